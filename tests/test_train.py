"""The sharded trainer: device-count invariance, exact resume, configs, the command line."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from dalle_jax import config as config_lib
from dalle_jax import sharding
from dalle_jax.train import loop, optim
from dalle_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "shapes_clip.py")
TINY = ["model.variant=micro", "data.image_size=16", "data.context_length=16",
        "data.global_batch=16", "data.num_threads=1", "total_steps=6", "log_every=1",
        "eval_every=0", "checkpoint_every=3", "progress_bar=False", "optim.warmup_steps=2"]


def tiny_config(*overrides):
    return config_lib.load(CONFIG, TINY + list(overrides))


def _one_step(config, workdir):
    mesh, task, step_fn, state, iterator, ckpt = loop.setup(config, str(workdir))
    batch = sharding.global_batch(next(iterator), mesh)
    state, metrics = step_fn(state, batch, task.frozen)
    state, metrics = step_fn(state, sharding.global_batch(next(iterator), mesh), task.frozen)
    ckpt.close()
    return jax.device_get(state.params), jax.device_get(metrics), state


@pytest.mark.parametrize("mesh,params", [
    ("mesh.data=8", "sharding.params=replicate"),
    ("mesh.fsdp=4", "sharding.params=fsdp"),  # data -1 absorbs the other 2 devices
])
def test_sharded_steps_match_one_device(tmp_path, mesh, params):
    assert jax.device_count() == 8
    ref_params, ref_metrics, _ = _one_step(
        tiny_config("mesh.data=1", "mesh.fsdp=1"), tmp_path / "one")
    got_params, got_metrics, state = _one_step(tiny_config(mesh, params), tmp_path / "eight")
    leaf = jax.tree.leaves(state.params)[0]
    assert len(leaf.sharding.device_set) == 8
    if params.endswith("fsdp"):
        kernel = state.params["visual"]["transformer"]["block_0"]["c_fc"]["kernel"]
        assert "fsdp" in str(kernel.sharding.spec)
        assert kernel.addressable_shards[0].data.size == kernel.size // 4
    np.testing.assert_allclose(got_metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 got_params, ref_params)


def test_resume_equals_uninterrupted_run(tmp_path):
    config = tiny_config()
    straight = loop.train_and_evaluate(config, str(tmp_path / "straight"))
    loop.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=3)
    resumed = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert int(resumed.step) == int(straight.step) == 6
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params),
                 jax.device_get(straight.params))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.opt_state),
                 jax.device_get(straight.opt_state))
    lines = open(tmp_path / "resumed" / "metrics.jsonl").read().splitlines()
    assert len(lines) == 6  # one per step, continued across the restart


def test_warm_restart_keeps_the_first_cycle_and_warms_up_again():
    base = dict(lr=1e-2, warmup_steps=10, final_lr_fraction=0.1)
    plain = optim.learning_rate_schedule(ml_collections.ConfigDict(base), 100)
    config = ml_collections.ConfigDict(dict(base, restart_steps=40, restart_lr=3e-3))
    joined = optim.learning_rate_schedule(config, 140)
    for step in (0, 5, 10, 50, 99):  # the first cycle is a 100-step run's schedule
        np.testing.assert_allclose(joined(step), plain(step), rtol=1e-6)

    def cosine(peak, step, warmup, steps):  # warm-up, then cosine to a tenth, by the formula
        if step < warmup:
            return peak * step / warmup
        t = (step - warmup) / (steps - warmup)
        return peak * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t)))
    for step in (100, 105, 110, 125, 139):
        np.testing.assert_allclose(joined(step), cosine(3e-3, step - 100, 10, 40), rtol=1e-5)
    assert float(joined(99)) < 1.1e-3 and float(joined(110)) == pytest.approx(3e-3)
    with pytest.raises(ValueError, match="restart_steps=40 leaves no first cycle"):
        optim.learning_rate_schedule(config, 40)


def test_gradient_accumulation_equals_one_big_batch():
    import optax
    import jax.numpy as jnp

    def loss_fn(params, batch, rng, frozen):
        err = batch["x"] @ params["w"] - batch["y"]
        return jnp.mean(err ** 2), {}

    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(8, 3))), "y": jnp.asarray(rng.normal(size=(8,)))}
    tx = optax.sgd(0.1)
    state = state_lib.create({"w": jnp.ones((3,))}, tx, jax.random.PRNGKey(0))
    grad_fn = state_lib.value_and_grad_fn(loss_fn)
    one = jax.jit(state_lib.make_train_step(grad_fn, tx, lambda s: 0.1))(state, batch)
    four = jax.jit(state_lib.make_train_step(grad_fn, tx, lambda s: 0.1,
                                             grad_accum_steps=4))(state, batch)
    np.testing.assert_allclose(four[0].params["w"], one[0].params["w"], rtol=1e-6)
    np.testing.assert_allclose(four[1]["loss"], one[1]["loss"], rtol=1e-6)
    assert not np.allclose(one[0].params["w"], 1.0)


def test_overrides_are_typed_and_unknown_keys_named():
    config = tiny_config("optim.lr=3e-4", "model.variant=tiny", "sharding.rules=[('x', ())]")
    assert config.optim.lr == 3e-4 and config.model.variant == "tiny"
    with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'optim.lrr'.*optim.lr"):
        tiny_config("optim.lrr=1")
    with pytest.raises(config_lib.ConfigError, match="total_steps must be int"):
        tiny_config("total_steps=many")
    with pytest.raises(config_lib.ConfigError, match="not key=value"):
        tiny_config("optim.lr")
    # The caller's config stays as it was, nested blocks included.
    changed = config_lib.apply_overrides(config, ["optim.lr=1e-3", "model.variant=micro"])
    assert (changed.optim.lr, changed.model.variant) == (1e-3, "micro")
    assert (config.optim.lr, config.model.variant) == (3e-4, "tiny")


def test_train_command_reports_bad_key_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--config", CONFIG,
         "--workdir", str(tmp_path), "optim.learning_rate=1"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown config key 'optim.learning_rate'" in lines[0]
    assert "optim.lr" in lines[0]
    assert not os.listdir(tmp_path)  # nothing written


def test_train_command_end_to_end_with_zero_shot_eval(tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--config", CONFIG,
         "--workdir", str(workdir), *TINY, "total_steps=2", "eval_every=2",
         "eval.num_examples=40"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("loss", "grad_norm", "param_norm", "update_norm", "lr", "images_per_s"):
        assert np.isfinite(steps[-1][key])
    evals = [r for r in records if "zero_shot/colour" in r]
    assert len(evals) == 1
    for key in ("colour", "shape", "binding_colour_swap", "binding_relation"):
        assert 0.0 <= evals[0][f"zero_shot/{key}"] <= 1.0
    assert "zero_shot_held_out/shape" in evals[0]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]


def test_bf16_remat_and_accumulation_switches_train(tmp_path):
    config = tiny_config("dtype=bfloat16", "remat=True", "grad_accum_steps=2", "total_steps=3",
                         "data.hard_negatives=1")
    state = loop.train_and_evaluate(config, str(tmp_path))
    params = jax.device_get(state.params)
    assert jax.tree.leaves(params)[0].dtype == np.float32  # bf16 compute, f32 parameters
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)


def test_pixel_loss_trains_the_image_tower_and_leaves_the_clip_alone():
    """pixel_loss: the loss is contrastive + weight x the squared error of the pixel head's
    redrawing of the box-downsampled picture; the head's gradient reaches the image tower
    (not the text tower); `clip_params` drops the head, so later stages get a plain CLIP."""
    from dalle_jax.train import clip as clip_family

    config = tiny_config("pixel_loss.weight=2.0", "pixel_loss.size=4")
    task = loop.build_task(config)
    params = task.init_params(jax.random.PRNGKey(0))
    assert set(params) - set(clip_family.clip_params(params)) == {clip_family.PIXEL_HEAD}
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32),
             "tokens": np.asarray(clip_family.Tokenizer()(["a red circle"] * 4, 16))}

    # One compiled program for each task's values and gradients (eager, every op compiles).
    def loss_and_grads(task, term):
        loss_fn = lambda p: task.loss_fn(p, batch, None, {})
        return jax.jit(lambda p: (loss_fn(p), jax.grad(lambda q: loss_fn(q)[1][term])(p)))(params)

    (loss, metrics), grads = loss_and_grads(task, "pixel_loss")
    np.testing.assert_allclose(loss, metrics["contrastive_loss"] + 2.0 * metrics["pixel_loss"],
                               rtol=1e-6)
    redrawn = task.pixel_head.apply({"params": params["pixel_head"]},
                                    task.model.apply({"params": params}, batch["image"],
                                                     method=task.model.encode_image)[0])
    boxes = batch["image"].reshape(4, 4, 4, 4, 4, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(metrics["pixel_loss"], np.mean((redrawn - boxes) ** 2),
                               rtol=1e-5)
    norm = lambda tree: float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree))))
    assert norm(grads["visual"]) > 0 and norm(grads["pixel_head"]) > 0
    assert norm(grads["text"]) == 0
    with pytest.raises(ValueError, match="must divide data.image_size"):
        loop.build_task(tiny_config("pixel_loss.weight=1.0", "pixel_loss.size=5"))

    # text_weight: the caption's vector through the same head, whose weights it leaves alone.
    task = loop.build_task(tiny_config("pixel_loss.weight=2.0", "pixel_loss.size=4",
                                       "pixel_loss.text_weight=3.0"))
    (loss, metrics), grads = loss_and_grads(task, "text_pixel_loss")
    np.testing.assert_allclose(loss, metrics["contrastive_loss"] + 2.0 * metrics["pixel_loss"]
                               + 3.0 * metrics["text_pixel_loss"], rtol=1e-6)
    assert norm(grads["text"]) > 0
    assert norm(grads["visual"]) == 0 and norm(grads["pixel_head"]) == 0
    with pytest.raises(ValueError, match="needs pixel_loss.weight"):
        loop.build_task(tiny_config("pixel_loss.text_weight=1.0"))
