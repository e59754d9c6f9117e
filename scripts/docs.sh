#!/usr/bin/env bash
# Regenerates the generated parts of docs/ (the configuration table from daemon.ops.config.Settings,
# the CLI reference from `edgetune ... --help`) with cog. tests/test_docs.py fails when they drift.
# Sets up ./.venv (scripts/env.sh) like the other scripts. Extra args go to cog (e.g. --check --diff).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh dev
VENV=${EDGETUNE_VENV:-.venv}
if [ "$#" = 0 ]; then
  set -- -r
fi
exec "$VENV/bin/python" -m cogapp "$@" -I . -I docs docs/configuration.md docs/cli.md
