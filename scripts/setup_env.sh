#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install the project into it.
# torch is installed first and pinned: on a machine without an NVIDIA GPU `torch==2.13.0` (the CPU
# wheel that our CPU machines serve locally; elsewhere add PIP_EXTRA_INDEX_URL for PyTorch's CPU
# index), on a GPU node the newest CUDA build. STABLESPAM_TORCH overrides the requirement, and an
# existing torch in the environment is kept. Later installs never replace it because pyproject.toml
# only asks for torch>=2.4.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="${STABLESPAM_VENV:-$root/.venv}"
stamp="$venv/.installed"
if [ -f "$stamp" ] && [ "$stamp" -nt "$root/pyproject.toml" ]; then
  exit 0
fi
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${STABLESPAM_TORCH:-}" ]; then
    "${pip[@]}" "$STABLESPAM_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" torch
  else
    "${pip[@]}" "torch==2.13.0"
  fi
fi
"${pip[@]}" -e "$root[dev]"
touch "$stamp"
