"""The Pipeline API, the model file, the flow prior and sample.py, on a small random model."""

import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dalle_jax import bundle
from dalle_jax import config as config_lib
from dalle_jax import images as images_lib
from dalle_jax.models import flow_prior
from dalle_jax.pipeline import Pipeline, PromptError, slerp
from dalle_jax.train import stages
from dalle_jax.train.clip import CLIPTask
from dalle_jax.train.gan import GANTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GAN_CONFIG = os.path.join(ROOT, "configs/shapes_gan.py")
LAYOUT_CONFIG = os.path.join(ROOT, "configs/shapes_gan_layout.py")
# configs/shapes_gan.py made small; its prior is the diffusion one (DIFFUSION_PRIOR), and
# small_config swaps in the flow prior (FLOW_PRIOR) unless asked for the config's own.
SMALL = ["clip.model.variant=micro", "clip.data.image_size=16", "prior.data.image_size=16",
         "decoder.data.image_size=16", "decoder.model.channels=(16,16,8)",
         "decoder.model.d_channels=(8,16,16)", "prior.model.width=32", "prior.model.depth=1",
         "decoder.model.w_dim=16", "decoder.model.z_dim=8"]
# configs/shapes_gan_layout.py's layout stage, made small.
SMALL_LAYOUT = ["layout.data.image_size=16", "layout.model.width=32", "layout.model.layers=1"]
FLOW_PRIOR = ["prior.model.sample_steps=4"]
DIFFUSION_PRIOR = ["prior.model.num_heads=2", "prior.eval.sample_steps=2"]


def small_config(*overrides, prior: str = "flow", refine: bool = False, layout: bool = False):
    """The GAN pipeline config, small, with the flow prior or (prior="diffusion") the
    config's own diffusion prior; without its refine stage unless asked for; with `layout`,
    configs/shapes_gan_layout.py's (a layout stage, read by the refine stage's generator)."""
    config = config_lib.load(LAYOUT_CONFIG if layout else GAN_CONFIG)
    if not refine:
        del config.refine
    if prior == "flow":
        config.prior = config_lib.sibling_module(GAN_CONFIG, "shapes_gan.py").flow_prior()
    return config_lib.validate(config_lib.apply_overrides(
        config, [*SMALL, *(SMALL_LAYOUT if layout else []),
                 *(FLOW_PRIOR if prior == "flow" else DIFFUSION_PRIOR), *overrides]))


def write_random_model(directory: str, *overrides, prior: str = "flow") -> str:
    """A randomly initialised GAN pipeline (small_config) exported to directory/model.npz."""
    config = small_config(*overrides, prior=prior)
    clip_params = CLIPTask(config.clip).init_params(jax.random.PRNGKey(0))
    prior_params = stages.build_task(config.prior, clip_params, config.clip).init_params(
        jax.random.PRNGKey(1))
    # Zero-initialised heads would hide bugs ...
    prior_params = jax.tree.map(lambda x: x + 0.01, prior_params)
    if prior == "diffusion":  # ... and a constant shift leaves its x0 head deaf to the noise
        leaves, tree = jax.tree.flatten(prior_params)
        noise = np.random.default_rng(3)
        prior_params = tree.unflatten([x + 0.1 * noise.standard_normal(x.shape).astype(x.dtype)
                                       for x in leaves])
    gan = GANTask(config.decoder, clip_params, config.clip).init_params(jax.random.PRNGKey(2))
    path = os.path.join(directory, "model.npz")
    stages.export(path, config, clip_params, prior_params, gan["generator"])
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A randomly initialised pipeline written as a model file, as training would."""
    return write_random_model(str(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def pipe(model_file):
    return Pipeline.load(model_file, batch_size=4)


PROMPTS = ["a large red circle in the top left", "a small blue square on a black background",
           "a green star"]


def test_generate_shapes_and_batch_independence(pipe, model_file):
    out = pipe.generate(PROMPTS, num_per_prompt=3, seed=5)
    assert out.dtype == np.uint8 and out.shape == (9, 16, 16, 3)
    # The same pictures one prompt at a time, and with another batch size (other padding and
    # batch composition): each picture's key depends on (seed, prompt index, sample index) only.
    other = Pipeline.load(model_file, batch_size=7)
    np.testing.assert_array_equal(other.generate(PROMPTS, num_per_prompt=3, seed=5), out)
    np.testing.assert_array_equal(pipe.generate(PROMPTS[:1], num_per_prompt=2, seed=5), out[:2])
    assert not np.array_equal(pipe.generate(PROMPTS, 3, seed=6), out)
    assert not np.array_equal(out[0], out[1])  # samples of one prompt differ


def test_rerank_keeps_the_candidate_clip_scores_highest(pipe, model_file):
    from dalle_jax.pipeline import candidate_keys, picture_keys
    k = 3
    best = pipe.generate(PROMPTS, num_per_prompt=2, seed=5, rerank=k)
    assert best.shape == (6, 16, 16, 3) and best.dtype == np.uint8
    # The candidates by hand: candidate 0 is the picture rerank=1 draws, candidate j > 0 is
    # keyed by fold_in(picture key, j).
    keys = picture_keys(5, [(i, j) for i in range(3) for j in range(2)])
    ck = candidate_keys(keys, k)
    np.testing.assert_array_equal(ck[::k], keys)
    np.testing.assert_array_equal(ck[1], np.asarray(jax.random.fold_in(keys[0], 1)))
    tokens = np.repeat(pipe.tokenize(PROMPTS), 2 * k, axis=0)
    fn = pipe._compile("generate", pipe.options())
    candidates = pipe._chunked(fn, tokens, ck)[0].reshape(6, k, 16, 16, 3)
    np.testing.assert_array_equal(candidates[:, 0], pipe.generate(PROMPTS, 2, seed=5))
    assert not np.array_equal(candidates[:, 0], candidates[:, 1])
    text = np.repeat(pipe.encode_text(PROMPTS), 2, axis=0)
    scores = np.einsum("nke,ne->nk",
                       pipe.encode_images(candidates.reshape(-1, 16, 16, 3)).reshape(6, k, -1),
                       text)
    np.testing.assert_array_equal(best, candidates[np.arange(6), scores.argmax(1)])
    # Still independent of the batch it was drawn in.
    other = Pipeline.load(model_file, batch_size=5)
    np.testing.assert_array_equal(other.generate(PROMPTS[:2], 2, seed=5, rerank=k), best[:4])
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="rerank"):
            pipe.generate(PROMPTS[:1], rerank=bad)


def test_a_repeated_call_traces_and_compiles_nothing(pipe):
    """Compiled once per shape: a second call with the same shapes and options (another seed)
    runs the programs of the first. A jit built afresh inside a call (as the picture keys'
    fold once was) would be traced, lowered and compiled again on every call."""
    traces = []
    listener = lambda event, secs, **_: traces.append(event) if event in (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/backend_compile_duration") else None
    image = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    calls = [lambda seed: pipe.generate(PROMPTS, num_per_prompt=2, seed=seed, rerank=2),
             lambda seed: pipe.variations(image[None], num=2, seed=seed),
             lambda seed: pipe.interpolate(image, image[::-1], steps=3, seed=seed),
             lambda seed: pipe.edit(image, "a red circle", "a blue circle", seed=seed)]
    for call in calls:
        call(1)
        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            call(2)
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
        assert traces == [], traces


def test_variations_interpolate_edit(pipe):
    source = pipe.generate(PROMPTS[:2], seed=1)
    var = pipe.variations(source, num=3, seed=2)
    assert var.shape == (6, 16, 16, 3) and var.dtype == np.uint8
    np.testing.assert_array_equal(pipe.variations(source[:1], num=3, seed=2), var[:3])
    assert not np.array_equal(var[0], var[1])  # noise differs between variations
    frames = pipe.interpolate(source[0], source[1], steps=5)
    assert frames.shape == (5, 16, 16, 3)
    # The end frames are the images' own vectors decoded with the frames' shared key.
    embed = pipe.encode_images(source)
    from dalle_jax.pipeline import picture_keys, slerp
    ends = pipe.decode(embed, picture_keys(0, [(0, 0), (0, 0)]))
    np.testing.assert_array_equal(frames[[0, -1]], ends)
    edited = pipe.edit(source[0], "red", "blue", amount=0.5)
    assert edited.shape == (1, 16, 16, 3)
    unchanged = pipe.edit(source[0], "red", "blue", amount=0.0)
    np.testing.assert_array_equal(unchanged, pipe.decode(embed[:1], picture_keys(0, [(0, 0)])))
    with pytest.raises(PromptError):
        pipe.edit(source[0], "red", "red")
    # Pictures edited in one batch, each with its own texts: the first row is that picture
    # edited alone, and each row follows its own texts.
    both = pipe.edit(source, ["red", "red"], ["blue", "green"], amount=0.5)
    assert both.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(both[:1], edited)
    red, green = pipe.encode_text(["red", "green"])
    direction = (green - red) / np.linalg.norm(green - red)
    target = np.asarray(slerp(embed[1:], direction[None], 0.5))
    np.testing.assert_array_equal(both[1:], pipe.decode(target, picture_keys(0, [(1, 0)])))
    with pytest.raises(ValueError, match="one per picture"):
        pipe.edit(source, ["red"] * 3, "blue")
    with pytest.raises(ValueError, match="uint8"):
        pipe.variations(np.zeros((1, 8, 8, 3), np.uint8))


def test_a_decoder_with_cross_attention_reads_the_prompt_and_decodes_images_without_one(
        tmp_path):
    """generate() hands the prompt's token features to a decoder's cross-attention;
    variations (an image vector alone) hand it none, so the layer's weights cannot move them."""
    config = small_config("decoder.model.cross_attention_res=(8,)",
                          "decoder.model.text_drop_prob=0.5")
    clip_params = CLIPTask(config.clip).init_params(jax.random.PRNGKey(0))
    prior = stages.build_task(config.prior, clip_params, config.clip).init_params(
        jax.random.PRNGKey(1))
    gan = GANTask(config.decoder, clip_params, config.clip).init_params(jax.random.PRNGKey(2))
    assert "b8_xattn" in gan["generator"]["synthesis"]
    path = str(tmp_path / "model.npz")
    stages.export(path, config, clip_params, prior, gan["generator"])
    pipe = Pipeline.load(path, batch_size=4)
    source = pipe.generate(PROMPTS[:2], seed=1)
    var = pipe.variations(source, num=2, seed=2)
    xattn = pipe.params["generator"]["synthesis"]["b8_xattn"]
    xattn["out"]["kernel"] = xattn["out"]["kernel"] * 3.0 + 0.1
    other = Pipeline(pipe.meta, pipe.params, path, batch_size=4)
    assert not np.array_equal(other.generate(PROMPTS[:2], seed=1), source)
    np.testing.assert_array_equal(other.variations(source, num=2, seed=2), var)


def test_a_gan_model_with_the_diffusion_prior(tmp_path):
    """The GAN's prior slot holds unCLIP's diffusion prior: generate() draws the vectors
    `unclip.sample_prior` draws for the same keys and decodes them, its options are the
    diffusion prior's (prior_steps reaches it), and the flow prior's option is one clear line."""
    from dalle_jax import pipeline as pipeline_lib
    from dalle_jax.train import unclip
    path = write_random_model(str(tmp_path), prior="diffusion")
    pipe = Pipeline.load(path, batch_size=2)
    assert pipe.options() == {"truncation": 1.0, "prior_steps": 10, "prior_guidance_scale": 1.0}
    got = pipe.generate(PROMPTS, seed=3, prior_steps=4)
    keys = pipeline_lib.picture_keys(3, [(i, 0) for i in range(len(PROMPTS))])
    prior_keys = jax.vmap(lambda k: jax.random.split(k))(keys)[:, 0]
    text_embed, features, mask = pipe._encode_text(pipe.params, pipe.tokenize(PROMPTS))
    vectors = unclip.sample_prior(pipe.generator.prior, pipe.params["prior"], text_embed,
                                  features, mask, prior_keys, 4, 1.0, num_candidates=1)
    np.testing.assert_array_equal(got, pipe.decode(np.asarray(vectors), keys))
    assert not np.array_equal(got, pipe.generate(PROMPTS, seed=3, prior_steps=2))
    with pytest.raises(ValueError, match="not an option of the gan generator with a diffusion "
                                         "prior; its options: truncation, prior_steps"):
        pipe.generate(PROMPTS, prior_temperature=0.5)
    with pytest.raises(ValueError, match="prior_steps must be an integer"):
        pipe.generate(PROMPTS, prior_steps=0)


def test_a_decoder_at_twice_the_clip_side(tmp_path):
    """A 32 px decoder on a 16 px CLIP: pictures come out at 32 px, and pictures in (at 32 px)
    reach the CLIP box-downsampled, so their vectors and CLIP scores are those of the same
    scenes rendered at 16 px (but for their edges' finer antialiasing)."""
    from dalle_jax.data import shapes
    from dalle_jax.metrics.clip_score import CLIPScore
    from dalle_jax.train import clip as clip_family
    path = write_random_model(str(tmp_path), "decoder.data.image_size=32",
                              "decoder.model.channels=(16,16,8,8)", "decoder.model.d_resolution=16")
    pipe = Pipeline.load(path, batch_size=4)
    assert (pipe.image_size, pipe.clip_size) == (32, 16)
    assert pipe.generate(PROMPTS[:2]).shape == (2, 32, 32, 3)
    big, captions = shapes.examples(range(6), size=32)
    small, _ = shapes.examples(range(6), size=16)
    got = pipe.encode_images(big)
    want = clip_family.embed_images(pipe.clip, pipe.params["clip"], small)
    # Each picture's vector is nearest its own scene's at 16 px, five times nearer than any
    # other scene's (a random CLIP puts all the scenes close together).
    similarity = got @ want.T
    same = np.diagonal(similarity)
    others = np.where(np.eye(len(want), dtype=bool), -1.0, similarity).max(axis=1)
    assert np.all(1 - same < 0.2 * (1 - others)), (same, others)
    assert pipe.variations(big[:1], num=2).shape == (2, 32, 32, 3)
    assert pipe.edit(big[0], "red", "blue").shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match=r"uint8 \[N, 32, 32, 3\]"):
        pipe.variations(small[:1])
    scorer = CLIPScore.from_pipeline(pipe, batch_size=8)
    np.testing.assert_allclose(scorer.pair_scores(big, captions),
                               scorer.pair_scores(small, captions), atol=0.5)


def test_slerp_endpoints_and_norm():
    a = jax.random.normal(jax.random.PRNGKey(0), (3, 8))
    b = jax.random.normal(jax.random.PRNGKey(1), (3, 8))
    n = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(slerp(a, b, 0.0), n(a), atol=1e-5)
    np.testing.assert_allclose(slerp(a, b, 1.0), n(b), atol=1e-5)
    mid = slerp(a, b, 0.5)
    np.testing.assert_allclose(jnp.linalg.norm(mid, axis=-1), 1.0, atol=1e-5)
    # Halfway is equally far from both ends.
    np.testing.assert_allclose(jnp.sum(mid * n(a), -1), jnp.sum(mid * n(b), -1), atol=1e-5)


def test_prompt_checks(pipe):
    for bad in ([""], ["   "], "a red circle", [3]):
        with pytest.raises(PromptError):
            pipe.generate(bad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.generate(["a red zebra " + "very " * 50 + "big"])
    text = " | ".join(str(w.message) for w in caught)
    assert "never saw" in text and "zebra" in text and "cut to" in text


def test_model_file_round_trip_and_bad_files(tmp_path, model_file):
    meta, params = bundle.load(model_file)
    config = small_config()
    clip_params = CLIPTask(config.clip).init_params(jax.random.PRNGKey(0))
    emb = clip_params["text"]["token_embedding"]["embedding"]
    kept = sorted(bundle.known_tokens(meta, "clip/text/token_embedding/embedding"))
    assert 20 < len(kept) < 200 and 49406 in kept and 49407 in kept
    loaded = params["clip"]["text"]["token_embedding"]["embedding"]
    np.testing.assert_array_equal(loaded[kept], np.asarray(emb)[kept])
    others = np.setdiff1d(np.arange(emb.shape[0]), kept)
    assert not loaded[others].any()
    np.testing.assert_array_equal(params["clip"]["visual"]["proj"]["kernel"],
                                  clip_params["visual"]["proj"]["kernel"])
    # bfloat16 files: half the bytes, values rounded to bf16.
    half = str(tmp_path / "half.npz")
    bundle.export(half, meta["configs"], {"x": {"w": np.linspace(0, 1, 1000, dtype=np.float32)}},
                  "bfloat16")
    _, p = bundle.load(half)
    np.testing.assert_allclose(p["x"]["w"], np.linspace(0, 1, 1000), atol=4e-3)
    # Files that are not models: one clear error each, never a traceback from numpy or zip.
    (tmp_path / "text.npz").write_text("not a zip")
    np.savez(tmp_path / "foreign.npz", a=np.zeros(3))
    future = dict(np.load(model_file))
    m = json.loads(bytes(future["__meta__"]).decode())
    m["format_version"] = 99
    future["__meta__"] = np.frombuffer(json.dumps(m).encode(), np.uint8)
    np.savez(tmp_path / "future.npz", **future)
    raw = open(model_file, "rb").read()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    for name, match in [("missing.npz", "no model file"), ("text.npz", "cannot read"),
                        ("foreign.npz", "not a dalle_jax model"), ("future.npz", "format 99"),
                        ("cut.npz", "cannot read")]:
        with pytest.raises(bundle.BundleError, match=match):
            bundle.load(str(tmp_path / name))


def test_flow_prior_sampling_is_per_key_and_unit_norm():
    model = flow_prior.FlowPrior(flow_prior.PriorConfig(embed_dim=8, token_dim=4, width=16,
                                                        depth=1, sample_steps=3))
    x = jnp.ones((5, 8)) / np.sqrt(8)
    feats, mask = jnp.ones((5, 6, 4)), jnp.ones((5, 6), bool)
    params = flow_prior.init(model, jax.random.PRNGKey(0), 6)
    params["net"] = jax.tree.map(lambda p: p + 0.05, params["net"])
    keys = jax.random.split(jax.random.PRNGKey(1), 5)
    out = flow_prior.sample(model, params, x, feats, mask, keys)
    np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(flow_prior.sample(model, params, x[:2], feats[:2], mask[:2],
                                                 keys[:2]), out[:2], atol=1e-6)
    assert float(jnp.abs(out[0] - out[1]).max()) > 1e-3
    # Temperature scales the starting noise: 1 is the default, 0 the flow from the origin (the
    # same vector for every key), and in between the samples spread less (around a data mean,
    # as real embedding statistics have, so that the final normalisation keeps the spread).
    warm = {**params, "embed_mean": jnp.ones(8), "embed_std": jnp.full(8, 0.3)}
    sample = lambda t, p=warm: flow_prior.sample(model, p, x, feats, mask, keys, temperature=t)
    np.testing.assert_array_equal(sample(1.0, params), out)
    cold = sample(0.0)
    np.testing.assert_allclose(cold, jnp.broadcast_to(cold[0], cold.shape), atol=1e-6)
    spread = lambda v: float(jnp.linalg.norm(v - v.mean(0), axis=-1).mean())
    assert 0.0 < spread(sample(0.5)) < 0.8 * spread(sample(1.0))


def test_flow_matching_learns_a_conditional_distribution():
    """Two conditions, each with its own target vector: after training, samples land near the
    right target (cosine > 0.9), which a broken loss or sampler would not achieve."""
    import optax
    d = 8
    model = flow_prior.FlowPrior(flow_prior.PriorConfig(embed_dim=d, token_dim=4, width=64,
                                                        depth=2, sample_steps=16))
    targets = jnp.eye(d)[:2]
    conds = jnp.eye(d)[2:4]
    feats, mask = jnp.zeros((64, 3, 4)), jnp.ones((64, 3), bool)
    params = flow_prior.init(model, jax.random.PRNGKey(0), 3, embed_mean=jnp.full(d, 0.1),
                             embed_std=jnp.full(d, 0.5))
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, rng):
        which = jax.random.bernoulli(jax.random.fold_in(rng, 1), 0.5, (64,)).astype(int)
        loss, g = jax.value_and_grad(lambda p: flow_prior.flow_matching_loss(
            model, p, targets[which], conds[which], feats, mask, rng))(params)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(params, u), opt, loss

    for i in range(300):
        params, opt, loss = step(params, opt, jax.random.PRNGKey(i))
    np.testing.assert_array_equal(params["embed_mean"], np.float32(0.1))  # never trained
    np.testing.assert_array_equal(params["embed_std"], 0.5)
    keys = jax.random.split(jax.random.PRNGKey(99), 8)
    which = np.array([0, 1] * 4)
    out = flow_prior.sample(model, params, conds[which], feats[:8], mask[:8], keys)
    cos = np.sum(np.asarray(out) * np.asarray(targets[which]), -1)
    assert cos.min() > 0.9, cos


def run_sample(*args, cwd=ROOT):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


def test_sample_cli_end_to_end(tmp_path, model_file):
    out = tmp_path / "grid.png"
    r = run_sample("a large red circle in the top left", "a blue star", "--num", "3",
                   "--seed", "4", "--checkpoint", model_file, "--out", str(out), "--scale", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    with Image.open(out) as im:
        assert im.text["seed"] == "4" and im.text["model"] == model_file
        assert "a blue star" in im.text["prompt"]
        assert im.size == ((3 * 18 + 2) * 2, (2 * 18 + 2) * 2)
    r = run_sample("a blue star", "--num", "2", "--rerank", "3", "--checkpoint", model_file,
                   "--out", str(out))
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        assert im.text["rerank"] == "3"
    # The image modes read a picture the user gives.
    src = tmp_path / "src.png"
    Image.fromarray(np.full((40, 50, 4), 200, np.uint8)).save(src)  # RGBA, not square
    for extra in (["--variations", str(src)], ["--interpolate", str(src), str(src)],
                  ["--edit", str(src), "--from", "red", "--to", "blue"]):
        r = run_sample(*extra, "--checkpoint", model_file, "--out", str(tmp_path / "x.png"))
        assert r.returncode == 0, (extra, r.stderr)


@pytest.mark.parametrize("args, message", [
    ([], "say what to draw"),
    (["   "], "empty"),
    (["a red circle", "--checkpoint", "/no/such/model.npz"], "no model file"),
    (["--variations", "/etc/hostname"], "cannot read"),
    (["--variations", "/no/such.png"], "no such image"),
    (["--edit", "x.png"], "--from"),
    (["a red circle", "--num", "0"], "--num"),
    (["a red circle", "--rerank", "0"], "--rerank"),
    (["a red circle", "--prior-temperature", "3"], "prior_temperature"),
    (["--variations", "x.png", "--rerank", "2"], "--rerank"),
    (["a red circle", "--out", "/proc/forbidden/x.png"], "cannot write"),
])
def test_sample_cli_bad_input_is_one_line(args, message, model_file):
    if "--checkpoint" not in args:
        args = [*args, "--checkpoint", model_file]
    r = run_sample(*args)
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr


def test_the_other_priors_option_is_one_line_in_both_commands(tmp_path):
    path = write_random_model(str(tmp_path), prior="diffusion")
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".jax_cache")}
    for r in (run_sample("a red circle", "--prior-temperature", "0.5", "--checkpoint", path,
                         "--out", str(tmp_path / "x.png")),
              subprocess.run([sys.executable, "-m", "dalle_jax.evaluate", "--checkpoint", path,
                              "--num", "2", "--prior-temperature", "0.5", "--out",
                              str(tmp_path / "r.json")], cwd=ROOT, capture_output=True,
                             text=True, timeout=300, env=env)):
        assert r.returncode != 0
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
        assert "not an option of the gan generator with a diffusion prior" in lines[0]
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "r.json").exists()


def test_images_load_any_mode(tmp_path):
    cases = {"rgba.png": Image.new("RGBA", (20, 10), (255, 0, 0, 0)),
             "grey.png": Image.new("L", (10, 10), 128),
             "pal.png": Image.new("P", (10, 10), 3),
             "cmyk.jpg": Image.new("CMYK", (10, 10), (0, 255, 255, 0)),
             "deep.png": Image.new("I;16", (10, 10), 65535)}
    for name, im in cases.items():
        im.save(tmp_path / name)
        out = images_lib.load_image(str(tmp_path / name), 8)
        assert out.shape == (8, 8, 3) and out.dtype == np.uint8, name
    assert (images_lib.load_image(str(tmp_path / "rgba.png"), 8) == 255).all()  # over white
    assert (images_lib.load_image(str(tmp_path / "deep.png"), 8) == 255).all()
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(images_lib.ImageError):
        images_lib.load_image(str(tmp_path / "empty.png"), 8)


def test_train_py_runs_every_stage_resumes_and_writes_a_model(tmp_path):
    """train.py on the pipeline config: four stages, each resumable, then a loadable model
    holding the refine stage's generator."""
    overrides = SMALL + DIFFUSION_PRIOR + [f"{s}.{k}" for s in ("clip", "prior", "decoder")
                         for k in ("total_steps=2", "eval_every=0", "progress_bar=False",
                                   "checkpoint_every=1", "data.global_batch=8")] + [
        "refine.total_steps=2"]  # the rest of refine's fields follow the decoder's
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
           os.path.join(ROOT, "configs/shapes_gan.py"), "--workdir", str(tmp_path), *overrides]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".jax_cache")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("clip", "prior", "decoder", "refine"):
        assert os.path.isdir(tmp_path / stage / "checkpoints" / "2"), stage
    model = tmp_path / "model.npz"
    first = model.stat().st_mtime_ns
    pipe = Pipeline.load(str(model))
    assert pipe.generate(["a red circle"]).shape == (1, 16, 16, 3)
    # Rerunning finds every stage finished and only rewrites the same model.
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" not in r.stderr and model.stat().st_mtime_ns >= first
    meta, params = bundle.load(str(model))
    np.testing.assert_array_equal(params["generator"]["synthesis"]["const"],
                                  pipe.params["generator"]["synthesis"]["const"])
    refine = meta["configs"]["refine"]  # its whole config: its own fields over the decoder's
    assert (refine["total_steps"], refine["data"]["global_batch"], refine["optim"]["lr"],
            refine["loss"]["reconstruction_shift"]) == (2, 8, 3e-3, 1)
    assert refine["model"] == meta["configs"]["decoder"]["model"]


def test_a_new_decoder_on_a_model_files_clip_and_prior(tmp_path, model_file):
    """clip.import_from, prior.import_from and decoder.init_from on one model file: nothing but
    the generator trains, and the new file carries the old CLIP and prior unchanged."""
    run = [f"decoder.{k}" for k in ("total_steps=1", "eval_every=0", "progress_bar=False",
                                    "data.global_batch=8")]
    config = small_config(*run, f"clip.import_from={model_file}",
                          f"prior.import_from={model_file}", f"decoder.init_from={model_file}")
    path = stages.run(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["decoder", "model.npz"]  # no clip or prior run
    old_meta, old = bundle.load(model_file)
    new_meta, new = bundle.load(path)
    for part in ("clip", "prior"):
        for a, b in zip(jax.tree.leaves(old[part]), jax.tree.leaves(new[part])):
            np.testing.assert_array_equal(a, b)
    assert new_meta["configs"]["prior"] == old_meta["configs"]["prior"]
    # The generator went on from the file's (one step, EMA 0.995), not from a fresh start.
    a, b = old["generator"]["synthesis"]["const"], new["generator"]["synthesis"]["const"]
    assert np.abs(a - b).max() < 1e-2 < np.abs(a).mean()

    # A prior belongs to the CLIP it was trained on.
    config = config_lib.apply_overrides(config, ["clip.import_from=shipped:gan"])
    with pytest.raises(bundle.BundleError, match="needs clip.import_from="):
        stages.prior_from_model(config)
    config = config_lib.apply_overrides(config, [f"clip.import_from={model_file}",
                                                 "prior.model.width=48"])
    with pytest.raises(bundle.BundleError, match=r"holds a prior with prior\.model="):
        stages.prior_from_model(config)


def test_refine_fine_tunes_an_imported_decoders_generator(tmp_path, model_file):
    """decoder.import_from takes a model file's generator as the decoder stage's result; the
    refine stage starts from it (here at learning rate 0, so it must come out unchanged) and
    the new model file holds the refine stage's generator and whole config."""
    imports = [f"{part}.import_from={model_file}" for part in ("clip", "prior", "decoder")]
    config = small_config(*imports, "refine.total_steps=1", "refine.optim.lr=0.0",
                          "refine.eval_every=0", "refine.progress_bar=False",
                          "refine.data.global_batch=8", refine=True)
    path = stages.run(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["model.npz", "refine"]  # nothing else trained
    _, old = bundle.load(model_file)
    meta, new = bundle.load(path)
    for a, b in zip(jax.tree.leaves(old["generator"]), jax.tree.leaves(new["generator"])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert meta["configs"]["refine"]["total_steps"] == 1
    assert "import_from" not in meta["configs"]["refine"]  # the decoder's, not inherited
    # At the config's own learning rate the refine stage moves the generator.
    config = config_lib.apply_overrides(config, ["refine.optim.lr=3e-3"])
    path = stages.run(config, str(tmp_path / "moved"))
    _, moved = bundle.load(path)
    a, b = old["generator"]["synthesis"]["const"], moved["generator"]["synthesis"]["const"]
    assert 0 < np.abs(a - b).max() < 0.1

    # A decoder belongs to the CLIP it was trained on, and to its own config.
    with pytest.raises(bundle.BundleError, match="needs clip.import_from="):
        stages.decoder_from_model(config_lib.apply_overrides(
            config, ["clip.import_from=shipped:gan"]))
    with pytest.raises(bundle.BundleError, match=r"trained under another config \(decoder\."
                       r"total_steps=7000 there, 500 here\)"):
        stages.decoder_from_model(config_lib.apply_overrides(config, ["decoder.total_steps=500"]))


def test_a_refine_stage_may_add_caption_layers_that_start_as_the_identity(tmp_path, model_file,
                                                                           pipe):
    """The refine stage's generator under a model with cross-attention, a text reader and
    caption_to_w that the decoder lacks: the new layers start fresh, each attention's output
    projection and `embed_caption` at zero, so the model file draws what the decoder's did;
    the reader is given the CLIP's token embeddings; `Pipeline.load` builds the refine stage's
    model; a generator missing any other weight is refused."""
    from dalle_jax.train.gan import with_added_layers
    config = small_config("refine.model.cross_attention_res=(8,)",
                          "refine.model.text_reader_layers=1", "refine.model.caption_to_w=True",
                          refine=True)
    _, params = bundle.load(model_file)
    refine = config_lib.stage_config(config, "refine")
    task = GANTask(refine, params["clip"], config.clip, initial_generator=params["generator"])
    generator = task.init_params(jax.random.PRNGKey(0))["generator"]
    assert "b8_xattn" in generator["synthesis"] and "text_reader" in generator
    assert "embed_caption" in generator["mapping"]
    assert "b8_xattn" not in params["generator"]["synthesis"]
    # The reader reads the CLIP's token embeddings (the words), not its final features.
    tokens = pipe.tokenize(PROMPTS)
    _, features, _ = task.conditions(params["clip"], np.zeros((3, 16, 16, 3), np.float32), tokens)
    table = np.asarray(params["clip"]["text"]["token_embedding"]["embedding"])
    np.testing.assert_array_equal(features, table[tokens])
    path = str(tmp_path / "grown.npz")
    stages.export(path, config, params["clip"], params["prior"], generator)
    before = pipe.generate(PROMPTS, num_per_prompt=2, seed=5)
    grown = Pipeline.load(path, batch_size=4)
    np.testing.assert_allclose(grown.generate(PROMPTS, num_per_prompt=2, seed=5), before, atol=1)
    # Once the attention's output moves, the caption's features reach the picture.
    moved = jax.tree.map(np.array, generator)
    for name, layer in (("xattn", moved["synthesis"]["b8_xattn"]["out"]),
                        ("caption_to_w", moved["mapping"]["embed_caption"])):
        # Random, not constant: LayerNorm'd features sum to zero over channels.
        change = np.random.default_rng(0).standard_normal(layer["kernel"].shape)
        layer["kernel"] += change
        stages.export(path, config, params["clip"], params["prior"], moved)
        after = Pipeline.load(path, batch_size=4).generate(PROMPTS, num_per_prompt=2, seed=5)
        assert np.abs(after.astype(int) - before).max() > 2, name
        layer["kernel"] -= change
    with pytest.raises(ValueError, match="lacks parameter .*mapping"):
        with_added_layers({"synthesis": params["generator"]["synthesis"]}, generator)
