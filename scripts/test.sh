#!/usr/bin/env bash
# The whole test suite: sets up ./.venv (scripts/env.sh) and runs pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh dev
# The status page test drives Debian's Chromium (never a downloaded browser); install it where we
# can (root with apt-get), else that test skips with the reason.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  log=/tmp/edgetune-chromium-install.log
  echo "edgetune: installing Debian's chromium for the status page test (log: $log)" >&2
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; } >"$log" 2>&1 \
    || echo "edgetune: chromium install failed (see $log); the browser test will be skipped" >&2
fi
exec .venv/bin/python -m pytest -n 2 "$@"
