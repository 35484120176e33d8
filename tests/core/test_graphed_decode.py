"""The decode step as CUDA graphs replay it (lightvlm_core/graphed_decode.py), checked here on CPU:
the graph-safe layers (attention over each layer's whole buffer under a key mask built from the
lengths on the device, appends at device-side positions) give the eager step's greedy tokens and
cache; where no graph applies the step goes to the inner (compiled) step, or eager. The capture and
replay themselves need a GPU: scripts/gpu_parity.py --compiled checks them there."""

from __future__ import annotations

import torch
from PIL import Image

from lightvlm_core import decode_step
from lightvlm_core.compiling import cuda_graphs_enabled
from lightvlm_core.engine import Engine
from lightvlm_core.graphed_decode import GraphedDecode, full_capacity_layers
from lightvlm_core.runner import load_runner
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams


class FullCapacityStep:
    """The graph-safe layers run directly (what a capture records), counting its steps."""

    def __init__(self) -> None:
        self.steps = 0

    def applies(self, adapter, cache) -> bool:
        return True

    def __call__(self, adapter, cache, h, ropes) -> torch.Tensor:
        self.steps += 1
        rows = torch.arange(h.shape[0])
        return full_capacity_layers(adapter, cache, h, ropes, rows, [torch.arange(k.shape[2]) for k in cache.keys])


def ragged_batch(preset: str, n_tokens: int = 8) -> list[GenerationRequest]:
    image = Image.new("RGB", (96, 64), (200, 40, 40))
    sampling = SamplingParams(max_new_tokens=n_tokens, ignore_eos=True)
    accel = AccelerationConfig(preset)
    return [GenerationRequest("What is in the picture?", [image], sampling, accel),
            GenerationRequest("Tell me a long story about a red square and a blue circle.", [], sampling, accel),
            GenerationRequest("Count.", [image.resize((64, 64))], sampling, accel)]


def test_graph_safe_layers_give_the_eager_tokens_and_cache(tiny_model_dir) -> None:
    """Ragged rows (and, with `aggressive`, layers of different lengths): same tokens, and after
    the same steps the same lengths and the same cache entries."""
    for family in ("llava", "qwen3_vl"):
        model = str(tiny_model_dir(family))
        eager, graph_safe = load_runner(model, device="cpu"), load_runner(model, device="cpu")
        graph_safe.compiled_decode = step = FullCapacityStep()
        for preset in ("none", "aggressive"):
            batch = ragged_batch(preset)
            ours = [r.token_ids for r in Engine(graph_safe).generate(batch)]
            assert ours == [r.token_ids for r in Engine(eager).generate(batch)], (family, preset)
        assert step.steps >= 2 * 7  # every decode step of both batches went through it

        # one step from the same cache: equal logits, lengths and entries
        engines = Engine(eager), Engine(graph_safe)
        for engine in engines:
            engine.add([engine.prepare(r) for r in ragged_batch("aggressive")])
        caches = [engine.runner.cache for engine in engines]
        ids, pos = torch.tensor([5, 6, 7]), torch.tensor([40, 41, 42])
        logits = [decode_step.decode(e.runner.adapter, c, ids, pos, e.runner.compiled_decode)
                  for e, c in zip(engines, caches)]
        assert torch.allclose(logits[0], logits[1], atol=1e-5)
        assert torch.equal(caches[0].lengths, caches[1].lengths)
        for layer in range(caches[0].num_layers):
            for row, n in enumerate(caches[0].lengths[layer].tolist()):
                assert torch.allclose(caches[0].keys[layer][row, :, :n], caches[1].keys[layer][row, :, :n], atol=1e-5)
                assert torch.allclose(caches[0].values[layer][row, :, :n], caches[1].values[layer][row, :, :n], atol=1e-5)
        for engine in engines:
            engine.runner.remove_all()


class InnerStep:
    def __init__(self, applies: bool) -> None:
        self._applies, self.calls = applies, 0

    def applies(self, adapter, cache) -> bool:
        return self._applies

    def __call__(self, adapter, cache, h, ropes) -> torch.Tensor:
        self.calls += 1
        return torch.full((h.shape[0], 3), 7.0)


def test_without_a_cuda_cache_the_inner_step_runs_or_the_eager_one(tiny_model_dir) -> None:
    runner = load_runner(str(tiny_model_dir("llava")), device="cpu")
    cache, h = runner.cache, torch.zeros(2, 1, 8)
    inner = InnerStep(applies=True)
    graphs = GraphedDecode(runner.adapter, inner=inner)
    assert graphs.applies(runner.adapter, cache)  # the inner step's
    assert graphs(runner.adapter, cache, h, {}).eq(7.0).all() and inner.calls == 1
    assert graphs.captures == graphs.replays == 0
    declining = GraphedDecode(runner.adapter, inner=InnerStep(applies=False))
    assert not declining.applies(runner.adapter, cache)
    assert declining(runner.adapter, cache, h, {}) is None  # eager
    assert GraphedDecode(runner.adapter)(runner.adapter, cache, h, {}) is None


def test_cpu_runners_get_no_graphs_and_the_setting_reads_like_the_others(tiny_model_dir) -> None:
    runner = load_runner(str(tiny_model_dir("llava")), device="cpu", compile=True)
    assert runner.info()["compiled_decode"] and not runner.info()["cuda_graphs"]
    assert not isinstance(runner.compiled_decode, GraphedDecode)
    # off by default (not yet measured faster); on with the usual spellings
    assert not cuda_graphs_enabled({})
    assert all(cuda_graphs_enabled({"LIGHTVLM_CUDA_GRAPHS": v}) for v in ("1", "true", "On"))
    assert not any(cuda_graphs_enabled({"LIGHTVLM_CUDA_GRAPHS": v}) for v in ("0", "false", "off"))
