"""A decode step's rotary tables looked up by position instead of computed every step.

Why: each step's cos / signed sin for the rows' positions cost ~13 small ATen calls from Python
(the model's rotary module: a multiply, cat, cos, sin, the scaling, casts; then the signed sine),
and right after the previous step's layers have streamed the weights through the caches they run
cold: ~90 us of a 3.6 ms `cpu-small` batch-1 step, against 18 us for the same calls timed alone.
For the static rope types a row of the tables depends on its position only, so one table of every
position up to the longest seen, built once by the model's own rotary module, gives the step's
tables with two lookups. Built only where it gives exactly what the module gives: positions
spot-checked one by one against the module at every build; elsewhere (M-RoPE, dynamic scaling, a
family with its own `rotary`, a spot check that differs) the step computes them as before.
"""

from __future__ import annotations

import logging

import torch

from lightvlm_core.forward import RopeTables
from lightvlm_core.models.base import ModelAdapter

log = logging.getLogger(__name__)

# rope types whose tables are a function of the position alone (transformers' ROPE_INIT_FUNCTIONS;
# "dynamic" and "longrope" rescale with the sequence length)
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
FIRST_SIZE = 1024  # positions in the first table; it doubles as longer positions come


class RopeTable:
    """The rotary tables (cos, signed sin) of positions 0 .. len - 1 as rows (position, head_dim)."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.cos = self.signed_sin = torch.empty(0)
        self.failed = False  # a spot check differed: never used again

    @staticmethod
    def applies(adapter: ModelAdapter) -> bool:
        """CPU only (there the step's Python runs cold; on a GPU the lookup's maximum would also be
        a device sync per step), for the base adapter's rotary module of a static rope type."""
        return (adapter.model.device.type == "cpu" and not adapter.uses_mrope
                and type(adapter).rotary is ModelAdapter.rotary
                and all(spec.rope is None for spec in adapter.layer_specs)
                and getattr(adapter.rotary_emb, "rope_type", None) in STATIC_ROPE_TYPES)

    def lookup(self, h: torch.Tensor, pos: torch.Tensor) -> RopeTables | None:
        """The step's tables for positions `pos` (B,) of hidden states `h` (B, 1, d); None where the
        table cannot give them (the caller computes them)."""
        if self.failed:
            return None
        longest = int(pos.max())
        if longest >= self.cos.shape[0] and not self._grow(h, longest + 1):
            return None
        batch = pos.shape[0]
        return RopeTables(self.cos[pos].view(batch, 1, 1, -1), self.signed_sin[pos].view(batch, 1, 1, -1))

    def _grow(self, h: torch.Tensor, needed: int) -> bool:
        size = max(FIRST_SIZE, self.cos.shape[0])
        while size < needed:
            size *= 2
        positions = torch.arange(size, device=h.device)
        tables = RopeTables.build(*self.adapter.rotary(h[:1], positions[None], None))
        cos, signed_sin = tables.cos[0, 0].contiguous(), tables.signed_sin[0, 0].contiguous()
        for p in sorted({0, 1, size // 3, size - 1}):  # one at a time, as a step computes them
            one = RopeTables.build(*self.adapter.rotary(h[:1], positions[None, p:p + 1], None))
            if not (torch.equal(one.cos[0, 0, 0], cos[p]) and torch.equal(one.signed_sin[0, 0, 0], signed_sin[p])):
                log.warning("the rotary table differs from the model's rotary module at position %d; not used", p)
                self.failed = True
                return False
        self.cos, self.signed_sin = cos, signed_sin
        return True
