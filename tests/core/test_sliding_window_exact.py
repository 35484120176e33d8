"""Sliding-window layers stay exact after token reduction and KV eviction.

A key is visible to a query iff key_pos > query_pos - window in ORIGINAL positions (transformers'
sliding mask). The KV cache records each sliding-layer entry's position and carries it through
every move (grow, append, join, leave, copy, eviction), so decode's window has the holes that
reduction or eviction left, instead of reaching further back for the `window` latest entries.
Gemma 3 (5 sliding layers of 6) and Mistral 3 (every layer sliding), both at a window of 16: short
enough to cut the prompts, long enough to reach past Gemma's 11 template tokens after the last
image and past what a budget of 16 keeps of recent entries.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from PIL import Image

from lightvlm_core import decode_step, forward
from lightvlm_core.engine import Engine, load_engine
from lightvlm_core.forward import PrefillState
from lightvlm_core.kv.cache import BatchedKVCache
from lightvlm_core.kv.compress import KVCompressor, mark_decode_scoring
from lightvlm_core.kv.registry import kv_policy, kv_policy_names
from lightvlm_core.reduction.base import InLLMMethod, PreLLMMethod
from lightvlm_core.reduction.hook import ReductionHook
from lightvlm_core.prefill_batch import pad_batch
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams

WINDOW = 16
IMAGE_LAST = [{"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "image"}]}]


def scene(w: int, h: int, color=(200, 30, 30)) -> Image.Image:
    img = Image.new("RGB", (w, h), (235, 235, 235))
    img.paste(color, (w // 5, h // 5, w // 2, h // 2))
    return img


@pytest.fixture(scope="module", params=["gemma3", "mistral3"])
def engine(request, tiny_model_dir, tmp_path_factory) -> Engine:
    """The tiny model with its text config's sliding_window set (on every layer for Mistral)."""
    path = tmp_path_factory.mktemp(f"sw_{request.param}") / "m"
    shutil.copytree(tiny_model_dir(request.param), path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["sliding_window"] = WINDOW
    (path / "config.json").write_text(json.dumps(config))
    engine = load_engine(str(path), device="cpu")
    assert {s.window for s in engine.adapter.layer_specs if s.attention == "sliding"} == {WINDOW}
    return engine


# --- deterministic reductions: the same kept set whatever follows the prompt -------------------

@dataclass
class KeepFirstPre(PreLLMMethod):
    def reduce(self, feats, text, target):
        return torch.arange(target, device=feats.device), None, None


@dataclass
class KeepFirstIn(InLLMMethod):
    """Cuts before layers 1 and 3, keeping each image's first tokens (no attention needed)."""

    query: ClassVar[int | str] = 0

    def stages(self, num_layers):
        return ((1, 0.5), (3, self.keep_ratio))

    def choose(self, scores, h, target):
        return torch.arange(target, device=h.device)


@dataclass
class KeepFirstMerge(KeepFirstIn):
    merge: ClassVar[bool] = True
    merge_by: ClassVar[str] = "size"


METHODS = {"pre-drop": KeepFirstPre, "in-drop": KeepFirstIn, "in-merge": KeepFirstMerge}


def prompt_state(engine: Engine, request, extra: list[int]) -> PrefillState:
    """The prompt's prefill state, extended by the `extra` tokens (as text after the prompt)."""
    a = engine.adapter
    embeds, carry = a.embed_with_carry([request.prompt.prompt], engine.device, engine.loaded.dtype)
    state = pad_batch([request], embeds, a, engine.device, carry)
    if not extra:
        return state
    ids = torch.tensor(extra, device=engine.device)
    n = len(extra)
    pos = request.prompt.next_position + torch.arange(n, device=engine.device)
    return PrefillState(
        h=torch.cat([state.h, a.embed_tokens(ids)[None].to(state.h.dtype)], dim=1),
        valid=torch.cat([state.valid, torch.ones(1, n, dtype=torch.bool)], dim=1),
        pos=torch.cat([state.pos, (pos.expand(3, -1) if state.pos.dim() == 3 else pos)[..., None, :]], dim=-1),
        span=torch.cat([state.span, torch.full((1, n), -1)], dim=1),
        size=torch.cat([state.size, torch.ones(1, n)], dim=1),
        carry={k: torch.cat([c, c.new_zeros(1, n, *c.shape[2:])], dim=1) for k, c in state.carry.items()},
    )


def reduced_prefill(engine: Engine, request, extra: list[int], method):
    hook = ReductionHook(method, len(engine.adapter.layers), engine.adapter.scaling)
    h_last, cache, _ = forward.prefill(engine.adapter, prompt_state(engine, request, extra), hook)
    return forward.logits_for(engine.adapter, h_last), cache


def latest_entries_reach_outside_window(engine: Engine, cache: BatchedKVCache, query_pos: int) -> bool:
    """Whether the former rule (a row's `window` latest entries, the query's own included) shows
    a sliding layer an entry outside the window, i.e. reduction left holes inside the window."""
    for spec, pos, n in zip(engine.adapter.layer_specs, cache.positions, cache.lengths[:, 0].tolist()):
        if spec.attention == "sliding" and int(pos[0, 0, max(0, n - spec.window):n].min()) <= query_pos - spec.window:
            return True
    return False


@pytest.mark.parametrize("method", METHODS, ids=list(METHODS))
def test_decode_after_reduction_equals_prefill_of_the_longer_prompt(engine, method):
    """Each decode step's logits equal the last-token logits of a prefill of the prompt extended by
    the tokens decoded so far, under the same reduction (whose prefill mask is position-exact)."""
    a = engine.adapter
    # the image last, so that the windows of the decode queries reach into its dropped tokens
    request = engine.prepare(GenerationRequest("Describe", [scene(96, 64)], SamplingParams(max_new_tokens=4),
                                               messages=IMAGE_LAST))
    reduce = METHODS[method](keep_ratio=0.25)
    logits, cache = reduced_prefill(engine, request, [], reduce)
    start = request.prompt.next_position
    tokens, holes = [], False
    for step in range(4):
        token = int(logits.argmax(-1))
        tokens.append(token)
        logits = decode_step.decode(a, cache, torch.tensor([token]), torch.tensor([start + step]))
        expected, _ = reduced_prefill(engine, request, tokens, reduce)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4, msg=f"step {step}")
        holes |= latest_entries_reach_outside_window(engine, cache, start + step)
    assert holes  # the reduction really left holes inside the window the decode queries saw


def test_greedy_parity_with_transformers_at_a_small_window(engine):
    """Acceleration off, a window shorter than the prompts still gives transformers' tokens."""
    from test_engine import hf_greedy, run

    for prompt, images in [("What is in the image?", [scene(64, 48)]), ("Tell me a story about a cat.", [])]:
        assert run(engine, prompt, images, 12).token_ids == hf_greedy(engine, prompt, images, 12)


# --- KV eviction ----------------------------------------------------------------------------------

class MaskSpy:
    """Records, per decode layer, which entries each KV head's attention may see: (H_kv, S) bool."""

    def __init__(self, monkeypatch, groups: int) -> None:
        self.groups = groups
        self.masks: list[torch.Tensor] = []
        sdpa, score = forward.F.scaled_dot_product_attention, decode_step.attend_and_score

        def spy_sdpa(q, k, v, attn_mask=None, **kw):
            if attn_mask is None:  # no mask: every entry is visible
                attn_mask = torch.ones(1, 1, 1, k.shape[2], dtype=torch.bool)
            m = attn_mask[0, :, 0]  # (H or 1, S)
            self.masks.append(m.expand(q.shape[1], -1)[:: self.groups])
            return sdpa(q, k, v, attn_mask=attn_mask, **kw)

        def spy_score(q, keys, values, mask, *args, **kw):
            m = mask[0] if mask.dim() == 3 else mask[0][None]  # (H_kv or 1, S)
            self.masks.append(m.expand(keys.shape[1], -1))
            return score(q, keys, values, mask, *args, **kw)

        monkeypatch.setattr(forward.F, "scaled_dot_product_attention", spy_sdpa)
        monkeypatch.setattr(decode_step, "attend_and_score", spy_score)


def follow_eviction(before: torch.Tensor, after: torch.Tensor, tracked: torch.Tensor) -> torch.Tensor:
    """Positions of the entries that stayed, found by matching each kept key (H_kv, n', D) to the
    one key it was before compaction (H_kv, n, D); tracked: (H_kv, n) positions before."""
    same = (after[:, :, None, :] == before[:, None, :, :]).all(dim=-1)  # (H_kv, n', n)
    assert bool((same.sum(dim=-1) == 1).all()), "every kept entry is one earlier entry"
    return tracked.gather(1, same.int().argmax(dim=-1))


@pytest.mark.parametrize("policy", kv_policy_names())
def test_sliding_layers_never_see_entries_outside_the_window_after_eviction(engine, policy, monkeypatch):
    """With a budget of 16 (recent window 4, shorter than the model's), eviction leaves holes inside the
    window: each sliding layer must see exactly its kept entries whose original position is within
    the window, global layers every kept entry. Positions are followed here independently of the
    cache (by matching keys across each compaction)."""
    a, budget = engine.adapter, 16
    request = engine.prepare(GenerationRequest("What is shown?", [scene(64, 48)], SamplingParams(max_new_tokens=12)))
    h_last, cache, _ = forward.prefill(a, prompt_state(engine, request, []), None,
                                       kv_scores=kv_policy(policy).needs_prefill_scores)
    mark_decode_scoring(cache, [budget], [policy])
    n0 = int(request.prompt.positions.shape[-1])
    tracked = [request.prompt.positions.reshape(-1, n0)[0].expand(a.num_kv_heads, -1) for _ in a.layers]
    spy, compressor = MaskSpy(monkeypatch, a.num_heads // a.num_kv_heads), KVCompressor()
    token, start, holes = int(forward.logits_for(a, h_last).argmax(-1)), request.prompt.next_position, False
    for step in range(12):
        q = start + step
        spy.masks.clear()
        logits = decode_step.decode(a, cache, torch.tensor([token]), torch.tensor([q]))
        tracked = [torch.cat([t, torch.full((a.num_kv_heads, 1), q)], dim=1) for t in tracked]
        assert len(spy.masks) == len(a.layers)
        for spec, seen, pos in zip(a.layer_specs, spy.masks, tracked):
            visible = pos > q - spec.window if spec.attention == "sliding" else torch.ones_like(pos, dtype=torch.bool)
            assert torch.equal(seen[:, : pos.shape[1]], visible), (step, spec)
            assert not seen[:, pos.shape[1]:].any()
            if spec.attention == "sliding":
                holes |= bool((pos[:, -spec.window:] <= q - spec.window).any())
        before = [k[0].clone() for k in cache.keys]
        compressor.after_step(cache, [budget], [policy])
        tracked = [follow_eviction(b[:, : t.shape[1]], k[0, :, :n], t)
                   for b, k, t, n in zip(before, cache.keys, tracked, cache.lengths[:, 0].tolist())]
        token = int(logits.argmax(-1))
    assert compressor.evicted_total > 0 and holes
    for spec, pos, mine in zip(a.layer_specs, cache.positions, tracked):  # the cache agrees
        assert pos is None if spec.attention == "global" else torch.equal(pos[0, :, : mine.shape[1]].long(), mine)


# --- the cache's bookkeeping ------------------------------------------------------------------------

def coded_cache(lengths: list[int], heads: int = 2, first: int = 0) -> BatchedKVCache:
    """One layer kept with positions, one without; each key's first feature is its position."""
    b, s = len(lengths), max(lengths)
    pos = (first + torch.arange(s)).repeat(b, heads, 1).int()
    keys = [pos[..., None].float().expand(-1, -1, -1, 4).clone() for _ in range(2)]
    values = [k.clone() for k in keys]
    return BatchedKVCache(keys, values, torch.tensor([lengths, lengths]), [pos.clone(), None])


def assert_positions_follow_keys(cache: BatchedKVCache) -> None:
    assert cache.positions[1] is None
    for b, n in enumerate(cache.lengths[0].tolist()):
        assert torch.equal(cache.positions[0][b, :, :n].float(), cache.keys[0][b, :, :n, 0])


def test_positions_move_with_their_entries_through_every_cache_operation():
    """Join, grow, append, per-head eviction, copy, leave: every entry keeps its position."""
    torch.manual_seed(0)
    cache = BatchedKVCache.empty(2, 2, 4, torch.float32, torch.device("cpu"))
    cache.extend(coded_cache([30, 12]))
    cache.extend(coded_cache([20], first=100))
    cache.enable_scores()
    assert_positions_follow_keys(cache)
    for _ in range(40):  # grow past every buffer, evicting rows 0 and 2 along the way
        cache.reserve(1)
        new = (cache.lengths[0] + torch.tensor([0, 0, 100])).int()
        kv = new[:, None, None].float().expand(-1, 2, 4)
        for layer in range(2):
            cache.append(layer, kv, kv, new)
            cache.scores[layer].uniform_()  # each KV head ranks its entries differently
        KVCompressor().after_step(cache, [16, None, 24], ["heavy_hitter", None, "streaming"])
        assert_positions_follow_keys(cache)
    held = cache.lengths[0].tolist()
    assert held[0] < 16 and held[1] == 52 and held[2] < 24  # rows 0 and 2 were compacted
    assert not torch.equal(cache.positions[0][0, 0], cache.positions[0][0, 1])  # heads kept different entries
    alone = cache.copy_rows([2])
    assert_positions_follow_keys(alone)
    cache.select([2, 0])
    assert_positions_follow_keys(cache)
    n = int(alone.lengths[0, 0])
    assert torch.equal(cache.positions[0][0, :, :n], alone.positions[0][0, :, :n])


# --- batching ---------------------------------------------------------------------------------------

def test_batched_rows_with_reduction_and_eviction_equal_rows_alone(engine):
    def req(prompt, images, n, **accel):
        return GenerationRequest(prompt, images, SamplingParams(max_new_tokens=n, ignore_eos=True),
                                 AccelerationConfig(**accel))

    rows = [req("What is shown?", [scene(64, 48)], 14, preset="balanced", kv_budget=16),
            req("Compare both images", [scene(96, 40), scene(40, 80)], 10, preset="balanced"),
            req("Describe", [scene(160, 120)], 16, preset="balanced", kv_budget=20, kv_policy="streaming"),
            req("Tell me a story about a cat.", [], 12, kv_budget=16, kv_policy="snapkv")]
    together = [r.token_ids for r in engine.generate(rows)]
    assert together == [engine.generate([r])[0].token_ids for r in rows]
