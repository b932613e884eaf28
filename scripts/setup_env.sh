# Sourced by scripts/quickstart.sh and scripts/test.sh: make a Python environment that runs this project.
# Uses the active virtual environment, or creates and activates .venv in the repository. PyTorch: one already
# installed is kept; otherwise the default (CUDA) build where an NVIDIA GPU is visible, and the CPU build
# (the same version that is tested, TORCH_CPU_VERSION) where none is. Then the project, editable, with the
# extras given as arguments.

setup_env() {
    local extras="$1"
    if [ -z "${VIRTUAL_ENV:-}" ]; then
        if [ ! -x .venv/bin/python ]; then
            python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
                || { echo "error: Python 3.10 or newer is needed as python3" >&2; exit 2; }
            echo "creating a virtual environment in .venv"
            python3 -m venv .venv
        fi
        # shellcheck disable=SC1091
        source .venv/bin/activate
    fi
    if ! python -c 'import torch' 2>/dev/null; then
        if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
            echo "installing PyTorch (an NVIDIA GPU is visible: the default CUDA build)"
            pip install --quiet torch
        else
            echo "installing PyTorch ${TORCH_CPU_VERSION:-2.13.0} (no NVIDIA GPU: the CPU build)"
            pip install --quiet "torch==${TORCH_CPU_VERSION:-2.13.0}" \
                --index-url https://download.pytorch.org/whl/cpu
        fi
    fi
    echo "installing the project with [$extras]"
    pip install --quiet -e ".[$extras]"
}
