#!/usr/bin/env bash
# One entry point that does all set-up on a fresh machine with Python 3.10+:
#   ./run.sh bench [ARGS...]   the main job: train, calibrate, measure and report every method (dyntok bench)
#   ./run.sh test  [ARGS...]   the test suite (pytest)
#   ./run.sh dyntok ARGS...    any other dyntok command inside the project's environment
# The environment lives in .venv and is (re)built only when pyproject.toml or requirements/lock.txt changes.
# Every package is installed at the version in requirements/lock.txt (the versions the tests passed with), with
# the pip that comes with the Python it runs on, so two fresh machines get the same environment.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.dyntok-installed

ensure_env() {
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || { echo "dyntok needs Python 3.10 or newer (found $("$PYTHON" --version))" >&2; exit 1; }
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    local want
    want=$(cat pyproject.toml requirements/lock.txt | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
        echo "Installing dyntok and its locked dependencies into $VENV (first run: a few minutes)..." >&2
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
            --constraint requirements/lock.txt --editable ".[test]"
        echo "$want" > "$STAMP"
    fi
}

command=${1:-bench}
shift || true
ensure_env
case "$command" in
    bench) exec "$VENV/bin/dyntok" bench "$@" ;;
    test) exec "$VENV/bin/python" -m pytest "$@" ;;
    dyntok) exec "$VENV/bin/dyntok" "$@" ;;
    *) echo "usage: ./run.sh {bench|test|dyntok} [ARGS...]" >&2; exit 2 ;;
esac
