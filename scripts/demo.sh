#!/usr/bin/env bash
# The main job: sets up ./.venv (scripts/env.sh) and runs `edgetune demo`. Extra args go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh dev
exec .venv/bin/edgetune demo "$@"
