#!/usr/bin/env bash
# Makes benchmarks/peers/.venv: the PyTorch peers of benchmarks/bench_peers.py (issue 5).
# Kept outside the project's dependencies and CI because the peers import torchvision.
# torch/torchvision come from this machine's local wheel index; the peers from PyPI.
# Usage: bash benchmarks/peers/setup_venv.sh   (about 6 GB on disk, several minutes)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
if [ ! -x "$venv/bin/python" ]; then
  nice "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --no-input --progress-bar off)
nice "${pip[@]}" torch==2.14.1 torchvision==0.29.1
# The peers, pinned to the releases this benchmark was written against (dalle2-pytorch
# 1.15.6 requires open_clip_torch < 3, hence 2.32.0).
nice "${pip[@]}" dalle2-pytorch==1.15.6 gigagan-pytorch==0.3.0 open_clip_torch==2.32.0 \
  torch==2.14.1 torchvision==0.29.1
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "torchvision", "dalle2-pytorch", "gigagan-pytorch", "open_clip_torch"):
    print(f"{name}=={md.version(name)}")
PY
echo "peers venv ready: $venv/bin/python"
