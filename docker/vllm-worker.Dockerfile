# syntax=docker/dockerfile:1
# A vLLM model worker: vLLM's OpenAI server, started, health-checked and announced in discovery
# by `nilai worker vllm`. From the repository root:
#   docker build -f docker/vllm-worker.Dockerfile -t nilai-vllm-worker .
# Tuning comes from VLLM_* variables (docs/VLLM_TUNING.md). The vLLM tag is pinned: this tag
# still accepts --swap-space; from vLLM 0.18 on, set VLLM_SWAP_SPACE=none.
#
# Both base images are named once, below, and pinned by digest: `make pin-images`
# (scripts/pin_images.py) writes the digests where a registry is reachable; a build may also
# pass --build-arg VLLM_IMAGE=vllm/vllm-openai:v0.11.0@sha256:<digest> (and PYTHON_IMAGE).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG VLLM_IMAGE=vllm/vllm-openai:v0.11.0

FROM ${PYTHON_IMAGE} AS wheel

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build
COPY pyproject.toml README.md constraints.txt ./
COPY src ./src
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && cp constraints.txt /wheels/


FROM ${VLLM_IMAGE}

# nilai (gateway dependencies only: no torch of its own) goes into a virtualenv of its own, made
# from the image's Python 3.12, so vLLM's carefully pinned environment stays as vLLM built it.
# Its packages are those locked in constraints.txt.
COPY --from=wheel /wheels /tmp/wheels
RUN python3 -m venv /opt/nilai \
    && /opt/nilai/bin/pip install --no-cache-dir --constraint /tmp/wheels/constraints.txt \
        /tmp/wheels/nilai-*.whl \
    && rm -rf /tmp/wheels

# An unprivileged user with a writable home: vLLM, Triton and torch.compile keep their caches
# under ~/.cache. The Hugging Face cache is a volume (see deploy/compose.yaml), owned by it.
RUN groupadd --system --gid 10001 nilai \
    && useradd --system --uid 10001 --gid nilai --home-dir /home/nilai --create-home \
        --shell /usr/sbin/nologin nilai \
    && mkdir -p /data/huggingface \
    && chown -R 10001:10001 /data

ENV HF_HOME=/data/huggingface \
    NILAI_VLLM_BIN=vllm \
    PYTHONUNBUFFERED=1

USER 10001:10001
WORKDIR /home/nilai
EXPOSE 8000

# Long start period: the model loads (and may download) before /health answers.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30m --retries=3 \
    CMD ["/opt/nilai/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# PID 1 is the launcher: on SIGTERM it withdraws the announcement first, then stops vLLM.
ENTRYPOINT ["/opt/nilai/bin/nilai", "worker", "vllm"]
CMD ["--help"]
