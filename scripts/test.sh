#!/usr/bin/env bash
# The README's second command (and CI's): set up (see scripts/setup_env.sh) with every extra the tests use,
# then run the test suite. Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup_env.sh
setup_env dev,plot,slurm,hf,lm_eval,schedulefree

python -m pytest "$@"
