"""GAN pipeline speed: decoder and prior training throughput with model FLOP utilisation, and
sampling throughput of the whole text-to-image Pipeline at batch 1 and 64.

    python benchmarks/bench_gan.py [--steps 10] [--checkpoint runs/shapes/model.npz]

Training FLOPs come from XLA's cost analysis of the compiled step (both players, forward and
backward, optimizer); MFU is against the float32 matmul peak measured in the same run. Sampling
is timed after compilation on the shipped model (or --checkpoint): prompt -> CLIP text tower ->
prior (its DDIM or Euler steps) -> generator, pictures as uint8 on the host.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time

import jax
import numpy as np

from bench_clip import compiled_flops, matmul_peak_gflops
from dalle_jax import host
from dalle_jax import config as config_lib
from dalle_jax import sharding
from dalle_jax.pipeline import Pipeline
from dalle_jax.train import clip as clip_family
from dalle_jax.train import loop, stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "shapes_gan.py")


def bench_stage(stage: str, steps: int, overrides: tuple[str, ...] = (), config: str = CONFIG):
    """One stage of a pipeline config (default: the GAN's), timed on random weights."""
    config = config_lib.load(config, [f"{stage}.progress_bar=False", *overrides])
    stage_config = config[stage]
    clip_params = clip_family.CLIPTask(config.clip).init_params(jax.random.PRNGKey(0))
    task = stages.build_task(stage_config, clip_params, config.clip)
    with tempfile.TemporaryDirectory() as workdir:
        mesh, task, step_fn, state, iterator, ckpt = loop.setup(stage_config, workdir, task)
        batch = sharding.global_batch(next(iterator), mesh)
        frozen = jax.device_put(task.frozen, sharding.replicated(mesh))
        flops = compiled_flops(step_fn.lower(state, batch, frozen).compile())
        for _ in range(2):
            state, metrics = step_fn(state, batch, frozen)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, metrics = step_fn(state, batch, frozen)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
        ckpt.close()
    step_time = float(np.median(times))
    params = sum(x.size for x in jax.tree.leaves(state.params))
    b = stage_config.data.global_batch
    return dict(batch=b, params=params, step_s=step_time, images_per_s=b / step_time,
                flops=flops, gflops_per_s=flops / step_time / 1e9, family=stage_config.family)


def bench_sampling(pipe_path: str | None, batch: int, reps: int,
                   prompt: str = "a large red circle in the top left"):
    """Images/s drawing `batch` copies of `prompt` (median of `reps`, after compiling). A
    model with a layout stage samples a layout only for prompts that name two objects."""
    pipe = Pipeline.load(pipe_path, batch_size=batch)
    prompts = [prompt] * batch
    pipe.generate(prompts, seed=0)  # compile
    times = []
    for r in range(reps):
        t = time.perf_counter()
        pipe.generate(prompts, seed=r + 1)
        times.append(time.perf_counter() - t)
    t = float(np.median(times))
    return dict(batch=batch, seconds=t, images_per_s=batch / t)


def main():
    host.from_environment()  # DALLE_JAX_MALLOC=keep: dalle_jax/host.py
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--checkpoint", help="model file to sample from (default: shipped)")
    args = parser.parse_args()
    peak = matmul_peak_gflops()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    print(f"# GAN pipeline, {time.strftime('%Y-%m-%d')}, commit {commit}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    print(f"float32 matmul peak (2048^3, best of 5): {peak:.1f} GFLOP/s\n")
    print("| training stage | batch | trained params | step (s) | images/s | GFLOP/step | "
          "GFLOP/s | MFU |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for stage in ("decoder", "prior"):
        r = bench_stage(stage, args.steps)
        print(f"| {stage} | {r['batch']} | {r['params'] / 1e6:.2f}M | {r['step_s']:.3f} | "
              f"{r['images_per_s']:.1f} | {r['flops'] / 1e9:.2f} | {r['gflops_per_s']:.1f} | "
              f"{r['gflops_per_s'] / peak:.0%} |", flush=True)
    print("\n| sampling (prompt -> picture) | batch | seconds per batch | images/s |")
    print("|---|---:|---:|---:|")
    for batch, reps in ((1, 20), (64, 5)):
        r = bench_sampling(args.checkpoint, batch, reps)
        print(f"| Pipeline.generate | {batch} | {r['seconds']:.4f} | {r['images_per_s']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
