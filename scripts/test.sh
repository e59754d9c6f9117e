#!/usr/bin/env bash
# The whole test suite: sets up ./.venv (scripts/env.sh) and runs pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh dev
exec .venv/bin/python -m pytest -n 2 "$@"
