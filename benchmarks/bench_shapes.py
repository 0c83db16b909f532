"""Throughput of the captioned-shapes generator and of the adherence scorer (one core).

    python benchmarks/bench_shapes.py [--n 2000] [--sizes 32 64 128]

Targets (the generator feeds a training loop): >= ~1000 images/s at 32 px and >= ~300 images/s
at 64 px on one core.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# One core: keep any BLAS from spreading out (numpy reads these at import).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

try:
    import dalle_jax  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dalle_jax.data import shapes as S  # noqa: E402
from dalle_jax.metrics import adherence as A  # noqa: E402


def _rate(fn, n: int) -> float:
    fn(0)  # warm up
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="examples per measurement")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    args = parser.parse_args(argv)
    n = args.n

    rate = _rate(lambda i: S.scene(i, "train"), n)
    print(f"scene():            {rate:9.0f} scenes/s")
    for size in args.sizes:
        scenes = [S.scene(i, "train") for i in range(n)]
        render_rate = _rate(lambda i: S.render(scenes[i % n], size), n)
        example_rate = _rate(lambda i: S.example(i, "train", 0, size), n)
        data = [S.example(i, "eval", 0, size) for i in range(min(n, 500))]
        score_rate = _rate(lambda i: A.score(*data[i % len(data)]), len(data))
        print(
            f"{size:4d} px: render {render_rate:7.0f} img/s | example (scene+render) "
            f"{example_rate:7.0f} img/s | score {score_rate:6.0f} img/s"
        )


if __name__ == "__main__":
    main()
