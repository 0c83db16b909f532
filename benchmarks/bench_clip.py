"""CLIP training throughput and model FLOP utilisation (MFU).

    python benchmarks/bench_clip.py [--steps 10] [--skip-b16]

FLOPs per step come from XLA's cost analysis of the compiled train step (forward, backward and
optimizer); MFU is those FLOPs over the measured step time, against this machine's float32
matmul peak measured in the same run (best of several large square matmuls). The step is timed
on a fixed batch, so the figure is the model's, not the input pipeline's; the input pipeline's
own rate is printed beside it.
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
from dalle_jax import config as config_lib
from dalle_jax import sharding
from dalle_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "shapes_clip.py")


def cpu_name() -> str:
    """The CPU's model name from lscpu, else what platform knows."""
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split(
            "Model name:")[1].splitlines()[0].strip()
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


def matmul_peak_gflops(n: int = 2048, reps: int = 5, dtype=jnp.float32) -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    # Accumulated in float32: XLA:CPU runs a bf16 x bf16 -> bf16 dot at a fifth of the speed of
    # bf16 x bf16 -> f32 on a CPU with AMX (benchmarks/RESULTS.md, session 23).
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def compiled_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


def bench_train_step(overrides, steps: int):
    config = config_lib.load(CONFIG, ["progress_bar=False"] + overrides)
    with tempfile.TemporaryDirectory() as workdir:
        mesh, task, step_fn, state, iterator, ckpt = loop.setup(config, workdir)
        t = time.perf_counter()
        local = [next(iterator) for _ in range(4)]
        loader_rate = 4 * config.data.global_batch / (time.perf_counter() - t)
        batch = sharding.global_batch(local[0], mesh)
        flops = compiled_flops(step_fn.lower(state, batch, task.frozen).compile())
        for _ in range(2):
            state, metrics = step_fn(state, batch, task.frozen)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, metrics = step_fn(state, batch, task.frozen)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
        ckpt.close()
    step_time = float(np.median(times))
    params = sum(x.size for x in jax.tree.leaves(state.params))
    return dict(batch=config.data.global_batch, params=params, step_s=step_time,
                images_per_s=config.data.global_batch / step_time, flops=flops,
                gflops_per_s=flops / step_time / 1e9, loader_images_per_s=loader_rate)


def main():
    host.from_environment()  # DALLE_JAX_MALLOC=keep: dalle_jax/host.py
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip-b16", action="store_true")
    args = parser.parse_args()

    peak = matmul_peak_gflops()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    print(f"# CLIP training, {time.strftime('%Y-%m-%d')}, commit {commit}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    print(f"float32 matmul peak (2048^3, best of 5): {peak:.1f} GFLOP/s\n")
    cases = [("shapes tiny 32px (default config)", [], args.steps)]
    if not args.skip_b16:
        cases.append(("B/16 224px", ["model.variant=B/16", "data.image_size=224",
                                     "data.context_length=77", "data.global_batch=8",
                                     "data.num_threads=1"], max(3, args.steps // 3)))
    print("| model | batch | params | step (s) | images/s | GFLOP/step | GFLOP/s | MFU | "
          "loader images/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, overrides, steps in cases:
        r = bench_train_step(overrides, steps)
        print(f"| {name} | {r['batch']} | {r['params'] / 1e6:.1f}M | {r['step_s']:.3f} | "
              f"{r['images_per_s']:.1f} | {r['flops'] / 1e9:.1f} | {r['gflops_per_s']:.1f} | "
              f"{r['gflops_per_s'] / peak:.0%} | {r['loader_images_per_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
