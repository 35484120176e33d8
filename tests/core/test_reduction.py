"""LightVLM pyramid merging: merge arithmetic, exact counts, schedules, validation, the overlay."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lightvlm_core.engine import Engine, load_engine
from lightvlm_core.errors import InvalidRequestError
from lightvlm_core.forward import PrefillState
from lightvlm_core.reduction import method_for, resolve_acceleration
from lightvlm_core.reduction.hook import ReductionHook
from lightvlm_core.reduction.lightvlm import LightVLM
from lightvlm_core.reduction.merger import merge_into
from lightvlm_core.tiny import FAMILIES
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams

# --- unit: merge arithmetic, selection, positions ---------------------------------------------------


def make_state(spans: list[list[int]], d: int = 8, seed: int = 0) -> PrefillState:
    """One row per entry of `spans` (span id per token, -1 = text); positions are 10 * index."""
    gen = torch.Generator().manual_seed(seed)
    t = max(len(s) for s in spans)
    span = torch.full((len(spans), t), -1)
    valid = torch.zeros(len(spans), t, dtype=torch.bool)
    for row, s in enumerate(spans):
        span[row, : len(s)] = torch.tensor(s)
        valid[row, : len(s)] = True
    pos = (torch.arange(t) * 10).expand(len(spans), -1).clone()
    return PrefillState(h=torch.randn(len(spans), t, d, generator=gen), valid=valid, pos=pos, span=span,
                        size=torch.ones(len(spans), t))


def test_merge_into_is_a_size_and_importance_weighted_average():
    state = make_state([[0, 0, 0, 0]], d=2)
    state.h[0] = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    state.size[0] = torch.tensor([1.0, 2.0, 1.0, 3.0])
    importance = torch.tensor([0.5, 0.25, 0.5, 0.1])
    before = state.h[0].clone()
    merge_into(state, 0, src=torch.tensor([1, 3]), dst=torch.tensor([0, 2]), importance=importance)
    w = state.size.new_tensor([1.0, 2.0, 1.0, 3.0]) * (importance + 1e-6)
    expect0 = (before[0] * w[0] + before[1] * w[1]) / (w[0] + w[1])  # token 1 is most similar to 0
    expect2 = (before[2] * w[2] + before[3] * w[3]) / (w[2] + w[3])
    assert torch.allclose(state.h[0, 0], expect0) and torch.allclose(state.h[0, 2], expect2)
    assert state.size[0, 0] == 3 and state.size[0, 2] == 4  # sizes add up


def test_cut_keeps_exact_counts_per_span_text_and_original_positions():
    spans = [[-1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -1, 1, 1, 1, 1, -1, -1], [-1, -1, 0, 0, 0, 0, 0, -1]]
    state = make_state(spans)
    merger = ReductionHook(LightVLM(keep_ratio=0.25, schedule=((1, 0.5), (2, 0.25))), num_layers=4, scaling=1.0)
    merger.before_layer(0, state)  # records original span sizes
    merger.importance = torch.rand(state.valid.shape, generator=torch.Generator().manual_seed(1))
    total_size = state.size[state.valid].sum()
    out = merger.before_layer(1, state)
    # span sizes 10, 4 | 5  ->  keep round(0.5 * n) = 5, 2 | 2 (3 text in row 0, 3 text in row 1)
    assert out.valid.sum(dim=1).tolist() == [4 + 5 + 2, 3 + 2]
    assert merger.stage_counts == [[7, 2]]
    kept_cells = (out.pos[1, out.valid[1] & (out.span[1] == 0)] // 10 - 2).tolist()  # span 0 starts at 2
    assert [(p.stage, p.layer, p.grid, p.indices) for p in merger.kept_patches(1)] == [(1, 1, (1, 5), kept_cells)]
    for row in range(2):
        kept_pos = out.pos[row, out.valid[row]]
        assert torch.all(kept_pos[1:] > kept_pos[:-1])  # original order, original ids
        assert set((kept_pos // 10).tolist()) >= {i for i, s in enumerate(spans[row]) if s < 0}
    assert torch.isclose(out.size[out.valid].sum(), total_size)  # merging conserves size
    merger.importance = torch.rand(out.valid.shape)
    merger.before_layer(2, out)
    assert merger.stage_counts[-1] == [round(0.25 * 10) + round(0.25 * 4), 1]  # min 1 per span


def stages_of(accel: AccelerationConfig, num_layers: int):
    method = method_for(accel)
    return None if method is None else method.stages(num_layers)


def test_plans_and_validation():
    assert method_for(AccelerationConfig("none")) is None
    assert method_for(AccelerationConfig("none", keep_ratio=1.0)) is None
    assert method_for(AccelerationConfig("cdpruner", keep_ratio=1.0)) is None
    aggressive = stages_of(AccelerationConfig("aggressive"), 32)
    assert aggressive[-1][1] == pytest.approx(0.03) and [layer for layer, _ in aggressive] == [2, 4, 8]
    assert stages_of(AccelerationConfig("light", keep_ratio=0.2), 32)[-1][1] == pytest.approx(0.2)
    assert stages_of(AccelerationConfig("fastv", keep_ratio=0.1), 32) == ((2, 0.1),)
    pdrop = stages_of(AccelerationConfig("pdrop", keep_ratio=0.125), 32)
    assert [layer for layer, _ in pdrop] == [8, 16, 24] and [k for _, k in pdrop] == pytest.approx([0.5, 0.25, 0.125])
    assert stages_of(AccelerationConfig(schedule=((0.1, 0.5), (0.5, 0.05))), 24) == ((2, 0.5), (12, 0.05))
    assert stages_of(AccelerationConfig("aggressive"), 2) == ((1, 0.03),)  # too shallow: one cut, same final keep
    for bad in [AccelerationConfig("none", keep_ratio=0), AccelerationConfig(schedule=((4, 0.5), (2, 0.1))),
                AccelerationConfig(schedule=((2, 0.1), (4, 0.5))), AccelerationConfig("nope"),
                AccelerationConfig(kv_budget=64, kv_policy="nope")]:
        with pytest.raises(InvalidRequestError):
            resolve_acceleration(bad)
    with pytest.raises(InvalidRequestError, match="cdpruner"):  # the message lists the valid names
        resolve_acceleration(AccelerationConfig("nope"))


# --- engine level: every family ---------------------------------------------------------------------


@pytest.fixture(scope="module", params=FAMILIES)
def engine(request, tiny_model_dir) -> Engine:
    return load_engine(str(tiny_model_dir(request.param)), device="cpu")


def scene(w, h, color):
    img = Image.new("RGB", (w, h), (235, 235, 235))
    img.paste(color, (w // 5, h // 5, w // 2, h // 2))
    return img


REQUESTS = [
    ("What is shown?", [scene(64, 48, (200, 30, 30))]),
    ("Compare both images", [scene(96, 40, (30, 30, 200)), scene(40, 80, (30, 200, 30))]),
    ("Describe", [scene(160, 120, (200, 200, 30))]),
]


def test_each_image_span_keeps_its_own_budget(engine):
    request = GenerationRequest(*REQUESTS[1], SamplingParams(max_new_tokens=2), AccelerationConfig("balanced"))
    prepared = engine.prepare(request)
    spans = engine.adapter.image_spans(prepared.prompt.input_ids)
    assert len(spans) >= 2  # one span per image (or per tile group, e.g. Idefics3)
    result = engine.generate([request])[0]
    assert result.usage.image_tokens_kept == sum(max(1, round(0.1 * (e - s))) for s, e in spans)


@pytest.mark.parametrize("preset", ["aggressive", "cdpruner"])
def test_kept_patches_report_every_stage_of_every_image(engine, preset):
    request = GenerationRequest(*REQUESTS[1], SamplingParams(max_new_tokens=2), AccelerationConfig(preset, 0.1))
    request.return_kept_patches = True
    spans = engine.adapter.image_spans(engine.prepare(request).prompt.input_ids)
    done = [out.done for out in engine.stream(request) if out.done][0]
    report = done.kept_patches
    num_cuts = len(method_for(AccelerationConfig(preset, 0.1)).stages(len(engine.adapter.layers))) \
        if preset != "cdpruner" else 0
    stages = sorted({p.stage for p in report})
    assert stages == ([0] if preset == "cdpruner" else list(range(1, num_cuts + 1)))
    for patch in report:
        n = spans[patch.image][1] - spans[patch.image][0]
        assert patch.grid[0] * patch.grid[1] == n
        assert patch.indices == sorted(set(patch.indices)) and all(0 <= i < n for i in patch.indices)
    final = [p for p in report if p.stage == stages[-1]]
    assert [len(p.indices) for p in final] == [max(1, round(0.1 * (e - s))) for s, e in spans]


def test_greedy_dpp_returns_exactly_target_distinct_tokens_when_the_kernel_rank_runs_out():
    from lightvlm_core.reduction.cdpruner import greedy_dpp_map

    feats = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))  # rank 4
    unit = torch.nn.functional.normalize(feats, dim=-1)
    picked = greedy_dpp_map(unit @ unit.T, 20)
    assert len(set(picked.tolist())) == 20


def test_diverse_topk_picks_greedily_by_importance_times_novelty() -> None:
    """The NumPy loop picks exactly what the plain definition does (ties and duplicates included)."""
    import torch.nn.functional as F

    from lightvlm_core.reduction.lightvlm import diverse_topk

    def reference(scores: torch.Tensor, h: torch.Tensor, target: int) -> list[int]:
        unit = F.normalize(h.float(), dim=-1)
        cosine = unit @ unit.T
        weight = scores.float().clamp(min=0) + 1e-9
        novelty, chosen = torch.ones_like(weight), []
        for _ in range(target):
            gain = weight * novelty
            gain[chosen] = -1.0
            chosen.append(int(gain.argmax()))
            novelty = torch.minimum(novelty, (1 - cosine[chosen[-1]]).clamp(min=0))
        return chosen

    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        h, scores = torch.randn(90, 32, generator=g), torch.rand(90, generator=g) - 0.1
        h[10:30] = h[10]  # duplicates: novelty 0 after the first is taken
        for target in (1, 7, 45, 90):
            picks = diverse_topk(scores, h, target).tolist()
            assert picks == reference(scores, h, target)
            assert len(set(picks)) == target  # never the same token twice


def test_the_greedy_kernel_picks_what_the_numpy_loop_does() -> None:
    """Ties (duplicate tokens, equal scores) and every target up to all tokens; bad input is refused."""
    from lightvlm_core.reduction import lightvlm

    if not lightvlm._greedy_kernel_ready():
        pytest.skip("the C++ kernels are not built here")
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        tokens = (5, 90, 784)[seed % 3]
        unit = torch.nn.functional.normalize(torch.randn(tokens, 16, generator=g), dim=-1)
        unit[1:tokens // 3] = unit[1]
        distinct = (1 - unit @ unit.T).clamp(min=0)
        weight = torch.rand(tokens, generator=g).clamp(min=0.2) + 1e-9
        weight[::4] = weight[0]
        for target in (0, 1, tokens // 2, tokens):
            got = torch.ops.lightvlm.diverse_topk(distinct, weight, target).tolist()
            assert got == lightvlm.greedy_picks(distinct.numpy(), weight.numpy(), target)
    with pytest.raises(RuntimeError, match="target"):
        torch.ops.lightvlm.diverse_topk(distinct, weight, tokens + 1)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.lightvlm.diverse_topk(distinct.double(), weight.double(), 1)
