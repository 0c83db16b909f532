"""The layout stage (`models/layout.py`, `train/layout.py`) and the GAN decoder that reads it."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dalle_jax import bundle
from dalle_jax import config as config_lib
from dalle_jax.data import shapes
from dalle_jax.data.pipeline import to_float_images
from dalle_jax.models import gan as gan_lib
from dalle_jax.models import layout as layout_lib
from dalle_jax.pipeline import Pipeline
from dalle_jax.tokenizer import Tokenizer
from dalle_jax.train import stages
from dalle_jax.train.clip import CLIPTask
from dalle_jax.train.gan import GANTask, with_added_layers
from dalle_jax.train.layout import LayoutTask
from test_generation import small_config, write_random_model

TOKENIZE = lambda captions: Tokenizer()(captions, context_length=16)  # noqa: E731


def _targets(index, split="train", size=32):
    images, captions = shapes.examples(index, split, 0, size)
    return np.asarray(layout_lib.targets(jnp.asarray(to_float_images(images)),
                                         jnp.asarray(TOKENIZE(captions)))), captions


def test_named_objects_bind_each_colour_to_the_shape_after_it():
    tokens = jnp.asarray(TOKENIZE(["a cyan star above an orange circle",
                                   "a large pink diamond on a white background",
                                   "a red square to the left of a cyan triangle"]))
    named, shape = map(np.asarray, layout_lib.named_objects(tokens))
    c, s = layout_lib.COLOURS.index, layout_lib.SHAPES.index
    assert set(np.flatnonzero(named[0])) == {c("cyan"), c("orange")}  # cyan is two tokens
    assert (shape[0, c("cyan")], shape[0, c("orange")]) == (s("star"), s("circle"))
    assert set(np.flatnonzero(named[1])) == {c("pink")} and shape[1, c("pink")] == s("diamond")
    assert (shape[2, c("red")], shape[2, c("cyan")]) == (s("square"), s("triangle"))


@pytest.mark.parametrize("size", [32, 16])
def test_targets_place_each_named_object_and_the_background(size):
    """At 32 px (4 px cells) exactly; at 16 px (2 px cells) an object's antialiased edge can
    read as the other named colour, so there most, not all."""
    index = range(120)
    layouts, captions = _targets(index, size=size)
    two = [k for k, c in enumerate(captions) if len(shapes.parse_caption(c).objects) == 2]
    assert len(two) > 20
    # Read from real pictures, two-object layouts stand in their caption's relation, none in
    # the reversed one.
    right = layout_lib.relation_right(layouts[two], [captions[k] for k in two])
    assert right.all() if size == 32 else right.mean() > 0.9
    reverse = [shapes.reverse_relation(captions[k])[1] for k in two]
    assert not layout_lib.relation_right(layouts[two], reverse).any()
    if size != 32:
        return
    for k, caption in enumerate(captions):
        scene = shapes.scene(index[k], "train", 0)
        want = {layout_lib.object_class(o.colour, o.shape) for o in scene.objects}
        classes = set(np.unique(layouts[k]).tolist())
        assert classes - set(range(3)) == want, caption  # the objects, each with its shape
        assert classes & set(range(3)) == {layout_lib.BACKGROUNDS.index(scene.background)}


@pytest.mark.parametrize("vector", [False, True])
def test_layout_model_is_causal_and_sampling_is_per_key(vector):
    """With `vector`, the model also reads an image vector (one more word before the
    caption's): every path below reads it alike."""
    task_config = config_lib.apply_overrides(small_config(refine=True, layout=True),
                                             [f"layout.model.vector={vector}"]).layout
    model = LayoutTask(task_config, None, small_config().clip).model
    words = jax.random.normal(jax.random.PRNGKey(0), (3, 16, model.config.token_dim))
    mask = jnp.arange(16)[None] < jnp.array([[9], [12], [7]])
    n = model.config.res ** 2
    layout = jax.random.randint(jax.random.PRNGKey(1), (3, n), 0, layout_lib.NUM_CLASSES)
    vec = jax.random.normal(jax.random.PRNGKey(4), (3, model.config.vector_dim)) if vector else None
    params = model.init(jax.random.PRNGKey(2), words, mask, layout, vec)["params"]
    apply = lambda *a, **k: model.apply({"params": params}, *a, **k)  # noqa: E731
    forward = lambda w, m, lay, v=vec: apply(w, m, lay, v)  # noqa: E731
    logits = forward(words, mask, layout)
    assert logits.shape == (3, n, layout_lib.NUM_CLASSES)
    if vector:  # the vector is read (as its direction), and a model that reads one needs it
        moved = forward(words, mask, layout, vec.at[0, 0].add(3.0))
        assert np.abs(moved[0] - logits[0]).max() > 1e-3
        np.testing.assert_allclose(moved[1:], logits[1:], atol=1e-5)
        np.testing.assert_allclose(forward(words, mask, layout, 2 * vec), logits, atol=1e-4)
        with pytest.raises(ValueError, match="reads an image vector"):
            forward(words, mask, layout, None)
    # Cell i's logits see only the cells before it ...
    changed = layout.at[:, 40:].set(0)
    np.testing.assert_allclose(forward(words, mask, changed)[:, :41], logits[:, :41], atol=1e-5)
    assert np.abs(forward(words, mask, changed)[:, 41:] - logits[:, 41:]).max() > 1e-3
    # ... and the words (padding aside).
    other = words.at[0, 3].add(1.0)
    assert np.abs(forward(other, mask, layout)[0] - logits[0]).max() > 1e-3
    padded = words.at[0, 10].add(1.0)  # past row 0's 9 tokens
    np.testing.assert_allclose(forward(padded, mask, layout)[0], logits[0], atol=1e-5)
    # A class's logit is its colour's plus its shape's, so a pair never seen in training (red
    # triangle is held out) is as reachable as its colour and its shape are.
    k = layout_lib.object_class
    np.testing.assert_allclose(
        logits[..., k("red", "triangle")] - logits[..., k("red", "circle")],
        logits[..., k("blue", "triangle")] - logits[..., k("blue", "circle")], atol=1e-4)
    # The sampler's path (the words' keys and values once, then one cell at a time with the
    # cells' kept) gives the logits of the whole-sequence pass.
    word_kv = apply(words, mask, vec, method=layout_lib.LayoutModel.encode_words)
    prefix = layout_lib.prefix_mask(model.config, mask)
    empty = jnp.zeros((3, n, model.config.num_heads,
                       model.config.width // model.config.num_heads))
    cache = [(empty, empty)] * model.config.layers
    step = jax.jit(lambda i, prev, cache: apply(i, prev, word_kv, prefix, cache,
                                                method=layout_lib.LayoutModel.decode_cell))
    for i in range(n):
        cell_logits, cache = step(i, layout[:, i - 1] if i else jnp.full((3,), -1), cache)
        np.testing.assert_allclose(cell_logits, logits[:, i], atol=1e-4, err_msg=str(i))
    keys = jax.random.split(jax.random.PRNGKey(3), 3)

    def sample(w, m, k, v=vec, temperature=1.0):
        return layout_lib.sample(model, params, w, m, k, temperature, vector=v)
    drawn = sample(words, mask, keys)
    alone = sample(words[1:2], mask[1:2], keys[1:2], None if vec is None else vec[1:2])
    np.testing.assert_array_equal(drawn[1:2], alone)
    assert not np.array_equal(drawn, sample(words, mask, keys[::-1]))
    # Temperature 0: each cell the likeliest given the cells drawn before it.
    greedy = sample(words, mask, keys, temperature=0.0)
    np.testing.assert_array_equal(greedy, np.argmax(forward(words, mask, greedy), -1))
    if vector:  # guided: the captionless logits plus 3x the caption's difference to them
        guided = layout_lib.sample(model, params, words, mask, keys, 0.0, vector=vec,
                                   guidance=3.0)
        without = forward(words, jnp.zeros_like(mask), guided)
        np.testing.assert_array_equal(guided, np.argmax(
            without + 3.0 * (forward(words, mask, guided) - without), -1))
        assert not np.array_equal(guided, greedy)


@pytest.mark.parametrize("vector", [False, True])
def test_layout_training_learns_a_batch(vector):
    """The layout task's gradient lowers its loss on a fixed batch of real pictures (targets
    read inside the step, words from the frozen CLIP's token embeddings; with `vector`, also
    the pictures' image vectors, the caption dropped for some)."""
    config = small_config(refine=True, layout=True)
    if vector:
        config = config_lib.apply_overrides(
            config, ["layout.model.vector=True", "layout.model.text_drop_prob=0.25"])
    clip_params = CLIPTask(config.clip).init_params(jax.random.PRNGKey(0))
    task = LayoutTask(config.layout, clip_params, config.clip)
    params = task.init_params(jax.random.PRNGKey(1))
    images, captions = shapes.examples(range(16), "train", 0, 16)
    batch = {"image": jnp.asarray(to_float_images(images)),
             "tokens": jnp.asarray(TOKENIZE(captions))}
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, rng):
        grads, metrics = task.grad_fn(params, batch, rng, task.frozen, 0)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(params, updates), opt, metrics["loss"]

    losses = []
    for i in range(40):
        params, opt, loss = step(params, opt, jax.random.PRNGKey(i))
        losses.append(float(loss))
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_factors_are_a_classes_colour_and_shape():
    classes = jnp.array([layout_lib.object_class("red", "triangle"),
                         layout_lib.BACKGROUNDS.index("white"), -1])
    f = np.asarray(layout_lib.factors(classes))
    assert f.shape == (3, layout_lib.NUM_FACTORS)
    colour, shape = f[:, :layout_lib.NUM_COLOURS], f[:, layout_lib.NUM_COLOURS:]
    assert colour[0].argmax() == layout_lib.COLOURS.index("red") and colour[0].sum() == 1
    assert shape[0].argmax() == layout_lib.SHAPES.index("triangle") and shape[0].sum() == 1
    assert colour[1].argmax() == len(layout_lib.COLOURS) + 1  # white, the second background
    assert shape[1].argmax() == len(layout_lib.SHAPES)  # no shape
    assert not f[2].any()  # no layout


@pytest.mark.parametrize("modulate", [False, True])
def test_a_generator_reads_the_layout_and_none_is_no_layout(modulate):
    config = gan_lib.GANConfig(resolution=16, cond_dim=8, z_dim=4, w_dim=8, mapping_layers=1,
                               channels=(8, 8, 8), d_channels=(8, 8, 8), noise=False,
                               layout_classes=layout_lib.NUM_CLASSES, layout_modulate=modulate)
    g = gan_lib.Generator(config)
    z, cond = jnp.ones((2, 4)), jnp.ones((2, 8))
    rng = jax.random.PRNGKey(0)
    layout = jax.random.randint(rng, (2, 64), 0, layout_lib.NUM_CLASSES)
    params = g.init(rng, z, cond, rng, layout=layout)
    assert {"b4_layout", "b8_layout", "b16_layout"} <= set(params["params"]["synthesis"])
    assert ("scale_kernel" in params["params"]["synthesis"]["b8_layout"]) == modulate
    drawn = g.apply(params, z, cond, rng, layout=layout)
    assert np.abs(drawn - g.apply(params, z, cond, rng, layout=layout[::-1])).max() > 1e-3
    np.testing.assert_allclose(g.apply(params, z, cond, rng, layout=jnp.full((2, 64), -1)),
                               g.apply(params, z, cond, rng), atol=1e-6)
    # Added by a fine-tune, the layout inputs start at zero: the initial generator's pictures
    # under any layout.
    plain = gan_lib.Generator(gan_lib.GANConfig(**{**config.__dict__, "layout_classes": 0}))
    initial = plain.init(rng, z, cond, rng)["params"]
    grown = with_added_layers(initial, params["params"])
    np.testing.assert_allclose(g.apply({"params": grown}, z, cond, rng, layout=layout),
                               plain.apply({"params": initial}, z, cond, rng), atol=1e-6)


def _model_files(tmp_path, config, seeds=(3, 4)):
    """Randomly initialised model files of `config` that differ only in their layout model
    (one per seed): ((CLIP, prior, generator parameters), paths)."""
    clip_params = CLIPTask(config.clip).init_params(jax.random.PRNGKey(0))
    prior = stages.build_task(config.prior, clip_params, config.clip).init_params(
        jax.random.PRNGKey(1))
    refine = config_lib.stage_config(config, "refine")
    gan = GANTask(refine, clip_params, config.clip).init_params(jax.random.PRNGKey(2))
    layout_task = LayoutTask(config.layout, clip_params, config.clip)
    parts, paths = (clip_params, prior, gan["generator"]), []
    for seed in seeds:
        paths.append(str(tmp_path / f"m{seed}.npz"))
        stages.export(paths[-1], config, *parts,
                      layout_params=layout_task.init_params(jax.random.PRNGKey(seed)))
    return parts, paths


def test_a_pipeline_with_a_layout_stage(tmp_path):
    """A model file with a layout stage: prompts that name two objects are drawn through a
    sampled layout (a file whose layout model differs draws other pictures from the same
    seed), others without one, per key as before;
    variations decode without one; a decoder that reads layouts needs the layout model."""
    config = small_config(refine=True, layout=True)
    prompts = ["a red circle to the left of a blue star", "a large green square"]
    pictures = []
    parts, paths = _model_files(tmp_path, config)
    for path in paths:
        pipe = Pipeline.load(path, batch_size=3)
        out = pipe.generate(prompts, num_per_prompt=2, seed=7)
        assert out.shape == (4, 16, 16, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(pipe.generate(prompts[:1], num_per_prompt=2, seed=7),
                                      out[:2])
        # A batch of one-object prompts alone skips the layout sampler, to the same pictures.
        np.testing.assert_array_equal(pipe.generate(prompts[::-1], num_per_prompt=2, seed=7)[:2],
                                      pipe.generate(prompts[1:], num_per_prompt=2, seed=7))
        np.testing.assert_array_equal(Pipeline.load(path, batch_size=4).generate(
            prompts, num_per_prompt=2, seed=7), out)
        pictures.append(out)
    # Only the two-object prompt is drawn through its layout: the one-object prompt's
    # pictures are the same under either layout model.
    assert np.abs(pictures[0][:2].astype(int) - pictures[1][:2]).max() > 2
    np.testing.assert_array_equal(pictures[0][2:], pictures[1][2:])
    assert pipe.variations(pictures[0][:1], num=2).shape == (2, 16, 16, 3)
    assert "layout_temperature" in pipe.options()
    assert pipe.generate(prompts, seed=7, layout_temperature=0).shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="layout_temperature must be between 0 and 2"):
        pipe.generate(prompts, layout_temperature=3.0)
    path = str(tmp_path / "no_layout.npz")
    stages.export(path, config, *parts)
    with pytest.raises(bundle.BundleError, match="holds no layout model"):
        Pipeline.load(path)


@pytest.mark.parametrize("text_drop", [0.0, 0.2])
def test_a_layout_drawn_from_the_image_vector(tmp_path, text_drop):
    """A layout model that reads the image vector draws every prompt's layout (a one-object
    prompt's too) given the vector the decoder draws from, per key as before; trained with
    its caption sometimes dropped, it draws one for variations too (else they go without)."""
    config = config_lib.apply_overrides(small_config(refine=True, layout=True), [
        "layout.model.vector=True", f"layout.model.text_drop_prob={text_drop}"])
    prompts = ["a large green square", "a red circle to the left of a blue star"]
    source = shapes.examples(range(1), "eval", 0, 16)[0]
    pictures, variations = [], []
    for path in _model_files(tmp_path, config)[1]:
        pipe = Pipeline.load(path, batch_size=3)
        variations.append(pipe.variations(source, num=2, seed=0))
        if text_drop:  # (the prompts' path is the same for both)
            out = pipe.generate(prompts, num_per_prompt=2, seed=7)
            np.testing.assert_array_equal(
                pipe.generate(prompts[:1], num_per_prompt=2, seed=7), out[:2])
            pictures.append(out)
    if text_drop:  # and the caption can guide the layout
        assert np.abs(pictures[0][:2].astype(int) - pictures[1][:2]).max() > 2
        assert np.abs(variations[0].astype(int) - variations[1]).max() > 2
        guided = pipe.generate(prompts[1:], num_per_prompt=2, seed=7, layout_guidance=3.0)
        assert np.abs(guided.astype(int) - out[2:]).max() > 2
    else:
        np.testing.assert_array_equal(variations[0], variations[1])
        assert "layout_guidance" not in pipe.options()


def test_a_layout_stage_and_a_decoder_that_reads_it_come_together():
    config = small_config(refine=True, layout=True)
    with config.unlocked():
        del config.layout
    with pytest.raises(config_lib.ConfigError, match="needs a layout stage"):
        config_lib.validate(config)
    config = small_config(refine=True, layout=True)
    with pytest.raises(config_lib.ConfigError, match="read by no decoder"):
        config_lib.validate(config_lib.apply_overrides(config, ["refine.model.layout=False"]))
    # A decoder that reads layouts from its first step: the refine stage keeps its layout
    # inputs' parametrisation (a multiplier applied at run time would rescale them).
    grown = ["decoder.model.layout=True", "decoder.model.layout_lr_mul=2.0"]
    config_lib.validate(config_lib.apply_overrides(
        config, [*grown, "refine.model.layout_lr_mul=2.0"]))
    with pytest.raises(config_lib.ConfigError, match="layout inputs are trained"):
        config_lib.validate(config_lib.apply_overrides(config, grown))
    with pytest.raises(ValueError, match="captioned shapes"):
        LayoutTask(config_lib.apply_overrides(config, ["layout.data.name=folder"]).layout,
                   None, config.clip)
    with pytest.raises(ValueError, match="text_drop_prob needs model.vector"):
        LayoutTask(config_lib.apply_overrides(config, ["layout.model.text_drop_prob=0.2"]).layout,
                   None, config.clip)


def test_an_old_model_file_without_a_layout_stage_still_loads(tmp_path):
    path = write_random_model(str(tmp_path))
    pipe = Pipeline.load(path, batch_size=2)
    assert "layout_temperature" not in pipe.options()
    assert pipe.generate(["a red circle"]).shape == (1, 16, 16, 3)


def test_the_layout_config_trains_its_stages_and_writes_a_model_that_reads_them(tmp_path):
    """configs/shapes_gan_layout.py on a model file's CLIP, prior and decoder: the layout stage
    and the refine stage train (a few steps), and the model file holds the layout model and
    a generator with layout inputs, which the Pipeline draws through."""
    source = write_random_model(str(tmp_path / "source"))
    run = [f"{stage}.{k}" for stage in ("layout", "refine")
           for k in ("total_steps=2", "eval_every=0", "progress_bar=False",
                     "data.global_batch=8")]
    config = small_config(*[f"{part}.import_from={source}" for part in ("clip", "prior",
                                                                        "decoder")],
                          *run, refine=True, layout=True)
    path = stages.run(config, str(tmp_path / "work"))
    assert sorted(os.listdir(tmp_path / "work")) == ["layout", "model.npz", "refine"]
    meta, params = bundle.load(path)
    assert meta["configs"]["layout"]["total_steps"] == 2 and "layout" in params
    assert meta["configs"]["refine"]["model"]["layout"] is True
    assert "b8_layout" in params["generator"]["synthesis"]
    pipe = Pipeline.load(path, batch_size=2)
    assert pipe.generate(["a red circle above a blue star"], num_per_prompt=2).shape == (
        2, 16, 16, 3)
    # layout.import_from takes that layout model as it is (with the CLIP of the same file),
    # and names what is wrong with a file that does not fit.
    again = config_lib.apply_overrides(config, [f"{part}.import_from={path}" for part in (
        "clip", "layout")])
    imported, stored = stages.layout_from_model(again)
    assert stored["total_steps"] == 2
    jax.tree.map(np.testing.assert_array_equal, imported, params["layout"])
    with pytest.raises(bundle.BundleError, match="needs clip.import_from"):
        stages.layout_from_model(config_lib.apply_overrides(config, [f"layout.import_from={path}"]))
    with pytest.raises(bundle.BundleError, match="holds no layout"):
        stages.layout_from_model(config_lib.apply_overrides(
            config, [f"{part}.import_from={source}" for part in ("clip", "layout")]))
