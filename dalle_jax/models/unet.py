"""unCLIP's diffusion decoder: a GLIDE/ADM-style U-Net from noise to pixels, given a CLIP image
embedding and the caption.

Architecture after Dhariwal & Nichol 2021 (ADM: residual blocks with GroupNorm and scale-shift
timestep conditioning, self-attention at the coarse resolutions, skip connections between the
down and up paths), with GLIDE's text conditioning (Nichol et al. 2022: every attention layer
also attends to the caption's token features, projected to its own keys and values) and
unCLIP's image conditioning (Ramesh et al. 2022, section 2.1: the CLIP image embedding is
projected and added to the timestep embedding, and projected into four extra context tokens
concatenated to the caption's). For classifier-free guidance, training zeroes the image
embedding 10% of the time and drops the caption 50% of the time (`drop_image`, `drop_text`
flags; a dropped caption's tokens are hidden from attention); sampling guides against both
dropped. The caption's token features come from the frozen CLIP text tower.

Simplifications for a small base model: fixed variances (no learned sigma, so no hybrid loss),
no dropout, strided-convolution downsampling and nearest + convolution upsampling (ADM's
non-residual resampling). The default shapes decoder (32 px, 32 base channels, multipliers
(1, 2, 2), one block per level, attention at 8 px, CLIP tiny's 128-wide tokens) has 1.28M
parameters and costs 0.48 GFLOPs per image per forward pass (XLA's count; a training step
about three times that, a guided sampling step twice). On the shared 2-core CPU it trained at
21 images/s (batch 64, frozen CLIP tiny included; 13/s under heavy load); attention at 16 px
as well cost a quarter more time, 24 base channels ran 1.5x faster (benchmarks/bench_unclip.py).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import diffusion, once
from dalle_jax.models import layers
from dalle_jax.models.flow_prior import timestep_embedding
from dalle_jax.models.gan import conv2d, upsample_conv2d


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    image_size: int = 32
    embed_dim: int = 128          # the CLIP embedding size
    token_dim: int = 128          # width of the CLIP text tower's token features
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (8,)
    num_heads: int = 4
    norm_groups: int = 8
    context_dim: int = 64         # width of the caption + image context tokens
    num_image_tokens: int = 4     # unCLIP's extra context tokens from the image embedding
    schedule: str = "cosine"
    num_timesteps: int = 1000
    prediction: str = "eps"
    min_snr_gamma: float = 0.0    # > 0: min-SNR-gamma loss weighting (diffusion.min_snr_weight)
    image_drop_prob: float = 0.1
    text_drop_prob: float = 0.5
    threshold_percentile: float = 0.995  # dynamic thresholding of x0; 0 clips to [-1, 1]

    def __post_init__(self):
        diffusion.check(self.prediction, diffusion.PREDICTIONS, "prediction target")
        diffusion.Schedule(self.schedule, self.num_timesteps)
        widths = [self.base_channels * m for m in self.channel_mult]
        if any(w % self.norm_groups or w % self.num_heads for w in widths):
            raise ValueError(f"U-Net widths {widths} must divide into {self.norm_groups} norm "
                             f"groups and {self.num_heads} heads")
        if self.image_size % 2 ** (len(self.channel_mult) - 1):
            raise ValueError(f"image size {self.image_size} does not halve "
                             f"{len(self.channel_mult) - 1} times")

    @property
    def noise_schedule(self) -> diffusion.Schedule:
        return diffusion.Schedule(self.schedule, self.num_timesteps)


class Conv3x3(nn.Module):
    """Stride-1 'SAME' 3x3 convolution through `gan.conv2d` (its fast weight gradient on CPUs)."""

    features: int
    zero_init: bool = False
    upsample: bool = False  # convolve x's nearest 2x upsampling (`gan.upsample_conv2d`)

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
        w = self.param("kernel", init, (3, 3, x.shape[-1], self.features))
        conv = upsample_conv2d if self.upsample else conv2d
        return conv(x, w) + self.param("bias", nn.initializers.zeros, (self.features,))


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; the timestep embedding as a scale and shift of the second norm
    (ADM's "AdaGN"); SiLU, zero-initialised conv; a 1x1 projection on the skip if widths differ."""

    features: int
    groups: int

    @nn.compact
    def __call__(self, x, emb):
        h = Conv3x3(self.features)(nn.silu(nn.GroupNorm(self.groups)(x)))
        scale, shift = jnp.split(nn.Dense(2 * self.features)(nn.silu(emb))[:, None, None], 2, -1)
        h = nn.GroupNorm(self.groups, use_bias=False, use_scale=False)(h) * (1 + scale) + shift
        h = Conv3x3(self.features, zero_init=True)(nn.silu(h))
        if x.shape[-1] != self.features:
            x = layers.Dense(self.features, name="skip")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions whose keys and values also include the context
    tokens, projected by this layer (GLIDE's encoder_kv); `context_mask` hides dropped or padding
    tokens, the image positions are always visible."""

    num_heads: int
    groups: int

    @nn.compact
    def __call__(self, x, context, context_mask):  # [B, H, W, C], [B, N, D], [B, N]
        b, hh, ww, c = x.shape
        heads, dh = self.num_heads, c // self.num_heads
        h = nn.GroupNorm(self.groups)(x).reshape(b, hh * ww, c)
        q, k, v = jnp.split(layers.Dense(3 * c, name="qkv")(h), 3, -1)
        ck, cv = jnp.split(layers.Dense(2 * c, name="context_kv")(context), 2, -1)
        k, v = jnp.concatenate([ck, k], 1), jnp.concatenate([cv, v], 1)
        mask = jnp.concatenate([context_mask, jnp.ones((b, hh * ww), bool)], 1)
        split = lambda a: a.reshape(b, a.shape[1], heads, dh)
        out = layers.attention(split(q), split(k), split(v), mask=mask[:, None, None, :])
        out = layers.Dense(c, name="out", kernel_init=nn.initializers.zeros)(out.reshape(b, -1, c))
        return x + out.reshape(b, hh, ww, c)


class UNet(nn.Module):
    """(x_t [B, H, W, 3], t [B], image_embed [B, E], token_features [B, L, T], token_mask
    [B, L], drop_image [B] bool, drop_text [B] bool) -> the prediction [B, H, W, 3]."""

    config: UNetConfig

    @nn.compact
    def __call__(self, x_t, t, image_embed, token_features, token_mask, drop_image, drop_text):
        c = self.config
        ch, groups = c.base_channels, c.norm_groups
        image = jnp.where(drop_image[:, None], 0.0, image_embed * np.sqrt(c.embed_dim))
        emb = timestep_embedding(t, ch)
        emb = nn.Dense(4 * ch, name="time_mlp_2")(nn.silu(nn.Dense(4 * ch, name="time_mlp_1")(emb)))
        emb = emb + nn.Dense(4 * ch, name="image_to_time")(image)
        image_tokens = nn.Dense(c.num_image_tokens * c.context_dim, name="image_to_tokens")(image)
        context = jnp.concatenate([
            layers.Dense(c.context_dim, name="token_proj")(nn.LayerNorm()(token_features)),
            image_tokens.reshape(-1, c.num_image_tokens, c.context_dim)], 1)
        context_mask = jnp.concatenate([token_mask & ~drop_text[:, None],
                                        jnp.ones((x_t.shape[0], c.num_image_tokens), bool)], 1)

        def attend(h, name):
            if h.shape[1] in c.attention_resolutions:
                h = AttentionBlock(c.num_heads, groups, name=name)(h, context, context_mask)
            return h

        h = Conv3x3(ch * c.channel_mult[0], name="conv_in")(x_t)
        skips = [h]
        for level, mult in enumerate(c.channel_mult):
            for i in range(c.num_res_blocks):
                h = ResBlock(ch * mult, groups, name=f"down{level}_res{i}")(h, emb)
                h = attend(h, f"down{level}_attn{i}")
                skips.append(h)
            if level < len(c.channel_mult) - 1:
                h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                            name=f"down{level}_resample")(h)
                skips.append(h)
        h = ResBlock(h.shape[-1], groups, name="mid_res0")(h, emb)
        h = AttentionBlock(c.num_heads, groups, name="mid_attn")(h, context, context_mask)
        h = ResBlock(h.shape[-1], groups, name="mid_res1")(h, emb)
        for level in reversed(range(len(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], -1)
                h = ResBlock(ch * c.channel_mult[level], groups, name=f"up{level}_res{i}")(h, emb)
                h = attend(h, f"up{level}_attn{i}")
            if level > 0:
                h = Conv3x3(h.shape[-1], upsample=True, name=f"up{level}_resample")(h)
        h = nn.silu(nn.GroupNorm(groups, name="norm_out")(h))
        return Conv3x3(3, zero_init=True, name="conv_out")(h)


def init(model: UNet, rng, context_length: int):
    c = model.config
    b = 1
    return once.jit(model.init)(
        rng, jnp.zeros((b, c.image_size, c.image_size, 3)), jnp.ones((b,)),
        jnp.zeros((b, c.embed_dim)), jnp.zeros((b, context_length, c.token_dim)),
        jnp.ones((b, context_length), bool), jnp.zeros((b,), bool),
        jnp.zeros((b,), bool))["params"]


def diffusion_loss(model: UNet, params, images, image_embed, token_features, token_mask, rng):
    """Mean squared error of the prediction on images [B, H, W, 3] in [-1, 1], with the image
    embedding and the caption dropped independently for guidance."""
    c = model.config
    k_image, k_text, k_loss = jax.random.split(rng, 3)
    b = images.shape[0]
    drop_image = jax.random.bernoulli(k_image, c.image_drop_prob, (b,))
    drop_text = jax.random.bernoulli(k_text, c.text_drop_prob, (b,))
    denoise = lambda x, t: model.apply({"params": params}, x, t, image_embed, token_features,
                                       token_mask, drop_image, drop_text)
    return diffusion.loss(denoise, images, k_loss, c.noise_schedule, c.prediction,
                          c.min_snr_gamma)


def sample(model: UNet, params, image_embed, token_features, token_mask, keys, steps: int,
           guidance_scale: float = 1.0, eta: float = 0.0, sampler: str = "ddim"):
    """Images [B, H, W, 3] in [-1, 1] from per-example keys [B], by DDIM (or DDPM) over
    `steps` respaced steps, guided against the null condition (both the image embedding and
    the caption dropped), each step's x0 dynamically thresholded."""
    c = model.config
    b = image_embed.shape[0]
    no, yes = jnp.zeros((b,), bool), jnp.ones((b,), bool)
    cond = (image_embed, token_features, token_mask, no, no)
    null = (image_embed, token_features, token_mask, yes, yes)
    apply = lambda x, t, cd: model.apply({"params": params}, x, t, *cd)
    denoise = diffusion.guided(apply, cond, null, guidance_scale)
    if c.threshold_percentile:
        transform = lambda x0: diffusion.dynamic_threshold(x0, c.threshold_percentile)
    else:
        transform = lambda x0: jnp.clip(x0, -1.0, 1.0)
    x = diffusion.sample(denoise, keys, (c.image_size, c.image_size, 3), c.noise_schedule,
                         steps, c.prediction, sampler, eta, transform)
    return jnp.clip(x, -1.0, 1.0)
