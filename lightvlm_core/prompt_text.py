"""Client text never becomes control tokens: only the chat template may produce them.

A chat template is rendered to one string and tokenised as a whole, so `</s>` or `<|im_start|>`
typed by a client would become the real control token (a forged turn, or an image placeholder with
no image). A text part that holds the spelling of a special token is therefore rendered as a *slot*
(a special token the rendered prompt does not use); after processing, each slot is replaced by that
text tokenised as text. Every other prompt takes the plain path and tokenises exactly as
transformers does.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightvlm_core.errors import InvalidRequestError

# Keys of a processor's output with one value per prompt token, and the value of a text token.
_TEXT_TOKEN_VALUE = {"attention_mask": 1}  # token_type_ids, mm_token_type_ids, ...: 0 (text)


@dataclass(frozen=True)
class TakenTexts:
    """The texts taken out of the messages, in order, and the markers that stand in for them."""

    texts: tuple[str, ...] = ()
    markers: tuple[str, ...] = ()


class TextGuard:
    def __init__(self, tokenizer, image_token_id: int | None) -> None:
        self.tokenizer = tokenizer
        specials = {i: t for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self._spellings = tuple(t.content for t in specials.values())
        # A slot must tokenise as itself and leave its neighbours alone (no lstrip/rstrip); the
        # unknown and padding tokens are the least likely to mean anything to a processor.
        preferred = [tokenizer.unk_token_id, tokenizer.pad_token_id]
        order = sorted(specials, key=lambda i: (preferred.index(i) if i in preferred else len(preferred), i))
        self._slots = [(i, specials[i].content) for i in order
                       if i != image_token_id and not specials[i].lstrip and not specials[i].rstrip]

    def holds_control_tokens(self, text: str) -> bool:
        return any(spelling in text for spelling in self._spellings)

    def take_texts(self, messages: list[dict]) -> tuple[list[dict], TakenTexts]:
        """The messages with every text that holds a control token's spelling replaced by a marker."""
        nonce = secrets.token_hex(8)
        texts: list[str] = []
        markers: list[str] = []

        def take(text: str) -> str:
            if not self.holds_control_tokens(text):
                return text
            markers.append(f"\ue000{nonce}-{len(texts)}\ue001")
            texts.append(text)
            return markers[-1]

        out = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, str):
                message = {**message, "content": take(content)}
            elif isinstance(content, list):
                parts = [{**p, "text": take(p["text"])} if p.get("type") == "text" and isinstance(p.get("text"), str)
                         else p for p in content]
                message = {**message, "content": parts}
            out.append(message)
        return out, TakenTexts(tuple(texts), tuple(markers))

    def fill_slots(self, rendered: str, taken: TakenTexts) -> tuple[str, int]:
        """The rendered prompt with each marker replaced by a slot token; returns it and the slot's id."""
        if any(rendered.count(marker) != 1 for marker in taken.markers):
            raise InvalidRequestError("this model's chat template alters message text, so text that spells "
                                      "control tokens (such as '</s>') cannot be kept apart from them: remove them")
        slot = next(((i, s) for i, s in self._slots if s not in rendered), None)
        if slot is None:
            raise InvalidRequestError("text that spells this model's control tokens is not supported: remove them")
        for marker in taken.markers:
            rendered = rendered.replace(marker, slot[1])
        return rendered, slot[0]

    def splice(self, inputs: dict, slot_id: int, taken: TakenTexts) -> dict:
        """Replace each slot token in the processor's output by its text, tokenised as text."""
        ids = inputs["input_ids"][0]
        where = (ids == slot_id).nonzero().flatten().tolist()
        if len(where) != len(taken.texts):
            raise InvalidRequestError("could not keep text that spells control tokens apart from them: remove them")
        pieces = [self._as_text(text) for text in taken.texts]
        n = ids.shape[0]
        out = dict(inputs)
        for key, value in inputs.items():
            if not (isinstance(value, torch.Tensor) and value.shape == (1, n)):
                continue
            # the ids themselves, or for another per-token field the value of a text token
            values = pieces if key == "input_ids" else [[_TEXT_TOKEN_VALUE.get(key, 0)] * len(p) for p in pieces]
            out[key] = _spliced(value[0], where, values).unsqueeze(0)
        return out

    def _as_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _spliced(row: torch.Tensor, where: Sequence[int], pieces: Sequence[list[int]]) -> torch.Tensor:
    """`row` with the value at position where[k] replaced by the values pieces[k]."""
    chunks, start = [], 0
    for position, piece in zip(where, pieces):
        chunks += [row[start:position], torch.tensor(piece, dtype=row.dtype)]
        start = position + 1
    chunks.append(row[start:])
    return torch.cat(chunks)
