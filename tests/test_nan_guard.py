"""The NaN guard: a non-finite loss or gradient never reaches the parameters, and a run of them
rolls back (with a smaller learning rate) or stops, as configured."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dalle_jax.data import pipeline
from dalle_jax.train import loop
from dalle_jax.train import state as state_lib

BATCH = 8


def test_step_drops_non_finite_updates_and_still_advances():
    def grad_fn(params, batch, rng, frozen, step):
        del rng, frozen, step
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2))(params)
        # poison 1: NaN loss and gradient; poison 2: finite loss, infinite gradient
        grads = jax.tree.map(lambda g: g * jnp.where(batch["poison"] > 0, jnp.inf, 1.0), grads)
        loss = loss * jnp.where(batch["poison"] == 1, jnp.nan, 1.0)
        return grads, {"loss": loss}

    rng = np.random.default_rng(0)
    data = {"x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
            "y": jnp.asarray(rng.normal(size=(8,)), jnp.float32)}
    tx = optax.adamw(0.1, weight_decay=0.1)
    step = jax.jit(state_lib.make_train_step(grad_fn, tx, lambda s: 0.1, ema_decay=0.5))
    state = state_lib.create({"w": jnp.ones((3,))}, tx, jax.random.PRNGKey(0))
    state, metrics = step(state, {**data, "poison": jnp.int32(0)})
    assert metrics["skipped"] == 0
    before = jax.device_get(state)
    for poison in (1, 2):
        state, metrics = step(state, {**data, "poison": jnp.int32(poison)})
        assert metrics["skipped"] == 1
        assert int(state.step) == int(before.step) + poison  # the counter still advances
        for name in ("params", "opt_state", "ema_params"):
            jax.tree.map(np.testing.assert_array_equal, jax.device_get(getattr(state, name)),
                         getattr(before, name))
    state, metrics = step(state, {**data, "poison": jnp.int32(0)})
    assert metrics["skipped"] == 0 and np.isfinite(metrics["loss"])
    assert not np.array_equal(state.params["w"], before.params["w"])


class PoisonedTask:
    """A one-layer regression on the shapes batches whose loss and gradient are NaN on chosen
    batches (recognised by their tokens) or from a chosen step on: bad data, or divergence."""

    frozen = {}

    def __init__(self, bad_batches=(), bad_from_step=None):
        source = pipeline.ShapesBatches("train", 0, 8, 16, BATCH)
        self.bad_tokens = jnp.asarray(np.stack([source[k]["tokens"] for k in bad_batches])
                                      if bad_batches else np.zeros((0, BATCH, 16), np.int32))
        self.bad_from_step = bad_from_step

    def init_params(self, rng):
        return {"w": jax.random.normal(rng, (3,)), "b": jnp.zeros(())}

    def grad_fn(self, params, batch, rng, frozen, step):
        def loss_fn(p):
            x = batch["image"].mean(axis=(1, 2))  # [B, 3]
            return jnp.mean((x @ p["w"] + p["b"] - 0.25) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        bad = jnp.any(jnp.all(batch["tokens"][None] == self.bad_tokens, axis=(1, 2)))
        if self.bad_from_step is not None:
            bad = bad | (step >= self.bad_from_step)
        poison = jnp.where(bad, jnp.nan, 1.0)
        return jax.tree.map(lambda g: g * poison, grads), {"loss": loss * poison}

    def evaluate(self, params, step=None):
        return {}


def config(**guard):
    return ml_collections.ConfigDict(dict(
        family="tiny", seed=0, total_steps=8,
        data=dict(name="shapes", split="train", seed=0, image_size=8, context_length=16,
                  global_batch=BATCH, num_threads=1, hard_negatives=0),
        optim=dict(lr=0.05, warmup_steps=0, final_lr_fraction=1.0, weight_decay=0.0, b1=0.9,
                   b2=0.99, eps=1e-8, clip_norm=1.0, ema_decay=0.9),
        grad_accum_steps=1, mesh=dict(data=-1, fsdp=1), sharding=dict(params="replicate", rules=[]),
        log_every=1, eval_every=0, eval=dict(num_examples=0, use_ema=False),
        checkpoint_every=3, keep_checkpoints=2, progress_bar=False,
        nan_guard=dict(max_consecutive=2, **guard)))


def records(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_bad_batches_are_skipped_then_rolled_back_with_a_smaller_learning_rate(tmp_path, capsys):
    # Batches 4 and 5 are bad: steps 5 and 6 skip their updates, which makes 2 in a row, so the
    # loop returns to the checkpoint of step 3 at half the learning rate and reads on from
    # batch 6 (the bad ones are not seen again).
    state = loop.train_and_evaluate(config(action="rollback", lr_factor=0.5), str(tmp_path),
                                    task=PoisonedTask(bad_batches=(4, 5)))
    assert int(state.step) == 8
    assert np.all(np.isfinite(jax.device_get(state.params)["w"]))
    log = records(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8]
    assert [r["skipped"] for r in log] == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]
    assert log[4]["loss"] is None  # NaN is written as null
    # The parameters did not move across the bad steps.
    assert log[3]["param_norm"] == log[4]["param_norm"] == log[5]["param_norm"]
    assert log[6]["lr"] == pytest.approx(0.5 * log[3]["lr"])
    err = capsys.readouterr().err
    assert "step 5: non-finite loss or gradient, update skipped" in err
    assert "rolled back to step 3, learning rate x0.5" in err
    # The scale is kept with the checkpoint, so a resumed run keeps the smaller rate.
    meta = json.load(open(tmp_path / "checkpoints" / "8" / "meta" / "metadata"))
    assert meta["lr_scale"] == 0.5 and meta["rollbacks"] == 1


def test_a_run_of_bad_steps_stops_with_one_line(tmp_path):
    with pytest.raises(loop.TrainingError) as info:
        loop.train_and_evaluate(config(action="stop"), str(tmp_path),
                                task=PoisonedTask(bad_from_step=4))
    message = str(info.value)
    assert "\n" not in message
    assert "2 consecutive steps with a non-finite loss or gradient (the last at step 6)" in message


def test_rollbacks_are_bounded(tmp_path):
    # Divergence that a smaller learning rate does not cure: every rollback meets it again.
    with pytest.raises(loop.TrainingError, match="after 1 rollbacks"):
        loop.train_and_evaluate(config(action="rollback", max_rollbacks=1), str(tmp_path),
                                task=PoisonedTask(bad_from_step=4))
