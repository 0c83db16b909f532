"""Layers shared by the models."""

from __future__ import annotations

import flax.linen as nn


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
