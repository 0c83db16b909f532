"""Training state as one immutable pytree, and the shared update step around a family's loss.

A family (CLIP, GAN, prior, ...) supplies `grad_fn(params, batch, rng, frozen, step) ->
(grads, metrics)` (`metrics["loss"]` required; `value_and_grad_fn` adapts a plain loss); this module
turns it into a pure `(state, batch, frozen) -> (state, metrics)` step with gradient
accumulation, the optax update, the EMA of the parameters and health metrics. `frozen` holds
parameters the family uses but does not train (a frozen CLIP, say): an argument, not a closure,
so they are never baked into the compiled program as constants.

The NaN guard lives in the step: when the loss, the gradient norm or the update norm is not
finite, the update is dropped (params, optimizer state and EMA keep their values; the step
counter still advances, so the next step draws a new batch and a new key) and
`metrics["skipped"]` is 1. A batch may carry `stop` (an int per example): the step returns its
maximum as `metrics["stop"]`, a value every process of a multi-host run reads the same, so that
all of them stop at the same step when any one of them is signalled.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array  # uint32 [2]; each step's key is fold_in(rng, step)


def create(params, tx: optax.GradientTransformation, rng) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree.map(jnp.copy, params), rng=rng)


def _split_microbatches(batch, k: int):
    # Microbatch i takes rows i, i+k, i+2k, ...: each device keeps a slice of every microbatch,
    # so splitting moves no data between devices.
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def value_and_grad_fn(loss_fn: Callable) -> Callable:
    """Adapts `loss_fn(params, batch, rng, frozen) -> (loss, metrics)` to a grad_fn."""
    def grad_fn(params, batch, rng, frozen, step):
        del step
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch, rng, frozen)
        return grads, {**metrics, "loss": loss}
    return grad_fn


def make_train_step(grad_fn: Callable, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, ema_decay: float = 0.999,
                    grad_accum_steps: int = 1):
    """Builds the pure step. Jit it with donated state and explicit shardings."""

    def compute_grads(params, batch, rng, frozen, step):
        if grad_accum_steps == 1:
            return grad_fn(params, batch, rng, frozen, step)
        micro = _split_microbatches(batch, grad_accum_steps)

        def body(carry, xs):
            i, mb = xs
            out = grad_fn(params, mb, jax.random.fold_in(rng, i), frozen, step)
            return jax.tree.map(jnp.add, carry, out), None

        shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng,
                                frozen, step)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        total, _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps), micro))
        return jax.tree.map(lambda x: x / grad_accum_steps, total)

    def train_step(state: TrainState, batch, frozen=None):
        batch = dict(batch)
        stop = batch.pop("stop", None)
        rng = jax.random.fold_in(state.rng, state.step)
        grads, metrics = compute_grads(state.params, batch, rng, frozen, state.step)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        update_norm = optax.tree.norm(updates)
        finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
                  & jnp.isfinite(update_norm))
        params = optax.apply_updates(state.params, updates)
        ema_params = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                                  state.ema_params, params)
        # A select, not a cond: the update is cheap next to the gradients and fuses with it;
        # jnp.where passes nothing of the dropped side, NaN included.
        keep_if_finite = lambda new, old: jax.tree.map(
            lambda n, o: jnp.where(finite, n, o), new, old)
        params = keep_if_finite(params, state.params)
        opt_state = keep_if_finite(opt_state, state.opt_state)
        ema_params = keep_if_finite(ema_params, state.ema_params)
        metrics = {
            **metrics,
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(params),
            "update_norm": update_norm,
            "lr": schedule(state.step),
            "skipped": (~finite).astype(jnp.float32),
        }
        if stop is not None:
            metrics["stop"] = jnp.max(stop).astype(jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema_params)
        return new_state, metrics

    return train_step
