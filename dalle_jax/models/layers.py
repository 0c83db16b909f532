"""Layers shared by the models."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Dense(nn.Dense):
    """`flax.linen.Dense` (same parameters, same names) that folds every leading axis into one
    before its matmul. The outputs are the same; the gradient of the kernel becomes one plain
    [N, in]^T x [N, out] matmul instead of a dot that contracts two axes (batch and sequence),
    which XLA's CPU backend runs 1.2-3x slower (benchmarks/RESULTS.md, session 5)."""

    @nn.compact
    def __call__(self, inputs):
        lead = inputs.shape[:-1]
        y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
        return y.reshape(*lead, y.shape[-1])


def attention(q, k, v, mask=None, is_causal=False):
    """Scaled dot-product attention, [B, T, H, D] queries over [B, S, H, D] keys and values ->
    [B, T, H, D]; the result of `jax.nn.dot_product_attention` (same arguments; `mask`
    broadcasts to [B, H, T, S], True = visible; a query that sees nothing averages every value).

    Heads are moved ahead of positions before the two products, so each is a batched matmul
    with its batch axes leading. `jax.nn.dot_product_attention` contracts the [B, T, H, D]
    layout in place, and XLA's CPU backend runs those dots at 12-20 GFLOP/s: on CLIP's
    attention (batch 128, 65 positions, 4 heads of 32) forward and backward took 27-34 ms against
    20-24 ms here (benchmarks/RESULTS.md, session 15)."""
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # [B, H, L, D]
    # logits and softmax in float32 whatever the inputs' dtype, as jax's function does for bf16
    logits = jnp.einsum("bhtd,bhsd->bhts", q * q.shape[-1] ** -0.5, k,
                        preferred_element_type=jnp.float32)
    if is_causal:
        t, s = logits.shape[-2:]
        causal = jnp.tril(jnp.ones((t, s), bool))
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.swapaxes(jnp.einsum("bhts,bhsd->bhtd", weights, v), 1, 2)
