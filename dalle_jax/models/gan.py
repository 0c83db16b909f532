"""A conditional StyleGAN2-style generator and discriminator, conditioned on a CLIP vector.

After Karras et al. 2020 ("Analyzing and Improving the Image Quality of StyleGAN"): a mapping
network turns noise `z` and the condition into a style vector `w`; the synthesis network renders
`w` from a learned constant with modulated, demodulated 3x3 convolutions, per-pixel noise and
RGB skip outputs; equalized learning rates throughout. Conditioning follows StyleGAN-T and
GigaGAN (Sauer et al. 2023; Kang et al. 2023): the normalised CLIP vector enters the mapping
network, and optional cross-attention layers let low-resolution features attend to the
caption's token features. The discriminator is residual, with minibatch standard deviation and
a projection head for the condition (Miyato & Koyama 2018).

Modulation scales activations rather than weights (x * s, a shared convolution, then the
output demodulated): the same arithmetic as StyleGAN2's weight modulation without the grouped
convolution, which runs about 5x slower on CPUs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.models import layers
from dalle_jax.models import layout as layout_lib

SQRT2 = float(np.sqrt(2.0))


def lrelu(x):
    # StyleGAN's leaky ReLU with gain sqrt(2), which keeps activations at unit variance.
    return jax.nn.leaky_relu(x, 0.2) * SQRT2


def normalize_2nd_moment(x, eps=1e-8):
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


@dataclasses.dataclass(frozen=True)
class GANConfig:
    resolution: int = 32
    cond_dim: int = 128        # the CLIP embedding size
    z_dim: int = 64
    w_dim: int = 256
    mapping_layers: int = 4
    mapping_lr_mul: float = 0.01
    # channels per resolution, from the input up: resolution input_res * 2**i gets channels[i]
    channels: tuple[int, ...] = (256, 256, 128, 64)
    d_channels: tuple[int, ...] = (64, 128, 256, 256)
    noise: bool = True
    cross_attention_res: tuple[int, ...] = ()  # e.g. (8,) as in GigaGAN
    # The share of training examples whose caption the cross-attention (and caption_to_w)
    # does not see, so that the decoder also draws from an image vector alone (variations,
    # interpolation, edits).
    text_drop_prob: float = 0.0
    # Pre-LN Transformer blocks, trained with the generator, that read the caption in both
    # directions for the cross-attention (and caption_to_w); 0: none, the layers read the
    # frozen CLIP's final token features. With a reader the generator is given the CLIP's
    # token embeddings instead (`clip.token_embeddings`, the words before its Transformer):
    # DALL-E 2's decoder has a text encoder of its own (GLIDE's; Ramesh et al. 2022, Nichol et
    # al. 2022), and the shapes CLIP's final features hardly tell "above" from "below".
    text_reader_layers: int = 0
    # Add a projection of the (read) caption's token features, flattened so that each place in
    # the caption has weights of its own, to the condition the mapping network embeds, so that
    # w itself can say what the caption says beyond the CLIP vector (which colour goes where:
    # one bit that the 4x4 input map from w could place, as it places one object). The mean
    # over tokens instead learned the words but not their order (benchmarks/RESULTS.md,
    # session 31).
    caption_to_w: bool = False
    # Add a projection of w to the 4x4 input (as a DCGAN/BigGAN generator starts), so that
    # where things go depends on the condition from the first layer, not only on which
    # channels of the constant the styles switch on.
    input_from_w: bool = False
    token_dim: int = 128       # width of the caption's token features
    mbstd_group: int = 4
    # "nearest" (what the models trained before this field existed used) or "bilinear"
    # (StyleGAN2's low-pass upsampling, for both the feature maps and the RGB skips).
    upsample: str = "nearest"
    # The side of the synthesis network's input map (4 as in StyleGAN; 8 gives the projection
    # of w four times the spatial detail before any convolution).
    input_res: int = 4
    norm_groups: int = 8  # GroupNorm groups of the "conv" synthesis
    # "style": the StyleGAN2 synthesis network above. "conv": a convolutional decoder in the
    # BigGAN manner (Brock et al. 2019): w projected to the input map, then per level a 2x
    # upsampling and two 3x3 convolutions, each followed by a GroupNorm whose scale and shift
    # come from w (conditional normalisation) and a GELU; one 3x3 convolution to RGB at the end.
    synthesis: str = "style"
    # The side the discriminator reads; 0: the generator's `resolution`. Smaller, the pictures
    # are box-downsampled to it (a 64 px generator judged at 32 px: its finest level then
    # learns from the reconstruction terms alone, at about 0.8x the step time).
    d_resolution: int = 0
    # Layout classes (`models/layout.py`; 0: no layout input). With them the synthesis network
    # also reads a layout [B, layout_res ** 2] of cell classes (a row of -1: none): each cell's
    # colour and shape one-hot, resized to each level, through a 1x1 convolution added to the
    # features (`LayoutInput`), so the caption's placement and its colour-shape pairs reach
    # the pixels where the image vector leaves them open (two objects). `layout_drop_prob` of
    # training rows get none, so that the decoder also draws from an image vector alone
    # (variations, interpolation, edits).
    layout_classes: int = 0
    layout_res: int = 8
    layout_drop_prob: float = 0.0
    # The layout inputs' learning-rate multiplier (equalized learning rate, as the mapping
    # network's): a fine-tune that adds them starts them at zero beside a trained generator.
    layout_lr_mul: float = 1.0
    # With `layout_modulate` each input also scales the features it is added to, per pixel
    # (x * (1 + map @ W_scale) + map @ W_shift, SPADE's spatially-adaptive modulation: Park et
    # al. 2019), so that the map can switch features off where it says background and pick
    # a shape's features where it names one, where an addition can only add.
    layout_modulate: bool = False

    def __post_init__(self):
        if self.synthesis not in ("style", "conv"):
            raise ValueError(f"synthesis must be style or conv, got {self.synthesis!r}")
        if self.upsample not in ("nearest", "bilinear"):
            raise ValueError(f"upsample must be nearest or bilinear, got {self.upsample!r}")
        if not 0.0 <= self.layout_drop_prob <= 1.0:
            raise ValueError(f"layout_drop_prob must be between 0 and 1, got "
                             f"{self.layout_drop_prob}")
        if self.layout_classes and (self.layout_res < 1 or self.layout_res & (self.layout_res - 1)
                                    or self.resolution % self.layout_res):
            raise ValueError(f"layout_res {self.layout_res} must be a power of 2 that divides "
                             f"the resolution {self.resolution}")
        if not 0.0 <= self.text_drop_prob <= 1.0:
            raise ValueError(f"text_drop_prob must be between 0 and 1, got {self.text_drop_prob}")
        ratio = self.resolution // self.input_res if self.input_res >= 1 else 0
        if ratio < 1 or ratio * self.input_res != self.resolution or ratio & (ratio - 1):
            raise ValueError(f"input_res {self.input_res} must divide {self.resolution} by a "
                             "power of 2")
        d = self.disc_resolution
        if d < 4 or self.resolution % d or d & (d - 1):
            raise ValueError(f"d_resolution {self.d_resolution} must be a power of 2 of at "
                             f"least 4 that divides the resolution {self.resolution} (or 0)")

    @property
    def reads_caption(self) -> bool:
        """Whether any layer reads the caption (cross-attention or caption_to_w)."""
        return bool(self.cross_attention_res or self.caption_to_w)

    @property
    def has_text_reader(self) -> bool:
        """Whether the caption layers read it through a TextReader (then the generator is
        given the CLIP's token embeddings, not its final features)."""
        return bool(self.text_reader_layers and self.reads_caption)

    @property
    def disc_resolution(self) -> int:
        """The side of the pictures the discriminator reads."""
        return self.d_resolution or self.resolution

    def synthesis_levels(self) -> int:
        """How many resolutions either synthesis network runs at (input_res, 2 input_res, ...,
        resolution); `channels` must name one width for each."""
        levels = int(np.log2(self.resolution // self.input_res)) + 1
        if len(self.channels) < levels:
            raise ValueError(f"{levels} channel counts needed for {self.resolution} px, "
                             f"got {self.channels}")
        return levels


def config_from(model: dict, resolution: int, cond_dim: int, token_dim: int) -> GANConfig:
    """A GANConfig from a config's `decoder.model` block (a dict or ConfigDict; fields a model
    file written before they existed take their old defaults)."""
    return GANConfig(
        resolution=resolution, cond_dim=cond_dim, z_dim=model["z_dim"], w_dim=model["w_dim"],
        mapping_layers=model["mapping_layers"],
        mapping_lr_mul=model.get("mapping_lr_mul", 0.01),
        input_from_w=model.get("input_from_w", False),
        channels=tuple(model["channels"]), d_channels=tuple(model["d_channels"]),
        noise=model["noise"], cross_attention_res=tuple(model["cross_attention_res"]),
        text_drop_prob=model.get("text_drop_prob", 0.0),
        text_reader_layers=model.get("text_reader_layers", 0),
        caption_to_w=model.get("caption_to_w", False),
        token_dim=token_dim, upsample=model.get("upsample", GANConfig.upsample),
        input_res=model.get("input_res", GANConfig.input_res),
        norm_groups=model.get("norm_groups", GANConfig.norm_groups),
        synthesis=model.get("synthesis", GANConfig.synthesis),
        d_resolution=model.get("d_resolution", GANConfig.d_resolution),
        layout_classes=layout_lib.NUM_CLASSES if model.get("layout", False) else 0,
        layout_res=layout_lib.RES,
        layout_drop_prob=model.get("layout_drop_prob", 0.0),
        layout_lr_mul=model.get("layout_lr_mul", 1.0),
        layout_modulate=model.get("layout_modulate", False))


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


# Elements of one chunk of the weight gradient's input (about 1 MB of float32): small enough for
# the nine shifted copies and their matmuls to stay in a 2-core CPU's cache (benchmarks/RESULTS.md).
_WEIGHT_GRAD_CHUNK = 1 << 18


@jax.custom_vjp
def conv2d(x, w):
    """Stride-1 'SAME' convolution, NHWC x HWIO, with a faster weight gradient on CPUs.

    XLA's CPU backend computes the weight gradient of a convolution on large, thin feature
    maps (32x32 with 32 channels, say) about 3-5x slower than the same sums written as one
    matmul per kernel tap; the input gradient is an ordinary convolution and stays one. On
    large maps even those taps run from memory, not cache, so the batch is summed in chunks of
    about `_WEIGHT_GRAD_CHUNK` elements (images k, k + n, k + 2n, ... in chunk k, so that a
    batch sharded over devices stays sharded). Values and gradients equal
    `lax.conv_general_dilated`'s (tests/test_gan_model.py).
    """
    return _conv(x, w)


def _conv2d_fwd(x, w):
    return _conv(x, w), (x, w)


def _weight_grad(x, g, kh, kw):
    """sum over the batch of the conv's weight gradient, one matmul per kernel tap."""
    h, wd, cin = x.shape[1:]
    xp = jnp.pad(x, ((0, 0), (kh // 2, (kh - 1) // 2), (kw // 2, (kw - 1) // 2), (0, 0)))
    gm = g.reshape(-1, g.shape[-1])
    return jnp.stack([jnp.stack([xp[:, i:i + h, j:j + wd, :].reshape(-1, cin).T @ gm
                                 for j in range(kw)]) for i in range(kh)])


def _conv2d_bwd(residual, g):
    x, w = residual
    kh, kw, cin, cout = w.shape
    dx = _conv(g, jnp.flip(w, (0, 1)).swapaxes(2, 3))
    b, h, wd = x.shape[:3]
    per_chunk = max(1, _WEIGHT_GRAD_CHUNK // (h * wd * max(cin, cout)))
    while b % per_chunk:
        per_chunk -= 1
    chunks = b // per_chunk
    if chunks == 1:
        dw = _weight_grad(x, g, kh, kw)
    else:
        xs = x.reshape(per_chunk, chunks, *x.shape[1:])
        gs = g.reshape(per_chunk, chunks, *g.shape[1:])
        take = lambda a, k: jax.lax.dynamic_index_in_dim(a, k, 1, keepdims=False)
        # Summed in float32 whatever the compute dtype, so that bf16 chunks lose nothing.
        dw = jax.lax.fori_loop(
            0, chunks, lambda k, acc: acc + _weight_grad(take(xs, k), take(gs, k), kh,
                                                         kw).astype(jnp.float32),
            jnp.zeros((kh, kw, cin, cout), jnp.float32))
    return dx, dw.astype(w.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def upsample2x(x):
    """Nearest-neighbour 2x upsampling as two repeats: the gradient is a reshape and a sum,
    where `jax.image.resize`'s is a scatter that is slow on CPUs."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _fold_rows(k, phase):
    """A 3x3 kernel's rows [3, ...] folded to the 2 source rows one output phase of a nearest
    2x upsampling reads: phase 0 reads source offsets (-1, 0), phase 1 (0, +1)."""
    return jnp.stack([k[0], k[1] + k[2]]) if phase == 0 else jnp.stack([k[0] + k[1], k[2]])


def _upsample_conv_subpixel(x, w):
    b, h, wd, cin = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = []
    for i in range(2):
        kr = _fold_rows(w, i)                                            # [2, 3, cin, cout]
        cols = []
        for j in range(2):
            k = _fold_rows(kr.swapaxes(0, 1), j).swapaxes(0, 1)          # [2, 2, cin, cout]
            views = [xp[:, i + a:i + a + h, j + c:j + c + wd] for a in range(2) for c in range(2)]
            cols.append(jnp.concatenate(views, axis=-1) @ k.reshape(4 * cin, -1))
        rows.append(jnp.stack(cols, axis=3))                             # [b, h, wd, 2, cout]
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * wd, -1)        # rows 2a + i, cols 2c + j


def upsample_conv2d(x, w):
    """`conv2d(upsample2x(x), w)` for a 3x3 kernel, in 2.25x fewer FLOPs where that is faster.

    Each output pixel of a 3x3 convolution over a nearest-neighbour 2x upsampled map reads
    2x2 source pixels, so each of the four output phases is a 2x2 convolution of x with the
    kernel's taps that land on one source pixel summed (the sub-pixel form of a resize-conv):
    16 taps at the low resolution instead of 36. Each phase runs as one matmul over its four
    shifted views side by side. Used where it was measured faster on CPUs (benchmarks/
    RESULTS.md, session 19): low-resolution maps of 8 px or less, or 64 or more channels in
    (forward and backward 28 -> 15 ms at 8 px, 64 -> 32; 165 -> 121 ms at 16 px, 64 -> 64;
    but 25 -> 43 ms at 16 px, 32 -> 16, where conv2d's chunked weight gradient wins). Values
    and gradients equal the direct form's up to float32 rounding (tests/test_gan_model.py)."""
    if w.shape[:2] != (3, 3) or (min(x.shape[1:3]) > 8 and x.shape[-1] < 64):
        return conv2d(upsample2x(x), w)
    return _upsample_conv_subpixel(x, w)


def _smooth_upsample_axis(x, axis):
    n = x.shape[axis]
    take = lambda start, stop: jax.lax.slice_in_dim(x, start, stop, axis=axis)
    prev = jnp.concatenate([take(0, 1), take(0, n - 1)], axis=axis)  # edge pixels repeated
    nxt = jnp.concatenate([take(1, n), take(n - 1, n)], axis=axis)
    even, odd = 0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt
    out = jnp.stack([even, odd], axis=axis + 1)
    return out.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1:])


def upsample2x_smooth(x):
    """2x upsampling through StyleGAN2's [1, 3, 3, 1] low-pass filter (Karras et al. 2020),
    i.e. bilinear with half-pixel centres and the edge pixels repeated (the values of
    `jax.image.resize(..., "bilinear")`), built from shifts so that its gradient stays cheap.
    Nearest-neighbour upsampling leaves the coarse levels' RGB in 8x8 blocks that the fine
    levels must cancel exactly."""
    return _smooth_upsample_axis(_smooth_upsample_axis(x, 1), 2)


class EqualizedDense(nn.Module):
    """Dense layer with the weight scaled at run time by lr_mul / sqrt(fan_in)."""

    features: int
    lr_mul: float = 1.0
    bias_init: float = 0.0
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", nn.initializers.normal(1.0 / self.lr_mul),
                       (x.shape[-1], self.features))
        y = x.astype(self.dtype) @ (w * (self.lr_mul / np.sqrt(x.shape[-1]))).astype(self.dtype)
        if self.use_bias:
            b = self.param("bias", nn.initializers.constant(self.bias_init / self.lr_mul),
                           (self.features,))
            y = y + (b * self.lr_mul).astype(self.dtype)
        return y


class EqualizedConv(nn.Module):
    features: int
    kernel: int = 3
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, cin = self.kernel, x.shape[-1]
        w = self.param("kernel", nn.initializers.normal(1.0), (k, k, cin, self.features))
        y = conv2d(x.astype(self.dtype), (w / np.sqrt(k * k * cin)).astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


class MappingNetwork(nn.Module):
    """(z [B, Z], condition [B, C]) -> w [B, W]. The condition is L2-normalised first."""

    config: GANConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z, cond, caption=None):
        """`caption` [B, L * T]: the caption of `Generator.read` (with `caption_to_w`; zeros
        or None where there is no caption)."""
        c = self.config
        cond = cond / jnp.linalg.norm(cond, axis=-1, keepdims=True).clip(1e-6)
        embed = EqualizedDense(c.w_dim, name="embed_cond")(cond)
        if c.caption_to_w and caption is not None:
            # No bias: a row without a caption (all zeros) adds nothing, as does no caption.
            embed = embed + EqualizedDense(c.w_dim, use_bias=False, name="embed_caption")(caption)
        x = jnp.concatenate([normalize_2nd_moment(z), normalize_2nd_moment(embed)], axis=-1)
        for i in range(c.mapping_layers):
            x = lrelu(EqualizedDense(c.w_dim, lr_mul=c.mapping_lr_mul, name=f"fc{i}")(x))
        return x


class ModulatedConv(nn.Module):
    """3x3 (or 1x1) convolution modulated by a style: scale, convolve, demodulate."""

    features: int
    kernel: int = 3
    demodulate: bool = True
    dtype: Any = jnp.float32
    upsample: bool = False  # convolve the nearest 2x upsampling of x (see upsample_conv2d)

    @nn.compact
    def __call__(self, x, w):
        cin, k = x.shape[-1], self.kernel
        style = EqualizedDense(cin, bias_init=1.0, name="affine")(w)  # [B, Cin]
        weight = self.param("kernel", nn.initializers.normal(1.0), (k, k, cin, self.features))
        weight = weight / np.sqrt(k * k * cin)
        # The style scales channels, so it commutes with the upsampling.
        conv = upsample_conv2d if self.upsample else conv2d
        y = conv((x * style[:, None, None, :]).astype(self.dtype), weight.astype(self.dtype))
        if self.demodulate:
            # The output's std had the weight been modulated: sqrt(sum_{k,cin} (w * s)^2).
            power = jnp.square(style) @ jnp.sum(jnp.square(weight), axis=(0, 1))  # [B, Cout]
            y = y * jax.lax.rsqrt(power + 1e-8)[:, None, None, :].astype(self.dtype)
        return y


class CrossAttention(nn.Module):
    """Image features [B, H, W, C] attend to token features [B, L, T] (GigaGAN).

    A row whose mask holds no token (a dropped caption, or a decode from an image vector alone)
    adds nothing: the layer is then the identity, as it is at initialisation of `out`."""

    num_heads: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, tokens, token_mask):
        b, h, w, c = x.shape
        heads, dh = self.num_heads, c // self.num_heads
        q = nn.LayerNorm(dtype=self.dtype, name="ln_q")(x).reshape(b, h * w, c)
        kv = nn.LayerNorm(dtype=self.dtype, name="ln_kv")(tokens)
        q = layers.Dense(c, dtype=self.dtype, name="query")(q).reshape(b, h * w, heads, dh)
        # No key bias: it shifts every logit of a query equally, so softmax ignores it and its
        # gradient is pure round-off, which Adam would amplify into noise.
        k = layers.Dense(c, use_bias=False, dtype=self.dtype, name="key")(kv)
        v = layers.Dense(c, dtype=self.dtype, name="value")(kv)
        k = k.reshape(*k.shape[:2], heads, dh)
        v = v.reshape(*v.shape[:2], heads, dh)
        out = layers.attention(q, k, v, mask=token_mask[:, None, None, :])
        out = layers.Dense(c, dtype=self.dtype, name="out")(out.reshape(b, h * w, c))
        any_token = jnp.any(token_mask, axis=-1)[:, None, None].astype(out.dtype)
        return x + (out * any_token).reshape(b, h, w, c)


class TextReader(nn.Module):
    """Token features [B, L, T] -> [B, L, T] through `num_layers` pre-LN Transformer blocks
    with learned positions; a token attends to every token its row's mask [B, L] holds."""

    num_layers: int
    num_heads: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens, token_mask):
        b, length, d = tokens.shape
        heads = self.num_heads
        x = tokens + self.param("positional_embedding", nn.initializers.normal(0.01),
                                (length, d))
        visible = token_mask[:, None, None, :]
        for i in range(self.num_layers):
            y = nn.LayerNorm(dtype=self.dtype, name=f"block{i}_ln_1")(x)
            qkv = layers.Dense(3 * d, dtype=self.dtype, name=f"block{i}_qkv")(y)
            q, k, v = jnp.split(qkv.reshape(b, length, 3, heads, d // heads), 3, axis=2)
            out = layers.attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], mask=visible)
            x = x + layers.Dense(d, dtype=self.dtype, name=f"block{i}_out")(
                out.reshape(b, length, d))
            y = nn.LayerNorm(dtype=self.dtype, name=f"block{i}_ln_2")(x)
            y = layers.Dense(4 * d, dtype=self.dtype, name=f"block{i}_fc")(y)
            x = x + layers.Dense(d, dtype=self.dtype, name=f"block{i}_proj")(nn.gelu(y))
        return nn.LayerNorm(dtype=self.dtype, name="ln_final")(x)


def layout_maps(layout, config: GANConfig):
    """int [B, layout_res ** 2] (-1 rows: none) -> {side: map [B, side, side, F]} for each
    synthesis level's side (repeated up, averaged down), each cell its class's colour and shape
    one-hot side by side (`models/layout.factors`), or None without a layout."""
    if layout is None or not config.layout_classes:
        return None
    r = config.layout_res
    x = layout_lib.factors(layout).reshape(layout.shape[0], r, r, -1)
    maps = {}
    for i in range(config.synthesis_levels()):
        side = config.input_res * 2 ** i
        if side >= r:
            f = side // r
            maps[side] = jnp.repeat(jnp.repeat(x, f, axis=1), f, axis=2)
        else:
            f = r // side
            maps[side] = x.reshape(x.shape[0], side, f, side, f, -1).mean((2, 4))
    return maps


class LayoutInput(nn.Module):
    """A 1x1 convolution of a level's layout map (an embedding of each cell's colour plus one
    of its shape), added to its features (with `modulate`, a second one scaling them first);
    no bias, so a row with no layout (zeros) changes nothing (a fine-tune that adds it starts
    it at zero). Its weights are scaled at run time by lr_mul / sqrt(channels in)."""

    lr_mul: float = 1.0
    dtype: Any = jnp.float32
    modulate: bool = False

    @nn.compact
    def __call__(self, x, layout_map):
        k = layout_map.shape[-1]
        m = layout_map.astype(self.dtype)

        def conv(name):
            w = self.param(name, nn.initializers.normal(1.0 / self.lr_mul), (k, x.shape[-1]))
            return (m @ (w * (self.lr_mul / np.sqrt(k))).astype(self.dtype)).astype(x.dtype)
        if self.modulate:
            x = x * (1 + conv("scale_kernel"))
        return x + conv("kernel")


class SynthesisLayer(nn.Module):
    features: int
    noise: bool = True
    dtype: Any = jnp.float32
    upsample: bool = False  # nearest 2x upsampling of x first, folded into the convolution

    @nn.compact
    def __call__(self, x, w, rng):
        x = ModulatedConv(self.features, dtype=self.dtype, upsample=self.upsample,
                          name="conv")(x, w)
        if self.noise:
            strength = self.param("noise_strength", nn.initializers.zeros, ())
            noise = jax.random.normal(rng, x.shape[:3] + (1,), x.dtype)
            x = x + strength.astype(x.dtype) * noise
        x = x + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
        return lrelu(x)


class SynthesisNetwork(nn.Module):
    """w [B, W] -> image [B, R, R, 3] in about [-1, 1]."""

    config: GANConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, w, rng, tokens=None, token_mask=None, layout=None):
        c = self.config
        r0 = c.input_res
        levels = c.synthesis_levels()
        b = w.shape[0]
        maps = layout_maps(layout, c)
        const = self.param("const", nn.initializers.normal(1.0), (r0, r0, c.channels[0]))
        x = jnp.broadcast_to(const.astype(self.dtype), (b, r0, r0, c.channels[0]))
        if c.input_from_w:
            x = x + EqualizedDense(r0 * r0 * c.channels[0], name="input_from_w")(w).reshape(
                b, r0, r0, c.channels[0]).astype(self.dtype)
        up = upsample2x_smooth if c.upsample == "bilinear" else upsample2x
        rgb = None
        keys = jax.random.split(rng, 2 * levels)
        for i in range(levels):
            res, ch = r0 * 2 ** i, c.channels[i]
            if i > 0:
                nearest = c.upsample == "nearest"
                x = SynthesisLayer(ch, c.noise, self.dtype, upsample=nearest,
                                   name=f"b{res}_conv0")(x if nearest else up(x), w, keys[2 * i])
            if maps is not None:
                x = LayoutInput(c.layout_lr_mul, self.dtype, c.layout_modulate,
                                name=f"b{res}_layout")(x, maps[res])
            if res in c.cross_attention_res and tokens is not None:
                x = CrossAttention(dtype=self.dtype, name=f"b{res}_xattn")(x, tokens, token_mask)
            x = SynthesisLayer(ch, c.noise, self.dtype, name=f"b{res}_conv1")(x, w, keys[2 * i + 1])
            y = ModulatedConv(3, kernel=1, demodulate=False, dtype=self.dtype,
                              name=f"b{res}_torgb")(x, w)
            y = y + self.param(f"b{res}_torgb_bias", nn.initializers.zeros, (3,))
            rgb = y if rgb is None else up(rgb) + y
        return rgb.astype(jnp.float32)


class ConditionalNormConv(nn.Module):
    """3x3 convolution, GroupNorm scaled and shifted by w, GELU."""

    features: int
    groups: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, w):
        x = EqualizedConv(self.features, dtype=self.dtype, name="conv")(x)
        x = nn.GroupNorm(min(self.groups, self.features), use_scale=False, use_bias=False,
                         dtype=self.dtype, name="norm")(x)
        scale = EqualizedDense(self.features, bias_init=1.0, name="scale")(w)
        shift = EqualizedDense(self.features, name="shift")(w)
        return nn.gelu(x * scale[:, None, None, :].astype(self.dtype)
                       + shift[:, None, None, :].astype(self.dtype))


class ConvSynthesisNetwork(nn.Module):
    """w [B, W] -> image [B, R, R, 3]: the `synthesis="conv"` decoder (see GANConfig)."""

    config: GANConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, w, rng, tokens=None, token_mask=None, layout=None):
        del rng  # no per-pixel noise: z in w is the only source of variety
        c = self.config
        r0 = c.input_res
        levels = c.synthesis_levels()
        b = w.shape[0]
        maps = layout_maps(layout, c)
        x = EqualizedDense(r0 * r0 * c.channels[0], name="input_from_w")(w)
        x = x.reshape(b, r0, r0, c.channels[0]).astype(self.dtype)
        up = upsample2x_smooth if c.upsample == "bilinear" else upsample2x
        for i in range(levels):
            res, ch = r0 * 2 ** i, c.channels[i]
            if i > 0:
                x = up(x)
            if maps is not None:
                x = LayoutInput(c.layout_lr_mul, self.dtype, c.layout_modulate,
                                name=f"b{res}_layout")(x, maps[res])
            for j in range(2):
                x = ConditionalNormConv(ch, c.norm_groups, self.dtype,
                                        name=f"b{res}_conv{j}")(x, w)
            if res in c.cross_attention_res and tokens is not None:
                x = CrossAttention(dtype=self.dtype, name=f"b{res}_xattn")(x, tokens, token_mask)
        return EqualizedConv(3, dtype=self.dtype, name="to_rgb")(x).astype(jnp.float32)


class Generator(nn.Module):
    """(z, condition[, token features]) -> images. `truncation` pulls w toward `w_mean`."""

    config: GANConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.mapping = MappingNetwork(c, self.dtype)
        synthesis = ConvSynthesisNetwork if c.synthesis == "conv" else SynthesisNetwork
        self.synthesis = synthesis(c, self.dtype)
        if c.has_text_reader:
            self.text_reader = TextReader(c.text_reader_layers, dtype=self.dtype)

    def read(self, tokens, token_mask):
        """The caption's token features [B, L, T] as the cross-attention reads them (through
        the reader where the config has one) and, with `caption_to_w`, the caption [B, L * T]
        for the mapping network (the features outside the mask zeroed), else None."""
        if tokens is None:
            return None, None
        if hasattr(self, "text_reader"):
            tokens = self.text_reader(tokens, token_mask)
        caption = None
        if self.config.caption_to_w:
            m = token_mask[..., None].astype(tokens.dtype)
            caption = (tokens * m).reshape(tokens.shape[0], -1)
        return tokens, caption

    def __call__(self, z, cond, rng, tokens=None, token_mask=None, truncation=1.0, w_mean=None,
                 layout=None):
        """`layout` int [B, layout_res ** 2] (`models/layout.py`; rows of -1: none), read where
        the config has `layout_classes`."""
        tokens, caption = self.read(tokens, token_mask)
        w = self.mapping(z, cond, caption)
        if w_mean is not None:
            w = w_mean + truncation * (w - w_mean)
        return self.synthesis(w, rng, tokens, token_mask, layout)


class DiscriminatorBlock(nn.Module):
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        skip = EqualizedConv(self.features, kernel=1, use_bias=False, name="skip")(x)
        skip = nn.avg_pool(skip, (2, 2), (2, 2))
        x = lrelu(EqualizedConv(x.shape[-1], dtype=self.dtype, name="conv0")(x))
        x = lrelu(EqualizedConv(self.features, dtype=self.dtype, name="conv1")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        return (skip + x) / SQRT2


class Discriminator(nn.Module):
    """(images [B, R, R, 3], condition [B, C]) -> logits [B], R the config's disc_resolution
    (the caller box-downsamples to it).

    Conditions [K, B, C] give logits [K, B]: the images under each of K conditions, the
    convolutional trunk run once (the matching-aware term scores real images under their own
    and a mismatched condition; only the projection head differs)."""

    config: GANConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, cond):
        c = self.config
        levels = int(np.log2(c.disc_resolution)) - 2  # down to 4x4
        x = lrelu(EqualizedConv(c.d_channels[0], kernel=1, name="fromrgb")(images))
        for i in range(levels):
            x = DiscriminatorBlock(c.d_channels[min(i + 1, len(c.d_channels) - 1)], self.dtype,
                                   name=f"block{i}")(x)
        x = minibatch_stddev(x, c.mbstd_group)
        x = lrelu(EqualizedConv(x.shape[-1] - 1, name="conv_final")(x))
        x = lrelu(EqualizedDense(c.d_channels[-1], name="fc")(x.reshape(x.shape[0], -1)))
        cond = cond / jnp.linalg.norm(cond, axis=-1, keepdims=True).clip(1e-6)
        cond_embed = EqualizedDense(c.d_channels[-1], name="embed_cond")(cond)
        # Projection: an unconditional score plus <features, embedded condition>; x [B, F]
        # broadcasts against the embedded conditions' leading axes.
        out = EqualizedDense(1, name="out")(x)[:, 0]
        return out + jnp.sum(x * cond_embed, axis=-1) / np.sqrt(x.shape[-1])


def minibatch_stddev(x, group_size: int = 4):
    """Appends the std of features across a group of samples as one extra channel."""
    b, h, w, c = x.shape
    g = min(group_size, b)
    while b % g:
        g -= 1
    y = x.reshape(g, b // g, h, w, c).astype(jnp.float32)
    y = jnp.sqrt(jnp.var(y, axis=0) + 1e-8)           # [B/g, H, W, C]
    y = jnp.mean(y, axis=(1, 2, 3))                    # [B/g]
    y = jnp.tile(y[None, :, None, None, None], (g, 1, h, w, 1)).reshape(b, h, w, 1)
    return jnp.concatenate([x, y.astype(x.dtype)], axis=-1)
