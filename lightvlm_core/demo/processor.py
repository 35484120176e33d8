"""Closed-vocabulary tokenizer, chat template and LlavaProcessor for the shapes demo."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

from .scenes import COLOR_NAMES, MODEL_SIZE, NUMBERS, SHAPES

PATCH_SIZE = 7
GRID = MODEL_SIZE // PATCH_SIZE  # 16 patches a side
IMAGE_SEQ_LEN = GRID**2  # 256

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<|user|>", "<|assistant|>"]
WORDS = (
    ["what", "color", "is", "the", "how", "many", "are", "there", "a", "shape", "object",
     "describe", "image", "and", "yes", "no", "?", ".", ","]
    + COLOR_NAMES + SHAPES + [s + "s" for s in SHAPES] + NUMBERS
)
VOCAB = SPECIALS + WORDS
PAD_ID, UNK_ID, BOS_ID, EOS_ID, IMAGE_ID, USER_ID, ASSISTANT_ID = range(7)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{% else %}<|assistant|>{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# CLIP normalisation constants (what CLIPImageProcessor uses by default).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "circle?" -> "circle", "?"
    # WordPiece decoder with cleanup: joins words with spaces and removes " ." / " ," / " ?"
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        model_input_names=["input_ids", "attention_mask"],
    )


def build_image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"height": MODEL_SIZE, "width": MODEL_SIZE},
        do_center_crop=False,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def build_processor() -> LlavaProcessor:
    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
    )


_WORD_TO_ID = {w: i for i, w in enumerate(VOCAB)}


def encode_words(text: str) -> list[int]:
    """Fast pure-python encoding equal to the tokenizer's for in-vocabulary text."""
    out = []
    for w in text.lower().replace("?", " ?").replace(".", " .").replace(",", " ,").split():
        out.append(_WORD_TO_ID.get(w, UNK_ID))
    return out


def prompt_ids(question: str) -> list[int]:
    """Ids of the generation prompt, as the processor builds them (image expanded)."""
    return [BOS_ID, USER_ID] + [IMAGE_ID] * IMAGE_SEQ_LEN + encode_words(question) + [ASSISTANT_ID]


def messages(question: str) -> list:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
