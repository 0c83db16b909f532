"""Programs that run once, such as parameter initialisation: compiled without optimisation.

A model's initialiser draws every weight from the random generator, and XLA:CPU's backend
(LLVM) spends seconds optimising those loops for a program that then runs once, in
milliseconds: the test GAN's discriminator initialiser compiled in 11.8 s, and in 1.6 s with the
backend's optimisation level at 0 (benchmarks/RESULTS.md, session 18). `once.jit` is `jax.jit`
with that level; the values it computes are the same draws, equal to an optimised program's up
to float32 rounding (the inverse error function's polynomial, contracted differently).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def jit(fn: Callable, **jit_kwargs: Any) -> Callable:
    """`jax.jit(fn, **jit_kwargs)` compiled without the backend's optimisation passes; called
    with traced arguments (inside another program's trace) it is `fn` itself, inlined there,
    since only a top-level jit takes compiler options."""
    compiled = jax.jit(fn, compiler_options=COMPILER_OPTIONS, **jit_kwargs)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs))):
            return fn(*args, **kwargs)
        return compiled(*args, **kwargs)
    return call
