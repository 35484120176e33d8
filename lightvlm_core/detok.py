"""Incremental detokenisation and stop-string handling for streaming.

Decoding token by token breaks multi-byte characters (a byte-level BPE token may hold half of
an emoji) and word-joining rules (some tokenizers add spaces between words at decode time). So
each step decodes a short window of recent tokens twice, with and without the new ones, and
emits only the new suffix once it no longer ends in a partial character (U+FFFD).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: decoded for context only
        self.read_offset = 0  # tokens before this are already in self.text
        self.text = ""  # all decoded text so far
        self.stop = stop
        self.emitted = 0  # chars of self.text already streamed
        self.hold = max((len(s) for s in stop), default=1) - 1  # chars that may still start a stop string
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Add one token; return the text that can be streamed now ("" if none yet)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self.text += full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what is left at the end of the generation."""
        if self.read_offset < len(self.ids) and not self.stopped:
            tail = self._decode(self.ids[self.prefix_offset:])
            self.text += tail[len(self._decode(self.ids[self.prefix_offset:self.read_offset])):]
            self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop and not self.stopped:
            hits = [i for i in (self.text.find(s, max(0, self.emitted - self.hold)) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
        end = len(self.text) if (final or self.stopped or not self.stop) else max(self.emitted,
                                                                                   len(self.text) - self.hold)
        piece = self.text[self.emitted:end]
        self.emitted = end
        return piece
