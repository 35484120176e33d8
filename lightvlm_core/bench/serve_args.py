"""Command-line options of `lightvlm bench serve` (argparse only: the CLI imports this to build its
parser, before anything heavy loads)."""

from __future__ import annotations

import argparse
from typing import Any


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("bench serve: peers and our service")
    g.add_argument("--target", action="append", default=[], metavar="URL",
                   help="a peer OpenAI-compatible server to measure beside ours, e.g. http://127.0.0.1:8100 "
                        "(repeat for several)")
    g.add_argument("--target-model", action="append", default=[], metavar="NAME",
                   help="the model name to send to each --target, in order (default: ours' served name)")
    g.add_argument("--target-name", action="append", default=[], metavar="LABEL",
                   help="a label for each --target in the table (default: peer1, peer2, ...)")
    g.add_argument("--rounds", type=int, default=None,
                   help="repeat the whole sweep; every number is the median over the rounds")
    g.add_argument("--model", dest="serve_model", default=None, metavar="DIR",
                   help="serve this model directory instead of the profile's random-weight model")
    g.add_argument("--ours-url", default=None, metavar="URL",
                   help="measure our service already running at URL instead of starting one")
    g.add_argument("--no-ours", action="store_true", help="measure the --target servers only")
    g.add_argument("--no-runtime-env", action="store_true",
                   help="start our service without the tcmalloc / Intel OpenMP set-up (A/B)")
    w = parser.add_argument_group("bench serve: workload overrides (default: the profile's)")
    w.add_argument("--concurrency", type=int, nargs="+", default=None, help="closed-loop client counts")
    w.add_argument("--rate", type=float, nargs="*", default=None, help="open-loop arrivals/s (none: no open loop)")
    w.add_argument("--requests", type=int, default=None, help="requests per load point")
    w.add_argument("--max-new-tokens", type=int, default=None, help="output tokens per request")
    w.add_argument("--presets", nargs="+", default=None, help="our acceleration presets to measure")
    w.add_argument("--no-compare", action="store_true", help="skip the in-process transformers/engine rows")


def serve_options(args: argparse.Namespace) -> dict[str, Any]:
    """`serve.run` keyword arguments from the parsed options ({} for other benches)."""
    if getattr(args, "kind", None) != "serve":
        return {}
    from lightvlm_core.bench.serve import Target

    urls = args.target
    if len(args.target_model) > len(urls) or len(args.target_name) > len(urls):
        raise SystemExit("error: more --target-model / --target-name than --target")
    default_model = args.target_model[-1] if args.target_model else None
    targets = []
    for i, url in enumerate(urls):
        model = args.target_model[i] if i < len(args.target_model) else default_model
        name = args.target_name[i] if i < len(args.target_name) else f"peer{i + 1}"
        targets.append(Target(name, url.rstrip("/"), model or ""))
    overrides = {"concurrencies": tuple(args.concurrency) if args.concurrency else None,
                 "rates": tuple(args.rate) if args.rate is not None else None, "requests_per_point": args.requests,
                 "max_new_tokens": args.max_new_tokens, "presets": tuple(args.presets) if args.presets else None,
                 "compare": False if args.no_compare else None}
    return {"targets": targets, "rounds": args.rounds,
            "overrides": {k: v for k, v in overrides.items() if v is not None},
            "model_dir": args.serve_model, "ours": not args.no_ours,
            "ours_url": args.ours_url.rstrip("/") if args.ours_url else None,
            "tuned": not args.no_runtime_env}
