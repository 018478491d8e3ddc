#!/usr/bin/env bash
# The `long` tier: end-to-end runs of minutes kept out of the README's test command so that it stays under 30 min on
# 2 cores (pyproject's addopts deselects them). Run before a release or after touching the loop, SLURM or GEPA
# service code. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh && .venv/bin/python -m pytest -q -m long "$@"
