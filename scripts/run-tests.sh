#!/usr/bin/env bash
# The test suite as CI runs it (the first half of .ci/run): sets up .venv (scripts/setup-env.sh), then ruff and the README's
# test command, `python -m pytest -q`, in that environment. Extra arguments go to pytest (e.g. -x, or a test file).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
# shellcheck disable=SC1091
source "${ANNEALING_VENV:-.venv}/bin/activate"
ruff check .
python -m pytest -q "$@"
