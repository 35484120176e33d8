"""The `lightvlm` command: generate, bench, eval, make-tiny, make-scene (`serve` is in app/cli.py,
which hands every other subcommand to `main` here).

Exit status: 0 done, 1 failed at run time (e.g. the model did not load), 2 usage error (a bad
argument or file, reported in one line before any model loads)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from lightvlm_core import cli_checks as checks
from lightvlm_core.types import MIN_KV_BUDGET, kv_policy_names, preset_names

PRESETS = preset_names()  # the reduction registry's names (LightVLM presets, then every method)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="hub id or local dir (default: $LIGHTVLM_MODEL, else the demo model)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when available, else CPU (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU (default: auto)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model's own Python code from the hub (off by default)")


def _parser() -> argparse.ArgumentParser:
    parser = checks.OneLineParser(prog="lightvlm", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer one prompt about one image")
    _add_model_args(gen)
    gen.add_argument("--image", action="append", default=[], help="image path (repeat for several)")
    gen.add_argument("--prompt", required=True, help="the question or instruction")
    gen.add_argument("--max-new-tokens", type=checks.positive_int, default=256,
                     help="stop after this many tokens (default: 256)")
    gen.add_argument("--temperature", type=checks.temperature, default=0.0, help="0 = greedy (default: 0)")
    gen.add_argument("--top-p", type=checks.top_p, default=1.0, help="nucleus sampling mass (default: 1)")
    gen.add_argument("--top-k", type=checks.non_negative_int, default=0, help="0 = off (default: 0)")
    gen.add_argument("--seed", type=checks.non_negative_int, default=None, help="sampling seed")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeat for several)")
    gen.add_argument("--preset", default="none", choices=PRESETS, help="acceleration preset (default: none)")
    gen.add_argument("--keep-ratio", type=checks.keep_ratio, default=None,
                     help="override the preset's final fraction of image tokens kept, in (0, 1]")
    gen.add_argument("--kv-budget", type=checks.kv_budget(MIN_KV_BUDGET), default=None,
                     help="KV entries kept per layer during decode: 0 = off, else >= 16")
    gen.add_argument("--kv-policy", default=None, choices=kv_policy_names(),
                     help="KV eviction policy used with --kv-budget (default: heavy_hitter)")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    gen.add_argument("--json", action="store_true", help="print one JSON object")

    bench = sub.add_parser("bench", help="benchmarks: prefill | decode | serve")
    bench.add_argument("kind", choices=["prefill", "decode", "serve"], help="what to measure")
    bench.add_argument("--profile", default=None,
                       help="model shapes and workload; `lightvlm bench KIND --profile list` lists them "
                            "(default: cpu-small)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--out", default=None, help="also write the JSON result to this file")
    bench.add_argument("--plot", default=None, help="write a PNG plot")
    from lightvlm_core.bench.serve_args import add_serve_arguments

    add_serve_arguments(bench)

    ev = sub.add_parser("eval", help="accuracy on the demo task vs kept image tokens")
    ev.add_argument("--model", default=None, help="default: $LIGHTVLM_MODEL, else the demo model")
    ev.add_argument("--preset", action="append", default=None, choices=PRESETS,
                    help="restrict to these presets (repeat for several)")
    ev.add_argument("--num-questions", type=checks.positive_int, default=1000,
                    help="held-out questions to ask (default: 1000)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--plot", default=None, help="write a PNG plot of accuracy vs kept fraction")
    ev.add_argument("--out", default=None, help="also write the JSON result to this file")

    tiny = sub.add_parser("make-tiny", help="write a random-init tiny model of a real VLM architecture")
    tiny.add_argument("--family", required=True, choices=["llava", "qwen2_vl", "qwen2_5_vl", "internvl", "qwen3_vl",
                                                         "gemma3", "idefics3", "smolvlm", "llava_onevision",
                                                         "mistral3"],
                      help="architecture to copy")
    tiny.add_argument("--out", required=True, help="directory to write")
    tiny.add_argument("--seed", type=checks.non_negative_int, default=0, help="weight seed (default: 0)")

    scene = sub.add_parser("make-scene", help="draw a demo scene (PNG) and print questions the demo model answers")
    scene.add_argument("--out", required=True, help="PNG file to write")
    scene.add_argument("--seed", type=checks.non_negative_int, default=0, help="scene seed (default: 0)")
    scene.add_argument("--size", type=checks.positive_int, default=224, help="side in pixels (default: 224)")
    scene.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        _check(args)
    except checks.UsageError as exc:
        return checks.fail(f"lightvlm {args.command}", exc)
    if args.command == "bench" and args.profile == "list":
        print("\n".join(_bench_profiles(args.kind)))
        return 0
    if args.command == "make-scene":
        return _make_scene(args)
    if args.command == "make-tiny":
        from lightvlm_core.tiny import make_tiny

        print(make_tiny(args.family, args.out, seed=args.seed))
        return 0
    if args.command == "generate":
        return _generate(args)
    if args.command == "bench":
        from lightvlm_core.bench.runner import run_bench

        from lightvlm_core.bench.serve_args import serve_options

        return run_bench(args.kind, profile=args.profile, as_json=args.json, out=args.out, plot=args.plot,
                         options=serve_options(args))
    if args.command == "eval":
        from lightvlm_core.eval.accuracy import run_eval

        return run_eval(model=args.model, presets=args.preset, num_questions=args.num_questions,
                        as_json=args.json, plot_path=args.plot, out=args.out)
    return 2


def _bench_profiles(kind: str) -> list[str]:
    from lightvlm_core.bench.profiles import PROFILES

    if kind == "prefill":
        from lightvlm_core.bench.prefill import PAIRS

        return [*PROFILES, *PAIRS]
    if kind == "serve":
        from lightvlm_core.bench.serve import WORKLOADS

        return list(dict.fromkeys([*PROFILES, *WORKLOADS]))
    return list(PROFILES)


def _check(args: argparse.Namespace) -> None:
    """Every argument and file, before any model loads (raises checks.UsageError)."""
    if args.command != "make-tiny":  # make-tiny's --out is a directory it creates
        checks.check_output("--out", getattr(args, "out", None))
    checks.check_output("--plot", getattr(args, "plot", None))
    if args.command == "bench" and args.profile != "list":
        checks.check_profile(args.kind, args.profile, _bench_profiles(args.kind))
    if args.command in ("generate", "eval"):
        checks.check_model(args.model)
    if args.command == "generate":
        checks.check_images(args.image)
        model_dir = checks.local_model_dir(args.model)
        if model_dir is not None:
            checks.check_images_fit(model_dir, len(args.image))


def _make_scene(args: argparse.Namespace) -> int:
    from lightvlm_core.demo.scenes import describe, sample_scene

    image, objs, questions = sample_scene(args.seed, size=args.size)
    image.save(args.out)
    if args.json:
        print(json.dumps({"image": args.out, "seed": args.seed, "objects": describe(objs),
                          "questions": [{"question": q, "answer": a} for q, a in questions]}))
        return 0
    print(f"{args.out}: {describe(objs)}")
    for question, answer in questions:
        print(f"  {question}  ->  {answer}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from lightvlm_core.engine import load_engine
    from lightvlm_core.errors import LightVLMError
    from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams

    try:
        engine = load_engine(args.model, device=args.device, dtype=args.dtype,
                             trust_remote_code=args.trust_remote_code)
        images = []
        for path in args.image:
            with Image.open(path) as img:
                img.load()
                images.append(img.copy())
        request = GenerationRequest(
            prompt=args.prompt,
            images=images,
            sampling=SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=tuple(args.stop),
                                    ignore_eos=args.ignore_eos),
            acceleration=AccelerationConfig(preset=args.preset, keep_ratio=args.keep_ratio,
                                            kv_budget=args.kv_budget, kv_policy=args.kv_policy),
        )
        if args.json:
            result = engine.generate([request])[0]
            print(json.dumps(result.to_dict()))
            return 0
        for out in engine.stream(request):
            if out.token:
                sys.stdout.write(out.token.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    except (LightVLMError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
