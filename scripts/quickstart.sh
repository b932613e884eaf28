#!/usr/bin/env bash
# The README's first command: set up (see scripts/setup_env.sh), train the quick start, plot its curve.
# Extra arguments go to train.py, e.g. `bash scripts/quickstart.sh optim=sophia_g`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup_env.sh
setup_env plot

python train.py experiment=quickstart "$@"
python scripts/plot_curves.py runs/quickstart/*/ --out runs/quickstart/val_loss.png
echo "next: source .venv/bin/activate (unless you use your own environment), then see the README"
