"""Layers shared by the models: the same results as the library functions they stand in for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.models import layers


@pytest.mark.parametrize("t, s, causal, masked", [(9, 9, False, False), (9, 9, True, False),
                                                  (7, 12, False, True), (1, 12, False, False)])
def test_attention_equals_jax_dot_product_attention(t, s, causal, masked):
    kq, kk, kv, km, kg = jax.random.split(jax.random.PRNGKey(0), 5)
    b, h, d = 3, 2, 8
    q = jax.random.normal(kq, (b, t, h, d))
    k = jax.random.normal(kk, (b, s, h, d))
    v = jax.random.normal(kv, (b, s, h, d))
    mask = None
    if masked:
        visible = jax.random.uniform(km, (b, s)) < 0.6
        visible = visible.at[0].set(False)  # a query that sees nothing averages every value
        mask = visible[:, None, None, :]
    ours = lambda q, k, v: layers.attention(q, k, v, mask=mask, is_causal=causal)
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=1e-5)
    if masked:
        np.testing.assert_allclose(ours(q, k, v)[0], jnp.broadcast_to(v[0].mean(0), (t, h, d)),
                                   atol=1e-5)
    g = jax.random.normal(kg, (b, t, h, d))
    grads = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * g), argnums=(0, 1, 2)))(q, k, v)
    for a, r in zip(grads(ours), grads(ref)):
        np.testing.assert_allclose(a, r, atol=1e-4)


def test_dense_folds_leading_axes_and_keeps_flax_parameters():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 4))
    dense = layers.Dense(3)
    params = dense.init(jax.random.PRNGKey(2), x)
    y = dense.apply(params, x)
    kernel, bias = params["params"]["kernel"], params["params"]["bias"]
    np.testing.assert_allclose(y, jnp.einsum("bld,de->ble", x, kernel) + bias, atol=1e-5)
    assert y.shape == (2, 5, 3)


def test_attention_in_bfloat16_keeps_float32_logits_like_jax():
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(3), 3)
    q, k, v = (jax.random.normal(key, (2, 33, 4, 16), jnp.bfloat16) * 3 for key in (kq, kk, kv))
    ours = layers.attention(q, k, v)
    assert ours.dtype == jnp.bfloat16
    ref = jax.nn.dot_product_attention(q, k, v)
    exact = jax.nn.dot_product_attention(*(t.astype(jnp.float32) for t in (q, k, v)))
    np.testing.assert_allclose(ours.astype(jnp.float32), ref.astype(jnp.float32), atol=0.03)
    np.testing.assert_allclose(ours.astype(jnp.float32), exact, rtol=1e-2, atol=0.03)
