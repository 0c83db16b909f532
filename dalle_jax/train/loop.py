"""The shared training loop: any model family, any mesh, resumable by rerunning it.

`train_and_evaluate(config, workdir)` builds the mesh, creates the state already sharded
(eval_shape -> shardings -> jit(init, out_shardings)), restores the newest readable checkpoint
in `workdir` if there is one (state and input position), then runs the jitted step, logging
health metrics to the terminal and to `workdir/metrics.jsonl`, evaluating and checkpointing at
the configured intervals.

Two things keep a long run alive:
- Preemption. SIGTERM or SIGINT only sets a flag; between steps the loop saves a checkpoint of
  the current step, waits for every save to finish and raises `Preempted` (the command line
  prints it as one line and exits with status 0). Rerunning the command resumes. A second
  SIGINT interrupts at once, without a checkpoint.
- The NaN guard. The step drops any update whose loss or gradient is not finite
  (`state.make_train_step`); the loop counts those steps, and after
  `nan_guard.max_consecutive` in a row either rolls back to the newest checkpoint with the
  learning rate scaled by `nan_guard.lr_factor` ("rollback"; the input stream runs on, so the
  batches that led there are skipped, as PaLM did on loss spikes: Chowdhery et al. 2022,
  sec. 5.1) or stops with a `TrainingError` ("stop"). Configs without the block get
  `NAN_GUARD_DEFAULTS`.
Both per-step flags (skipped, stop) are read one step late, so reading them never stalls the
device, and they come out of the jitted step, so every process of a multi-host run sees the
same values and takes the same action at the same step.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from dalle_jax import checkpoint as ckpt_lib
from dalle_jax import once
from dalle_jax import sharding
from dalle_jax.data import pipeline
from dalle_jax.train import optim
from dalle_jax.train import state as state_lib

NAN_GUARD_DEFAULTS = {"max_consecutive": 20, "action": "rollback", "lr_factor": 0.5,
                      "max_rollbacks": 3}


class TrainingError(RuntimeError):
    """Training cannot go on (a loss that stays non-finite, say). Its message is one line."""


class Preempted(Exception):
    """Training stopped on a signal after checkpointing the current step; rerunning resumes.
    Its message is one line, for the user."""


class StopSignals:
    """While inside `catch()`, SIGTERM and SIGINT set `received` and do nothing else.

    Re-entrant: the command line spans a whole multi-stage run with it and each stage's loop
    enters it again; the previous handlers come back, and the flag is cleared, when the
    outermost `catch()` exits. Outside the main thread, where Python cannot install handlers,
    it does nothing.
    """

    def __init__(self):
        self.received: int | None = None
        self._depth = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        del frame
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now
        self.received = signum

    @contextlib.contextmanager
    def catch(self):
        outermost = self._depth == 0
        if outermost and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if outermost:
                for signum, handler in self._previous.items():
                    signal.signal(signum, signal.SIG_DFL if handler is None else handler)
                self._previous.clear()
                self.received = None


stop_signals = StopSignals()


def nan_guard_config(config) -> dict:
    guard = {**NAN_GUARD_DEFAULTS, **dict(config.get("nan_guard") or {})}
    if guard["action"] not in ("rollback", "stop"):
        raise ValueError(f"nan_guard.action must be rollback or stop, not {guard['action']!r}")
    if guard["max_consecutive"] < 1:
        raise ValueError(f"nan_guard.max_consecutive must be at least 1, "
                         f"not {guard['max_consecutive']}")
    return guard


def build_task(config):
    from dalle_jax.train.clip import CLIPTask
    tasks = {"clip": CLIPTask}
    if config.family not in tasks:
        raise ValueError(f"unknown model family {config.family!r}; valid: {', '.join(tasks)}")
    return tasks[config.family](config)


class MetricWriter:
    """JSON lines, one record per logged step, appended so that resumed runs continue it.
    A non-finite value is written as null (JSON has no NaN)."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items()}
        record = {"step": int(step), "time": time.time(),
                  **{k: v if math.isfinite(v) else None for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int):
        """Drops records past `step` (a run killed after its last checkpoint logged them; the
        resumed run logs those steps again) and any line cut short by the kill."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)


def _meta(config) -> dict:
    return {"family": config.family, "config": json.loads(config.to_json_best_effort())}


@dataclasses.dataclass
class _Run:
    """What the loop holds besides the state: built once by `_build`."""
    mesh: Any
    task: Any
    state: Any
    iterator: Any
    checkpointer: ckpt_lib.Checkpointer
    abstract: Any  # the state's ShapeDtypeStructs, with shardings
    fresh: Callable[[], Any]  # a newly initialised state
    make_step: Callable[[float], Callable]  # learning-rate scale -> jitted step
    lr_scale: float = 1.0
    rollbacks: int = 0


def _build(config, workdir: str, task=None) -> _Run:
    mesh = sharding.make_mesh(dict(config.mesh))
    task = task or build_task(config)
    tx, _ = optim.make_optimizer(config.optim, config.total_steps)

    def init(rng):
        init_rng, train_rng = jax.random.split(rng)
        return state_lib.create(task.init_params(init_rng), tx, train_rng)

    rng = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(init, rng)
    shardings = sharding.tree_shardings(mesh, abstract, config.sharding.params,
                                        [tuple(r) for r in config.sharding.rules])
    abstract = ckpt_lib.abstract_with_shardings(abstract, shardings)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         max_to_keep=config.keep_checkpoints)
    iterator = pipeline.make_iterator(
        pipeline.make_dataset(config.data, jax.process_index(), jax.process_count()),
        num_threads=config.data.num_threads)
    fresh = lambda: once.jit(init, out_shardings=shardings)(rng)
    meta = {}
    if checkpointer.all_steps():
        state, meta = checkpointer.restore_latest(abstract, iterator)
    else:
        state = fresh()

    def make_step(lr_scale: float):
        optim_config = config.optim
        if lr_scale != 1.0:
            optim_config = config.optim.copy_and_resolve_references()
            optim_config.lr = config.optim.lr * lr_scale
            if "restart_lr" in optim_config:
                optim_config.restart_lr = config.optim.restart_lr * lr_scale
        tx, schedule = optim.make_optimizer(optim_config, config.total_steps)
        return jax.jit(
            state_lib.make_train_step(task.grad_fn, tx, schedule, config.optim.ema_decay,
                                      config.grad_accum_steps),
            in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
            out_shardings=(shardings, sharding.replicated(mesh)),
            donate_argnums=(0,))

    return _Run(mesh, task, state, iterator, checkpointer, abstract, fresh, make_step,
                lr_scale=float(meta.get("lr_scale", 1.0)), rollbacks=int(meta.get("rollbacks", 0)))


def setup(config, workdir: str, task=None):
    """Everything but the loop itself: (mesh, task, train step, state, iterator, checkpointer).

    Split out so that tests and benchmarks can drive the very same objects. `task` defaults to
    the family the config names.
    """
    run = _build(config, workdir, task)
    return (run.mesh, run.task, run.make_step(run.lr_scale), run.state, run.iterator,
            run.checkpointer)


def train_and_evaluate(config, workdir: str, stop_at_step: int | None = None, task=None):
    """Trains to `config.total_steps` (or stops early at `stop_at_step`); returns the state.

    `task` defaults to the family the config names (families that stand on a frozen CLIP are
    built by `dalle_jax.train.stages`). A finished run returns its restored state at once.
    Raises `Preempted` after checkpointing when SIGTERM or SIGINT arrives, `TrainingError`
    when the NaN guard gives up.
    """
    os.makedirs(workdir, exist_ok=True)
    guard = nan_guard_config(config)
    with stop_signals.catch():
        run = _build(config, workdir, task)
        try:
            return _train(config, workdir, run, guard, stop_at_step)
        finally:
            run.checkpointer.close()  # waits for the last async save, whatever happened


def _train(config, workdir: str, run: _Run, guard: dict, stop_at_step: int | None):
    task, mesh, checkpointer = run.task, run.mesh, run.checkpointer
    task.workdir = workdir
    writer = MetricWriter(workdir)
    meta = _meta(config)
    state = run.state
    step = int(state.step)
    end = min(config.total_steps, stop_at_step or config.total_steps)
    if step >= end:
        return state
    writer.truncate_after(step)
    if step:
        tqdm.write(f"resumed from step {step} in {workdir}", file=sys.stderr)
    show = jax.process_index() == 0 and config.progress_bar
    bar = tqdm(total=config.total_steps, initial=step, disable=not show, dynamic_ncols=True,
               file=sys.stderr, desc=config.family)
    step_fn = run.make_step(run.lr_scale)
    saved = checkpointer.latest_step()
    flags = collections.deque()  # (step, skipped, stop) of steps whose flags are unread
    streak = skipped_since_log = 0
    stop_seen = False
    last_time, last_step = time.perf_counter(), step

    def save(at, state):
        nonlocal saved
        if saved != at:
            checkpointer.save(at, state, run.iterator,
                              {**meta, "lr_scale": run.lr_scale, "rollbacks": run.rollbacks},
                              force=True)
            saved = at

    try:
        while step < end:
            local = next(run.iterator)
            rows = len(next(iter(local.values())))
            local = {**local, "stop": np.full((rows,), stop_signals.received is not None,
                                              np.int32)}
            state, metrics = step_fn(state, sharding.global_batch(local, mesh), task.frozen)
            step += 1
            flags.append((step, metrics["skipped"], metrics["stop"]))
            log_now = step % config.log_every == 0 or step == end
            while len(flags) > (0 if log_now else 1) and streak < guard["max_consecutive"]:
                at, skipped, stop = flags.popleft()
                stop_seen = stop_seen or bool(stop)
                if bool(skipped):
                    streak += 1
                    skipped_since_log += 1
                    if streak == 1:
                        tqdm.write(f"step {at}: non-finite loss or gradient, update skipped",
                                   file=sys.stderr)
                else:
                    streak = 0
            if log_now:
                metrics = jax.device_get(metrics)
                metrics.pop("stop")
                metrics["skipped"] = skipped_since_log
                skipped_since_log = 0
                now = time.perf_counter()
                metrics["images_per_s"] = ((step - last_step) * config.data.global_batch
                                           / (now - last_time))
                last_time, last_step = now, step
                metrics.update(pipeline.data_metrics(run.iterator))  # skipped files, by reason
                writer.write(step, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                                img_s=f"{metrics['images_per_s']:.0f}", refresh=False)
            if streak >= guard["max_consecutive"]:
                state, step_fn = _recover(run, guard, at)
                step, saved = int(state.step), checkpointer.latest_step()
                flags.clear()
                streak = 0
                last_time, last_step = time.perf_counter(), step
                bar.update(step - bar.n)
                continue
            if stop_seen:
                save(step, state)
                checkpointer.wait()
                raise Preempted(f"stopped by {_signal_name()} at step {step}; checkpoint saved "
                                f"in {workdir}; rerun the same command to resume")
            if config.eval_every and (step % config.eval_every == 0 or step == config.total_steps):
                results = task.evaluate(state.ema_params if config.eval.use_ema else state.params,
                                        step)
                writer.write(step, results)
                tqdm.write(f"step {step} eval: "
                           + ", ".join(f"{k}={v:.3f}" for k, v in results.items()),
                           file=sys.stderr)
                last_time = time.perf_counter()  # evaluation time is not training throughput
            if step % config.checkpoint_every == 0 or step == end:
                save(step, state)
            bar.update(step - bar.n)
    finally:
        bar.close()
    return state


def _recover(run: _Run, guard: dict, at: int):
    """The NaN guard's action after `max_consecutive` skipped steps in a row, the last at `at`:
    (restored state, step with the scaled learning rate), or a TrainingError."""
    what = (f"{guard['max_consecutive']} consecutive steps with a non-finite loss or gradient "
            f"(the last at step {at})")
    if guard["action"] == "stop":
        raise TrainingError(f"{what}; lower optim.lr or check the data, then rerun to resume "
                            "from the last checkpoint")
    if run.rollbacks >= guard["max_rollbacks"]:
        raise TrainingError(f"{what} after {run.rollbacks} rollbacks (learning rate now "
                            f"x{run.lr_scale:g}); check the data and the config")
    run.checkpointer.wait()
    run.rollbacks += 1
    run.lr_scale *= guard["lr_factor"]
    if run.checkpointer.all_steps():
        state, _ = run.checkpointer.restore_latest(run.abstract)  # the input stream runs on
    else:
        state = run.fresh()
    tqdm.write(f"{what}: rolled back to step {int(state.step)}, learning rate "
               f"x{run.lr_scale:g}", file=sys.stderr)
    return state, run.make_step(run.lr_scale)


def _signal_name() -> str:
    if stop_signals.received is None:
        return "a signal to another process"
    return signal.Signals(stop_signals.received).name
