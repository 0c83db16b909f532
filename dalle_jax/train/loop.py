"""The shared training loop: any model family, any mesh, resumable by rerunning it.

`train_and_evaluate(config, workdir)` builds the mesh, creates the state already sharded
(eval_shape -> shardings -> jit(init, out_shardings)), restores the newest checkpoint in
`workdir` if there is one (state and input position), then runs the jitted step, logging
health metrics to the terminal and to `workdir/metrics.jsonl`, evaluating and checkpointing at
the configured intervals.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
from tqdm import tqdm

from dalle_jax import checkpoint as ckpt_lib
from dalle_jax import sharding
from dalle_jax.data import pipeline
from dalle_jax.train import optim
from dalle_jax.train import state as state_lib


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, say). Its message is one line, for the user."""


def build_task(config):
    from dalle_jax.train.clip import CLIPTask
    tasks = {"clip": CLIPTask}
    if config.family not in tasks:
        raise ValueError(f"unknown model family {config.family!r}; valid: {', '.join(tasks)}")
    return tasks[config.family](config)


class MetricWriter:
    """JSON lines, one record per logged step, appended so that resumed runs continue it."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time(),
                  **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _meta(config) -> dict:
    return {"family": config.family, "config": json.loads(config.to_json_best_effort())}


def setup(config, workdir: str, task=None):
    """Everything but the loop itself: (mesh, task, train step, state, iterator, checkpointer).

    Split out so that tests and benchmarks can drive the very same objects. `task` defaults to
    the family the config names.
    """
    mesh = sharding.make_mesh(dict(config.mesh))
    jax.set_mesh(mesh)
    task = task or build_task(config)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)

    def init(rng):
        init_rng, train_rng = jax.random.split(rng)
        return state_lib.create(task.init_params(init_rng), tx, train_rng)

    rng = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(init, rng)
    shardings = sharding.tree_shardings(mesh, abstract, config.sharding.params,
                                        [tuple(r) for r in config.sharding.rules])
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         max_to_keep=config.keep_checkpoints)
    iterator = pipeline.make_iterator(
        pipeline.make_dataset(config.data, jax.process_index(), jax.process_count()),
        num_threads=config.data.num_threads)
    if checkpointer.latest_step() is not None:
        state, _ = checkpointer.restore(ckpt_lib.abstract_with_shardings(abstract, shardings),
                                        iterator)
    else:
        state = jax.jit(init, out_shardings=shardings)(rng)
    step_fn = jax.jit(
        state_lib.make_train_step(task.grad_fn, tx, schedule, config.optim.ema_decay,
                                  config.grad_accum_steps),
        in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,))
    return mesh, task, step_fn, state, iterator, checkpointer


def train_and_evaluate(config, workdir: str, stop_at_step: int | None = None, task=None):
    """Trains to `config.total_steps` (or stops early at `stop_at_step`); returns the state.

    `task` defaults to the family the config names (families that stand on a frozen CLIP are
    built by `dalle_jax.train.stages`). A finished run returns its restored state at once.
    """
    os.makedirs(workdir, exist_ok=True)
    mesh, task, step_fn, state, iterator, checkpointer = setup(config, workdir, task)
    task.workdir = workdir
    writer = MetricWriter(workdir)
    meta = _meta(config)
    start = int(state.step)
    end = min(config.total_steps, stop_at_step or config.total_steps)
    show = jax.process_index() == 0 and config.progress_bar
    bar = tqdm(total=config.total_steps, initial=start, disable=not show, dynamic_ncols=True,
               file=sys.stderr, desc=config.family)
    if start >= end:
        bar.close()
        checkpointer.close()
        return state
    if start:
        tqdm.write(f"resumed from step {start} in {workdir}", file=sys.stderr)
    last_time, last_step = time.perf_counter(), start
    for step in range(start, end):
        batch = sharding.global_batch(next(iterator), mesh)
        state, metrics = step_fn(state, batch, task.frozen)
        done = step + 1
        if done % config.log_every == 0 or done == end:
            metrics = jax.device_get(metrics)
            if not all(math.isfinite(float(v)) for v in metrics.values()):
                checkpointer.close()
                raise TrainingError(f"non-finite metrics at step {done}: "
                                    + ", ".join(f"{k}={float(v):.4g}" for k, v in metrics.items()))
            now = time.perf_counter()
            metrics["images_per_s"] = (done - last_step) * config.data.global_batch / (now - last_time)
            last_time, last_step = now, done
            writer.write(done, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.0f}",
                            refresh=False)
        if config.eval_every and (done % config.eval_every == 0 or done == config.total_steps):
            results = task.evaluate(state.ema_params if config.eval.use_ema else state.params, done)
            writer.write(done, results)
            tqdm.write(f"step {done} eval: " + ", ".join(f"{k}={v:.3f}" for k, v in results.items()),
                       file=sys.stderr)
            last_time = time.perf_counter()  # evaluation time is not training throughput
        if done % config.checkpoint_every == 0 or done == end:
            checkpointer.save(done, state, iterator, meta, force=True)
        bar.update(1)
    bar.close()
    checkpointer.close()
    return state
