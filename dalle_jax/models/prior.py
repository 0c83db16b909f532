"""unCLIP's diffusion prior: caption -> CLIP image embedding, by Gaussian diffusion.

After Ramesh et al. 2022 ("Hierarchical Text-Conditional Image Generation with CLIP Latents",
section 2.2 and appendix C): a decoder-only Transformer with a causal attention mask reads the
sequence [caption token features (L), text embedding, timestep embedding, noised image
embedding, a learned output query] and the output at the query predicts the clean image
embedding (x0, trained with mean squared error). The caption conditioning (token features and
text embedding together) is dropped for 10% of the training examples, replaced by a learned
null text embedding with the tokens masked out, so the prior also learns the unconditional
distribution that classifier-free guidance needs. To sample, the paper draws two embeddings and
keeps the one with the higher dot product with the text embedding.

Like the flow prior, the diffusion runs in standardised coordinates: each dimension of the CLIP
image vector shifted by its mean and scaled by its spread over training images (`embed_mean`,
`embed_std` beside the network's parameters `net`; set from data, never trained), so the
noise schedule sees unit-variance data. A sampled vector is mapped back and L2-normalised.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import diffusion, once
from dalle_jax.models import layers
from dalle_jax.models.flow_prior import standardise, timestep_embedding, with_embed_stats


@dataclasses.dataclass(frozen=True)
class DiffusionPriorConfig:
    embed_dim: int = 128      # the CLIP embedding size
    token_dim: int = 128      # width of the CLIP text tower's token features
    width: int = 256
    depth: int = 4
    num_heads: int = 4
    schedule: str = "cosine"
    num_timesteps: int = 1000
    prediction: str = "x0"    # the paper's choice; "eps" and "v" also work
    min_snr_gamma: float = 0.0  # > 0: min-SNR-gamma loss weighting (diffusion.min_snr_weight)
    text_drop_prob: float = 0.1

    def __post_init__(self):
        diffusion.check(self.prediction, diffusion.PREDICTIONS, "prediction target")
        diffusion.Schedule(self.schedule, self.num_timesteps)
        if self.width % self.num_heads:
            raise ValueError(f"prior width {self.width} does not split into "
                             f"{self.num_heads} heads")

    @property
    def noise_schedule(self) -> diffusion.Schedule:
        return diffusion.Schedule(self.schedule, self.num_timesteps)


class CausalBlock(nn.Module):
    """Pre-LN Transformer block whose attention takes an explicit [B, 1, S, S] mask."""

    num_heads: int

    @nn.compact
    def __call__(self, x, mask):  # [B, S, D]
        b, s, d = x.shape
        h = nn.LayerNorm()(x)
        qkv = layers.Dense(3 * d, name="qkv")(h).reshape(b, s, 3, self.num_heads,
                                                         d // self.num_heads)
        # not layers.attention: on these ~20 positions jax's own is faster (RESULTS, session 15)
        out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask=mask)
        x = x + layers.Dense(d, name="out", kernel_init=nn.initializers.zeros)(out.reshape(b, s, d))
        h = nn.gelu(layers.Dense(4 * d, name="fc")(nn.LayerNorm()(x)))
        return x + layers.Dense(d, name="proj", kernel_init=nn.initializers.zeros)(h)


class DiffusionPrior(nn.Module):
    """(x_t [B, E], t [B], text_embed [B, E], token_features [B, L, T], token_mask [B, L],
    drop_text [B] bool) -> the model's prediction [B, E] (x0 by default), standardised."""

    config: DiffusionPriorConfig

    @nn.compact
    def __call__(self, x_t, t, text_embed, token_features, token_mask, drop_text):
        c = self.config
        b, length = token_mask.shape
        tokens = layers.Dense(c.width, name="token_proj")(token_features)       # [B, L, W]
        # A unit CLIP vector has components of size 1/sqrt(E): scale them to unit variance.
        text = layers.Dense(c.width, name="text_proj")(text_embed * np.sqrt(c.embed_dim))
        null_text = self.param("null_text", nn.initializers.normal(0.02), (c.width,))
        text = jnp.where(drop_text[:, None], null_text, text)
        time = timestep_embedding(t, c.width)
        time = layers.Dense(c.width, name="time_mlp_2")(nn.silu(layers.Dense(c.width,
                                                                     name="time_mlp_1")(time)))
        noised = layers.Dense(c.width, name="x_proj")(x_t)
        query = self.param("query", nn.initializers.normal(0.02), (c.width,))
        seq = jnp.concatenate([tokens, text[:, None], time[:, None], noised[:, None],
                               jnp.broadcast_to(query, (b, 1, c.width))], axis=1)
        s = seq.shape[1]
        seq = seq + self.param("positional_embedding", nn.initializers.normal(0.01), (s, c.width))
        # Causal, with padding (and dropped) caption tokens hidden as keys; a position always
        # sees itself, so no row of the softmax is empty.
        key_valid = jnp.concatenate([token_mask & ~drop_text[:, None],
                                     jnp.ones((b, 4), bool)], axis=1)            # [B, S]
        causal = jnp.tril(jnp.ones((s, s), bool))
        mask = causal & (key_valid[:, None, :] | jnp.eye(s, dtype=bool))         # [B, S, S]
        for i in range(c.depth):
            seq = CausalBlock(c.num_heads, name=f"block{i}")(seq, mask[:, None])
        out = nn.LayerNorm(name="ln_final")(seq[:, -1])
        return layers.Dense(c.embed_dim, name="head", kernel_init=nn.initializers.zeros)(out)


def init(model: DiffusionPrior, rng, context_length: int, embed_mean=None, embed_std=None):
    """{"net": network parameters, "embed_mean", "embed_std": the standardisation}."""
    c = model.config
    x = jnp.zeros((1, c.embed_dim))
    net = once.jit(model.init)(rng, x, jnp.ones((1,)), x,
                               jnp.zeros((1, context_length, c.token_dim)),
                               jnp.ones((1, context_length), bool), jnp.zeros((1,), bool))["params"]
    return with_embed_stats(net, c.embed_dim, embed_mean, embed_std)


def unstandardise(params, x):
    x = x * params["embed_std"] + params["embed_mean"]
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)


def diffusion_loss(model: DiffusionPrior, params, image_embed, text_embed, token_features,
                   token_mask, rng):
    """Mean squared error of the prediction (the clean standardised embedding, by default),
    with the caption dropped for `text_drop_prob` of the examples."""
    c = model.config
    k_drop, k_loss = jax.random.split(rng)
    drop = jax.random.bernoulli(k_drop, c.text_drop_prob, (image_embed.shape[0],))
    denoise = lambda x, t: model.apply({"params": params["net"]}, x, t, text_embed,
                                       token_features, token_mask, drop)
    return diffusion.loss(denoise, standardise(params, image_embed), k_loss, c.noise_schedule,
                          c.prediction, c.min_snr_gamma)


def best_of(candidates, text_embed):
    """candidates [C, B, E] -> [B, E]: per example, the one with the highest dot product with
    its text embedding (the paper's choice between two samples)."""
    score = jnp.einsum("cbe,be->cb", candidates, text_embed)
    return jnp.take_along_axis(candidates, jnp.argmax(score, 0)[None, :, None], axis=0)[0]


def sample(model: DiffusionPrior, params, text_embed, token_features, token_mask, keys,
           steps: int, guidance_scale: float = 1.0, eta: float = 1.0,
           num_candidates: int = 2):
    """Unit image embeddings [B, E] from per-example keys [B]: `num_candidates` draws per
    example (candidate j from fold_in(key, j)), each by DDIM over `steps` respaced steps with
    classifier-free guidance, the best kept by `best_of`. eta 1 is ancestral sampling."""
    c = model.config
    b = text_embed.shape[0]
    rep = lambda x: jnp.concatenate([x] * num_candidates)
    cand_keys = jnp.concatenate([jax.vmap(jax.random.fold_in, (0, None))(keys, j)
                                 for j in range(num_candidates)])
    keep = jnp.zeros((num_candidates * b,), bool)
    cond = (rep(text_embed), rep(token_features), rep(token_mask), keep)
    null = cond[:3] + (~keep,)
    apply = lambda x, t, cd: model.apply({"params": params["net"]}, x, t, *cd)
    denoise = diffusion.guided(apply, cond, null, guidance_scale)
    x = diffusion.sample(denoise, cand_keys, (c.embed_dim,), c.noise_schedule, steps,
                         c.prediction, "ddim", eta)
    embed = unstandardise(params, x).reshape(num_candidates, b, c.embed_dim)
    return best_of(embed, text_embed)
