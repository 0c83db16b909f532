"""The unCLIP prior and decoder: conditioning and guidance flags, sharded training steps of both
tasks, samplers whose pictures depend on their own keys only, evaluation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dalle_jax import sharding
from dalle_jax.models import prior as prior_lib
from dalle_jax.train import clip as clip_family
from dalle_jax.train import loop, unclip

PRIOR_MODEL = dict(width=32, depth=1, num_heads=2, num_timesteps=100)
DECODER_MODEL = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(8,), num_heads=2, norm_groups=4, context_dim=16,
                     num_timesteps=100)
# One level, no resampling: what the train step tests compile is the heaviest part of the file.
DECODER_STEP_MODEL = {**DECODER_MODEL, "channel_mult": (1,), "attention_resolutions": (16,)}


def stage_config(family, model, **mesh):
    return ml_collections.ConfigDict(dict(
        family=family, seed=0, total_steps=4,
        data=dict(name="shapes", split="train", seed=0, image_size=16, context_length=16,
                  global_batch=16, num_threads=1, hard_negatives=0),
        model=model,
        optim=dict(lr=1e-3, warmup_steps=0, final_lr_fraction=1.0, weight_decay=0.0, b1=0.9,
                   b2=0.99, eps=1e-8, clip_norm=1e3, ema_decay=0.9),
        dtype="float32", remat=False, grad_accum_steps=1,
        mesh=dict(data=mesh.get("data", 1), fsdp=mesh.get("fsdp", 1)),
        sharding=dict(params=mesh.get("params", "replicate"), rules=[]),
        log_every=1, eval_every=0,
        eval=dict(num_examples=6, use_ema=False, sample_steps=2, guidance_scale=2.0),
        checkpoint_every=100, keep_checkpoints=1, progress_bar=False))


def random_params(init_fn, seed=0):
    """Parameters of `init_fn`'s shapes drawn on the host: weights at 1/sqrt(fan-in), norm scales
    near 1, biases and other vectors near 0 (nonzero everywhere, so that zero-initialised heads
    hide nothing). Nothing is compiled: a model's init compiles one random kernel per weight,
    many seconds on a CPU."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        x = rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "scale":
            return 1.0 + 0.05 * x
        if leaf.ndim >= 2:
            return x / np.sqrt(np.prod(leaf.shape[:-1]))
        return 0.05 * x
    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(init_fn, jax.random.PRNGKey(0)))


@pytest.fixture(scope="module")
def clip_parts():
    clip_config = ml_collections.ConfigDict(dict(
        model=dict(variant="micro"), data=dict(image_size=16, context_length=16),
        remat=False, dtype="float32"))
    return random_params(clip_family.CLIPTask(clip_config).init_params, 7), clip_config


@pytest.fixture(scope="module")
def prior_task(clip_parts):
    return unclip.DiffusionPriorTask(stage_config("diffusion_prior", PRIOR_MODEL), *clip_parts,
                                     embed_stats_count=64)


@pytest.fixture(scope="module")
def decoder_task(clip_parts):
    return unclip.DiffusionDecoderTask(stage_config("diffusion_decoder", DECODER_MODEL),
                                       *clip_parts)


@pytest.fixture(scope="module")
def prior_params(prior_task):
    params = random_params(prior_task.init_params)
    params["embed_mean"], params["embed_std"] = prior_task.embed_stats
    return params


@pytest.fixture(scope="module")
def decoder_params(decoder_task):
    return random_params(decoder_task.init_params)


def conditions(task, n=4, seed=0):
    images = jax.random.uniform(jax.random.PRNGKey(seed), (n, 16, 16, 3), minval=-1, maxval=1)
    tokens = np.zeros((n, 16), np.int32)
    tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 49406, [[320, 736, 2866]], 49407
    tokens[0, 1:4] = [320, 1746, 3360]
    return unclip._conditions(task.clip_model, task.frozen["clip"], images, tokens)


def test_prior_ignores_padding_and_a_dropped_caption(prior_task, prior_params):
    params = prior_params["net"]
    _, text, feats, mask = conditions(prior_task)
    x = jax.random.normal(jax.random.PRNGKey(1), text.shape)
    t = jnp.full((4,), 0.5)
    apply = jax.jit(lambda text, feats, drop: prior_task.model.apply(
        {"params": params}, x, t, text, feats, mask, drop))
    no, yes = jnp.zeros(4, bool), jnp.ones(4, bool)
    base = apply(text, feats, no)
    other_text = jnp.roll(text, 1, 0)
    other_feats = feats + jax.random.normal(jax.random.PRNGKey(2), feats.shape)
    assert not np.allclose(apply(other_text, feats, no), base, atol=1e-4)
    assert not np.allclose(apply(text, other_feats, no), base, atol=1e-4)
    np.testing.assert_allclose(apply(other_text, other_feats, yes), apply(text, feats, yes),
                               atol=1e-5)
    padding = feats.at[:, 6:].add(3.0)  # tokens 5... are padding
    np.testing.assert_allclose(apply(text, padding, no), base, atol=1e-5)


def test_unet_conditions_on_embedding_and_caption_through_drop_flags(decoder_task,
                                                                    decoder_params):
    params = decoder_params
    image_embed, _, feats, mask = conditions(decoder_task)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
    t = jnp.full((4,), 0.3)
    apply = jax.jit(lambda e, f, di, dt: decoder_task.model.apply(
        {"params": params}, x, t, e, f, mask, di, dt))
    no, yes = jnp.zeros(4, bool), jnp.ones(4, bool)
    base = apply(image_embed, feats, no, no)
    assert base.shape == x.shape
    other_embed = jnp.roll(image_embed, 1, 0)
    other_feats = feats + jax.random.normal(jax.random.PRNGKey(2), feats.shape)
    assert not np.allclose(apply(other_embed, feats, no, no), base, atol=1e-4)
    assert not np.allclose(apply(image_embed, other_feats, no, no), base, atol=1e-4)
    np.testing.assert_allclose(apply(other_embed, feats, yes, no),
                               apply(image_embed, feats, yes, no), atol=1e-5)
    np.testing.assert_allclose(apply(image_embed, other_feats, no, yes),
                               apply(image_embed, feats, no, yes), atol=1e-5)
    np.testing.assert_allclose(apply(image_embed, feats.at[:, 6:].add(3.0), no, no), base,
                               atol=1e-5)


def test_best_of_keeps_the_candidate_closest_to_the_text():
    text = jnp.eye(3)[:2]                                       # [B=2, E=3]
    candidates = jnp.array([[[0.0, 1, 0], [0, 1, 0]],           # candidate 0 for each example
                            [[1.0, 0, 0], [0, 0, 1]]])          # candidate 1
    np.testing.assert_array_equal(prior_lib.best_of(candidates, text),
                                  [[1.0, 0, 0], [0, 1, 0]])


@pytest.mark.parametrize("model,message", [
    ({**DECODER_MODEL, "chanels": 3}, "unknown UNetConfig field.*chanels.*valid:.*channel_mult"),
    ({**DECODER_MODEL, "prediction": "score"}, "unknown prediction target 'score'; valid"),
    ({**DECODER_MODEL, "norm_groups": 3}, "must divide into 3 norm groups"),
])
def test_bad_model_config_is_one_line(clip_parts, model, message):
    with pytest.raises(ValueError, match=message) as info:
        unclip.DiffusionDecoderTask(stage_config("diffusion_decoder", model), *clip_parts)
    assert "\n" not in str(info.value)


def run_steps(task, config, workdir, steps=2):
    """(initial parameters, parameters after `steps` steps, metrics of each step)."""
    mesh, task, step_fn, state, iterator, ckpt = loop.setup(config, str(workdir), task)
    frozen = jax.device_put(task.frozen, sharding.replicated(mesh))
    init = jax.device_get(state.params)
    history = []
    for _ in range(steps):
        state, metrics = step_fn(state, sharding.global_batch(next(iterator), mesh), frozen)
        history.append(jax.device_get(metrics))
    ckpt.close()
    return init, jax.device_get(state.params), history


def make_task(family, config, clip_parts):
    if family == "prior":
        return unclip.DiffusionPriorTask(config, *clip_parts, embed_stats_count=64)
    return unclip.DiffusionDecoderTask(config, *clip_parts)


@pytest.mark.parametrize("family", ["prior", "decoder"])
def test_sharded_train_step_on_eight_devices(family, clip_parts, tmp_path):
    model = PRIOR_MODEL if family == "prior" else DECODER_STEP_MODEL
    config = stage_config(family, model, data=2, fsdp=4, params="fsdp")
    task = make_task(family, config, clip_parts)
    init, params, history = run_steps(task, config, tmp_path, steps=3)
    assert all(np.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in history)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params, init)
    if family == "prior":
        # The standardisation comes from the data and is not a parameter: it must stay put.
        np.testing.assert_allclose(init["embed_mean"], task.embed_stats[0], rtol=1e-6)
        assert moved["embed_mean"] == 0 and moved["embed_std"] == 0
        head, first = moved["net"]["head"]["kernel"], moved["net"]["x_proj"]["kernel"]
    else:
        head, first = moved["conv_out"]["kernel"], moved["conv_in"]["kernel"]
    # The zero-initialised output layer learns at once; within three steps the gradient passes
    # the zero-initialised residual branches and reaches the input layer.
    assert head > 0 and first > 0


@pytest.mark.slow
@pytest.mark.parametrize("family", ["prior", "decoder"])
def test_sharded_train_step_matches_one_device(family, clip_parts, tmp_path):
    model = PRIOR_MODEL if family == "prior" else DECODER_STEP_MODEL
    results = []
    for mesh in (dict(), dict(data=8)):
        config = stage_config(family, model, **mesh)
        results.append(run_steps(make_task(family, config, clip_parts), config,
                                 tmp_path / str(len(results))))
    (_, one, h1), (_, eight, h8) = results
    np.testing.assert_allclose(h8[-1]["loss"], h1[-1]["loss"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), eight, one)


def test_sample_prior_per_example_keys(prior_task, prior_params):
    params = prior_params
    _, text, feats, mask = conditions(prior_task)
    keys = jax.random.split(jax.random.PRNGKey(3), 5)
    out = np.asarray(prior_task.sample_prior(params, text, feats, mask, keys[:4], 3, 2.0))
    assert out.shape == text.shape
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)
    # Example 1 in another batch (other neighbours, other position) draws the same vector.
    order = jnp.array([4, 1, 0, 2])
    again = prior_task.sample_prior(params, text[order % 4], feats[order % 4], mask[order % 4],
                                    keys[order], 3, 2.0)
    np.testing.assert_allclose(again[1:], out[[1, 0, 2]], atol=1e-5)
    assert not np.allclose(out[0], prior_task.sample_prior(params, text, feats, mask, keys[1:],
                                                           3, 2.0)[0], atol=1e-3)


def test_sample_decoder_per_example_keys(decoder_task, decoder_params):
    params = decoder_params
    image_embed, _, feats, mask = conditions(decoder_task)
    keys = jax.random.split(jax.random.PRNGKey(3), 5)
    out = np.asarray(decoder_task.sample_decoder(params, image_embed, feats, mask, keys[:4], 3,
                                                 3.0))
    assert out.shape == (4, 16, 16, 3) and out.min() >= -1 and out.max() <= 1
    order = jnp.array([4, 1, 0, 2])
    again = decoder_task.sample_decoder(params, image_embed[order % 4], feats[order % 4],
                                        mask[order % 4], keys[order], 3, 3.0)
    np.testing.assert_allclose(again[1:], out[[1, 0, 2]], atol=1e-5)
    assert not np.allclose(out[0], out[1], atol=1e-2)


@pytest.mark.slow
def test_evaluate_both_tasks(prior_task, decoder_task, prior_params, decoder_params, tmp_path):
    metrics = prior_task.evaluate(prior_params, 1)
    assert set(metrics) == {"prior_cosine", "text_as_image_cosine"}
    assert all(-1 <= v <= 1 for v in metrics.values())
    decoder_task.workdir = str(tmp_path)
    metrics = decoder_task.evaluate(decoder_params, 1)
    assert "decoder_adherence/one_object_seen" in metrics
    assert (tmp_path / "samples_000001.png").exists()
