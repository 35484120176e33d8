"""Greedy parity with plain transformers for every tiny family, on a given device and dtype.

    python scripts/gpu_parity.py --device cuda --dtype bfloat16 [--tokens 12] [--out parity.json]
    python scripts/gpu_parity.py --compiled --device cuda --dtype float32 [--out compiled.json]

For each family of `lightvlm_core.tiny` (random-weight tiny models of real architectures) and each
case (an image, text only, two images) it compares the engine's greedy token ids with
`model.generate(do_sample=False)` on the same model, device and dtype. Prints one line per case
and exits 1 if any case differs (in bfloat16 a near-tie between two logits may flip the argmax
where the two implementations round differently: the line shows the first differing position).

With --compiled it checks the compiled decode step instead (compiled_decode.py): for the families it
applies to, the compiled engine's greedy tokens must equal the eager engine's, alone and in a ragged
batch of three, with and without token merging, with no graph compiled after the warm-up (on CUDA
with LIGHTVLM_CUDA_GRAPHS=1: replayed as CUDA graphs, and some replay must have run). Use
float32 there: the fused kernels reduce in another order, which bfloat16 near-ties would show.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch
from PIL import Image

from torch._dynamo.utils import counters

from lightvlm_core.warmup import warm_up
from lightvlm_core.engine import Engine, load_engine
from lightvlm_core.graphed_decode import GraphedDecode
from lightvlm_core.runner import load_runner
from lightvlm_core.tiny import FAMILIES, make_tiny
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams


def scene(w: int, h: int, color=(200, 30, 30)) -> Image.Image:
    img = Image.new("RGB", (w, h), (240, 240, 240))
    img.paste(color, (w // 4, h // 4, w // 2, h // 2))
    return img


CASES = {
    "image": ("What is in the image?", [scene(64, 48)]),
    "text-only": ("Tell me a story about a cat.", []),
    "two-images": ("Compare the two pictures.", [scene(64, 48), scene(40, 96, (30, 30, 200))]),
}


def hf_greedy(engine: Engine, prompt: str, images: list[Image.Image], n: int) -> list[int]:
    loaded = engine.loaded
    processor, model = loaded.processor, loaded.model
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=images or None, text=[text], return_tensors="pt").to(loaded.device)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(loaded.dtype)
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=n)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


COMPILED_FAMILIES = ("llava", "qwen2_vl", "qwen3_vl")  # plain RoPE, M-RoPE, q/k norms + DeepStack


def ragged_batch(n: int, preset: str) -> list[GenerationRequest]:
    """Three prompts of different lengths, two with an image of its own size."""
    sampling, accel = SamplingParams(max_new_tokens=n, ignore_eos=True), AccelerationConfig(preset)
    return [GenerationRequest("What is in the picture?", [scene(96, 64)], sampling, accel),
            GenerationRequest("Tell me a long story about a red square and a blue circle.", [], sampling, accel),
            GenerationRequest("Count.", [scene(64, 64, (30, 200, 30))], sampling, accel)]


def compiled_check(args: argparse.Namespace, tmp: str) -> list[dict]:
    """The compiled engine's tokens against the eager engine's, per family, preset and case."""
    results = []
    for family in [f for f in args.families if f in COMPILED_FAMILIES]:
        start = time.perf_counter()
        model = str(make_tiny(family, f"{tmp}/{family}"))
        eager = Engine(load_runner(model, device=args.device, dtype=args.dtype))
        runner = load_runner(model, device=args.device, dtype=args.dtype, compile=True)
        warm_up(runner)
        compiled, graphs = Engine(runner), counters["stats"]["unique_graphs"]
        print(f"{family:12s} compiled and warmed up in {time.perf_counter() - start:.1f}s", flush=True)
        for preset in ("none", "aggressive"):
            batch = ragged_batch(args.tokens, preset)
            cases = {"batch-of-3": batch, **{f"alone-{i}": [one] for i, one in enumerate(batch)}}
            for case, requests in cases.items():
                ours = [r.token_ids for r in compiled.generate(requests)]
                ref = [r.token_ids for r in eager.generate(requests)]
                diff = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
                where = None if diff is None else [diff, first_difference(ours[diff], ref[diff])]  # row, token
                results.append({"family": family, "case": f"{preset} {case}", "match": diff is None,
                                "first_difference": where, "ours": ours, "eager": ref})
                print(f"{family:12s} {preset:10s} {case:10s} {'MATCH' if diff is None else f'DIFFERS in row {diff}'}",
                      flush=True)
        new_graphs = counters["stats"]["unique_graphs"] - graphs
        step = runner.compiled_decode
        cuda_graphs = {"captures": step.captures, "replays": step.replays} if isinstance(step, GraphedDecode) else None
        inner = step.inner if isinstance(step, GraphedDecode) else step
        ran_compiled = not inner.failed and (cuda_graphs is None or (not step.failed and step.replays > 0))
        results.append({"family": family, "case": "compiled, no graph after warm-up",
                        "match": ran_compiled and new_graphs == 0, "new_graphs": new_graphs,
                        "compile_failed": not ran_compiled, "cuda_graphs": cuda_graphs})
        print(f"{family:12s} compiled step ran: {ran_compiled}; graphs compiled after warm-up: {new_graphs};"
              f" CUDA graphs: {cuda_graphs}  ({time.perf_counter() - start:.1f}s)", flush=True)
        del eager, compiled, runner
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--compiled", action="store_true",
                    help="compare the compiled decode step with the eager one instead of eager with transformers")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for family in [] if args.compiled else args.families:
            start = time.perf_counter()
            try:
                engine = load_engine(str(make_tiny(family, f"{tmp}/{family}")), device=args.device, dtype=args.dtype)
            except Exception as exc:  # e.g. a processor's missing dependency: report it, check the others
                failed += 1
                results.append({"family": family, "case": "load", "match": False, "error": repr(exc)})
                print(f"{family:12s} could not be loaded: {exc!r}", flush=True)
                continue
            for case, (prompt, images) in CASES.items():
                ref = hf_greedy(engine, prompt, images, args.tokens)
                ours = engine.generate([GenerationRequest(prompt, list(images),
                                                          SamplingParams(max_new_tokens=args.tokens))])[0].token_ids
                diff = first_difference(ours, ref)
                failed += diff is not None
                results.append({"family": family, "case": case, "match": diff is None, "first_difference": diff,
                                "ours": ours, "transformers": ref})
                print(f"{family:12s} {case:11s} {'MATCH' if diff is None else f'DIFFERS at token {diff}'}"
                      f"  ({len(ours)} tokens, {args.device} {args.dtype})", flush=True)
            print(f"{family:12s} done in {time.perf_counter() - start:.1f}s", flush=True)
            del engine
        if args.compiled:
            results = compiled_check(args, tmp)
            failed = sum(not r["match"] for r in results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": args.device, "dtype": args.dtype, "compiled": args.compiled, "results": results,
                       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}, f, indent=2)
    print(f"parity: {len(results) - failed}/{len(results)} cases match")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
