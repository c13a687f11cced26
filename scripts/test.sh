#!/usr/bin/env bash
# The README's second command (and CI's): set up .venv, then run the default test suite.
# Extra arguments go to pytest (e.g. `-m slow` for the long tests).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup_env.sh"
cd "$root"
exec "${STABLESPAM_VENV:-$root/.venv}/bin/python" -m pytest "$@"
