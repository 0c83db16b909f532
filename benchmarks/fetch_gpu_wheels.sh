#!/usr/bin/env bash
# Downloads, into .whl/ at the repository root, the wheels that benchmarks/gpu.sh installs on a
# lent GPU machine: the packages dalle_jax imports that its image lacks (grain, ml_collections,
# ftfy) and their requirements not already there (array-record, portpicker, wcwidth), for
# CPython 3.12 on x86-64 Linux. The recipe and the machine's package list are the device tool's
# (README.md and KINDS.md of /work/.library/device). .whl/ is git-ignored: never commit it.
#
#     bash benchmarks/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Versions as installed here (pip show), so the GPU run imports the code the tests ran.
WHEELS=(grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0
        ftfy==6.3.1 wcwidth==0.7.0)

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl "${WHEELS[@]}"
ls -1 .whl
du -sh .whl
