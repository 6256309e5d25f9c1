#!/usr/bin/env bash
# Sets up the project's virtualenv, the one every command in the README uses: .venv (or $ANNEALING_VENV) with torch 2.13.0
# (CPU build) installed first, so nothing after it pulls a CUDA build of several GB, then this project, editable, with its
# training and development extras ([train,dev]). For a GPU: ANNEALING_TORCH="torch==2.13.0 --index-url <your CUDA index>".
# Run it again and it returns at once, unless pyproject.toml or the torch request changed (then it installs what changed).
# Used by scripts/first-run.sh, scripts/run-tests.sh and so by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${ANNEALING_VENV:-.venv}
torch_spec=${ANNEALING_TORCH:-torch==2.13.0}
stamp="$venv/.annealing-setup"
want="$torch_spec | pyproject.toml $(sha256sum pyproject.toml | cut -c1-16)"

if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "setup-env: $venv is ready ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
  exit 0
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "setup-env: needs Python 3.10 or newer; python3 is $(python3 --version 2>&1)" >&2; exit 1; }
start=$SECONDS
echo "setup-env: building $venv ($torch_spec, then the project with [train,dev]; a few minutes the first time)"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# shellcheck disable=SC2086 # torch_spec may carry pip options (an --index-url)
"$venv/bin/python" -m pip install -q $torch_spec
"$venv/bin/python" -m pip install -q -e ".[train,dev]"
"$venv/bin/python" - "$torch_spec" <<'PY'
import sys, torch
wanted = sys.argv[1].split()[0].partition("==")[2]
if wanted and not torch.__version__.startswith(wanted):
    sys.exit(f"setup-env: torch {torch.__version__} was installed, not {wanted}: a later install replaced it")
PY
echo "$want" > "$stamp"
echo "setup-env: $venv ready in $((SECONDS - start)) s"
