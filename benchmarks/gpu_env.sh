# Sourced by the GPU checks (gpu_check.sh, gpu_kernels_check.sh): the repository root as working directory, the
# results folder, wheels from .whl/ on an offline machine without the package's dependencies, and what runs.
#
# An offline machine without the package's dependencies: put wheels (Python 3.12, manylinux) of what is missing
# (transformers >= setup.cfg's minimum, datasets, dill, multiprocess, xxhash) in .whl/ at the repository root.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$RESULTS"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, accelerate, datasets; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| accelerate', accelerate.__version__, '| datasets', datasets.__version__)" || exit 1
