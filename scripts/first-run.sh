#!/usr/bin/env bash
# The first run on a fresh machine: sets up .venv (scripts/setup-env.sh), then runs the pack's main job on its embedded
# default, a benchmark's quick run that needs no model download and ends in figures, and says where they are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
py=${ANNEALING_VENV:-.venv}/bin/python
out=results/first-run
start=$SECONDS

# The benchmark's quick run (its own output folder, rewritten on every first run):
"$py" -m training.toy --quick --out "$out" --force

echo
echo "first-run: done in $((SECONDS - start)) s after set-up. Figures:"
for figure in "$out"/*.png; do echo "  $PWD/$figure"; done
echo "Next: bash scripts/run-tests.sh (the test suite, as CI runs it)"
