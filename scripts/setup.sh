#!/usr/bin/env bash
# One-command set-up from a fresh clone: a Python >= 3.12 virtualenv with nilai and its dev tools.
#
# Usage: scripts/setup.sh            (or: make setup)
#
# Environment:
#   PYTHON=/path/to/python3.12   use this interpreter instead of searching for one
#   VENV=.venv                   where the virtualenv lives (default .venv, as in the Makefile)
#   NILAI_INSTALL_HOOKS=1        also install the pre-commit git hooks (same as `make hooks`)
#
# Every package is installed at the version locked in constraints.txt (pip constraints; `make lock`
# regenerates it from a tested virtualenv), so CI and every clone test the same set.
#
# Safe to run again: an existing virtualenv is reused (or rebuilt when its Python is older than
# 3.12) and the install is refreshed. The last step writes $VENV/.installed with the SHA-256 of
# pyproject.toml and constraints.txt, which the Makefile uses to tell when the install is out of
# date.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${VENV:-.venv}"
STAMP="$VENV/.installed"
MIN_VERSION="3.12"

say() { printf '==> %s\n' "$*"; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }

# True when "$1" runs and is Python >= 3.12 (pyenv shims for versions not selected fail here).
is_modern_python() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
    local candidates=()
    local name
    for name in python3.12 python3.13; do
        if command -v "$name" >/dev/null 2>&1; then
            candidates+=("$(command -v "$name")")
        fi
    done
    local path
    for path in /root/.pyenv/versions/3.12*/bin/python; do
        if [[ -x "$path" ]]; then candidates+=("$path"); fi
    done
    if command -v pyenv >/dev/null 2>&1; then
        local root
        root="$(pyenv root 2>/dev/null || true)"
        if [[ -n "$root" ]]; then
            for path in "$root"/versions/3.12*/bin/python; do
                if [[ -x "$path" ]]; then candidates+=("$path"); fi
            done
        fi
    fi
    if command -v python3 >/dev/null 2>&1; then
        candidates+=("$(command -v python3)")
    fi

    local candidate
    for candidate in ${candidates[@]+"${candidates[@]}"}; do
        if is_modern_python "$candidate"; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    return 1
}

if [[ -n "${PYTHON:-}" ]]; then
    is_modern_python "$PYTHON" || die "PYTHON=$PYTHON is not a working Python >= $MIN_VERSION;
  unset PYTHON to search for one, or point it at a Python $MIN_VERSION+ interpreter."
    PY="$PYTHON"
else
    PY="$(find_python)" || {
        cat >&2 <<EOF
setup: no Python >= $MIN_VERSION found.
  nilai needs Python $MIN_VERSION or newer. Looked for python3.12 and python3.13 on PATH,
  pyenv installs of 3.12, and python3 (only used if it is $MIN_VERSION or newer).
  Install Python $MIN_VERSION (e.g. 'pyenv install 3.12' or your OS package), or point at one:
    PYTHON=/path/to/python3.12 scripts/setup.sh
EOF
        exit 1
    }
fi
# Resolve shims (pyenv) to the real interpreter, so the virtualenv does not depend on them.
PY="$("$PY" -c 'import sys; print(sys.executable)')"
say "Using $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"

# Reuse the virtualenv when its interpreter is new enough; otherwise rebuild it.
if [[ -e "$VENV" ]] && ! is_modern_python "$VENV/bin/python"; then
    if [[ ! -f "$VENV/pyvenv.cfg" ]]; then
        die "$VENV exists but is not a virtualenv; move it away or set VENV to another path."
    fi
    say "Rebuilding $VENV (its Python is missing or older than $MIN_VERSION)"
    rm -rf -- "$VENV"
fi
if [[ ! -e "$VENV" ]]; then
    say "Creating $VENV"
    "$PY" -m venv "$VENV" || die "could not create $VENV with $PY (on Debian/Ubuntu the venv
  module is a separate package, e.g. python3.12-venv)."
fi

say "Upgrading pip"
"$VENV/bin/python" -m pip install --quiet --upgrade pip

say "Installing nilai (editable) with the dev tools and the local engine"
say "(PyTorch and transformers: a few GB on the first install; pip shows its progress)"
rm -f -- "$STAMP"
"$VENV/bin/python" -m pip install --progress-bar on --constraint constraints.txt -e '.[dev,local,nildb,websearch,rag,attest]'

"$VENV/bin/python" - "$STAMP" <<'EOF'
import hashlib
import pathlib
import sys

files = ("pyproject.toml", "constraints.txt")
digest = hashlib.sha256(b"".join(pathlib.Path(name).read_bytes() for name in files)).hexdigest()
pathlib.Path(sys.argv[1]).write_text(digest + "\n")
EOF

if [[ "${NILAI_INSTALL_HOOKS:-0}" == "1" ]]; then
    if git rev-parse --git-dir >/dev/null 2>&1; then
        say "Installing the pre-commit git hooks"
        "$VENV/bin/pre-commit" install
    else
        say "Not a git checkout; skipping the pre-commit hooks"
    fi
fi

cat <<EOF

Set-up done ($VENV, $("$VENV/bin/python" -V)).
Next steps:
  make serve    run the gateway (configure it with NILAI_* variables; see .env.sample)
  make test     run the test suite with coverage (needs PostgreSQL and Redis for integration tests)
  make help     list the other targets (lint, typecheck, format, audit, bench, hooks)
EOF
