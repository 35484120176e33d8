"""The decode step replayed as a CUDA graph: one launch for the whole step instead of ~35 per layer.

Why: on an H200 (gpu-8b profile, InternVL2.5-8B shapes, bf16, batch 1) the eager step took ~18 ms
and the inductor-compiled one ~16 ms against a 3.7 ms memory-bandwidth bound: the GPU waits for
the host to launch kernels, which a graph replay does not.

A graph replays fixed addresses and shapes, so the captured step differs from the eager one in how
it attends: each layer attends over its whole buffer (the cache grows capacity a quarter at a time)
under a key mask built on the device from the row lengths, and appends at positions read on the
device; no span is read on the host. The step's inputs (hidden state, rotary tables) are copied
into the graph's own buffers before each replay.

A graph is kept per cache layout: the batch size and every buffer's address and shape. Rows joining
or leaving, or a buffer growing, make a new layout; it is captured once it has held for two steps in
a row (a layout that changes every step is never worth a capture), and the steps before that run
as the inner step (compiled or eager) would. Sliding-window layers and KV policies that read
decode-time scores run eagerly.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightvlm_core import decode_step, forward
from lightvlm_core.kv.cache import BatchedKVCache
from lightvlm_core.models.base import LayerSpec, ModelAdapter

log = logging.getLogger(__name__)

MAX_GRAPHS = 4  # layouts kept; each holds its own activations (small at decode) until evicted


def full_capacity_layers(adapter: ModelAdapter, cache: BatchedKVCache, h: torch.Tensor,
                         ropes: dict[str | None, forward.RopeTables], rows: torch.Tensor,
                         slots: list[torch.Tensor]) -> torch.Tensor:
    """`decode_step.decode_layers` with an attention that reads no value on the host (what a graph can
    replay): layer i appends at `cache.lengths[i]` and attends over the whole buffer, entries at or
    beyond each row's new length masked out. rows: arange(B); slots[i]: arange(capacity of layer i).
    Returns logits (B, V) and advances the lengths, as the eager step does."""
    def attend(i: int, spec: LayerSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values, pos = cache.keys[i], cache.values[i], cache.lengths[i]
        keys[rows, :, pos] = k[:, :, 0]
        values[rows, :, pos] = v[:, :, 0]
        pos.add_(1)
        mask = slots[i][None, :] < pos[:, None]  # (B, S_cap)
        batch, heads, _, dim = q.shape
        grouped = q.reshape(batch, keys.shape[1], heads // keys.shape[1], dim)  # one query per row: group the heads
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask[:, None, None, :],
                                             scale=adapter.scaling)
        return out.reshape(batch, heads, 1, dim)

    return decode_step.decode_layers(adapter, h, ropes, attend)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    h: torch.Tensor
    ropes: dict[str | None, forward.RopeTables]
    logits: torch.Tensor
    keep: tuple  # the rows and slots index tensors the graph reads


class GraphedDecode:
    """`decode_step.CompiledLayers` as CUDA graphs, with `inner` (the compiled step, or None: eager) for
    the steps no graph covers."""

    def __init__(self, adapter: ModelAdapter, inner: decode_step.CompiledLayers | None = None) -> None:
        self.inner = inner
        self._sliding = any(spec.attention == "sliding" for spec in adapter.layer_specs)
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._pending: tuple | None = None  # a layout seen once: captured if the next step has it too
        self.failed = False  # a capture failed once: the inner step from then on
        self.captures = 0
        self.replays = 0

    def _graphs_apply(self, cache: BatchedKVCache) -> bool:
        return not (self.failed or self._sliding) and cache.scores is None and cache.lengths.is_cuda

    def applies(self, adapter: ModelAdapter, cache: BatchedKVCache) -> bool:
        return self._graphs_apply(cache) or (self.inner is not None and self.inner.applies(adapter, cache))

    def __call__(self, adapter: ModelAdapter, cache: BatchedKVCache, h: torch.Tensor,
                 ropes: dict[str | None, forward.RopeTables]) -> torch.Tensor | None:
        if not self._graphs_apply(cache):
            return self._inner(adapter, cache, h, ropes)
        key = _layout(cache, h, ropes)
        graph = self._graphs.get(key)
        if graph is None and key == self._pending:
            graph = self._capture(adapter, cache, h, ropes, key)
        if graph is None:
            self._pending = key
            return self._inner(adapter, cache, h, ropes)
        self._graphs.move_to_end(key)
        graph.h.copy_(h)
        for kind, rope in ropes.items():
            graph.ropes[kind].cos.copy_(rope.cos)
            graph.ropes[kind].signed_sin.copy_(rope.signed_sin)
        graph.graph.replay()
        self.replays += 1
        return graph.logits.clone()  # the graph's buffer is overwritten by the next replay

    def _inner(self, adapter, cache, h, ropes) -> torch.Tensor | None:
        if self.inner is not None and self.inner.applies(adapter, cache):
            return self.inner(adapter, cache, h, ropes)
        return None  # the eager step

    def _capture(self, adapter: ModelAdapter, cache: BatchedKVCache, h: torch.Tensor,
                 ropes: dict[str | None, forward.RopeTables], key: tuple) -> _Graph | None:
        """Capture this step's layers for the cache's current layout. A warm-up run first (on a side
        stream, as capture requires; it sets up the libraries' workspaces), its appends undone by
        restoring the lengths (the entries it wrote are overwritten by the step proper)."""
        static_h = h.clone()
        static_ropes = {kind: forward.RopeTables(r.cos.clone(), r.signed_sin.clone()) for kind, r in ropes.items()}
        rows = torch.arange(h.shape[0], device=h.device)
        slots = [torch.arange(k.shape[2], device=h.device) for k in cache.keys]
        lengths = cache.lengths.clone()
        try:
            side = torch.cuda.Stream(h.device)
            side.wait_stream(torch.cuda.current_stream(h.device))
            with torch.cuda.stream(side):
                full_capacity_layers(adapter, cache, static_h, static_ropes, rows, slots)
            torch.cuda.current_stream(h.device).wait_stream(side)
            cache.lengths.copy_(lengths)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = full_capacity_layers(adapter, cache, static_h, static_ropes, rows, slots)
        except RuntimeError as exc:  # e.g. an op that cannot be captured; nothing was replayed
            cache.lengths.copy_(lengths)
            log.warning("the decode step could not be captured as a CUDA graph; it runs without from now on: %s",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            self.failed = True
            return None
        self.captures += 1
        self._graphs[key] = _Graph(graph, static_h, static_ropes, logits, (rows, slots))
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return self._graphs[key]


def _layout(cache: BatchedKVCache, h: torch.Tensor, ropes: dict[str | None, forward.RopeTables]) -> tuple:
    """What a captured graph depends on: every buffer's address, shape and strides (the lengths
    included), the batch, and the inputs' shapes and dtype."""
    buffers = [*cache.keys, *cache.values, cache.lengths]
    return (tuple((b.data_ptr(), tuple(b.shape), b.stride()) for b in buffers), tuple(h.shape), h.dtype,
            tuple((kind, tuple(r.cos.shape)) for kind, r in ropes.items()))
