"""The one place that builds optimisers: AdamW, warm-up + cosine decay, gradient clipping."""

from __future__ import annotations

import jax
import optax


def decay_mask(params):
    """Weight decay on matrices only: not on biases, norms, embeddings or the temperature."""
    def keep(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return leaf.ndim >= 2 and "embedding" not in name
    return jax.tree_util.tree_map_with_path(keep, params)


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `lr`, then cosine decay to `lr * final_lr_fraction`.

    With `restart_steps` = R > 0 that cycle spans the first total_steps - R steps, and the last
    R are a second one, warmed up again to `restart_lr` and decayed to `restart_lr *
    final_lr_fraction`: a warm restart (SGDR, Loshchilov and Hutter 2017). The first cycle is
    the schedule of a run of total_steps - R steps, so such a run's checkpoints resume into it.
    """
    restart = int(config.get("restart_steps", 0) or 0)
    if restart <= 0:
        return _cycle(config.lr, config, total_steps)
    if restart >= total_steps:
        raise ValueError(f"optim.restart_steps={restart} leaves no first cycle in "
                         f"total_steps={total_steps}")
    first = total_steps - restart
    return optax.join_schedules(
        [_cycle(config.lr, config, first),
         _cycle(float(config.get("restart_lr", config.lr)), config, restart)], [first])


def _cycle(lr: float, config, steps: int) -> optax.Schedule:
    warmup = min(int(config.warmup_steps), max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=lr * config.final_lr_fraction)


def clip_each_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` applied to each top-level entry of the gradient dict on its
    own (the GAN's generator and discriminator), so that one player's large gradient does not
    shrink the other's step."""
    clip = optax.clip_by_global_norm(max_norm)

    def update(updates, state, params=None):
        del params
        return {k: clip.update(v, optax.EmptyState())[0] for k, v in updates.items()}, state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config, total_steps: int):
    """Returns (optax transformation, learning-rate schedule) from an `optim` config block;
    `clip_separately` clips each top-level parameter group (the GAN's two players) on its own
    instead of all together."""
    schedule = learning_rate_schedule(config, total_steps)
    separately = config.get("clip_separately", False)
    tx = optax.chain(
        (clip_each_by_global_norm if separately else optax.clip_by_global_norm)(config.clip_norm),
        optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=decay_mask),
    )
    return tx, schedule
