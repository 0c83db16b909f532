"""Preemption and damaged checkpoints: SIGTERM/SIGINT checkpoint the current step and exit 0, a
rerun resumes exactly, and a damaged newest checkpoint falls back to the one before.

The soak test (slow) kills real training processes at random moments, with SIGKILL and SIGTERM,
and checks that the run finished by reruns equals an uninterrupted one bit for bit.
"""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dalle_jax import checkpoint as ckpt_lib
from dalle_jax import cli
from dalle_jax.train import clip as clip_family
from dalle_jax.train import loop

# The tiny run of tests/test_train.py, so that both files share compiled programs.
from test_train import CONFIG, ROOT, TINY, tiny_config


def params_of(state):
    return jax.device_get(state.params)


def assert_same(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: (final parameters, its workdir with checkpoints 3 and 6)."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    return params_of(loop.train_and_evaluate(tiny_config(), workdir)), workdir


def test_signals_only_set_a_flag_and_a_second_sigint_interrupts():
    signals = loop.StopSignals()
    before = signal.getsignal(signal.SIGTERM)
    with signals.catch():
        with signals.catch():  # re-entrant: the command line and each stage's loop
            os.kill(os.getpid(), signal.SIGTERM)
            assert signals.received == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == signals._handle  # inner exit keeps them
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before and signals.received is None


def test_sigterm_checkpoints_the_current_step_and_the_rerun_is_exact(
        reference, tmp_path, monkeypatch, capsys):
    sent = []

    def evaluate(self, params, step=None):  # a SIGTERM arrives during step 4's evaluation
        if not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    monkeypatch.setattr(clip_family.CLIPTask, "evaluate", evaluate)
    args = ["--config", CONFIG, "--workdir", str(tmp_path), *TINY, "eval_every=4"]
    assert cli.train_main(args) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"stopped by SIGTERM at step 5; checkpoint saved in {tmp_path}; "
                       "rerun the same command to resume")
    assert sent == [4]
    # Step 5 is no multiple of checkpoint_every: it was saved because of the signal.
    assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [3, 5]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored

    finished = loop.train_and_evaluate(tiny_config(), str(tmp_path))  # what a rerun does
    assert int(finished.step) == 6
    assert_same(params_of(finished), reference[0])
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")
             if "loss" in line]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[1], workdir)
    biggest = max(glob.glob(str(workdir / "checkpoints" / "6" / "state" / "**" / "*"),
                            recursive=True), key=lambda p: os.path.isfile(p) and os.path.getsize(p))
    with open(biggest, "r+b") as f:  # a copy cut short, a disk that filled up
        f.truncate(os.path.getsize(biggest) // 2)
    with pytest.warns(UserWarning, match="cannot restore step 6 .*; using step 3 and moving "
                      "step 6 to 6.damaged"):
        state = loop.train_and_evaluate(tiny_config(), str(workdir))
    assert int(state.step) == 6  # trained 4..6 again from step 3
    assert_same(params_of(state), reference[0])
    assert os.path.isdir(workdir / "checkpoints" / "6.damaged")  # kept for a post-mortem
    assert ckpt_lib.Checkpointer(str(workdir / "checkpoints")).all_steps() == [3, 6]


def test_checkpointer_skips_missing_files_and_unfinished_saves(tmp_path):
    state = {"w": jax.numpy.arange(4.0), "step": jax.numpy.int32(0)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
    for step in (1, 2, 3):
        ckpt.save(step, {**state, "step": jax.numpy.int32(step)}, meta={"n": step})
    ckpt.close()
    shutil.rmtree(tmp_path / "3" / "state")  # a step directory missing an item
    os.remove(tmp_path / "2" / "meta" / "metadata")  # ... and one missing a file
    os.makedirs(tmp_path / "4.orbax-checkpoint-tmp-1234" / "state")  # a save killed half-way
    ckpt = ckpt_lib.Checkpointer(str(tmp_path))
    assert ckpt.all_steps() == [1, 2, 3]
    with pytest.warns(UserWarning) as caught:
        restored, meta = ckpt.restore_latest(abstract)
    assert [str(w.message).split(" from ")[0] for w in caught] == [
        "cannot restore step 3", "cannot restore step 2"]
    assert int(restored["step"]) == 1 and meta["n"] == 1
    assert ckpt.all_steps() == [1]
    ckpt.close()
    # When no step reads back (a checkpoint of another set-up, say), none counts as damaged.
    shutil.rmtree(tmp_path / "1" / "data", ignore_errors=True)
    shutil.rmtree(tmp_path / "1" / "state")
    with pytest.raises(ckpt_lib.CheckpointError, match="cannot restore step 1"):
        ckpt_lib.Checkpointer(str(tmp_path)).restore_latest(abstract)
    assert ckpt_lib.Checkpointer(str(tmp_path)).all_steps() == [1]


# --------------------------------------------------------------------------------------------
# Real processes, real signals.

def _env():
    env = dict(os.environ)
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(ROOT, ".jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    return env


def _logged_steps(workdir) -> int:
    try:
        return sum(1 for line in open(os.path.join(workdir, "metrics.jsonl")) if '"loss"' in line)
    except FileNotFoundError:
        return 0


def _run_and_kill(command, workdir, signum, rng, timeout=300):
    """Starts the command, waits until it has trained a step, kills it a random moment later
    with `signum`; returns (exit status, stderr), or that of the run if it ended first."""
    proc = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    start_steps, deadline = _logged_steps(workdir), time.time() + timeout
    while proc.poll() is None and _logged_steps(workdir) <= start_steps:
        assert time.time() < deadline, "training never started"
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.5))
    if proc.poll() is None:
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


@pytest.mark.slow
def test_soak_random_sigkill_and_sigterm_then_rerun_equals_uninterrupted(tmp_path):
    workdir = tmp_path / "soak"
    total = 18
    overrides = [o for o in TINY if not o.startswith("total_steps")] + [
        f"total_steps={total}", "checkpoint_every=2", "keep_checkpoints=2"]
    command = [sys.executable, "train.py", "--config", CONFIG, "--workdir", str(workdir),
               *overrides]
    rng = random.Random(0)
    kinds = [signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL]
    interrupted = []
    for signum in kinds:
        status, err = _run_and_kill(command, workdir, signum, rng)
        if status == 0 and "stopped by" not in err:
            break  # the run finished before the signal
        if signum == signal.SIGTERM:
            assert status == 0, err[-2000:]
            last = err.strip().splitlines()[-1]
            assert last.startswith("stopped by SIGTERM at step ") and "rerun" in last
        else:
            assert status == -signal.SIGKILL
        interrupted.append((signum.name, _logged_steps(workdir)))
    print("interrupted (signal, steps logged):", interrupted)
    assert len(interrupted) >= 3
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    config = tiny_config(f"total_steps={total}", "checkpoint_every=2", "keep_checkpoints=2")
    soaked = loop.train_and_evaluate(config, str(workdir))
    straight = loop.train_and_evaluate(config, str(tmp_path / "straight"))
    assert int(soaked.step) == int(straight.step) == total
    assert_same(params_of(soaked), params_of(straight))
    assert_same(jax.device_get(soaked.opt_state), jax.device_get(straight.opt_state))
    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert steps == list(range(1, total + 1))  # killed runs' extra records were dropped


@pytest.mark.slow
def test_sigterm_inside_the_pipeline_stops_its_stage_and_the_rerun_finishes(tmp_path):
    workdir = tmp_path / "pipe"
    stage = ["data.image_size=16", "data.global_batch=16", "data.num_threads=1",
             "log_every=1", "eval_every=0", "checkpoint_every=4", "progress_bar=False",
             "optim.warmup_steps=1"]
    overrides = ([f"clip.{o}" for o in TINY if not o.startswith("total_steps")]
                 + ["clip.total_steps=2"]
                 + [f"prior.{o}" for o in stage] + ["prior.total_steps=40", "prior.model.width=32",
                                                    "prior.model.depth=1",
                                                    "prior.model.num_heads=2"]
                 + [f"decoder.{o}" for o in stage] + [
                     "decoder.total_steps=2", "decoder.model.channels=(16, 16, 8)",
                     "decoder.model.d_channels=(8, 16, 16)", "decoder.model.z_dim=8",
                     "decoder.model.w_dim=16", "refine.total_steps=1"])
    command = [sys.executable, "train.py", "--config",
               os.path.join(ROOT, "configs", "shapes_gan.py"), "--workdir", str(workdir),
               *overrides]
    status, err = _run_and_kill(command, workdir / "prior", signal.SIGTERM, random.Random(1))
    assert status == 0, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM at step ") and str(workdir / "prior") in last
    stopped_at = int(last.split("at step ")[1].split(";")[0])
    assert 0 < stopped_at < 40
    assert ckpt_lib.Checkpointer(str(workdir / "prior" / "checkpoints")).latest_step() == stopped_at
    assert not (workdir / "decoder").exists() and not (workdir / "model.npz").exists()
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from step {stopped_at}" in result.stderr
    assert (workdir / "model.npz").exists()
