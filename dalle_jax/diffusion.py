"""Gaussian diffusion: noise schedules, the forward process, prediction targets, samplers.

The pieces unCLIP's prior and decoder share (Ramesh et al. 2022), as pure functions:

- Schedules as alpha-bar, the fraction of signal variance left at time t in [0, 1]: the cosine
  schedule of Nichol & Dhariwal 2021 (f(t) / f(0), f(t) = cos^2(((t + s) / (1 + s)) pi / 2),
  s = 0.008, discrete betas clipped at 0.999) and the linear schedule of Ho et al. 2020 (betas
  from 1e-4 to 0.02 over 1000 steps, scaled by 1000 / T as in improved DDPM; continuously,
  exp(-(0.1 t + 9.95 t^2)), the limit of those betas: Song et al. 2021's VP SDE). A `Schedule`
  is discrete (`num_timesteps` = T, time index i in [0, T) standing for t = (i + 1) / T) or
  continuous (`num_timesteps` = 0). Models are given t in (0, 1].
- The forward process q(x_t | x_0) = N(sqrt(ab) x_0, (1 - ab) I) and the three targets a
  network may predict: the noise eps (Ho et al.), the clean sample x0 (unCLIP's prior), or
  v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022), with exact conversions.
- Samplers over any number of steps (respacing: a subsequence of the training times, with the
  betas implied by their alpha-bars, Nichol & Dhariwal 2021): DDPM's ancestral step through
  the posterior q(x_{t'} | x_t, x0) (Ho et al.), and DDIM (Song et al. 2021) whose `eta` moves
  from the deterministic ODE-like path (0) to ancestral sampling (1). The loop is one
  `lax.scan`; each step's noise is `fold_in(key, step)` of each example's own key, so a sample
  does not depend on the batch it is drawn in.
- Classifier-free guidance (Ho & Salimans 2022): the model runs on the conditional and the
  null-condition inputs as one batch, and the outputs combine as u + s (c - u). Every target
  is affine in the prediction for fixed (x_t, t), so guiding eps, x0 or v is the same thing.
- Dynamic thresholding (Saharia et al. 2022) of a pixel model's x0: per sample, s = the p-th
  percentile of |x0|, at least 1; x0 is clipped to [-s, s] and divided by s.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("cosine", "linear")
PREDICTIONS = ("eps", "x0", "v")
SAMPLERS = ("ddim", "ddpm")
# Continuous schedules reach alpha-bar 0 (cosine) or nearly (linear) at t = 1, where turning a
# noise prediction into x0 divides by sqrt(alpha-bar): the floor keeps that finite.
ALPHA_BAR_MIN = 1e-5


class DiffusionError(ValueError):
    """A schedule, target or sampler the module does not know. One line, for the user."""


def check(value: str, valid: tuple[str, ...], what: str):
    """Raises a one-line DiffusionError unless `value` is one of `valid`."""
    if value not in valid:
        raise DiffusionError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def cosine_alpha_bar(t, s: float = 0.008):
    """Nichol & Dhariwal's f(t) / f(0) at continuous t in [0, 1]."""
    f = lambda u: jnp.cos((u + s) / (1 + s) * jnp.pi / 2) ** 2
    return f(jnp.asarray(t, jnp.float32)) / f(0.0)


def linear_alpha_bar(t, beta_min: float = 0.1, beta_max: float = 20.0):
    """exp(-int_0^t beta(u) du) with beta linear from beta_min to beta_max: the continuous limit
    of Ho et al.'s betas 1e-4 ... 0.02 over 1000 steps (beta(u) = 1000 * beta_{1000 u})."""
    t = jnp.asarray(t, jnp.float32)
    return jnp.exp(-(beta_min * t + 0.5 * (beta_max - beta_min) * t ** 2))


def discrete_alpha_bars(kind: str, num_timesteps: int) -> np.ndarray:
    """alpha-bar at time indices 0 ... T-1 (float64), from the schedule's betas."""
    check(kind, SCHEDULES, "noise schedule")
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    if kind == "linear":
        scale = 1000.0 / num_timesteps
        betas = np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    else:
        f = np.cos((steps + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    return np.cumprod(1.0 - betas)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A noise schedule: `kind` (cosine or linear), discrete over `num_timesteps` or, with 0,
    continuous. Hashable, so a jitted function may take it as a static argument."""

    kind: str = "cosine"
    num_timesteps: int = 1000

    def __post_init__(self):
        check(self.kind, SCHEDULES, "noise schedule")
        if self.num_timesteps < 0:
            raise DiffusionError(f"num_timesteps must be >= 0 (0: continuous), "
                                 f"not {self.num_timesteps}")

    def alpha_bar(self, t):
        """alpha-bar at t in (0, 1] (a discrete schedule reads its table at index tT - 1)."""
        t = jnp.asarray(t, jnp.float32)
        if self.num_timesteps:
            table = jnp.asarray(discrete_alpha_bars(self.kind, self.num_timesteps), jnp.float32)
            index = jnp.clip(jnp.round(t * self.num_timesteps).astype(jnp.int32) - 1, 0,
                             self.num_timesteps - 1)
            return table[index]
        fn = cosine_alpha_bar if self.kind == "cosine" else linear_alpha_bar
        return jnp.clip(fn(t), ALPHA_BAR_MIN, 1.0)

    def sample_time(self, rng, shape):
        """Training times: a uniform time index, or uniform t in (0, 1]."""
        if self.num_timesteps:
            index = jax.random.randint(rng, shape, 0, self.num_timesteps)
            return (index + 1).astype(jnp.float32) / self.num_timesteps
        return 1.0 - jax.random.uniform(rng, shape)

    def sampling_times(self, steps: int) -> np.ndarray:
        """`steps` times from t = 1 down (respacing): time indices evenly spaced from T - 1 to
        0, rounded; or steps of 1/steps in continuous time. The last step goes to alpha-bar 1.
        """
        if steps < 1:
            raise DiffusionError(f"sampling needs at least one step, not {steps}")
        if self.num_timesteps:
            if steps > self.num_timesteps:
                raise DiffusionError(f"{steps} sampling steps exceed the schedule's "
                                     f"{self.num_timesteps} time steps")
            index = np.round(np.linspace(self.num_timesteps - 1, 0, steps))
            return ((index + 1) / self.num_timesteps).astype(np.float32)
        return (1.0 - np.arange(steps) / steps).astype(np.float32)


def _expand(a, x):
    """alpha-bar [B] -> [B, 1, ..., 1] to broadcast against x [B, ...]."""
    a = jnp.asarray(a, x.dtype)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def q_sample(x0, alpha_bar, noise):
    """x_t ~ q(x_t | x_0): sqrt(ab) x0 + sqrt(1 - ab) noise."""
    ab = _expand(alpha_bar, x0)
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def target(prediction: str, x0, noise, alpha_bar):
    """What a network predicting `prediction` should output for (x0, noise) at alpha-bar."""
    check(prediction, PREDICTIONS, "prediction target")
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    ab = _expand(alpha_bar, x0)
    return jnp.sqrt(ab) * noise - jnp.sqrt(1.0 - ab) * x0


def to_x0_eps(prediction: str, x_t, output, alpha_bar):
    """(x0, eps) implied by a network's output at (x_t, alpha-bar)."""
    check(prediction, PREDICTIONS, "prediction target")
    ab = _expand(alpha_bar, x_t)
    sa, sb = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
    if prediction == "eps":
        return (x_t - sb * output) / sa, output
    if prediction == "x0":
        return output, (x_t - sa * output) / sb
    return sa * x_t - sb * output, sb * x_t + sa * output


def from_x0_eps(prediction: str, x0, eps, alpha_bar):
    """The output a network predicting `prediction` gives for (x0, eps): `to_x0_eps`'s inverse."""
    return target(prediction, x0, eps, alpha_bar)


def min_snr_weight(prediction: str, alpha_bar, gamma: float):
    """Hang et al. 2023's min-SNR-gamma loss weight for a network predicting `prediction`: the
    weight that turns its squared error into min(SNR, gamma) times the squared error of the
    implied x0 (eps error = SNR x0 error, v error = (SNR + 1) x0 error), so that the nearly
    clean times, whose targets are easy, stop dominating the gradient. SNR = ab / (1 - ab)."""
    check(prediction, PREDICTIONS, "prediction target")
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = jnp.minimum(snr, gamma)
    return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1.0)}[prediction]


def loss(denoise: Callable, x0, rng, schedule: Schedule, prediction: str,
         min_snr_gamma: float = 0.0):
    """Mean squared error of `denoise(x_t, t)` against its target at random times (Ho et al.'s
    simple loss, for whichever target the network predicts); with `min_snr_gamma` > 0 each
    example's error is weighted by `min_snr_weight` (the paper's gamma is 5)."""
    k_t, k_noise = jax.random.split(rng)
    t = schedule.sample_time(k_t, (x0.shape[0],))
    ab = schedule.alpha_bar(t)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    output = denoise(q_sample(x0, ab, noise), t)
    error = jnp.square(output - target(prediction, x0, noise, ab))
    if not min_snr_gamma:
        return jnp.mean(error)
    per_example = jnp.mean(error.reshape(error.shape[0], -1), axis=1)
    return jnp.mean(min_snr_weight(prediction, ab, min_snr_gamma) * per_example)


def guided(denoise: Callable, cond, null_cond, scale):
    """Classifier-free guidance: a denoiser (x_t, t) -> u + scale (c - u), where c and u are
    `denoise(x_t, t, cond)` and `denoise(x_t, t, null_cond)`, computed as one batch of 2B.
    `cond` and `null_cond` are pytrees of arrays with a leading batch axis. A scale given as
    the Python number 1 is the conditional model alone: the null batch is skipped."""
    if isinstance(scale, (int, float)) and scale == 1:
        return lambda x_t, t: denoise(x_t, t, cond)
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, null_cond)

    def fn(x_t, t):
        out = denoise(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), both)
        c, u = jnp.split(out, 2)
        return u + scale * (c - u)
    return fn


def dynamic_threshold(x0, percentile: float = 0.995):
    """Saharia et al.'s dynamic thresholding of x0 [B, ...] into [-1, 1]."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=-1), 1.0)
    s = _expand(s, x0)
    return jnp.clip(x0, -s, s) / s


def ddim_step(x_t, x0, eps, ab, ab_prev, eta, noise):
    """Song et al.'s update from alpha-bar `ab` to `ab_prev`; eta 1 is the ancestral step."""
    ab, ab_prev = _expand(ab, x_t), _expand(ab_prev, x_t)
    sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    direction = jnp.sqrt(jnp.maximum(1 - ab_prev - sigma ** 2, 0.0))
    return jnp.sqrt(ab_prev) * x0 + direction * eps + sigma * noise


def ddpm_step(x_t, x0, ab, ab_prev, noise):
    """Ho et al.'s ancestral step: the posterior q(x_{t'} | x_t, x0) with its variance
    beta-tilde, for the respaced beta = 1 - ab / ab_prev."""
    ab, ab_prev = _expand(ab, x_t), _expand(ab_prev, x_t)
    alpha = ab / ab_prev
    beta = 1 - alpha
    mean = (jnp.sqrt(ab_prev) * beta * x0 + jnp.sqrt(alpha) * (1 - ab_prev) * x_t) / (1 - ab)
    variance = beta * (1 - ab_prev) / (1 - ab)
    return mean + jnp.sqrt(variance) * noise


def sample(denoise: Callable, keys, shape: tuple[int, ...], schedule: Schedule, steps: int,
           prediction: str, sampler: str = "ddim", eta: float = 0.0,
           x0_transform: Callable | None = None):
    """Samples [B, *shape] from per-example keys [B] in `steps` respaced steps.

    `denoise(x_t [B, ...], t [B]) -> output` predicts `prediction`; `x0_transform` (a clip or
    `dynamic_threshold`) is applied to each step's x0 and eps recomputed from it. Each
    example's starting noise and step-i noise come from its own key alone. Pass `eta` as a
    Python number where it is 0, so that the deterministic path skips drawing noise.
    """
    check(sampler, SAMPLERS, "sampler")
    check(prediction, PREDICTIONS, "prediction target")
    times = jnp.asarray(schedule.sampling_times(steps))
    ab = schedule.alpha_bar(times)
    ab_prev = jnp.concatenate([ab[1:], jnp.ones((1,), ab.dtype)])
    init_keys, step_keys = jnp.swapaxes(jax.vmap(jax.random.split)(keys), 0, 1)
    x = jax.vmap(lambda k: jax.random.normal(k, shape))(init_keys)
    b = x.shape[0]
    # DDIM with eta 0 draws no noise after the start: skip generating it (a concrete eta only).
    deterministic = sampler == "ddim" and isinstance(eta, (int, float)) and eta == 0

    def body(x, xs):
        i, t, a, a_prev = xs
        out = denoise(x, jnp.full((b,), t))
        x0, eps = to_x0_eps(prediction, x, out, a)
        if x0_transform is not None:
            x0 = x0_transform(x0)
            eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
        if deterministic:
            noise = jnp.zeros_like(x)
        else:
            noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), shape))(
                step_keys)
        if sampler == "ddpm":
            x = ddpm_step(x, x0, a, a_prev, noise)
        else:
            x = ddim_step(x, x0, eps, a, a_prev, eta, noise)
        return x, None

    x, _ = jax.lax.scan(body, x, (jnp.arange(len(times)), times, ab, ab_prev))
    return x
