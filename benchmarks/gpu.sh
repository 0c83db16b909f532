#!/usr/bin/env bash
# The whole speed report (benchmarks/run_all.py, bf16 where it applies) on a lent GPU machine,
# inside 5 minutes, in one call of the device tool:
#
#     bash benchmarks/fetch_gpu_wheels.sh          # once, here: grain, ml_collections, ftfy
#     run(command="DALLE_JAX_COMMIT=<hash> bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=330)
#
# That machine has Python 3.12 with its own jax, flax, optax, orbax, tqdm and regex, but neither
# grain, ml_collections nor ftfy, and no network: where they do not import, the wheels carried
# in .whl/ are installed into /tmp/site (the device README's recipe). The table goes to
# $OUT/speed_gpu.md and everything printed to $OUT/log (to /tmp/dalle_jax_bench without OUT).
# Extra arguments go to run_all.py (--quick, --only ...). BENCH_DEADLINE (s, default 170) is
# when run_all.py stops starting new benchmarks; BENCH_TIMEOUT (s, default 250) kills it,
# keeping the rows already written.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out_dir="${OUT:-/tmp/dalle_jax_bench}"
mkdir -p "$out_dir"
py="${PYTHON:-python3}"

run() {
  if ! "$py" -c "import grain, ml_collections, ftfy" 2>/dev/null \
      && compgen -G ".whl/*.whl" >/dev/null; then
    timeout 90 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader \
    || echo "nvidia-smi: not available"
  timeout 60 "$py" -c "import jax; print('jax', jax.__version__, jax.devices())"
  timeout --kill-after=10 "${BENCH_TIMEOUT:-250}" "$py" benchmarks/run_all.py --bf16 \
    --deadline "${BENCH_DEADLINE:-170}" --out "$out_dir/speed_gpu.md" "$@"
}

run "$@" 2>&1 | tee "$out_dir/log"
