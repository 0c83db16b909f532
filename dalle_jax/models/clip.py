"""CLIP: a text Transformer and a ViT image encoder in one embedding space.

Architecture after Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision", and OpenAI's published model shapes (B/32, B/16, L/14): pre-LN residual
blocks with QuickGELU MLPs, a causal text Transformer pooled at the end-of-text token, a ViT with
a class token pooled after a final LayerNorm, bias-free projections and a learnable temperature.
Parameter names follow the paper's roles so that published weights map onto them one to one.
For small pictures, variant "tiny-cnn" swaps the ViT for a convolutional tower pooled by
attention (`ConvTower`, in the manner of the paper's ResNets), which reads outlines that a tiny
ViT learns slowly.

Usage: `CLIP(variant="B/16")` or `CLIP(variant="tiny", image_size=32)`. A variant may change
fields of a named one, `"B/16,vision_layers=2,activation=gelu"`: that is how an imported
checkpoint whose shapes match no named variant (`dalle_jax.clip_import`) is named in a config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.models import layers

EOT_TOKEN = 49407

# Published OpenAI CLIP shapes (clip/model.py build_model and the model card), plus small ones
# for the shapes dataset and for tests.
VARIANTS: dict[str, dict[str, Any]] = {
    "B/32": dict(embed_dim=512, image_size=224, patch_size=32, vision_width=768,
                 vision_layers=12, vision_heads=12, context_length=77, vocab_size=49408,
                 text_width=512, text_layers=12, text_heads=8),
    "B/16": dict(embed_dim=512, image_size=224, patch_size=16, vision_width=768,
                 vision_layers=12, vision_heads=12, context_length=77, vocab_size=49408,
                 text_width=512, text_layers=12, text_heads=8),
    "L/14": dict(embed_dim=768, image_size=224, patch_size=14, vision_width=1024,
                 vision_layers=24, vision_heads=16, context_length=77, vocab_size=49408,
                 text_width=768, text_layers=12, text_heads=12),
    "tiny": dict(embed_dim=128, image_size=32, patch_size=8, vision_width=128,
                 vision_layers=3, vision_heads=4, context_length=16, vocab_size=49408,
                 text_width=128, text_layers=3, text_heads=4,
                 conv_stem=((32, 2, 3), (64, 2, 3))),
    # The tiny sizes with a convolutional image tower instead of the ViT.
    "tiny-cnn": dict(embed_dim=128, image_size=32, patch_size=8, vision_width=128,
                     vision_layers=0, vision_heads=4, context_length=16, vocab_size=49408,
                     text_width=128, text_layers=3, text_heads=4,
                     vision_cnn=((32, 1), (32, 1), (64, 2), (64, 1), (128, 2), (128, 1))),
    "micro": dict(embed_dim=32, image_size=16, patch_size=4, vision_width=32,
                  vision_layers=1, vision_heads=2, context_length=16, vocab_size=49408,
                  text_width=32, text_layers=1, text_heads=2),
}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    context_length: int
    vocab_size: int
    text_width: int
    text_layers: int
    text_heads: int
    # (channels, stride, kernel) of convolutions before the patch embedding; () is OpenAI's ViT.
    conv_stem: tuple[tuple[int, int, int], ...] = ()
    # (channels, stride) of 3x3 convolutions, each GroupNorm + GELU, that replace the ViT: a
    # convolutional image tower pooled by attention, as CLIP's ResNets are; () keeps the ViT.
    vision_cnn: tuple[tuple[int, int], ...] = ()
    # The MLP's nonlinearity: OpenAI's QuickGELU, or the exact GELU of OpenCLIP's non-"quickgelu"
    # models and of Hugging Face configs with hidden_act="gelu".
    activation: str = "quick_gelu"
    # How the convolutional tower pools its grid: "attention" (CLIP's AttentionPool2d) or
    # "cells" (each cell's features, LayerNorm'd and cut to `pool_width` channels, through
    # weights of that cell's own: the vector then says which colour is where; see ConvTower).
    vision_pool: str = "attention"
    pool_width: int = 32

    @classmethod
    def from_variant(cls, variant: str, **overrides) -> "CLIPConfig":
        """A named variant, optionally followed by ",field=value" changes; `overrides` (None
        values ignored) apply last."""
        name, *changes = [part.strip() for part in variant.split(",")]
        if name not in VARIANTS:
            raise ValueError(f"unknown CLIP variant {name!r}; valid: {', '.join(VARIANTS)}")
        fields = {f.name for f in dataclasses.fields(cls)} - set(TUPLE_FIELDS)
        values = dict(VARIANTS[name])
        for change in changes:
            key, _, text = change.partition("=")
            key = key.strip()
            if key not in fields or not text.strip():
                raise ValueError(f"bad CLIP variant change {change!r} in {variant!r}; write "
                                 f"field=value with a field among: {', '.join(sorted(fields))}")
            text = text.strip()
            values[key] = int(text) if text.lstrip("-").isdigit() else text
        config = cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})
        if config.activation not in ACTIVATIONS:
            raise ValueError(f"unknown CLIP activation {config.activation!r}; valid: "
                             f"{', '.join(ACTIVATIONS)}")
        if config.vision_pool not in POOLS:
            raise ValueError(f"unknown CLIP vision_pool {config.vision_pool!r}; valid: "
                             f"{', '.join(POOLS)}")
        return config

    def as_variant(self) -> str:
        """The shortest variant string that `from_variant` turns back into this config (with
        image_size and context_length, which configs set apart, given as overrides)."""
        best = None
        for name, values in VARIANTS.items():
            base = CLIPConfig(**values)
            if any(getattr(base, k) != getattr(self, k) for k in TUPLE_FIELDS):
                continue
            changes = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                       if f.name not in ("image_size", "context_length", *TUPLE_FIELDS)
                       and getattr(self, f.name) != getattr(base, f.name)]
            if best is None or len(changes) < len(best) - 1:
                best = [name, *changes]
        if best is None:
            raise ValueError("no named CLIP variant has this convolutional stem or tower")
        return ",".join(best)


POOLS = ("attention", "cells")

# Fields that a variant string cannot change: they name an architecture, not a size.
TUPLE_FIELDS = ("conv_stem", "vision_cnn")


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu,
               "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


class MultiHeadAttention(nn.Module):
    """Self-attention with a fused q/k/v projection (the layout of CLIP's `in_proj`)."""

    num_heads: int
    causal: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, L, D]
        b, l, d = x.shape
        head_dim = d // self.num_heads
        qkv = layers.Dense(3 * d, dtype=self.dtype, name="qkv",
                           kernel_init=nn.initializers.normal(d ** -0.5))(x)
        q, k, v = jnp.split(qkv.reshape(b, l, 3, self.num_heads, head_dim), 3, axis=2)
        out = layers.attention(q[:, :, 0], k[:, :, 0], v[:, :, 0],
                               is_causal=self.causal)  # [B, L, H, Dh]
        return layers.Dense(d, dtype=self.dtype, name="out",
                            kernel_init=nn.initializers.normal(d ** -0.5))(out.reshape(b, l, d))


class ResidualBlock(nn.Module):
    """Pre-LN Transformer block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    num_heads: int
    causal: bool = False
    dtype: Any = jnp.float32
    activation: str = "quick_gelu"

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        y = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ln_1")(x)
        x = x + MultiHeadAttention(self.num_heads, self.causal, self.dtype, name="attn")(y)
        y = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ln_2")(x)
        y = layers.Dense(4 * d, dtype=self.dtype, name="c_fc",
                         kernel_init=nn.initializers.normal((2 * d) ** -0.5))(y)
        y = layers.Dense(d, dtype=self.dtype, name="c_proj",
                         kernel_init=nn.initializers.normal(d ** -0.5))(
            ACTIVATIONS[self.activation](y))
        return x + y


class Transformer(nn.Module):
    num_layers: int
    num_heads: int
    causal: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    activation: str = "quick_gelu"

    @nn.compact
    def __call__(self, x):
        block = nn.remat(ResidualBlock) if self.remat else ResidualBlock
        for i in range(self.num_layers):
            x = block(self.num_heads, self.causal, self.dtype, self.activation,
                      name=f"block_{i}")(x)
        return x


class TextTransformer(nn.Module):
    """Caption tokens [B, L] -> (text embedding [B, E], token features [B, L, W])."""

    config: CLIPConfig
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        c = self.config
        x = nn.Embed(c.vocab_size, c.text_width, name="token_embedding",
                     embedding_init=nn.initializers.normal(0.02))(tokens)
        pos = self.param("positional_embedding", nn.initializers.normal(0.01),
                         (c.context_length, c.text_width))
        x = (x + pos[: tokens.shape[1]]).astype(self.dtype)
        x = Transformer(c.text_layers, c.text_heads, causal=True, remat=self.remat,
                        dtype=self.dtype, activation=c.activation, name="transformer")(x)
        x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ln_final")(x)
        # Pool at the end-of-text token; truncation keeps it last, so every row has one.
        eot = jnp.argmax(tokens == EOT_TOKEN, axis=-1)
        pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        embed = layers.Dense(c.embed_dim, use_bias=False, dtype=self.dtype, name="text_projection",
                             kernel_init=nn.initializers.normal(c.text_width ** -0.5))(pooled)
        return embed, x


class VisionTransformer(nn.Module):
    """Images [B, H, W, 3] in [-1, 1] -> (image embedding [B, E], patch features [B, N+1, W])."""

    config: CLIPConfig
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        c = self.config
        p, w = c.patch_size, c.vision_width
        x = images.astype(self.dtype)
        if c.conv_stem:
            # Early convolutions (Xiao et al. 2021): small convs see the local shape of small
            # objects that a linear patch embedding learns slowly. The patch embedding then
            # covers what the strides leave of the patch size.
            for i, (ch, stride, kernel) in enumerate(c.conv_stem):
                x = nn.Conv(ch, (kernel, kernel), strides=(stride, stride), dtype=self.dtype,
                            name=f"stem_{i}")(x)
                x = nn.gelu(x)
                p //= stride
        x = nn.Conv(w, (p, p), strides=(p, p), use_bias=False, dtype=self.dtype,
                    name="patch_embedding")(x)
        b, gh, gw, _ = x.shape
        x = x.reshape(b, gh * gw, w)
        cls = self.param("class_embedding", nn.initializers.normal(w ** -0.5), (w,))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, w)), x], axis=1)
        pos = self.param("positional_embedding", nn.initializers.normal(w ** -0.5),
                         (gh * gw + 1, w))
        x = (x + pos).astype(self.dtype)
        x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ln_pre")(x)
        x = Transformer(c.vision_layers, c.vision_heads, remat=self.remat, dtype=self.dtype,
                        activation=c.activation, name="transformer")(x)
        pooled = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ln_post")(x[:, 0])
        embed = layers.Dense(c.embed_dim, use_bias=False, dtype=self.dtype, name="proj",
                             kernel_init=nn.initializers.normal(w ** -0.5))(pooled)
        return embed, x


class ConvTower(nn.Module):
    """Images [B, H, W, 3] -> (image embedding [B, E], pooled + grid features [B, 1+N, W]).

    3x3 convolutions with GroupNorm and GELU, then one of two poolings:
    - "attention", as in CLIP's ResNets (Radford et al. 2021, `AttentionPool2d`): the mean of
      the grid, with learned positions on every cell, queries the grid in one multi-head
      attention. The pooled vector keeps where things are and what they are, but as a
      weighted sum: two objects' features and places add up alike whichever is where, so "red
      above blue" and "blue above red" pool to nearly one vector (cosine 0.98).
    - "cells": each cell's features, LayerNorm'd and cut to `pool_width` channels by one shared
      projection, then the whole grid through one projection, so a feature enters the vector
      through weights of its own cell: a product of what and where. Redrawing an 8x8
      picture from the vector alone, this pool reached a squared error of 0.013 uncut (0.027
      cut to 32 channels) where the attention pool stalled at 0.045-0.054
      (benchmarks/RESULTS.md, session 17).
    """

    config: CLIPConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        c = self.config
        x = images.astype(self.dtype)
        for i, (ch, stride) in enumerate(c.vision_cnn):
            x = nn.Conv(ch, (3, 3), strides=(stride, stride), use_bias=False, dtype=self.dtype,
                        name=f"conv_{i}")(x)
            x = nn.GroupNorm(num_groups=min(32, ch // 4), epsilon=1e-5, dtype=self.dtype,
                             name=f"norm_{i}")(x)
            x = nn.gelu(x)
        b, gh, gw, w = x.shape
        x = x.reshape(b, gh * gw, w)
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
        if c.vision_pool == "cells":
            cells = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ln_cells")(x[:, 1:])
            cells = layers.Dense(c.pool_width, dtype=self.dtype, name="cell_proj")(cells)
            embed = layers.Dense(c.embed_dim, dtype=self.dtype, name="c_proj")(
                cells.reshape(b, -1))
            return embed, x
        pos = self.param("positional_embedding", nn.initializers.normal(w ** -0.5),
                         (gh * gw + 1, w))
        x = x + pos.astype(x.dtype)
        heads, head_dim = c.vision_heads, w // c.vision_heads
        q = layers.Dense(w, dtype=self.dtype, name="q_proj")(x[:, :1])
        k = layers.Dense(w, dtype=self.dtype, name="k_proj")(x)
        v = layers.Dense(w, dtype=self.dtype, name="v_proj")(x)
        split = lambda t: t.reshape(b, t.shape[1], heads, head_dim)
        pooled = layers.attention(split(q), split(k), split(v)).reshape(b, w)
        embed = layers.Dense(c.embed_dim, dtype=self.dtype, name="c_proj")(pooled)
        return embed, x


def token_embeddings(params, tokens):
    """The text tower's input rows for token ids [B, L] -> [B, L, text_width]: what each word
    is before the causal Transformer mixes it with the words before it. (A CLIP trained on
    shapes maps "above" and "below" to final token features 0.997 alike: the contrastive loss
    never needed the relation; benchmarks/RESULTS.md, session 31.)"""
    return jnp.take(params["text"]["token_embedding"]["embedding"], tokens, axis=0)


def l2_normalize(x, eps=1e-6):
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class CLIP(nn.Module):
    """The two towers. `__call__(images, tokens) -> (image_embed, text_embed, aux)`.

    Embeddings are L2-normalised float32. `aux` holds `logit_scale` (exp of the learned log
    temperature), `logit_bias` (used by the sigmoid loss) and the unnormalised features.
    Either input may be None to run one tower only.
    """

    variant: str = "tiny"
    image_size: int | None = None
    context_length: int | None = None
    remat: bool = False
    dtype: Any = jnp.float32

    @property
    def config(self) -> CLIPConfig:
        return CLIPConfig.from_variant(self.variant, image_size=self.image_size,
                                       context_length=self.context_length)

    def setup(self):
        c = self.config
        self.visual = (ConvTower(c, self.dtype) if c.vision_cnn
                       else VisionTransformer(c, self.remat, self.dtype))
        self.text = TextTransformer(c, self.remat, self.dtype)
        # Initial temperature 0.07 (the paper); the bias -10 is SigLIP's initial value.
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(np.log(1 / 0.07)), ())
        self.logit_bias = self.param("logit_bias", nn.initializers.constant(-10.0), ())

    def encode_image(self, images):
        embed, features = self.visual(images)
        return l2_normalize(embed), features

    def encode_text(self, tokens):
        embed, features = self.text(tokens)
        return l2_normalize(embed), features

    def __call__(self, images, tokens):
        # The paper clips the temperature so that logits scale by at most 100.
        aux = {"logit_scale": jnp.minimum(jnp.exp(self.logit_scale), 100.0),
               "logit_bias": self.logit_bias}
        image_embed = text_embed = None
        if images is not None:
            image_embed, aux["image_features"] = self.encode_image(images)
        if tokens is not None:
            text_embed, aux["text_features"] = self.encode_text(tokens)
        return image_embed, text_embed, aux


def softmax_loss(image_embed, text_embed, logit_scale, negative_embed=None):
    """Symmetric InfoNCE over the whole (global) batch: every other pair is a negative.

    Under jit with batch-sharded inputs the [B, B] logits span all devices, so the negatives are
    the global batch, not one device's slice. `negative_embed` [N, E] adds extra captions that
    every image must rank below its own (NegCLIP's hard negatives); they take no part in the
    text-to-image direction.
    """
    texts = text_embed if negative_embed is None else jnp.concatenate([text_embed, negative_embed])
    logits = logit_scale * image_embed @ texts.T  # [B, B + N]
    labels = jnp.arange(image_embed.shape[0])
    li = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], 1)
    t2i = logits[:, : text_embed.shape[0]]
    lt = -jnp.take_along_axis(jax.nn.log_softmax(t2i, axis=0), labels[None, :], 0)
    return 0.5 * (li.mean() + lt.mean())


def sigmoid_loss(image_embed, text_embed, logit_scale, logit_bias, negative_embed=None):
    """SigLIP (Zhai et al. 2023): a binary logistic loss on every image-text pair."""
    b = image_embed.shape[0]
    texts = text_embed if negative_embed is None else jnp.concatenate([text_embed, negative_embed])
    logits = logit_scale * image_embed @ texts.T + logit_bias  # [B, B + N]
    signs = 2.0 * jnp.eye(b, texts.shape[0]) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / b


def contrastive_loss(kind: str, image_embed, text_embed, aux, negative_embed=None):
    if kind == "softmax":
        return softmax_loss(image_embed, text_embed, aux["logit_scale"], negative_embed)
    if kind == "sigmoid":
        return sigmoid_loss(image_embed, text_embed, aux["logit_scale"], aux["logit_bias"],
                            negative_embed)
    raise ValueError(f"unknown contrastive loss {kind!r}; valid: softmax, sigmoid")
