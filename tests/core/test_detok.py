"""Incremental detokenisation: multi-byte characters, word joining, stop strings."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from lightvlm_core.detok import IncrementalDetokenizer

TEXT = "héllo wörld 你好 🙂 done. Über-naïve café ☕!"


@pytest.fixture(scope="module", params=["qwen2_vl", "llava"])
def tokenizer(request, tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir(request.param))


def stream(tokenizer, ids, stop=()):
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = []
    for i in ids:
        pieces.append(detok.add(i))
        if detok.stopped:
            break
    pieces.append(detok.finish())
    return pieces


def test_pieces_never_split_a_character_and_concatenate_to_the_full_text(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT.split())  # byte-level: characters span several tokens
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("stop", ["wörld", "🙂", "done.", "ld 你"])
def test_stop_strings_cut_the_text_and_are_never_streamed(tokenizer, stop):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces = stream(tokenizer, ids, stop=(stop, "never-there"))
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == full[: full.index(stop)]


def test_no_stop_match_streams_everything(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert "".join(stream(tokenizer, ids, stop=("zzz",))) == tokenizer.decode(ids, skip_special_tokens=True)
