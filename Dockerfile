# syntax=docker/dockerfile:1.7
#
# LightVLM Serve image, two variants from one file (BuildKit builds only the stages it needs):
#
#   GPU (default):  docker build -t lightvlm-serve:gpu .
#   CPU (laptops):  docker build --build-arg VARIANT=cpu -t lightvlm-serve:cpu .
#
# Both install the project exactly as the test suite does: `pip install .` against pyproject.toml
# (same pins, same index, no extra wheels), without the dev extras. Both serve the bundled demo
# model (models/shapes-demo) unless LIGHTVLM_MODEL names another one (hub id or local directory).
# tests/deploy/test_dockerfile.py checks the pins, the pip commands and the runtime contract below.

ARG VARIANT=gpu
# Python 3.11, the version everything is tested on, for both variants. The GPU variant needs no
# CUDA base image: PyPI's torch 2.14.1 wheel brings the CUDA 13 runtime, cuBLAS and cuDNN as
# nvidia-* wheels, and the NVIDIA container toolkit mounts the host driver (>= 580) into any
# image that asks for it through the two NVIDIA_* variables below.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- operating-system layers, one per variant ---------------------------------------------------
FROM ${PYTHON_IMAGE} AS os-gpu
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LIGHTVLM_DEVICE=auto

FROM ${PYTHON_IMAGE} AS os-cpu
ENV LIGHTVLM_DEVICE=cpu
# A C++ compiler: on CPU the engine compiles its decode step with torch.compile (inductor generates
# C++), see README "Compiled decode step". Without one it logs a warning and runs eagerly.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*

# ---- builder: a self-contained virtual environment in /opt/venv ---------------------------------
# hadolint ignore=DL3006
FROM os-${VARIANT} AS builder
ARG PIP_VERSION=26.3
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /src

# 1. The dependencies, read from pyproject.toml's [project].dependencies. This heavy layer (torch)
#    is rebuilt only when pyproject.toml changes, not on every source edit.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "pip==${PIP_VERSION}" \
 && python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# 2. The project itself, installed the way the tests install it (non-editable, no extras).
COPY README.md ./
COPY app ./app
COPY lightvlm_core ./lightvlm_core
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install . \
 && pip check

# ---- runtime -------------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM os-${VARIANT} AS runtime
ARG UID=10001
# tcmalloc for the engine process: lightvlm_core/runtime_env.py preloads it where it is installed
# (PyTorch's many small CPU allocations; see README, "Runtime environment").
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libtcmalloc-minimal4 \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid "${UID}" lightvlm \
 && useradd --system --uid "${UID}" --gid lightvlm --create-home --home-dir /home/lightvlm \
        --shell /usr/sbin/nologin lightvlm \
 && mkdir -p /cache/huggingface \
 && chown lightvlm:lightvlm /cache/huggingface

COPY --from=builder /opt/venv /opt/venv
WORKDIR /opt/lightvlm
COPY models/shapes-demo ./models/shapes-demo
COPY examples ./examples

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache/huggingface \
    LIGHTVLM_MODEL=/opt/lightvlm/models/shapes-demo \
    LIGHTVLM_HOST=0.0.0.0 \
    LIGHTVLM_PORT=8000

# Downloaded hub models land here; mount a named volume so they survive container restarts.
VOLUME ["/cache/huggingface"]
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER ${UID}:${UID}
EXPOSE 8000

# Healthy = ready: /ready answers 503 until the model is loaded and warmed up (a first start that
# downloads a hub model takes minutes: failures during the start period do not count).
HEALTHCHECK --interval=15s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]

ENTRYPOINT ["lightvlm"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
