"""Parameter initialisation: compile time with and without XLA's backend optimisation.

    python benchmarks/bench_init.py

For every stage of the shipped configs (configs/shapes_gan.py, configs/shapes_unclip.py), the
stage task's `init_params` is compiled twice in one process: as `jax.jit` compiles it (the
backend's default optimisation) and as `dalle_jax.once.jit` does (optimisation level 0, what
the trainer and the tasks use). Each row gives both compile times (no persistent cache, one
compile each), the ratio, the compiled programs' run times (median of 5) and the largest
difference between the parameters they draw. No cache is read or written.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dalle_jax import config as config_lib  # noqa: E402
from dalle_jax import once  # noqa: E402
from dalle_jax.train import clip as clip_family  # noqa: E402
from dalle_jax.train import stages  # noqa: E402


def compile_and_run(jitted, rng, reps: int = 5):
    t = time.perf_counter()
    compiled = jitted.lower(rng).compile()
    compile_s = time.perf_counter() - t
    params = jax.block_until_ready(compiled(rng))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(compiled(rng))
        times.append(time.perf_counter() - t)
    return compile_s, float(np.median(times)), params


def bench_task(task, rng):
    """(params, optimised compile s, once compile s, optimised run s, once run s, max diff)."""
    opt_compile, opt_run, a = compile_and_run(jax.jit(task.init_params), rng)
    once_fn = jax.jit(task.init_params, compiler_options=once.COMPILER_OPTIONS)
    once_compile, once_run, b = compile_and_run(once_fn, rng)
    diff = max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    size = sum(x.size for x in jax.tree.leaves(a))
    return size, opt_compile, once_compile, opt_run, once_run, diff


def main():
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    print(f"# Parameter initialisation, {time.strftime('%Y-%m-%d')}, commit {commit}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}\n")
    print("| config: stage | params | compile, optimised (s) | compile, once.jit (s) | ratio | "
          "run, optimised (ms) | run, once.jit (ms) | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rng = jax.random.PRNGKey(0)
    for name, stage_names in (("shapes_gan", ("clip", "prior", "decoder")),
                              ("shapes_unclip", ("prior", "decoder"))):
        config = config_lib.load(os.path.join(ROOT, "configs", f"{name}.py"))
        clip_params = clip_family.CLIPTask(config.clip).init_params(jax.random.PRNGKey(1))
        for stage in stage_names:
            task = (clip_family.CLIPTask(config.clip) if stage == "clip" else
                    stages.build_task(config[stage], clip_params, config.clip))
            size, oc, wc, orun, wrun, diff = bench_task(task, rng)
            print(f"| {name}: {stage} | {size / 1e6:.2f}M | {oc:.2f} | {wc:.2f} | "
                  f"{oc / wc:.1f}x | {orun * 1e3:.1f} | {wrun * 1e3:.1f} | {diff:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
