"""`lightvlm bench prefill|decode` on a profile with its workload shortened (same model shapes):
for time-boxed checks (scripts/gpu-check.sh) and A/B runs (scripts/ab-runtime-env.sh).

    python scripts/bench_short.py decode --profile gpu-8b --decode-lengths 1024 --decode-batches 1 8 \
        --decode-tokens 128 -- --json --out decode.json

Everything after `--` goes to `lightvlm bench KIND --profile P` unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from lightvlm_core.bench import profiles
from lightvlm_core.cli import main as cli_main


def main(argv: list[str]) -> int:
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=["prefill", "decode"])
    ap.add_argument("--profile", required=True)
    ap.add_argument("--decode-lengths", type=int, nargs="+", default=None)
    ap.add_argument("--decode-batches", type=int, nargs="+", default=None)
    ap.add_argument("--decode-tokens", type=int, default=None)
    ap.add_argument("--prefill-runs", type=int, default=None)
    ap.add_argument("--decode-presets", nargs="+", default=None,
                    help="restrict `bench decode` to these of its cases (none, kv, aggressive, aggressive+kv)")
    args = ap.parse_args(argv)
    changes = {"decode_lengths": tuple(args.decode_lengths) if args.decode_lengths else None,
               "decode_batches": tuple(args.decode_batches) if args.decode_batches else None,
               "decode_tokens": args.decode_tokens, "prefill_runs": args.prefill_runs}
    changes = {k: v for k, v in changes.items() if v is not None}
    profiles.PROFILES[args.profile] = dataclasses.replace(profiles.PROFILES[args.profile], **changes)
    if args.decode_presets:
        from lightvlm_core.bench import decode

        every = decode.configs
        decode.configs = lambda profile: {k: v for k, v in every(profile).items() if k in args.decode_presets}
        changes["decode_presets"] = args.decode_presets
    print(f"{args.kind} {args.profile}: workload changes {changes or 'none'}", file=sys.stderr)
    return cli_main(["bench", args.kind, "--profile", args.profile, *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
