"""The `lightvlm` console script: `serve` lives here (it needs the app and uvicorn); every other
subcommand (generate, bench, eval, make-tiny, ...) is handed to `lightvlm_core.cli.main`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing

from pydantic import ValidationError

from app.settings import Settings
from lightvlm_core.cli_checks import OneLineParser, UsageError, check_model, fail, port_number


def _choices(field: str) -> list[str] | None:
    """The allowed values of a Literal settings field, so the CLI follows Settings."""
    values = typing.get_args(Settings.model_fields[field].annotation)
    return [str(v) for v in values] or None


def serve_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="lightvlm serve", description="start the HTTP service")
    p.add_argument("--model", default=None, help="hub id or local dir (default: $LIGHTVLM_MODEL, else the demo model)")
    p.add_argument("--device", default=None, choices=_choices("device"),
                   help="auto: CUDA when available, else CPU (default: $LIGHTVLM_DEVICE, else auto)")
    p.add_argument("--dtype", default=None, choices=_choices("dtype"),
                   help="auto: bfloat16 on CUDA, float32 on CPU (default: $LIGHTVLM_DTYPE, else auto)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model's own Python code from the hub (off by default)")
    p.add_argument("--host", default=None, help="address to listen on (default: $LIGHTVLM_HOST, else 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=None, help="default: $LIGHTVLM_PORT, else 8000")
    p.add_argument("--preset", default=None, choices=_choices("preset"),
                   help="default acceleration preset; requests may override it (default: none)")
    p.add_argument("--no-compile", action="store_true",
                   help="run the decode step eagerly instead of compiling it (default: $LIGHTVLM_COMPILE, else on)")
    ray = p.add_argument_group("Ray Serve (pip install 'lightvlm-serve[ray]')")
    ray.add_argument("--ray", action="store_true",
                     help="serve as a Ray Serve deployment (a local Ray cluster unless RAY_ADDRESS is set)")
    ray.add_argument("--replicas", type=int, default=None,
                     help="replicas at start (the autoscaling minimum); default 1")
    ray.add_argument("--max-replicas", type=int, default=None,
                     help="autoscale up to this many replicas on ongoing requests; default --replicas")
    ray.add_argument("--cpus-per-replica", type=int, default=1,
                     help="CPUs (and torch threads) of a CPU replica; GPU replicas take one GPU each")
    return p


def serve(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)
    try:
        check_model(args.model)  # before the model loads: a typo is one line, not a load failure
    except UsageError as exc:
        return fail("lightvlm serve", exc)
    overrides = {"host": args.host, "port": args.port, "model": args.model, "device": args.device,
                 "dtype": args.dtype, "preset": args.preset,
                 "trust_remote_code": args.trust_remote_code or None,  # the flag can only turn it on
                 "compile": False if args.no_compile else None}  # and this one only off
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.ray:
        from app.scaleout.launcher import run_ray_serve

        return run_ray_serve(overrides, replicas=args.replicas, max_replicas=args.max_replicas,
                             cpus_per_replica=args.cpus_per_replica)
    if args.replicas is not None or args.max_replicas is not None:
        print("error: --replicas and --max-replicas need --ray", file=sys.stderr)
        return 2
    from app.hub_notice import log_download_notice
    from app.logs import configure_logging
    from app.main import run_server

    try:
        settings = Settings(**overrides)
    except ValidationError as exc:  # a bad LIGHTVLM_* variable: one line, before anything loads
        first = exc.errors()[0]
        where = "LIGHTVLM_" + str(first["loc"][0]).upper() if first.get("loc") else "settings"
        return fail("lightvlm serve", UsageError(f"{where}: {first['msg']}"))
    configure_logging(settings.log_level)
    log_download_notice(settings.model)  # a first start of a hub model: say what it downloads
    run_server(**overrides)
    # Drained, and the engine process has exited: nothing is left to save, so skip the interpreter's
    # teardown (seconds of torch's on a busy machine, counted against an orchestrator's grace period).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        return serve(argv[1:])
    from lightvlm_core.cli import main as core_main

    if not argv or argv[0] in ("-h", "--help"):
        print("lightvlm serve [--help]: start the HTTP service (--ray: as a Ray Serve deployment)\n")
    return core_main(argv)


if __name__ == "__main__":
    sys.exit(main())
