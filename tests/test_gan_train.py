"""The GAN family's step: both players learn, sharding does not change the numbers."""

import functools

import jax
import ml_collections
import numpy as np
import optax
import pytest

from dalle_jax import bundle, sharding
from dalle_jax import images as images_lib
from dalle_jax.train import clip as clip_family
from dalle_jax.train import gan as gan_family
from dalle_jax.train import loop, optim


def gan_config(r1_gamma=1.0, **mesh):
    return ml_collections.ConfigDict(dict(
        family="gan", seed=0, total_steps=4,
        data=dict(name="shapes", split="train", seed=0, image_size=16, context_length=16,
                  global_batch=16, num_threads=1, hard_negatives=0, minimal_pairs=True),
        model=dict(z_dim=8, w_dim=16, mapping_layers=2, channels=(16, 16, 8),
                   d_channels=(8, 16, 16), noise=True, cross_attention_res=(8,),
                   condition="image"),
        loss=dict(augment="color,translation,cutout", clip_weight=1.0, matching_weight=1.0,
                  clip_contrastive_weight=0.5,
                  r1_gamma=r1_gamma, r1_interval=2, reconstruction_weight=1.0,
                  reconstruction_shift=1, perceptual_weight=0.5),
        optim=dict(lr=2e-3, warmup_steps=0, final_lr_fraction=1.0, weight_decay=0.0, b1=0.0,
                   b2=0.99, eps=1e-8, clip_norm=1e3, ema_decay=0.9),
        dtype="float32", remat=False, grad_accum_steps=1,
        mesh=dict(data=mesh.get("data", 1), fsdp=mesh.get("fsdp", 1)),
        sharding=dict(params=mesh.get("params", "replicate"), rules=[]),
        log_every=1, eval_every=0, eval=dict(num_examples=0, use_ema=False),
        checkpoint_every=100, keep_checkpoints=1, progress_bar=False))


@functools.cache
def clip_parts():
    """A micro CLIP's parameters and config, initialised once per test process."""
    clip_config = ml_collections.ConfigDict(dict(
        model=dict(variant="micro"), data=dict(image_size=16, context_length=16),
        remat=False, dtype="float32"))
    task = clip_family.CLIPTask(clip_config)
    return task.init_params(jax.random.PRNGKey(7)), clip_config


def run_steps(config, workdir, steps=2):
    clip_params, clip_config = clip_parts()
    task = gan_family.GANTask(config, clip_params, clip_config)
    mesh, task, step_fn, state, iterator, ckpt = loop.setup(config, str(workdir), task)
    frozen = jax.device_put(task.frozen, sharding.replicated(mesh))
    history = []
    for _ in range(steps):
        state, metrics = step_fn(state, sharding.global_batch(next(iterator), mesh), frozen)
        history.append(jax.device_get(metrics))
    ckpt.close()
    return jax.device_get(state.params), history


# R1's double backward through the discriminator makes this the costliest compile of the file;
# the sharded test below runs the same step without it, and checks that both players learn.
@pytest.mark.slow
def test_gan_step_updates_both_players_and_applies_lazy_r1(tmp_path):
    params, history = run_steps(gan_config(), tmp_path, steps=2)
    first = history[0]
    for key in ("g_loss", "d_loss", "d_real", "d_fake", "d_mismatch", "clip_cosine", "r1",
                "reconstruction", "perceptual", "clip_contrastive"):
        assert np.isfinite(first[key]), key
    assert first["r1"] > 0 and history[1]["r1"] == 0  # step 0 regularises, step 1 does not
    init = gan_family.GANTask(gan_config(), *clip_parts()).init_params(
        jax.random.split(jax.random.PRNGKey(0))[0])
    for player in ("generator", "discriminator"):
        moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), params[player], init[player])
        assert max(jax.tree.leaves(moved)) > 0, player


# The FSDP layout compiles a second program of the same step: slow (CLIP's sharded tests cover
# FSDP in the default suite).
@pytest.mark.parametrize("mesh", [dict(data=8), pytest.param(dict(data=2, fsdp=4, params="fsdp"),
                                                             marks=pytest.mark.slow)])
def test_sharded_gan_step_matches_one_device(tmp_path, mesh):
    one, h1 = run_steps(gan_config(r1_gamma=0.0), tmp_path / "one")
    eight, h8 = run_steps(gan_config(r1_gamma=0.0, **mesh), tmp_path / "eight")
    init = gan_family.GANTask(gan_config(), *clip_parts()).init_params(
        jax.random.split(jax.random.PRNGKey(0))[0])
    for player in ("generator", "discriminator"):  # both players learn
        moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), one[player], init[player])
        assert max(jax.tree.leaves(moved)) > 0, player
    assert h1[0]["r1"] == 0  # off
    assert h1[0]["perceptual"] > 0
    # Each player's gradient norm is logged; together they make the step's global norm.
    for h in h1:
        np.testing.assert_allclose(np.hypot(h["g_grad_norm"], h["d_grad_norm"]), h["grad_norm"],
                                   rtol=1e-4)
    np.testing.assert_allclose(h8[-1]["g_loss"], h1[-1]["g_loss"], rtol=1e-4)
    np.testing.assert_allclose(h8[-1]["d_loss"], h1[-1]["d_loss"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), eight, one)


def test_clip_contrastive_loss_is_the_batch_cross_entropy_and_rewards_the_own_condition():
    rng = np.random.default_rng(0)
    similarity = rng.uniform(-1, 1, (6, 6)).astype(np.float32)
    scale = 28.8
    logits = scale * similarity.astype(np.float64)
    reference = np.mean(np.log(np.exp(logits).sum(1)) - np.diag(logits))
    np.testing.assert_allclose(gan_family.clip_contrastive_loss(similarity, scale), reference,
                               rtol=1e-5)
    # Pictures 0 and 1 are a minimal pair: each nearer its own condition than its twin's scores
    # lower than each nearer the twin's (the loss a decoder drawing the wrong shape pays).
    right = np.array([[0.98, 0.95], [0.95, 0.98]], np.float32)
    wrong = right[:, ::-1]
    assert (gan_family.clip_contrastive_loss(right, scale)
            < np.log(2) < gan_family.clip_contrastive_loss(wrong, scale))
    # Its gradient raises each picture's own cosine and lowers its twin's.
    grad = np.asarray(jax.grad(gan_family.clip_contrastive_loss)(wrong, scale))
    assert (np.diag(grad) < 0).all() and (grad[[0, 1], [1, 0]] > 0).all()


def test_clipping_each_player_separately():
    """`optim.clip_separately`: the generator's large gradient is clipped to clip_norm on its
    own and leaves the discriminator's small one whole; the joint clip shrinks both."""
    grads = {"generator": {"w": np.array([30.0, 40.0])},
             "discriminator": {"w": np.array([0.3, 0.4])}}
    config = ml_collections.ConfigDict(dict(lr=1.0, warmup_steps=0, final_lr_fraction=1.0,
                                            weight_decay=0.0, b1=0.0, b2=0.99, eps=1.0,
                                            clip_norm=1.0, ema_decay=0.0))
    each = optim.clip_each_by_global_norm(1.0)
    clipped, _ = each.update(grads, each.init(grads))
    np.testing.assert_allclose(clipped["generator"]["w"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(clipped["discriminator"]["w"], [0.3, 0.4], rtol=1e-6)
    joint = optax.clip_by_global_norm(1.0)
    shrunk, _ = joint.update(grads, joint.init(grads))
    assert np.linalg.norm(shrunk["discriminator"]["w"]) < 0.02
    # Through make_optimizer: with Adam's eps at 1 its first step is -lr g / (|g| + 1), so the
    # discriminator's step shows which clip ran.
    steps = {}
    for separately in (False, True):
        config.clip_separately = separately
        tx, _ = optim.make_optimizer(config, total_steps=10)
        updates, _ = tx.update(grads, tx.init(grads), grads)
        steps[separately] = -np.asarray(updates["discriminator"]["w"])
    d = np.array([0.3, 0.4])
    np.testing.assert_allclose(steps[True], d / (d + 1.0), rtol=1e-3)
    assert steps[False].max() < 0.02


def test_perceptual_distance_reads_every_layer_of_a_conv_tower():
    """The perceptual term compares every GroupNorm output of CLIP's convolutional tower and its
    final grid: zero (up to rounding) for the same pictures, positive for others, with a
    gradient that reaches the drawn picture (and none that reaches the real one)."""
    clip_config = ml_collections.ConfigDict(dict(
        model=dict(variant="tiny-cnn"), data=dict(image_size=16, context_length=16),
        remat=False, dtype="float32"))
    clip_params = clip_family.CLIPTask(clip_config).init_params(jax.random.PRNGKey(1))
    task = gan_family.GANTask(gan_config(r1_gamma=0.0), clip_params, clip_config)
    k1, k2 = jax.random.split(jax.random.PRNGKey(2))
    fake = jax.random.uniform(k1, (3, 16, 16, 3), minval=-1, maxval=1)
    real = jax.random.uniform(k2, (3, 16, 16, 3), minval=-1, maxval=1)
    maps = jax.eval_shape(task.feature_maps, clip_params, real)
    assert len(maps) == len(task.clip_model.config.vision_cnn) + 1
    assert [m.shape[1] for m in maps] == [256, 256, 64, 64, 16, 16, 16]
    # One compiled program for the values and both gradients (eager, every op compiles alone).
    distance_and_grads = jax.jit(jax.value_and_grad(task.perceptual_distance, (1, 2)))
    assert float(distance_and_grads(clip_params, real, real)[0]) < 1e-6  # 0 up to rounding
    distance, (g_fake, g_real) = distance_and_grads(clip_params, fake, real)
    assert 0.0 < float(distance) <= 4.0
    assert np.abs(g_fake).max() > 0 and np.abs(g_real).max() == 0


def test_shift_tolerant_reconstruction_forgives_small_translations_only():
    rng = np.random.default_rng(0)
    real = np.zeros((2, 12, 12, 3), np.float32)
    real[:, 4:7, 5:8] = rng.uniform(0.2, 1.0, (2, 3, 3, 3))  # an object away from the edges
    moved = np.roll(real, (2, -1), axis=(1, 2))  # 2 px down, 1 px left
    plain = gan_family.reconstruction_error(moved, real, "l2", 0)
    assert plain > 0
    np.testing.assert_allclose(gan_family.reconstruction_error(moved, real, "l2", 2), 0.0,
                               atol=1e-7)
    # One pixel of tolerance cannot undo a 2 px move, and the plain error is the s = 0 case.
    assert 0 < gan_family.reconstruction_error(moved, real, "l1", 1) < \
        gan_family.reconstruction_error(moved, real, "l1", 0)
    np.testing.assert_allclose(plain, np.mean(np.square(moved - real)), rtol=1e-6)
    # Each picture takes its own best shift: a batch of one moved and one unmoved copy is 0.
    mixed = np.concatenate([moved[:1], real[1:]])
    np.testing.assert_allclose(gan_family.reconstruction_error(mixed, real, "l2", 2), 0.0,
                               atol=1e-7)
    # The gradient reaches the drawn picture.
    grad = jax.grad(lambda f: gan_family.reconstruction_error(f, real, "l2", 1))(real + 0.1)
    assert np.abs(grad).sum() > 0


def test_gaussian_blur_matches_a_direct_convolution_and_keeps_flat_pictures():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(2, 10, 11, 3)).astype(np.float32)
    sigma = 0.8
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k2 = np.outer(k, k) / np.outer(k, k).sum()
    padded = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    want = np.zeros_like(x)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            want += k2[dy, dx] * padded[:, dy:dy + 10, dx:dx + 11]
    np.testing.assert_allclose(gan_family.gaussian_blur(x, sigma), want, rtol=1e-5, atol=1e-6)
    flat = np.full((1, 8, 8, 3), 0.3, np.float32)
    np.testing.assert_allclose(gan_family.gaussian_blur(flat, 1.5), flat, rtol=1e-6)
    assert gan_family.gaussian_blur(x, 0.0) is x


def test_blurred_reconstruction_forgives_edges_more_than_placement():
    """Under the blur a one-pixel move costs a fraction of its plain error, a picture of the
    wrong colour costs about as much as before, and the gradient reaches the drawn picture."""
    real = np.zeros((1, 16, 16, 3), np.float32)
    real[:, 5:10, 5:10] = 1.0
    moved = np.roll(real, 1, axis=2)
    plain, blurred = (gan_family.reconstruction_error(moved, real, "l2", 0, s) for s in (0, 1.0))
    assert 0 < blurred < 0.4 * plain
    wrong = real * np.array([1.0, 0.0, 0.0], np.float32)  # the object red instead of white
    ratio = (gan_family.reconstruction_error(wrong, real, "l2", 0, 1.0)
             / gan_family.reconstruction_error(wrong, real, "l2", 0, 0))
    assert ratio > 0.6
    grad = jax.grad(lambda f: gan_family.reconstruction_error(f, real, "l2", 0, 1.0))(moved)
    assert np.abs(grad).sum() > 0


def test_edge_weights_match_a_direct_recomputation_and_move_the_error_to_edges():
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (2, 7, 9, 3)).astype(np.float32)
    strength = 3.0
    # Largest step to the right or lower neighbour over channels, then a 3x3 max filter.
    step = np.zeros(x.shape[:3], np.float32)
    step[:, :-1] = np.abs(x[:, 1:] - x[:, :-1]).max(-1)
    step[:, :, :-1] = np.maximum(step[:, :, :-1], np.abs(x[:, :, 1:] - x[:, :, :-1]).max(-1))
    spread = np.zeros_like(step)
    for b in range(2):
        for i in range(7):
            for j in range(9):
                spread[b, i, j] = step[b, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].max()
    want = 1.0 + strength * spread
    want /= want.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(gan_family.edge_weights(x, strength)[..., 0], want, rtol=1e-5)

    # A flat picture keeps the plain error; on a square, an error at its edge outweighs the
    # same error in the flat background, and each picture's weights average 1.
    flat = np.full((1, 12, 12, 3), 0.2, np.float32)
    np.testing.assert_allclose(gan_family.reconstruction_error(flat + 0.1, flat, edge=4.0),
                               gan_family.reconstruction_error(flat + 0.1, flat), rtol=1e-6)
    real = np.full((1, 12, 12, 3), -1.0, np.float32)
    real[:, 4:8, 4:8] = 1.0
    at_edge, in_background = real.copy(), real.copy()
    at_edge[:, 4, 5] -= 0.5
    in_background[:, 0, 11] += 0.5
    weighted = lambda f: float(gan_family.reconstruction_error(f, real, edge=4.0))
    assert weighted(at_edge) > 2 * weighted(in_background) > 0
    np.testing.assert_allclose(gan_family.edge_weights(real, 4.0).mean(), 1.0, rtol=1e-5)
    # Under the shift-tolerant error the weights follow the shifted real picture: a drawing
    # of the square one pixel to the right, wrong at one edge pixel, costs what it costs
    # against that shifted picture, not what the unshifted picture's weights would give.
    moved = np.roll(real, 1, axis=2)
    drawn = moved.copy()
    drawn[:, 5, 9] += 0.5  # beside the moved square's right edge, two pixels off the real one's
    np.testing.assert_allclose(
        gan_family.reconstruction_error(drawn, real, max_shift=1, edge=4.0),
        gan_family.reconstruction_error(drawn, moved, edge=4.0), rtol=1e-6)
    unshifted_weights = gan_family.edge_weights(real, 4.0)
    assert float(np.mean(np.square(drawn - moved) * unshifted_weights)) < \
        0.9 * float(gan_family.reconstruction_error(drawn, moved, edge=4.0))
    grad = jax.grad(lambda f: gan_family.reconstruction_error(f, real, edge=4.0))(at_edge)
    assert np.abs(grad).sum() > 0


@pytest.mark.parametrize("drop", [0.0, 1.0])
def test_text_drop_prob_hides_the_caption_from_cross_attention(tmp_path, drop):
    """Every caption dropped: the cross-attention layer gets no gradient (it adds nothing);
    none dropped: it learns."""
    config = gan_config(r1_gamma=0.0)
    config.model.text_drop_prob = drop
    # The adversarial and reconstruction terms alone: every other term reads the same drawn
    # picture, and leaving them out shortens the compile.
    config.loss.update(augment="", perceptual_weight=0.0, clip_weight=0.0,
                       clip_contrastive_weight=0.0, matching_weight=0.0)
    clip_params, clip_config = clip_parts()
    task = gan_family.GANTask(config, clip_params, clip_config)
    params = task.init_params(jax.random.PRNGKey(0))
    batch = task_batch(config)
    grads, _ = jax.jit(task.grad_fn)(params, batch, jax.random.PRNGKey(1), task.frozen, 1)
    xattn = jax.tree.leaves(grads["generator"]["synthesis"]["b8_xattn"])
    largest = max(float(np.abs(np.asarray(g)).max()) for g in xattn)
    if drop:
        assert largest == 0.0
    else:
        assert largest > 0.0


def task_batch(config):
    from dalle_jax.data import pipeline as data_pipeline
    source = data_pipeline.make_dataset(config.data)
    return jax.tree.map(np.asarray, next(iter(source)))


def twice_the_clip_side(config):
    """The config's decoder drawing at 32 px on the 16 px micro CLIP, judged at 16 px."""
    config.data.image_size = 32
    config.model.channels = (16, 16, 8, 8)
    config.model.d_resolution = 16
    return config


@pytest.mark.parametrize("augment,negatives,samples,search,side", [
    ("", "other", 1, False, 16), ("color,translation", "other", 1, False, 16),
    ("", "counterfactual", 1, False, 16), ("", "other", 3, False, 16),
    ("", "other", 4, True, 16), ("", "other", 1, False, 32)])
def test_step_shares_discriminator_passes_yet_equals_the_two_separate_losses(augment, negatives,
                                                                             samples, search,
                                                                             side):
    """The step runs the discriminator once over the fakes for both players and once over the
    real batch for all its conditions; its gradients must equal those of the textbook two
    losses, each player's written apart with the other's values held (the same augmented
    pictures seen by both, as the step sees them). With counterfactual negatives the
    matching-aware term is the mean over the neighbour's condition and the minimal-pair
    partner's (the batch's rows i and i + 8 here). With `samples` draws the squared error is
    each picture's best draw's, the adversarial term the first draw's; with `search`, every
    term is taken at the z of each picture's best draw, chosen without gradients. At `side` 32 the
    generator draws 32 px pictures that the discriminator reads box-downsampled to 16 px."""
    config = gan_config(r1_gamma=0.0)
    if side == 32:
        config = twice_the_clip_side(config)
    config.model.cross_attention_res = ()
    config.loss.update(augment=augment, perceptual_weight=0.0, clip_weight=0.0,
                       clip_contrastive_weight=0.0, matching_weight=0.7, adversarial_weight=0.3,
                       reconstruction_shift=0, matching_negatives=negatives,
                       reconstruction_samples=samples, reconstruction_search=search)
    clip_params, clip_config = clip_parts()
    task = gan_family.GANTask(config, clip_params, clip_config)
    params = task.init_params(jax.random.PRNGKey(0))
    batch = task_batch(config)
    rng = jax.random.PRNGKey(1)
    lc = config.loss

    def reference(params):
        real = batch["image"]
        cond, features, mask = task.conditions(task.frozen["clip"], real, batch["tokens"])
        k_z, k_noise, _, k_fake, k_real, _ = jax.random.split(rng, 6)
        z = jax.random.normal(k_z, (real.shape[0], task.gan_config.z_dim))
        aug = lambda x, k: gan_family.diff_augment(x, k, augment) if augment else x
        D = lambda dp, x, c: task.discriminator.apply(
            {"params": dp}, images_lib.box_downsample(x, 16), c)
        draw = lambda gp, z=z, k=k_noise: task.generator.apply({"params": gp}, z, cond, k,
                                                                features, mask)
        error = lambda x: ((x - real) ** 2).mean(axis=(1, 2, 3))
        if search:  # each picture's z: the candidate whose own draw is nearest it
            zs = [z, *jax.random.normal(jax.random.fold_in(k_z, 1), (samples - 1,) + z.shape)]
            best = jax.numpy.stack([error(draw(params["generator"], c)) for c in zs]).argmin(0)
            z = jax.numpy.stack(zs)[best, jax.numpy.arange(real.shape[0])]
            draw = functools.partial(draw, z=z)

        def g_loss(gp):
            fake = draw(gp)
            adversarial = jax.nn.softplus(-D(params["discriminator"], aug(fake, k_fake), cond))
            draws = [fake] + [draw(gp, jax.random.normal(jax.random.fold_in(k_z, i), z.shape),
                                   jax.random.fold_in(k_noise, i))
                              for i in range(1, 1 if search else samples)]
            errors = jax.numpy.stack([error(x) for x in draws])
            return (lc.adversarial_weight * adversarial.mean()
                    + lc.reconstruction_weight * errors.min(axis=0).mean())

        def d_loss(dp):
            fake = jax.lax.stop_gradient(draw(params["generator"]))
            real_seen = aug(real, k_real)
            wrong = [jax.numpy.roll(cond, 1, axis=0)]
            if negatives == "counterfactual":
                wrong.append(jax.numpy.concatenate([cond[8:], cond[:8]]))
            mismatch = sum(jax.nn.softplus(D(dp, real_seen, c)).mean() for c in wrong)
            return (jax.nn.softplus(D(dp, aug(fake, k_fake), cond)).mean()
                    + jax.nn.softplus(-D(dp, real_seen, cond)).mean()
                    + lc.matching_weight * mismatch / len(wrong))

        (gl, gg), (dl, dg) = (jax.value_and_grad(g_loss)(params["generator"]),
                              jax.value_and_grad(d_loss)(params["discriminator"]))
        return {"generator": gg, "discriminator": dg}, gl, dl

    grads, metrics = jax.jit(task.grad_fn)(params, batch, rng, task.frozen, 1)
    want, g_loss, d_loss = jax.jit(reference)(params)
    assert batch["image"].shape[1] == side
    if samples > 1:  # the best of the draws is nearer the real pictures than the first alone
        config.loss.reconstruction_samples = 1
        first = jax.jit(gan_family.GANTask(config, clip_params, clip_config).grad_fn)(
            params, batch, rng, task.frozen, 1)[1]
        assert metrics["reconstruction"] < first["reconstruction"]
    np.testing.assert_allclose(metrics["g_loss"], g_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["d_loss"], d_loss, rtol=1e-5)
    for player in ("generator", "discriminator"):
        scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want[player]))
        assert scale > 0, player
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4 * scale),
                     grads[player], want[player])


def test_a_decoder_at_twice_the_clip_side_is_conditioned_on_what_the_clip_sees():
    """The CLIP reads a 32 px decoder's pictures box-downsampled to its 16 px: the condition of
    a 32 px rendering is (but for its edges' finer antialiasing) that of the same scene
    rendered at 16 px, and the CLIP-guided step runs on the 32 px pictures."""
    from dalle_jax.data import pipeline as data_pipeline
    from dalle_jax.data import shapes
    clip_params, clip_config = clip_parts()
    config = twice_the_clip_side(gan_config(r1_gamma=0.0))
    task = gan_family.GANTask(config, clip_params, clip_config)
    big, captions = shapes.examples(range(16), size=32)
    small, _ = shapes.examples(range(16), size=16)
    tokens = gan_family.Tokenizer()(captions, context_length=16)
    cond = task.conditions(clip_params, data_pipeline.to_float_images(big), tokens)[0]
    want = clip_family.embed_images(task.clip_model, clip_params, small)
    unit = np.asarray(cond) / np.linalg.norm(cond, axis=-1, keepdims=True)
    # Each picture's vector is nearest its own scene's at 16 px, five times nearer than any
    # other scene's (a random CLIP puts all the scenes close together).
    similarity = unit @ want.T
    same = np.diagonal(similarity)
    others = np.where(np.eye(len(want), dtype=bool), -1.0, similarity).max(axis=1)
    assert np.all(1 - same < 0.2 * (1 - others)), (same, others)
    # The fake pictures are 32 px, CLIP guidance reads them at 16.
    params = task.init_params(jax.random.PRNGKey(0))
    batch = task_batch(config)
    grads, metrics = jax.jit(task.grad_fn)(params, batch, jax.random.PRNGKey(1), task.frozen, 0)
    assert batch["image"].shape[1:] == (32, 32, 3)
    assert np.isfinite(metrics["clip_cosine"]) and np.isfinite(metrics["g_loss"])
    with pytest.raises(ValueError, match="whole multiple of the CLIP"):
        config.data.image_size = 24
        gan_family.GANTask(config, clip_params, clip_config)


def test_counterfactual_negatives_need_minimal_pairs():
    config = gan_config()
    config.data.minimal_pairs = False
    config.loss.matching_negatives = "counterfactual"
    with pytest.raises(ValueError, match="needs data.minimal_pairs=True"):
        gan_family.GANTask(config, *clip_parts())


def pipeline_configs(generator):
    """What a model file's configs must hold to load (their contents unread here)."""
    return {"generator": generator, **{k: {} for k in ("clip", "prior", "decoder")}}


def test_init_from_starts_the_generator_from_a_model_file_and_the_discriminator_fresh(tmp_path):
    clip_params, clip_config = clip_parts()
    config = gan_config()
    fresh = gan_family.GANTask(config, clip_params, clip_config).init_params(
        jax.random.PRNGKey(3))
    # A "trained" generator: every weight moved off its initial value.
    trained = jax.tree.map(lambda x: np.asarray(x) + 0.25, fresh["generator"])
    path = str(tmp_path / "model.npz")
    bundle.export(path, pipeline_configs("gan"), {"generator": trained})
    config.init_from = path
    task = gan_family.GANTask(config, clip_params, clip_config)
    _, task, _, state, _, ckpt = loop.setup(config, str(tmp_path / "run"), task)
    ckpt.close()
    start = jax.device_get(state.params)
    for got, want in zip(jax.tree.leaves(start["generator"]), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(jax.tree.leaves(jax.device_get(state.ema_params["generator"])),
                         jax.tree.leaves(trained)):
        np.testing.assert_array_equal(got, want)
    # The discriminator is the config seed's fresh one, as without init_from.
    plain = gan_family.GANTask(gan_config(), clip_params, clip_config).init_params(
        jax.random.split(jax.random.PRNGKey(config.seed))[0])
    for got, want in zip(jax.tree.leaves(start["discriminator"]),
                         jax.tree.leaves(plain["discriminator"])):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_init_from_names_the_first_parameter_that_does_not_fit(tmp_path):
    clip_params, clip_config = clip_parts()
    config = gan_config()
    config.model.w_dim = 24
    other = gan_family.GANTask(config, clip_params, clip_config).init_params(
        jax.random.PRNGKey(0))
    path = str(tmp_path / "model.npz")
    bundle.export(path, pipeline_configs("gan"), {"generator": other["generator"]})
    config = gan_config()
    config.init_from = path
    with pytest.raises(bundle.BundleError, match=r"does not fit decoder.model here \(parameter "):
        gan_family.GANTask(config, clip_params, clip_config)
    bundle.export(path, pipeline_configs("unclip"), {"decoder": {"w": np.zeros(3, np.float32)}})
    with pytest.raises(bundle.BundleError, match="holds a unclip model, not a GAN generator"):
        gan_family.GANTask(config, clip_params, clip_config)
