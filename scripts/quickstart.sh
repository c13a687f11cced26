#!/usr/bin/env bash
# The README's first command: set up .venv, then train a tiny LLaMA with Stable-SPAM in INT4 on the
# bundled sample corpus (CPU, no network). Extra arguments are Hydra overrides.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup_env.sh"
cd "$root"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "${STABLESPAM_VENV:-$root/.venv}/bin/python" train.py +experiment=quickstart trainer.cpu=true \
  "run_dir=outputs/quickstart-$(date +%Y%m%d-%H%M%S)" "$@"
