"""Test set-up: 8 simulated CPU devices for sharding tests, programs compiled without XLA's
backend optimisation, a persistent compilation cache, the longest files first."""

import os

# Must happen before jax is imported anywhere. The suite's time is mostly XLA:CPU compiling
# small programs that then run for milliseconds; at optimisation level 0 the GAN step compiles
# about 1.7x faster, and sampling the shipped unCLIP model runs about 1.25x slower
# (benchmarks/RESULTS.md, session 18). Subprocesses (train.py, sample.py) inherit the flags.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# pytest-xdist hands whole files to its two workers in collection order: the longest first (as
# measured in session 18), so that neither worker is left with a long file at the end.
LONGEST_FIRST = ("test_gan_train.py", "test_generation.py", "test_unclip_pipeline.py",
                 "test_train.py", "test_gan_model.py", "test_evaluate.py", "test_unclip.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))


@pytest.fixture(autouse=True)
def _no_mesh_left_behind():
    """A context mesh (`jax.set_mesh`, thread-wide) left by one test would make a later test
    in the same worker that lays arrays out on the 8 devices fail against it (the trainer set
    one until session 24). Each test starts without one."""
    jax.set_mesh(None)
    yield
    jax.set_mesh(None)
