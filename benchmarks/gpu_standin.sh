#!/usr/bin/env bash
# benchmarks/gpu.sh checked without a GPU: a CPU stand-in for the lent machine's software.
#
#     bash benchmarks/fetch_gpu_wheels.sh          # once: the wheels gpu.sh carries
#     PYTHON312=~/.pyenv/versions/3.12.1/bin/python3.12 bash benchmarks/gpu_standin.sh [--quick]
#
# The lent machine runs Python 3.12 with jax 0.11 and, of what dalle_jax imports, flax, optax,
# orbax-checkpoint, numpy, pillow, tqdm, regex and grain's own requirements (absl-py,
# cloudpickle, etils, protobuf, psutil, pyyaml), but not grain, ml_collections or ftfy (the
# device tool's KINDS.md). This makes a venv of just that (CPU jaxlib) in /tmp/dalle_jax_gpu_standin
# and runs gpu.sh in it, so that an import the image lacks or an API that jax 0.11 changed
# shows up here, not in the few minutes a lent accelerator gives. Figures from it are CPU
# figures, not GPU ones. Extra arguments go to gpu.sh (and on to run_all.py).
set -euo pipefail
cd "$(dirname "$0")/.."
py312="${PYTHON312:-python3.12}"
venv="${STANDIN_VENV:-/tmp/dalle_jax_gpu_standin}"
if [ ! -x "$venv/bin/python" ]; then
  "$py312" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --progress-bar off "jax[cpu]==0.11.2" flax optax \
    orbax-checkpoint numpy pillow tqdm regex absl-py cloudpickle "etils[epath,epy]" protobuf \
    psutil pyyaml
fi
compgen -G ".whl/*.whl" >/dev/null || { echo "no .whl/: run benchmarks/fetch_gpu_wheels.sh first"; exit 1; }
rm -rf /tmp/site  # gpu.sh installs the carried wheels here, as it would on the lent machine
PYTHON="$venv/bin/python" OUT="${OUT:-/tmp/dalle_jax_gpu_standin_out}" bash benchmarks/gpu.sh "$@"
