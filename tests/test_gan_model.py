"""The GAN modules: shapes at 32/64 px, modulation arithmetic, conditioning paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax import once
from dalle_jax.models import gan

SMALL = dict(channels=(32, 32, 16, 16, 8), d_channels=(8, 16, 32, 32, 32), w_dim=32, z_dim=16,
             cond_dim=16, token_dim=16, mapping_layers=2)


@pytest.mark.parametrize("resolution, upsample, input_res",
                         [(32, "nearest", 4), (64, "bilinear", 4), (32, "nearest", 8)])
def test_generator_and_discriminator_shapes(resolution, upsample, input_res):
    config = gan.GANConfig(resolution=resolution, cross_attention_res=(8,), upsample=upsample,
                           input_res=input_res, **SMALL)
    k = jax.random.PRNGKey(0)
    z, cond = jax.random.normal(k, (4, 16)), jax.random.normal(k, (4, 16))
    tokens, mask = jax.random.normal(k, (4, 6, 16)), jnp.ones((4, 6), bool)
    g, d = gan.Generator(config), gan.Discriminator(config)
    gp = once.jit(g.init)(k, z, cond, k, tokens, mask)["params"]
    images = jax.jit(g.apply)({"params": gp}, z, cond, k, tokens, mask)
    assert images.shape == (4, resolution, resolution, 3)
    assert np.isfinite(np.asarray(images)).all()
    assert "b8_xattn" in gp["synthesis"]
    assert gp["synthesis"]["const"].shape[:2] == (input_res, input_res)
    dp = once.jit(d.init)(k, images, cond)["params"]
    assert jax.jit(d.apply)({"params": dp}, images, cond).shape == (4,)


def test_a_discriminator_at_half_the_side_reads_the_smaller_pictures():
    config = gan.GANConfig(resolution=32, d_resolution=16, **SMALL)
    assert config.disc_resolution == 16 and gan.GANConfig(resolution=32).disc_resolution == 32
    k = jax.random.PRNGKey(0)
    d = gan.Discriminator(config)
    images, cond = jnp.zeros((4, 16, 16, 3)), jnp.ones((4, 16))
    dp = once.jit(d.init)(k, images, cond)["params"]
    assert sorted(n for n in dp if n.startswith("block")) == ["block0", "block1"]  # 16 -> 4 px
    assert jax.jit(d.apply)({"params": dp}, images, cond).shape == (4,)
    for bad in (24, 64, 2):
        with pytest.raises(ValueError, match="d_resolution"):
            gan.GANConfig(resolution=32, d_resolution=bad)


@pytest.mark.parametrize("resolution", [32, 64])
def test_conv_synthesis_shapes_and_conditioning(resolution):
    """The BigGAN-style decoder: the picture depends on the condition and on z (its only
    noise), and every level's normalisation is scaled and shifted by w."""
    config = gan.GANConfig(resolution=resolution, synthesis="conv", cross_attention_res=(8,),
                           **SMALL)
    k = jax.random.PRNGKey(0)
    z, cond = jax.random.normal(k, (4, 16)), jax.random.normal(jax.random.PRNGKey(1), (4, 16))
    tokens, mask = jax.random.normal(k, (4, 6, 16)), jnp.ones((4, 6), bool)
    g = gan.Generator(config)
    gp = g.init(k, z, cond, k, tokens, mask)["params"]
    images = g.apply({"params": gp}, z, cond, k, tokens, mask)
    assert images.shape == (4, resolution, resolution, 3)
    assert np.isfinite(np.asarray(images)).all()
    synthesis = gp["synthesis"]
    levels = int(np.log2(resolution // 4)) + 1
    assert {f"b{4 * 2 ** i}_conv{j}" for i in range(levels) for j in range(2)} <= set(synthesis)
    assert "b8_xattn" in synthesis and "const" not in synthesis
    assert set(synthesis["b4_conv0"]) == {"conv", "scale", "shift"}
    other_cond = g.apply({"params": gp}, z, cond[::-1], k, tokens, mask)
    other_z = g.apply({"params": gp}, z[::-1], cond, k, tokens, mask)
    other_key = g.apply({"params": gp}, z, cond, jax.random.PRNGKey(7), tokens, mask)
    assert np.abs(np.asarray(images - other_cond)).max() > 1e-3
    assert np.abs(np.asarray(images - other_z)).max() > 1e-3
    np.testing.assert_array_equal(images, other_key)  # no per-pixel noise
    # The discriminator is the same whichever synthesis draws the pictures.
    d = gan.Discriminator(config)
    assert d.apply(d.init(k, images, cond), images, cond).shape == (4,)
    with pytest.raises(ValueError, match="synthesis"):
        gan.GANConfig(resolution=32, synthesis="unet", **SMALL)


def test_smooth_upsampling_is_bilinear_and_keeps_flat_maps_flat():
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    np.testing.assert_allclose(gan.upsample2x_smooth(x),
                               jax.image.resize(x, (2, 10, 14, 3), "bilinear"), atol=1e-6)
    # Its gradient (built from shifts) is the transpose of the same linear map.
    g = np.random.default_rng(1).normal(size=(2, 10, 14, 3)).astype(np.float32)
    ours = jax.grad(lambda v: jnp.sum(gan.upsample2x_smooth(v) * g))(x)
    ref = jax.grad(lambda v: jnp.sum(jax.image.resize(v, (2, 10, 14, 3), "bilinear") * g))(x)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    flat = np.full((1, 4, 4, 2), 0.3, np.float32)
    np.testing.assert_allclose(gan.upsample2x_smooth(flat), 0.3, atol=1e-7)


def test_activation_modulation_equals_weight_modulation():
    """Scaling inputs then demodulating is StyleGAN2's modulated convolution."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(k1, (2, 5, 5, 3))
    w = jax.random.normal(k2, (2, 4))
    conv = gan.ModulatedConv(6)
    params = conv.init(k3, x, w)["params"]
    got = conv.apply({"params": params}, x, w)
    style = np.asarray(w @ params["affine"]["kernel"] / 2.0 + params["affine"]["bias"])
    weight = np.asarray(params["kernel"]) / np.sqrt(9 * 3)
    for b in range(2):
        wb = weight * style[b][None, None, :, None]  # modulate the weight per sample
        wb = wb / np.sqrt(np.sum(wb ** 2, axis=(0, 1, 2), keepdims=True) + 1e-8)
        ref = jax.lax.conv_general_dilated(x[b:b + 1], wb, (1, 1), "SAME",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        np.testing.assert_allclose(got[b:b + 1], ref, rtol=1e-4, atol=1e-5)


def test_condition_and_noise_change_the_picture_and_truncation_pulls_to_mean():
    config = gan.GANConfig(resolution=32, **SMALL)
    g = gan.Generator(config)
    k = jax.random.PRNGKey(0)
    z = jax.random.normal(k, (2, 16))
    cond = jax.random.normal(jax.random.PRNGKey(1), (2, 16))
    params = g.init(k, z, cond, k)["params"]
    base = g.apply({"params": params}, z, cond, k)
    other_cond = g.apply({"params": params}, z, cond[::-1], k)
    assert np.abs(np.asarray(base - other_cond)).max() > 1e-3
    w_mean = g.apply({"params": params}, z, cond, method=lambda m, z, c: m.mapping(z, c))
    pulled = g.apply({"params": params}, z[::-1], cond, k, truncation=0.0, w_mean=w_mean)
    np.testing.assert_allclose(pulled, base, atol=1e-5)


def test_minibatch_stddev_sees_the_batch():
    x = jnp.concatenate([jnp.zeros((4, 2, 2, 3)), jnp.ones((4, 2, 2, 3))])
    y = gan.minibatch_stddev(x, group_size=4)
    assert y.shape == (8, 2, 2, 4)
    np.testing.assert_allclose(y[..., 3], 0.5, atol=1e-3)  # std of {0, 1} pairs


@pytest.mark.parametrize("kernel, cin, cout, batch, chunk", [
    (3, 5, 7, 2, None), (1, 4, 3, 2, None), (3, 3, 16, 2, None),
    # The weight gradient summed over the batch in chunks: 6 images in 3 chunks of 2; 5
    # images, where the chunk must shrink to 1 to divide them.
    (3, 5, 7, 6, 2 * 6 * 5 * 7), (3, 4, 3, 5, 2 * 6 * 5 * 4)])
def test_conv2d_values_and_gradients_equal_lax(kernel, cin, cout, batch, chunk, monkeypatch):
    """The hand-written weight gradient (per-tap matmuls, chunked over the batch on large
    inputs) and input gradient equal XLA's, and second derivatives (the R1 penalty
    differentiates a gradient) agree too."""
    if chunk:
        monkeypatch.setattr(gan, "_WEIGHT_GRAD_CHUNK", chunk)
    kx, kw = jax.random.split(jax.random.PRNGKey(3))
    x = jax.random.normal(kx, (batch, 6, 5, cin))
    w = jax.random.normal(kw, (kernel, kernel, cin, cout))
    ref = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(gan.conv2d(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
    for a, b in zip(jax.grad(loss(gan.conv2d), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    r1 = lambda f: lambda w: jnp.sum(jnp.square(jax.grad(lambda x: loss(f)(x, w))(x)))
    np.testing.assert_allclose(jax.grad(r1(gan.conv2d))(w), jax.grad(r1(ref))(w), rtol=1e-4,
                               atol=1e-3)


@pytest.mark.parametrize("side, cin, cout", [(4, 3, 5), (5, 6, 2), (12, 64, 3), (12, 6, 3)])
def test_upsample_conv2d_equals_conv_of_the_upsampled_map(side, cin, cout):
    """The four 2x2 phase convolutions compute conv2d(upsample2x(x), w): values and both
    gradients (odd and even sides; the last case, 12 px with few channels, takes the direct
    form, the others the phase form)."""
    kx, kw = jax.random.split(jax.random.PRNGKey(4))
    x = jax.random.normal(kx, (3, side, side + 2, cin))
    w = jax.random.normal(kw, (3, 3, cin, cout))
    direct = lambda x, w: gan.conv2d(gan.upsample2x(x), w)
    np.testing.assert_allclose(gan.upsample_conv2d(x, w), direct(x, w), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gan._upsample_conv_subpixel(x, w), direct(x, w), rtol=1e-5,
                               atol=1e-4)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
    for f in (gan.upsample_conv2d, gan._upsample_conv_subpixel):
        for a, b in zip(jax.grad(loss(f), (0, 1))(x, w), jax.grad(loss(direct), (0, 1))(x, w)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_text_reader_reads_both_ways_and_not_past_the_mask():
    """The reader's first token sees a later one (the frozen CLIP's causal features cannot),
    a token outside the mask changes nothing, and the generator's caption layers read what
    the reader makes of the caption."""
    reader = gan.TextReader(num_layers=2)
    k = jax.random.PRNGKey(0)
    tokens = jax.random.normal(k, (2, 6, 16))
    mask = jnp.array([[True] * 4 + [False] * 2] * 2)
    params = reader.init(k, tokens, mask)
    out = np.asarray(reader.apply(params, tokens, mask))
    change = jax.random.normal(jax.random.PRNGKey(1), (2, 16))  # not a constant: LayerNorm
    later = np.asarray(reader.apply(params, tokens.at[:, 3].add(change), mask))
    assert np.abs(out[:, 0] - later[:, 0]).max() > 1e-3  # token 0 reads token 3
    padded = np.asarray(reader.apply(params, tokens.at[:, 5].add(change), mask))
    np.testing.assert_allclose(padded[:, :4], out[:, :4], atol=1e-6)

    # The generator's cross-attention and (caption_to_w) mapping network read the reader's
    # features: its parameters are in the tree and change the picture.
    for xattn, to_w in (((8,), False), ((), True)):
        config = gan.GANConfig(resolution=32, cross_attention_res=xattn, text_reader_layers=1,
                               caption_to_w=to_w, **SMALL)
        z = jax.random.normal(k, (2, 16))
        cond = jax.random.normal(jax.random.PRNGKey(1), (2, 16))
        g = gan.Generator(config)
        gp = g.init(k, z, cond, k, tokens, mask)["params"]
        assert "text_reader" in gp and ("embed_caption" in gp["mapping"]) == to_w
        moved = jax.tree.map(lambda x: x, gp)
        qkv = moved["text_reader"]["block0_qkv"]
        qkv["kernel"] = qkv["kernel"] + jax.random.normal(k, qkv["kernel"].shape)
        a, b = (np.asarray(g.apply({"params": p}, z, cond, k, tokens, mask)) for p in (gp, moved))
        assert np.abs(a - b).max() > 1e-3
        # A row without a caption draws what the decoder draws without tokens.
        empty = jnp.zeros_like(mask)
        np.testing.assert_allclose(g.apply({"params": gp}, z, cond, k, tokens, empty),
                                   g.apply({"params": gp}, z, cond, k), atol=1e-6)


@pytest.mark.parametrize("synthesis", ["style", "conv"])
def test_cross_attention_reads_tokens_and_an_empty_mask_leaves_it_out(synthesis):
    """With tokens the picture depends on them; a row with no token (a dropped caption, a
    decode from an image vector alone) draws exactly what the decoder draws without tokens."""
    config = gan.GANConfig(resolution=32, synthesis=synthesis, cross_attention_res=(8, 16),
                           **SMALL)
    k = jax.random.PRNGKey(0)
    z, cond = jax.random.normal(k, (4, 16)), jax.random.normal(jax.random.PRNGKey(1), (4, 16))
    tokens = jax.random.normal(jax.random.PRNGKey(2), (4, 6, 16))
    mask = jnp.array([[True] * 6, [True] * 3 + [False] * 3, [False] * 6, [True] * 6])
    g = gan.Generator(config)
    gp = {"params": g.init(k, z, cond, k, tokens, jnp.ones((4, 6), bool))["params"]}
    images = np.asarray(g.apply(gp, z, cond, k, tokens, mask))
    without = np.asarray(g.apply(gp, z, cond, k))
    other_tokens = np.asarray(g.apply(gp, z, cond, k, tokens[::-1], mask))
    np.testing.assert_allclose(images[2], without[2], atol=1e-6)  # the empty row
    for row in (0, 1, 3):
        assert np.abs(images[row] - without[row]).max() > 1e-3, row
    assert np.abs(images[0] - other_tokens[0]).max() > 1e-3
