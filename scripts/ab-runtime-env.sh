#!/usr/bin/env bash
# A/B of lightvlm_core.runtime_env (tcmalloc + Intel OpenMP preload, KMP settings) on the
# in-process engine decode (`lightvlm bench decode`), in interleaved rounds (A B B A ...), each
# run a fresh process (a preload only takes effect at process start). Thread count is the same in
# both arms (OMP_NUM_THREADS=$THREADS), so only the libraries and KMP settings differ.
#
#   scripts/ab-runtime-env.sh [ROUNDS] [PROFILE]      # default 3 cpu-small
#   DECODE_ARGS="--decode-lengths 128 --decode-batches 1 8 --decode-tokens 64" scripts/ab-runtime-env.sh
# (default: --decode-lengths 32 --decode-batches 8 --decode-tokens 32 --decode-presets none)
#
# Writes $OUT/{with,without}-N.json and prints medians per case (decode tokens/s) and the ratio.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
ROUNDS="${1:-3}"
PROFILE="${2:-cpu-small}"
PY="${PY:-$REPO/.venv/bin/python}"
OUT="${OUT:-$REPO/bench_results/ab-runtime-env}"
THREADS="${THREADS:-$(nproc)}"
read -r -a DECODE <<< "${DECODE_ARGS:---decode-lengths 32 --decode-batches 8 --decode-tokens 32 --decode-presets none}"
mkdir -p "$OUT"
TUNED="$(env -u OMP_NUM_THREADS OMP_NUM_THREADS="$THREADS" "$PY" -m lightvlm_core.runtime_env)"
echo "with = $(echo "$TUNED" | tr '\n' ' ')"

run_arm() {  # run_arm with|without N
    local arm="$1" n="$2"
    if [[ "$arm" == with ]]; then
        (eval "$TUNED"; export OMP_NUM_THREADS="$THREADS"
         "$PY" scripts/bench_short.py decode --profile "$PROFILE" "${DECODE[@]}" -- --json --out "$OUT/$arm-$n.json" > /dev/null)
    else
        (unset LD_PRELOAD KMP_BLOCKTIME KMP_TPAUSE; export OMP_NUM_THREADS="$THREADS"
         "$PY" scripts/bench_short.py decode --profile "$PROFILE" "${DECODE[@]}" -- --json --out "$OUT/$arm-$n.json" > /dev/null)
    fi
    echo "round $n $arm done"
}

for n in $(seq 1 "$ROUNDS"); do
    if (( n % 2 )); then run_arm with "$n"; run_arm without "$n"; else run_arm without "$n"; run_arm with "$n"; fi
done

"$PY" - "$OUT" "$ROUNDS" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def load(arm):
    rows = {}
    for n in range(1, rounds + 1):
        for r in json.load(open(f"{out}/{arm}-{n}.json"))["results"]:
            rows.setdefault((r["case"], r["batch"], r["preset"]), []).append(r["decode_tokens_per_s"])
    return rows
a, b = load("with"), load("without")
print("| case | batch | preset | decode tok/s with (median) | without (median) | with / without | runs |")
print("|---|---|---|---|---|---|---|")
for key in a:
    ma, mb = statistics.median(a[key]), statistics.median(b[key])
    print(f"| {key[0]} | {key[1]} | {key[2]} | {ma:.1f} | {mb:.1f} | {ma / mb:.2f}x | {len(a[key])} |")
EOF
