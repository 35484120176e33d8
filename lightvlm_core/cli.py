"""The `lightvlm` command: generate, bench, eval, make-tiny (`serve` is in app/cli.py, which hands
every other subcommand to `main` here)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from lightvlm_core.reduction.schedule import PRESETS


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="hub id or local dir (default: $LIGHTVLM_MODEL, else the demo model)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--trust-remote-code", action="store_true")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightvlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer one prompt about one image")
    _add_model_args(gen)
    gen.add_argument("--image", action="append", default=[], help="image path (repeat for several)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--preset", default="none", choices=PRESETS)
    gen.add_argument("--keep-ratio", type=float, default=None)
    gen.add_argument("--kv-budget", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--json", action="store_true", help="print one JSON object")

    bench = sub.add_parser("bench", help="benchmarks: prefill | decode | serve")
    bench.add_argument("kind", choices=["prefill", "decode", "serve"])
    bench.add_argument("--profile", default=None)
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--out", default=None, help="also write the JSON result to this file")
    bench.add_argument("--plot", default=None, help="write a PNG plot")

    ev = sub.add_parser("eval", help="accuracy on the demo task vs kept image tokens")
    ev.add_argument("--model", default=None)
    ev.add_argument("--preset", action="append", default=None, help="restrict to these presets")
    ev.add_argument("--num-questions", type=int, default=1000)
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--plot", default=None, help="write a PNG plot of accuracy vs kept fraction")
    ev.add_argument("--out", default=None, help="also write the JSON result to this file")

    tiny = sub.add_parser("make-tiny", help="write a random-init tiny model of a real VLM architecture")
    tiny.add_argument("--family", required=True, choices=["llava", "qwen2_vl", "qwen2_5_vl", "internvl"])
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "make-tiny":
        from lightvlm_core.tiny import make_tiny

        print(make_tiny(args.family, args.out, seed=args.seed))
        return 0
    if args.command == "generate":
        return _generate(args)
    if args.command == "bench":
        from lightvlm_core.bench.runner import run_bench

        return run_bench(args.kind, profile=args.profile, as_json=args.json, out=args.out, plot=args.plot)
    if args.command == "eval":
        from lightvlm_core.eval.accuracy import run_eval

        return run_eval(model=args.model, presets=args.preset, num_questions=args.num_questions,
                        as_json=args.json, plot_path=args.plot, out=args.out)
    return 2


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
                                            kv_budget=args.kv_budget),
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
