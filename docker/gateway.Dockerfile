# syntax=docker/dockerfile:1
# The nilai gateway (`nilai api`), from the repository root:
#   docker build -f docker/gateway.Dockerfile -t nilai-gateway .
# Stage 1 builds nilai's wheel and installs it with its dependencies into /opt/nilai; the final
# stage copies only that virtualenv onto a slim Python, runs as an unprivileged user, and holds
# no compiler, no pip cache and no source tree. Every package is installed at the version locked
# in constraints.txt (`make lock`), so the image runs the set the tests ran against.
#
# The base image is named once, below, and pinned by digest: `make pin-images`
# (scripts/pin_images.py) writes the digest where a registry is reachable; a build may also pass
# --build-arg PYTHON_IMAGE=python:3.12-slim-bookworm@sha256:<digest>.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /build
COPY pyproject.toml README.md constraints.txt ./
COPY src ./src

# Every dependency ships manylinux wheels for CPython 3.12, so nothing is compiled here.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/nilai \
    && /opt/nilai/bin/pip install --no-cache-dir --constraint constraints.txt \
        "$(ls /wheels/nilai-*.whl)[nildb,websearch]" \
    && /opt/nilai/bin/pip uninstall --yes pip


FROM ${PYTHON_IMAGE}

ENV PATH=/opt/nilai/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NILAI_HOST=0.0.0.0 \
    NILAI_PORT=8080 \
    NILAI_DATA_DIR=/var/lib/nilai

# The data directory holds the signing key: mount a volume there so it survives restarts.
RUN groupadd --system --gid 10001 nilai \
    && useradd --system --uid 10001 --gid nilai --home-dir /var/lib/nilai --create-home \
        --shell /usr/sbin/nologin nilai \
    && chmod 0700 /var/lib/nilai

COPY --from=builder /opt/nilai /opt/nilai

# Numeric, so that runtimes can check it is not root without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/nilai
VOLUME ["/var/lib/nilai"]
EXPOSE 8080

# Liveness only (no I/O behind /healthz); the image has no curl, so Python asks.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('NILAI_PORT', '8080') + '/healthz', timeout=4)"]

# Extra arguments go to `nilai api`, e.g. `docker run nilai-gateway --workers 4`.
ENTRYPOINT ["nilai", "api"]
