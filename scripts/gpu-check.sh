#!/usr/bin/env bash
# The GPU check, time-boxed to 9 minutes, for a CUDA machine with torch (and torchvision)
# preinstalled and no internet:
#   1. installs the other dependencies from a wheelhouse carried with the repo (pip --target into
#      $OUT/site, put on PYTHONPATH ahead of the machine's packages; no venv: the machine's python3
#      may itself be a venv, whose packages a venv made from it would not see);
#   2. greedy parity with transformers on CUDA in bfloat16 for every tiny family, eager
#      (scripts/gpu_parity.py);
#   3. `lightvlm bench prefill --profile gpu-8b` (model shapes of InternVL2.5-8B);
#   4. the compiled decode step on CUDA against the eager one (scripts/gpu_parity.py --compiled,
#      float32: equal greedy tokens, no graph compiled after warm-up);
#   5. `lightvlm bench decode --profile gpu-8b` with LIGHTVLM_COMPILE=0 and =1 (decode lengths
#      shortened to fit the time box: scripts/bench_short.py);
#   6. `lightvlm bench serve --profile gpu-8b` with LIGHTVLM_COMPILE=0 and =1 (a shortened load:
#      c=1 and 8, 8 requests of 32 tokens per point, presets none and aggressive, closed loop).
# Results (JSON + logs + summary.md) go to $OUT (default gpu-check-out/). Each step has its own
# time limit (times LIMIT_SCALE: 1 on the GPU, 4 in a dry run) and the script never runs past
# DEADLINE_S (560) in all; a failed step is reported and the next one still runs. Inductor's cache
# (on disk, per machine) lets the later compiled runs reuse what the first one compiled.
# ONLY="parity bench-prefill" runs only those steps (and the install); a name without its
# -compile0/1 suffix selects both runs: ONLY="bench-decode bench-serve".
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
DEADLINE_S="${DEADLINE_S:-560}"
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
    *) sed -n '2,28p' "$0" >&2; exit 2 ;;
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
    if [[ -n "${ONLY:-}" && " install install-dry-run $ONLY " != *" ${name%-compile[01]} "* && " $ONLY " != *" $name "* ]]; then
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
    DECODE_ARGS=(--decode-lengths 256 --decode-batches 1 8 32 --decode-tokens 64 --decode-presets none kv aggressive)
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

step parity 70 env LIGHTVLM_COMPILE=0 "$PY" scripts/gpu_parity.py --device "$DEVICE" --dtype "$DTYPE" \
    --tokens "$PARITY_TOKENS" --out "$OUT/parity.json"
step bench-prefill 50 env LIGHTVLM_COMPILE=0 "$PY" scripts/bench_short.py prefill --profile "$PROFILE" \
    --prefill-runs 3 -- --out "$OUT/prefill.json"
step compiled-check 75 "$PY" scripts/gpu_parity.py --compiled --device "$DEVICE" --dtype float32 \
    --families llava qwen3_vl --tokens 8 --out "$OUT/compiled.json"
# compile on gets more time: its warm-up compiles the step (batch 1 and batch > 1)
for compile in 0 1; do
    step "bench-decode-compile$compile" "$((compile ? 100 : 60))" env LIGHTVLM_COMPILE=$compile "$PY" \
        scripts/bench_short.py decode --profile "$PROFILE" "${DECODE_ARGS[@]}" -- --out "$OUT/decode-compile$compile.json"
done
# compile off first: that run also saves the random gpu-8b weights our service loads (cached for
# the second)
for compile in 0 1; do
    step "bench-serve-compile$compile" "$((compile ? 100 : 95))" env LIGHTVLM_COMPILE=$compile "$PY" -m lightvlm_core.cli \
        bench serve --profile "$PROFILE" "${SERVE_ARGS[@]}" --out "$OUT/serve-compile$compile.json"
done

note "total: $((SECONDS - START)) s of ${DEADLINE_S} s; results in $OUT"
exit $FAILED
