"""The CLIP towers and contrastive losses."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.models import clip


def _tokens(batch, length, lengths):
    t = np.zeros((batch, length), np.int32)
    for i, n in enumerate(lengths):
        t[i, 0] = 49406
        t[i, 1:n + 1] = np.arange(1, n + 1) * 7 + i
        t[i, n + 1] = clip.EOT_TOKEN
    return jnp.asarray(t)


def _count(model, image_size, context_length):
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, image_size, image_size, 3)),
                            jnp.zeros((1, context_length), jnp.int32))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("variant,published", [
    # Parameter counts of OpenAI's released models (incl. logit_scale); ours adds logit_bias.
    ("B/32", 151_277_313), ("B/16", 149_620_737), ("L/14", 427_616_513)])
def test_published_shapes_have_published_parameter_counts(variant, published):
    assert _count(clip.CLIP(variant=variant), 224, 77) == published + 1


@pytest.mark.parametrize("size", [32, 64])
def test_output_shapes_and_normalisation(size):
    model = clip.CLIP(variant="micro", image_size=size, context_length=16)
    images = jax.random.uniform(jax.random.PRNGKey(1), (3, size, size, 3), minval=-1, maxval=1)
    tokens = _tokens(3, 16, [2, 5, 14])
    params = model.init(jax.random.PRNGKey(0), images, tokens)["params"]
    image_embed, text_embed, aux = model.apply({"params": params}, images, tokens)
    assert image_embed.shape == text_embed.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(image_embed, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_embed, axis=-1), 1.0, rtol=1e-5)
    assert aux["image_features"].shape == (3, (size // 4) ** 2 + 1, 32)
    assert aux["text_features"].shape == (3, 16, 32)
    np.testing.assert_allclose(aux["logit_scale"], 1 / 0.07, rtol=1e-5)


def test_text_tower_is_causal_and_pooled_at_end_token():
    model = clip.CLIP(variant="micro", context_length=16)
    tokens = _tokens(2, 16, [3, 3])
    params = model.init(jax.random.PRNGKey(0), None, tokens)["params"]
    embed = lambda t: model.apply({"params": params}, t, method=model.encode_text)[0]
    base = embed(tokens)
    # Tokens after the end token cannot reach it through a causal mask.
    after = tokens.at[:, 8:].set(123)
    np.testing.assert_allclose(embed(after), base, atol=1e-6)
    # A token before it does.
    before = tokens.at[:, 2].set(999)
    assert np.abs(np.asarray(embed(before) - base)).max() > 1e-3


def test_softmax_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 8)); a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = rng.normal(size=(6, 8)); b /= np.linalg.norm(b, axis=1, keepdims=True)
    logits = 10.0 * a @ b.T

    def xent(l):
        l = l - l.max(axis=1, keepdims=True)
        return -np.mean(np.diag(l) - np.log(np.exp(l).sum(axis=1)))

    expected = 0.5 * (xent(logits) + xent(logits.T))
    got = clip.softmax_loss(jnp.asarray(a), jnp.asarray(b), 10.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Matched pairs give a lower loss than shuffled ones.
    assert clip.softmax_loss(jnp.asarray(a), jnp.asarray(a), 10.0) < got


def test_sigmoid_loss_matches_numpy_reference():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 4)); b = rng.normal(size=(5, 4))
    logits = 3.0 * a @ b.T - 2.0
    labels = 2 * np.eye(5) - 1
    expected = np.sum(np.log1p(np.exp(-labels * logits))) / 5
    got = clip.sigmoid_loss(jnp.asarray(a), jnp.asarray(b), 3.0, -2.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_unknown_variant_and_loss_are_named():
    with pytest.raises(ValueError, match="valid: B/32"):
        clip.CLIPConfig.from_variant("B/99")
    with pytest.raises(ValueError, match="softmax, sigmoid"):
        clip.contrastive_loss("hinge", None, None, {})


def test_convolutional_tower_keeps_what_and_where():
    """The "tiny-cnn" image tower: embeddings of the right form, its own parameters (no ViT),
    and a pooled vector that changes when only an object's place or only its outline does."""
    from dalle_jax.data import shapes
    from dalle_jax.data.pipeline import to_float_images

    model = clip.CLIP(variant="tiny-cnn", image_size=32, context_length=16)
    assert model.config.as_variant() == "tiny-cnn"
    sc = shapes.scene(2, "train")  # one object
    moved = shapes.Scene(sc.background, (dataclasses.replace(sc.objects[0], cx=0.2, cy=0.2),),
                         "", None, sc.stated)
    other = shapes.counterfactual(sc, np.random.default_rng(0))
    pictures = np.stack([shapes.render(s, 32) for s in (sc, moved, other)])
    images = jnp.asarray(to_float_images(pictures))
    params = model.init(jax.random.PRNGKey(0), images, _tokens(3, 16, [2, 3, 4]))["params"]
    assert "conv_5" in params["visual"] and "transformer" not in params["visual"]
    embed, features = model.apply({"params": params}, images, method=model.encode_image)
    assert embed.shape == (3, 128) and features.shape == (3, 8 * 8 + 1, 128)
    np.testing.assert_allclose(np.linalg.norm(embed, axis=-1), 1.0, rtol=1e-5)
    assert np.abs(np.asarray(embed[1] - embed[0])).max() > 1e-3
    assert np.abs(np.asarray(embed[2] - embed[0])).max() > 1e-3
    with pytest.raises(ValueError, match="bad CLIP variant change"):
        clip.CLIPConfig.from_variant("tiny-cnn,vision_cnn=3")


def test_cells_pool_projects_each_cell_through_weights_of_its_own():
    """vision_pool=cells: the embedding is c_proj(flatten(cell_proj(LN(grid)))), so the same
    features in two cells enter it differently (the attention pool's weighted sum cannot tell
    which of two objects is where); the variant string round-trips and a bad pool is named."""
    model = clip.CLIP(variant="tiny-cnn,vision_pool=cells,pool_width=8", image_size=32,
                      context_length=16)
    assert model.config.as_variant() == "tiny-cnn,vision_pool=cells,pool_width=8"
    images = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1, maxval=1)
    params = model.init(jax.random.PRNGKey(0), images, _tokens(2, 16, [2, 3]))["params"]
    visual = jax.tree.map(lambda x: np.asarray(x, np.float64), params["visual"])
    assert {"ln_cells", "cell_proj", "c_proj"} <= set(visual) and "q_proj" not in visual
    embed, features = model.apply({"params": params}, images, method=model.encode_image)
    grid = np.asarray(features[:, 1:], np.float64)  # [2, 64, 128]
    ln = visual["ln_cells"]
    normed = (grid - grid.mean(-1, keepdims=True)) / np.sqrt(grid.var(-1, keepdims=True) + 1e-5)
    normed = normed * ln["scale"] + ln["bias"]
    cells = normed @ visual["cell_proj"]["kernel"] + visual["cell_proj"]["bias"]  # [2, 64, 8]
    want = cells.reshape(2, -1) @ visual["c_proj"]["kernel"] + visual["c_proj"]["bias"]
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(embed), want, rtol=1e-4, atol=1e-5)
    # Two cells' contents exchanged: a sum over cells would not change, this pool does.
    swapped = cells.copy()
    swapped[:, [0, 63]] = cells[:, [63, 0]]
    moved = swapped.reshape(2, -1) @ visual["c_proj"]["kernel"]
    assert np.abs(moved - cells.reshape(2, -1) @ visual["c_proj"]["kernel"]).max() > 1e-3
    with pytest.raises(ValueError, match="valid: attention, cells"):
        clip.CLIPConfig.from_variant("tiny-cnn,vision_pool=max")
