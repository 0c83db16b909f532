"""Multi-host training: two processes on localhost with 4 CPU devices each train like one
process with 8, checkpoint, stop together on a signal to one of them, and resume.

The two-process test is slow (each phase starts two Python processes that compile the step);
the fast test checks the property it rests on: hosts' slices of a batch, hard negatives
included, put together are the batch one host would read.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dalle_jax import checkpoint as ckpt_lib
from dalle_jax import config as config_lib
from dalle_jax.data import pipeline
from dalle_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "shapes_clip.py")
TINY = ["model.variant=micro", "data.image_size=16", "data.context_length=16",
        "data.global_batch=16", "data.num_threads=1", "total_steps=6", "log_every=1",
        "eval_every=0", "checkpoint_every=3", "progress_bar=False", "optim.warmup_steps=2"]

# One process of a two-process run stopped at a given step (train.py has no such flag).
DRIVER = """
import sys
from dalle_jax import config as config_lib, sharding
from dalle_jax.train import loop
port, process_id, config_path, workdir, stop_at, *overrides = sys.argv[1:]
sharding.initialize_distributed("localhost:" + port, 2, int(process_id))
config = config_lib.load(config_path, overrides)
loop.train_and_evaluate(config, workdir, stop_at_step=int(stop_at))
"""


def test_host_slices_with_hard_negatives_make_up_the_one_host_batch():
    whole = pipeline.ShapesBatches("train", 0, 16, 16, global_batch=8, hard_negatives=2)[3]
    parts = [pipeline.ShapesBatches("train", 0, 16, 16, global_batch=8, process_index=p,
                                    process_count=2, hard_negatives=2)[3] for p in range(2)]
    for key in ("image", "tokens", "negative_tokens"):
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(ROOT, ".jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    return env


def _start(command_of, logs):
    """Starts processes 0 and 1 (`command_of(port, process_id)`), stderr to files in `logs`."""
    port = _free_port()
    os.makedirs(logs, exist_ok=True)
    procs = []
    for i in range(2):
        err = open(os.path.join(logs, f"{len(os.listdir(logs))}.err"), "w+")
        procs.append((subprocess.Popen(command_of(port, i), cwd=ROOT, env=_env(),
                                       stdout=subprocess.DEVNULL, stderr=err), err))
    return procs


def _finish(procs, timeout=600):
    """[(exit status, stderr)] of each process, once all have ended."""
    results = []
    for p, err in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            raise
        err.seek(0)
        results.append((p.returncode, err.read()))
    return results


def _train_py(workdir):
    return lambda port, i: [sys.executable, "train.py", "--config", CONFIG, "--workdir", workdir,
                            "--coordinator", f"localhost:{port}", "--num_processes", "2",
                            "--process_id", str(i), *TINY]


def _losses(workdir):
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(workdir,
                                                                           "metrics.jsonl")))}


@pytest.mark.slow
def test_two_processes_train_checkpoint_stop_and_resume_like_one_with_eight_devices(tmp_path):
    workdir = str(tmp_path / "two")
    logs = str(tmp_path / "logs")
    # Phase 1: two processes train to step 3 of 6 and checkpoint it.
    results = _finish(_start(lambda port, i: [sys.executable, "-c", DRIVER, str(port), str(i),
                                              CONFIG, workdir, "3", *TINY], logs))
    for status, err in results:
        assert status == 0, err[-3000:]
    checkpoints = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    assert checkpoints.all_steps() == [3]

    # Phase 2: train.py resumes on both; a SIGTERM to process 1 alone, as its loop starts,
    # stops both at the same step, with a checkpoint.
    procs = _start(_train_py(workdir), logs)
    deadline = time.time() + 600
    while "resumed from step 3" not in open(procs[1][1].name).read():
        assert procs[1][0].poll() is None and time.time() < deadline
        time.sleep(0.05)
    procs[1][0].send_signal(signal.SIGTERM)
    (status0, err0), (status1, err1) = _finish(procs)
    assert status0 == 0 and status1 == 0, (err0[-3000:], err1[-3000:])
    stopped = err1.strip().splitlines()[-1]
    assert stopped.startswith("stopped by SIGTERM at step "), err1[-3000:]
    at = int(stopped.split("at step ")[1].split(";")[0])
    assert 3 < at < 6
    assert err0.strip().splitlines()[-1].startswith(
        f"stopped by a signal to another process at step {at};")
    assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 read_only=True).latest_step() == at

    # Phase 3: the same command again runs to the end.
    for status, err in _finish(_start(_train_py(workdir), logs)):
        assert status == 0, err[-3000:]
        assert f"resumed from step {at}" in err

    # The same run on one process with 8 devices.
    config = config_lib.load(CONFIG, TINY)
    straight = loop.train_and_evaluate(config, str(tmp_path / "one"))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            straight)
    restored, _ = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                        read_only=True).restore(abstract, step=6)
    # Only the order of the cross-process sums differs: agreement to float32 rounding (a host
    # reading the wrong examples moves the first loss by ~1e-3).
    two, one = _losses(workdir), _losses(str(tmp_path / "one"))
    assert sorted(two) == list(range(1, 7))
    np.testing.assert_allclose([two[s] for s in range(1, 7)], [one[s] for s in range(1, 7)],
                               rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 jax.device_get(restored.params), jax.device_get(straight.params))
    assert int(restored.step) == 6
