"""once.jit: programs run once (parameter initialisation) compiled without optimisation."""

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import once, sharding
from dalle_jax.models import layers


def test_once_jit_draws_the_same_parameters_and_inlines_under_another_jit():
    dense = layers.Dense(5)
    x = jnp.ones((1, 3))
    init = lambda rng: dense.init(rng, x)["params"]
    rng = jax.random.PRNGKey(3)
    ours = once.jit(init)(rng)
    reference = jax.jit(init)(rng)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 ours, reference)
    assert float(np.abs(ours["kernel"]).max()) > 0
    # Inside another program (a traced key) it is inlined there: jax refuses compiler options
    # on a nested jit, and the trainer's initialiser calls the tasks' from inside its own.
    outer = jax.jit(lambda r: jax.tree.map(lambda a: a * 2, once.jit(init)(r)))(rng)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 2 * b, rtol=1e-6, atol=1e-7),
                 outer, reference)
    # Keyword arguments of jax.jit pass through: parameters laid out on the mesh.
    replicated = sharding.replicated(sharding.make_mesh())
    sharded = once.jit(init, out_shardings=replicated)(rng)
    assert sharded["kernel"].sharding.is_equivalent_to(replicated, 2)
    np.testing.assert_array_equal(sharded["kernel"], ours["kernel"])
