#!/usr/bin/env bash
# The GPU check in one command, at most about 8 minutes on one H100/H200 (setup included): the
# `gpu`-marked tests and the three benchmarks at 350M, each under a time budget, gathered into ONE
# JSON file of figures by scripts/gpu_check.py (which says what runs, in which order, for how long).
#
#   bash scripts/gpu_check.sh [--output PATH] [--deadline-s SECONDS]
#       writes $OUT/gpu_check.json when $OUT is set, else outputs/gpu_check.json, and every part's
#       output to gpu_check.log beside it; a part that fails is recorded and the next one runs; exits
#       non-zero if the setup or any part failed. GPU_CHECK_DEADLINE_S also sets the deadline.
#   bash scripts/gpu_check.sh --dry-run      (or GPU_CHECK_DRY_RUN=1)
#       any machine, no GPU work, no install: checks that everything it would run exists, that the
#       benchmarks accept their arguments and that the gpu tests collect; prints the plan as JSON.
#
# Python: $STABLESPAM_PYTHON as it is, when set. Else the venv $STABLESPAM_VENV (default .venv-gpu),
# made once. Where python3 already has a CUDA torch (a GPU image), the venv is layered on python3's
# site-packages (a .pth file), so that torch is used and only the project and its missing
# dependencies are installed; elsewhere scripts/setup_env.sh installs pip's CUDA torch and the
# project. STABLESPAM_WHEELS=DIR installs from the wheels in DIR without an index, for a GPU machine
# without network. A dry run installs nothing: it takes $STABLESPAM_PYTHON, the venv, .venv or
# python3, whichever exists first.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
started_at=$(date +%s)
dry_run=${GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
  if [ "$arg" = --dry-run ]; then dry_run=1; fi
done
venv=${STABLESPAM_VENV:-$root/.venv-gpu}
setup_log=$(mktemp)
trap 'rm -f "$setup_log"' EXIT

layer_on_python3() {
  # A venv that sees python3's packages (torch) behind its own; pip comes from python3's layer.
  python3 -m venv --without-pip "$venv" || return
  local site
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return
  python3 -c 'import site; print("\n".join(site.getsitepackages()))' >"$site/python3-site.pth" || return
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-build-isolation -e "$root[dev]"
}

setup() {
  if [ -n "${STABLESPAM_WHEELS:-}" ]; then
    export PIP_NO_INDEX=1 PIP_FIND_LINKS=$STABLESPAM_WHEELS
  fi
  if [ -x "$venv/bin/python" ] && [ "$venv/.installed" -nt pyproject.toml ]; then
    setup_status=reused
    return 0
  fi
  setup_status=installed
  if python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    layer_on_python3 && touch "$venv/.installed"
  else
    STABLESPAM_VENV=$venv scripts/setup_env.sh
  fi
}

if [ -n "${STABLESPAM_PYTHON:-}" ]; then
  python=$STABLESPAM_PYTHON
  setup_status=given
elif [ "$dry_run" = 1 ]; then
  python=python3
  for candidate in "$venv/bin/python" "$root/.venv/bin/python"; do
    if [ -x "$candidate" ]; then python=$candidate; break; fi
  done
  setup_status=given
else
  echo "gpu_check: setting up $venv" >&2
  if ! setup >"$setup_log" 2>&1; then
    setup_status=failed
    cat "$setup_log" >&2
  fi
  python=$venv/bin/python
  "$python" -c '' 2>/dev/null || python=python3  # record the failure with whatever runs
fi
setup_s=$(( $(date +%s) - started_at ))
[ "$dry_run" = 1 ] && set -- --dry-run "$@"
"$python" scripts/gpu_check.py --started-at "$started_at" --setup-status "$setup_status" \
  --setup-s "$setup_s" --setup-log "$setup_log" "$@"
