"""Decode step time of the working tree against an earlier commit, in one process.

    .venv/bin/python scripts/ab_decode_step.py --base aef09e6 --model cpu-small --batch 1 8
    .venv/bin/python scripts/ab_decode_step.py --base aef09e6 --model models/shapes-demo --batch 8 --max-new 200

Why one process: on a shared VM the machine's speed wanders by tens of percent between runs, so
two engines (the base commit's `lightvlm_core`, imported as `lightvlm_core_base` from a `git
archive` of it, and the working tree's) are built side by side, as `lightvlm serve` builds them
(compiled where LIGHTVLM_COMPILE says, warmed up), and step in alternating blocks of 10; the
medians of the `Engine.step` times are compared. `--model` is a bench profile name or a model
directory. Run it with the runtime environment of `lightvlm serve` (see README, "Runtime
environment").
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def base_package(rev: str, into: Path) -> str:
    """Unpack `rev`'s lightvlm_core as `lightvlm_core_base` under `into`; returns the name."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "lightvlm_core"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    package = into / "lightvlm_core_base"
    (into / "lightvlm_core").rename(package)
    for source in package.rglob("*.py"):
        text = re.sub(r"\blightvlm_core\b", "lightvlm_core_base", source.read_text())
        # custom ops are registered process-wide by name: the base's get a namespace of their own
        text = text.replace('"lightvlm::', '"lightvlmbase::').replace('Library("lightvlm"', 'Library("lightvlmbase"')
        text = text.replace('load("lightvlm_', 'load("lightvlmbase_')  # C++ extensions: a build of their own
        source.write_text(re.sub(r"torch\.ops\.lightvlm\b", "torch.ops.lightvlmbase", text))
    for source in package.rglob("*.cpp"):  # their kernels registered under the base's namespace
        text = source.read_text().replace("TORCH_LIBRARY_IMPL(lightvlm,", "TORCH_LIBRARY_IMPL(lightvlmbase,")
        source.write_text(text)
    return "lightvlm_core_base"


def engine_from(package: str, model: str):
    """(engine, image, types module) built with `package` as the service builds its engine."""
    def module(name: str):
        return importlib.import_module(f"{package}.{name}")

    profiles = module("bench.profiles")
    if model in profiles.PROFILES:
        profile = profiles.PROFILES[model]
        loaded, image = profiles.build(profile), profiles.bench_image(profile)
    else:
        from PIL import Image
        loaded = module("loading").load_model(model, "cpu", "float32")
        image = Image.new("RGB", (224, 224), "white")
    return module("engine").Engine(module("bench.common").service_runner(loaded)), image, module("types")


def step_times(engines: dict, batch: int, max_new: int, preset: str, blocks: int) -> dict[str, list[float]]:
    for engine, image, types in engines.values():
        requests = [types.GenerationRequest("Describe the image.", [image],
                                            types.SamplingParams(max_new_tokens=max_new, ignore_eos=True),
                                            types.AccelerationConfig(preset)) for _ in range(batch)]
        engine.add([engine.prepare(request) for request in requests])
        for _ in range(5):  # the first steps of a batch size may still compile
            engine.step()
    times: dict[str, list[float]] = {label: [] for label in engines}
    for _ in range(blocks):
        for label, (engine, _, _) in engines.items():
            for _ in range(10):
                start = time.perf_counter()
                engine.step()
                times[label].append(time.perf_counter() - start)
    for engine, _, _ in engines.values():
        engine.runner.remove_all()
        engine.scheduler.running.clear()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the commit to compare against")
    parser.add_argument("--model", default="cpu-small", help="a bench profile name or a model directory")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--preset", default="none")
    parser.add_argument("--max-new", type=int, default=2000, help="tokens per row (>= 5 + 10 x blocks)")
    parser.add_argument("--blocks", type=int, default=12, help="blocks of 10 steps per engine")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, tmp)
        sys.path.insert(0, str(ROOT))
        engines = {f"base {args.base}": engine_from(base_package(args.base, Path(tmp)), args.model),
                   "working tree": engine_from("lightvlm_core", args.model)}
        for batch in args.batch:
            times = step_times(engines, batch, args.max_new, args.preset, args.blocks)
            medians = {label: statistics.median(t) * 1e3 for label, t in times.items()}
            base, new = medians.values()
            print(f"{args.model} batch {batch} {args.preset}: "
                  + "  ".join(f"{label} {ms:.2f} ms" for label, ms in medians.items())
                  + f"  speedup {base / new:.3f}x", flush=True)


if __name__ == "__main__":
    main()
