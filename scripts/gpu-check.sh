#!/usr/bin/env bash
# The GPU check, for a CUDA machine with torch (and torchvision) preinstalled and no internet:
#   1. installs the other dependencies from a wheelhouse carried with the repo (pip --target into
#      $OUT/site, put on PYTHONPATH ahead of the machine's packages; no venv: the machine's python3
#      may itself be a venv, whose packages a venv made from it would not see);
#   2. greedy parity with transformers on CUDA in bfloat16 for every tiny family, eager
#      (scripts/gpu_parity.py);
#   3. `lightvlm bench prefill --profile gpu-8b` (model shapes of InternVL2.5-8B);
#   4. the compiled decode step on CUDA, replayed as CUDA graphs, against the eager one
#      (scripts/gpu_parity.py --compiled, float32: equal greedy tokens, no graph compiled after
#      warm-up, graphs replayed);
#   5. `lightvlm bench decode --profile gpu-8b` eager, compiled, and compiled + CUDA graphs (a
#      shortened workload: 64 tokens at batch 1, 32 at batches 1 and 8; scripts/bench_short.py);
#   6. `lightvlm bench serve --profile gpu-8b` all off (eager) and all on (compiled + graphs): a
#      shortened load, c=1 and 8, 8 requests of 32 tokens per point, presets none and aggressive.
# Results (JSON + logs + summary.md) go to $OUT (default gpu-check-out/). Each step has its own
# time limit (times LIMIT_SCALE: 1 on the GPU, 4 in a dry run) and the script never runs past
# DEADLINE_S (570) in all; a failed step is reported and the next one still runs. Inductor's cache
# (on disk, per machine) lets the later compiled runs reuse what the first one compiled.
# On an H200 (2026-12-04) steps 1-4 took ~2 min and one gpu-8b decode run ~40 s with a warm
# inductor cache; steps 5-6 did not fit the rest of one 10-minute call, so split the check:
#   ONLY="parity bench-prefill compiled-check bench-decode" scripts/gpu-check.sh
#   ONLY="bench-serve" scripts/gpu-check.sh
# ONLY names steps (the install always runs); a name without its -eager/-compiled/-graphs suffix
# selects all its runs.
# Exit status: 0 all steps passed, 1 otherwise.
#
#   scripts/gpu-check.sh                # on the CUDA machine
#   scripts/gpu-check.sh --dry-run      # here: CPU, float32, tiny profiles, same steps (minutes)
#
# The wheelhouse (default .whl/gpu, git-ignored) is built on a machine with internet, for the GPU
# machine's Python version (check it there: python3 -V):
#   scripts/gpu-check.sh --build-wheelhouse            # PY_VERSIONS="3.11 3.12" for several
# which runs, per Python version:
#   pip download --dest .whl/gpu --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -r scripts/gpu-requirements.txt
# then drops the wheels named in PRUNE (packages the GPU machine already has in versions that
# satisfy the requirements, e.g. PRUNE="numpy pillow tokenizers hf_xet huggingface_hub httpx2
# httpcore2 truststore" where transformers' pins allow the machine's own; ~20 MB instead of ~50).
# Every wheel left there is installed (--no-deps), so keep one version of each.
# (set TORCHVISION=torchvision==X.Y.Z to add a torchvision matching the GPU machine's torch, for
# machines that have torch but not torchvision).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
WHEELHOUSE="${WHEELHOUSE:-$REPO/.whl/gpu}"
OUT="${OUT:-$REPO/gpu-check-out}"
DEADLINE_S="${DEADLINE_S:-570}"
PYTHON="${PYTHON:-python3}"
DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    --build-wheelhouse)
        mkdir -p "$WHEELHOUSE"
        for v in ${PY_VERSIONS:-3.11}; do
            "$PYTHON" -m pip download --dest "$WHEELHOUSE" --only-binary=:all: --python-version "$v" \
                --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
                -r scripts/gpu-requirements.txt ${TORCHVISION:+"$TORCHVISION"} || exit 1
        done
        for name in ${PRUNE:-}; do rm -fv "$WHEELHOUSE/$name"-[0-9]*.whl; done
        du -sh "$WHEELHOUSE"; exit 0 ;;
    "") ;;
    *) sed -n '2,/^set -uo pipefail/{/^set -uo/!p}' "$0" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
START=$SECONDS
FAILED=0
: > "$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S CMD...: run under the smaller of its limit and what is left of the deadline
step() {
    local name="$1" limit="$(( $2 * ${LIMIT_SCALE:-1} ))"; shift 2
    local family="${name%-eager}"; family="${family%-compiled}"; family="${family%-graphs}"
    if [[ -n "${ONLY:-}" && " install install-dry-run $ONLY " != *" $family "* && " $ONLY " != *" $name "* ]]; then
        return  # not among the steps asked for
    fi
    local left=$((DEADLINE_S - (SECONDS - START)))
    (( limit > left )) && limit=$left
    if (( limit < 10 )); then note "- $name: SKIPPED (time box spent)"; FAILED=1; return; fi
    local t0=$SECONDS rc
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    tail -n 25 "$OUT/$name.log"
    if (( rc == 0 )); then note "- $name: ok ($((SECONDS - t0)) s)"
    else note "- $name: FAILED rc=$rc ($((SECONDS - t0)) s; $( ((rc == 124)) && echo 'timed out' || echo "see $name.log"))"; FAILED=1; fi
}

if (( DRY_RUN )); then
    DEVICE=cpu; DTYPE=float32; PROFILE=ci-tiny; PARITY_TOKENS=4
    PY="$REPO/.venv/bin/python"; [[ -x "$PY" ]] || PY="$PYTHON"
    DECODE_ARGS=(--decode-lengths 8 --decode-batches 1 2 --decode-tokens 8 --decode-presets none kv aggressive)
    SERVE_ARGS=(--concurrency 1 2 --requests 2 --max-new-tokens 4 --presets none aggressive --rate --no-compare)
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    LIMIT_SCALE="${LIMIT_SCALE:-4}"  # CPU steps are slower than the GPU ones they stand for
    note "# gpu-check DRY RUN (CPU, float32, tiny profiles): $(date -u +%FT%TZ)"
    if [[ -d "$WHEELHOUSE" ]]; then  # what would be installed there: every wheel, for the GPU machine's Python
        step install-dry-run 120 "$PY" -m pip install --dry-run --no-index --no-deps --target "$OUT/site-dry-run" \
            --python-version "${GPU_PYTHON:-3.12}" --only-binary=:all: --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$WHEELHOUSE"/*.whl
    else
        note "- install: skipped in a dry run (no $WHEELHOUSE; build it with --build-wheelhouse)"
    fi
else
    DEVICE=cuda; DTYPE=bfloat16; PROFILE=gpu-8b; PARITY_TOKENS=12
    DECODE_ARGS=(--decode-lengths 64 --decode-batches 1 8 --decode-tokens 32 --decode-presets none)
    SERVE_ARGS=(--concurrency 1 8 --requests 8 --max-new-tokens 32 --presets none aggressive --rate --no-compare)
    PY="$PYTHON"
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "no CUDA device visible to $PY's torch (use --dry-run off-GPU)" >&2; exit 1; }
    [[ -d "$WHEELHOUSE" ]] || { echo "no wheelhouse at $WHEELHOUSE (see --build-wheelhouse)" >&2; exit 1; }
    note "# gpu-check: $(date -u +%FT%TZ), $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__, "CUDA", torch.version.cuda)')"
    step install 45 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$OUT/site" "$WHEELHOUSE"/*.whl
    export PYTHONPATH="$OUT/site"
    "$PY" -c "import torchvision" 2>/dev/null \
        || note "- warning: torchvision does not import; Qwen2-VL / InternVL processors need it (TORCHVISION=... --build-wheelhouse)"
    note "- packages: $("$PY" -c 'import transformers, fastapi, uvicorn, pydantic, torch; print("transformers", transformers.__version__, "fastapi", fastapi.__version__, "uvicorn", uvicorn.__version__, "pydantic", pydantic.__version__)' 2>&1 | tail -1)"
    export LIGHTVLM_BENCH_CACHE="${LIGHTVLM_BENCH_CACHE:-$OUT/bench-models}"  # gpu-8b saved once for both serve runs
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # run from the checkout; no package install needed

step parity 90 env LIGHTVLM_COMPILE=0 "$PY" scripts/gpu_parity.py --device "$DEVICE" --dtype "$DTYPE" \
    --tokens "$PARITY_TOKENS" --out "$OUT/parity.json"
step bench-prefill 60 env LIGHTVLM_COMPILE=0 "$PY" scripts/bench_short.py prefill --profile "$PROFILE" \
    --prefill-runs 3 -- --out "$OUT/prefill.json"
step compiled-check 120 env LIGHTVLM_CUDA_GRAPHS=1 "$PY" scripts/gpu_parity.py --compiled --device "$DEVICE" \
    --dtype float32 --families llava qwen3_vl --tokens 8 --out "$OUT/compiled.json"
# the decode step three ways: eager, compiled (inductor), compiled and replayed as CUDA graphs
# (on CPU the last is the compiled step: graphs apply to CUDA only); the compiled runs get more
# time: their warm-up compiles the step (batch 1 and batch > 1) unless inductor's cache has it
mode_env() {
    case "$1" in
        eager) echo LIGHTVLM_COMPILE=0 ;;
        compiled) echo LIGHTVLM_COMPILE=1 LIGHTVLM_CUDA_GRAPHS=0 ;;
        graphs) echo LIGHTVLM_COMPILE=1 LIGHTVLM_CUDA_GRAPHS=1 ;;
    esac
}
for mode in eager compiled graphs; do
    step "bench-decode-$mode" "$([[ $mode == eager ]] && echo 60 || echo 100)" env $(mode_env $mode) "$PY" \
        scripts/bench_short.py decode --profile "$PROFILE" "${DECODE_ARGS[@]}" -- --out "$OUT/decode-$mode.json"
done
# eager first: that run also saves the random gpu-8b weights our service loads (cached for the
# second); the service with everything off, then with everything on
for mode in eager graphs; do
    step "bench-serve-$mode" "$([[ $mode == eager ]] && echo 150 || echo 170)" env $(mode_env $mode) "$PY" \
        -m lightvlm_core.cli bench serve --profile "$PROFILE" "${SERVE_ARGS[@]}" --out "$OUT/serve-$mode.json"
done

note "total: $((SECONDS - START)) s of ${DEADLINE_S} s; results in $OUT"
exit $FAILED
