"""The GAN pipeline's prior: text vector -> image vector, by conditional flow matching.

unCLIP's prior (Ramesh et al. 2022) samples a CLIP image embedding given the caption, so that
what the caption leaves open (where the shape sits, the background) is drawn afresh each time.
Here the sampler is a rectified flow (Liu et al. 2022; Lipman et al. 2023): a residual MLP
predicts the velocity x1 - x0 along the straight path x_t = (1 - t) x0 + t x1 from Gaussian
noise x0 to the image embedding x1 (scaled to unit variance per dimension), conditioned on the
text embedding, the mean of the caption's token features and t. The flow runs in standardised
coordinates: CLIP image vectors of one dataset fill a narrow cone, so each dimension is shifted
by its mean and scaled by its spread over the training images (`embed_mean`, `embed_std` beside
the network's parameters `net`: set from data by the training task and never trained, like
DALL-E 2's prior's scaling of the embeddings). Sampling integrates the ODE with a fixed number
of Euler steps; the sampled vector is mapped back and L2-normalised like any CLIP embedding.

Flow matching rather than an adversarial prior: it is a plain regression loss (stable on a
few thousand steps), and its samples cover the caption's freedoms instead of collapsing to the
mean; `benchmarks/RESULTS.md` compares its cosine to the true image embedding with using the
text embedding itself as the image vector.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import once


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    embed_dim: int = 128     # the CLIP embedding size
    token_dim: int = 128     # width of the CLIP text tower's token features
    width: int = 256
    depth: int = 4
    sample_steps: int = 32


def timestep_embedding(t, dim: int):
    """Sinusoidal features of t in [0, 1] (Vaswani et al. 2017, as in DDPM)."""
    half = dim // 2
    freqs = jnp.exp(-np.log(10000.0) * jnp.arange(half) / half)
    args = 1000.0 * t[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class ResidualBlock(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x, cond):
        h = nn.LayerNorm()(x)
        # Adaptive scale and shift from the condition (FiLM), zero-initialised so every block
        # starts as the identity.
        film = nn.Dense(2 * self.width, kernel_init=nn.initializers.zeros)(cond)
        scale, shift = jnp.split(film, 2, axis=-1)
        h = h * (1 + scale) + shift
        h = nn.Dense(2 * self.width)(h)
        h = nn.gelu(h)
        h = nn.Dense(self.width, kernel_init=nn.initializers.zeros)(h)
        return x + h


class FlowPrior(nn.Module):
    """velocity(x_t, t, text_embed, token_features, token_mask) -> [B, embed_dim]."""

    config: PriorConfig

    @nn.compact
    def __call__(self, x_t, t, text_embed, token_features, token_mask):
        c = self.config
        mask = token_mask[..., None].astype(token_features.dtype)
        pooled = (token_features * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
        cond = jnp.concatenate([text_embed * np.sqrt(c.embed_dim), pooled,
                                timestep_embedding(t, c.width)], axis=-1)
        cond = nn.Dense(c.width)(nn.gelu(nn.Dense(c.width)(cond)))
        x = nn.Dense(c.width)(jnp.concatenate([x_t, text_embed * np.sqrt(c.embed_dim)], -1))
        for i in range(c.depth):
            x = ResidualBlock(c.width, name=f"block{i}")(x, cond)
        return nn.Dense(c.embed_dim, kernel_init=nn.initializers.zeros)(nn.LayerNorm()(x))


def init(model: FlowPrior, rng, context_length: int, embed_mean=None, embed_std=None):
    """{"net": network parameters, "embed_mean", "embed_std": the standardisation}."""
    c = model.config
    x = jnp.zeros((1, c.embed_dim))
    net = once.jit(model.init)(rng, x, jnp.zeros((1,)), x,
                               jnp.zeros((1, context_length, c.token_dim)),
                               jnp.ones((1, context_length), bool))["params"]
    return with_embed_stats(net, c.embed_dim, embed_mean, embed_std)


def with_embed_stats(net, embed_dim: int, embed_mean=None, embed_std=None) -> dict:
    """A prior's parameters: the network's beside the embedding statistics (identity when
    none are given), shared by the flow and diffusion priors."""
    return {"net": net,
            "embed_mean": jnp.zeros(embed_dim) if embed_mean is None else jnp.asarray(embed_mean),
            "embed_std": jnp.ones(embed_dim) if embed_std is None else jnp.asarray(embed_std)}


def standardise(params, embed):
    stop = jax.lax.stop_gradient  # statistics of the data, not parameters to learn
    return (embed - stop(params["embed_mean"])) / stop(params["embed_std"])


def flow_matching_loss(model: FlowPrior, params, image_embed, text_embed, token_features,
                       token_mask, rng):
    """Mean squared error of the predicted velocity on the straight noise-to-data path."""
    b = image_embed.shape[0]
    k_t, k_noise = jax.random.split(rng)
    x1 = standardise(params, image_embed)
    x0 = jax.random.normal(k_noise, x1.shape)
    t = jax.random.uniform(k_t, (b,))
    x_t = (1 - t[:, None]) * x0 + t[:, None] * x1
    v = model.apply({"params": params["net"]}, x_t, t, text_embed, token_features, token_mask)
    return jnp.mean(jnp.square(v - (x1 - x0)))


def sample(model: FlowPrior, params, text_embed, token_features, token_mask, keys,
           steps: int | None = None, temperature: float = 1.0):
    """Image embeddings [B, E] (unit norm) from per-example keys [B] (Euler, `steps` steps).

    Each example's noise comes from its own key, so a sample does not depend on its batch.
    `temperature` scales the starting noise (as Glow samples at reduced temperature, Kingma &
    Dhariwal 2018): below 1 the flow lands nearer the caption's most typical image vector,
    trading what the caption leaves open for adherence; 0 is the flow from the origin.
    """
    steps = steps or model.config.sample_steps
    d = text_embed.shape[-1]
    x = temperature * jax.vmap(lambda k: jax.random.normal(k, (d,)))(keys)
    dt = 1.0 / steps

    def body(i, x):
        t = jnp.full((x.shape[0],), i * dt)
        return x + dt * model.apply({"params": params["net"]}, x, t, text_embed,
                                    token_features, token_mask)

    x = jax.lax.fori_loop(0, steps, body, x)
    x = x * params["embed_std"] + params["embed_mean"]
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)
