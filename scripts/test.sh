#!/usr/bin/env bash
# The README's second command (and CI's): set up (see scripts/setup_env.sh) with every extra the tests use,
# and the older transformers the export is tested under (scripts/old_transformers.sh), then run the test
# suite. Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`. Under CI=true, a test that
# needs a missing extra or the older transformers fails instead of being skipped (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup_env.sh
# shellcheck disable=SC1091
source scripts/old_transformers.sh
setup_env dev,plot,slurm,hf,lm-eval,schedulefree,tensorboard
SOPHIA_OLD_TRANSFORMERS="$(old_transformers)"
export SOPHIA_OLD_TRANSFORMERS

python -m pytest "$@"
