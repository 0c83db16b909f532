"""The diffusion core: schedules against their closed forms, the forward process, targets,
samplers against the exact denoiser of Gaussian data, guidance, thresholding, keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax import diffusion

T = 1000


def cosine_f(t, s=0.008):
    return np.cos((t + s) / (1 + s) * np.pi / 2) ** 2


def test_cosine_schedule_is_f_over_f0_until_betas_clip():
    ab = diffusion.discrete_alpha_bars("cosine", T)
    t = np.arange(1, T + 1) / T
    closed = cosine_f(t) / cosine_f(0.0)
    # The product of the ratios telescopes to f(t) / f(0) wherever beta is not clipped at 0.999,
    # which happens only in the last few steps.
    clipped = 1 - closed[1:] / closed[:-1] > 0.999
    assert clipped.sum() <= 2 and not clipped[: T - 5].any()
    np.testing.assert_allclose(ab[: T - 5], closed[: T - 5], rtol=1e-9)
    assert np.all(np.diff(ab) < 0) and 0 < ab[-1] < 1e-4
    np.testing.assert_allclose(diffusion.cosine_alpha_bar(t[: T - 5]), closed[: T - 5],
                               rtol=1e-4, atol=1e-6)


def test_linear_schedule_matches_ho_et_al_and_its_continuous_limit():
    ab = diffusion.discrete_alpha_bars("linear", T)
    np.testing.assert_allclose(ab, np.cumprod(1 - np.linspace(1e-4, 0.02, T)), rtol=1e-12)
    # Finer discretisations (betas scaled by 1000 / T) approach exp(-int beta).
    fine = diffusion.discrete_alpha_bars("linear", 20000)
    t = np.arange(1, 20001) / 20000
    np.testing.assert_allclose(np.log(fine), np.log(diffusion.linear_alpha_bar(t)), atol=5e-3)


def test_schedule_reads_its_table_and_spaces_sampling_times():
    sch = diffusion.Schedule("cosine", T)
    table = diffusion.discrete_alpha_bars("cosine", T)
    idx = np.array([0, 1, 17, 500, 998, 999])
    np.testing.assert_allclose(sch.alpha_bar((idx + 1) / T), table[idx], rtol=1e-6)
    times = sch.sampling_times(25)
    assert len(times) == 25 and times[0] == 1.0 and np.isclose(times[-1], 1 / T)
    assert np.all(np.diff(times) < 0)
    np.testing.assert_allclose(sch.sampling_times(T), np.arange(T, 0, -1) / T, rtol=1e-6)
    assert sch.sampling_times(1).tolist() == [1.0]
    cont = diffusion.Schedule("linear", 0)
    np.testing.assert_allclose(cont.sampling_times(4), [1.0, 0.75, 0.5, 0.25])
    assert float(cont.alpha_bar(1.0)) >= diffusion.ALPHA_BAR_MIN
    t = cont.sample_time(jax.random.PRNGKey(0), (1000,))
    assert float(t.min()) > 0 and float(t.max()) <= 1
    index = sch.sample_time(jax.random.PRNGKey(0), (5000,)) * T
    np.testing.assert_allclose(index, np.round(index), atol=1e-3)
    assert int(np.round(index).min()) == 1 and int(np.round(index).max()) == T


@pytest.mark.parametrize("bad", [lambda: diffusion.Schedule("quadratic"),
                                 lambda: diffusion.Schedule("cosine", 10).sampling_times(11),
                                 lambda: diffusion.target("score", 0, 0, 0.5)])
def test_unknown_settings_are_one_line_errors(bad):
    with pytest.raises(diffusion.DiffusionError) as info:
        bad()
    assert "\n" not in str(info.value)


def test_forward_process_marginals():
    x0 = jnp.array([1.5, -0.5, 0.0])
    noise = jax.random.normal(jax.random.PRNGKey(0), (200000, 3))
    for ab in (0.9, 0.3, 0.01):
        x_t = diffusion.q_sample(jnp.broadcast_to(x0, noise.shape), jnp.full((200000,), ab),
                                 noise)
        np.testing.assert_allclose(x_t.mean(0), np.sqrt(ab) * x0, atol=1e-2)
        np.testing.assert_allclose(x_t.var(0), np.full(3, 1 - ab), rtol=2e-2)


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_targets_convert_back_to_x0_and_noise(prediction):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    x0 = jax.random.normal(k1, (6, 4, 4, 3))
    noise = jax.random.normal(k2, x0.shape)
    ab = jax.random.uniform(k3, (6,), minval=0.01, maxval=0.99)
    x_t = diffusion.q_sample(x0, ab, noise)
    out = diffusion.target(prediction, x0, noise, ab)
    rx0, reps = diffusion.to_x0_eps(prediction, x_t, out, ab)
    np.testing.assert_allclose(rx0, x0, atol=1e-4)
    np.testing.assert_allclose(reps, noise, atol=1e-4)
    np.testing.assert_allclose(diffusion.from_x0_eps(prediction, rx0, reps, ab), out, atol=1e-4)


def test_min_snr_weighting_is_one_x0_loss_for_every_target():
    """Weighted by min-SNR-gamma, a denoiser that implies the same x0 has the same loss
    whichever target it outputs (min(SNR, gamma) times its x0 error); with gamma above every
    SNR the eps loss is the simple loss."""
    schedule = diffusion.Schedule("cosine", 1000)
    x0 = jax.random.normal(jax.random.PRNGKey(2), (64, 4, 4, 3))
    rng = jax.random.PRNGKey(3)

    def denoiser(prediction):
        def fn(x_t, t):
            ab = diffusion._expand(schedule.alpha_bar(t), x_t)
            x0_hat = jnp.tanh(x_t)  # some guess of x0 from x_t
            eps = (x_t - jnp.sqrt(ab) * x0_hat) / jnp.sqrt(1 - ab)
            return diffusion.from_x0_eps(prediction, x0_hat, eps, schedule.alpha_bar(t))
        return fn

    weighted = [float(diffusion.loss(denoiser(p), x0, rng, schedule, p, min_snr_gamma=5.0))
                for p in diffusion.PREDICTIONS]
    np.testing.assert_allclose(weighted, weighted[0], rtol=1e-4)
    simple = [float(diffusion.loss(denoiser(p), x0, rng, schedule, p)) for p in
              diffusion.PREDICTIONS]
    assert len({round(v, 3) for v in simple}) == 3  # unweighted, the targets' losses differ
    np.testing.assert_allclose(
        diffusion.loss(denoiser("eps"), x0, rng, schedule, "eps", min_snr_gamma=1e12),
        simple[diffusion.PREDICTIONS.index("eps")], rtol=1e-5)
    snr = np.array([0.5, 5.0, 50.0])
    ab = snr / (1 + snr)
    np.testing.assert_allclose(diffusion.min_snr_weight("x0", ab, 5.0), [0.5, 5.0, 5.0],
                               rtol=1e-6)
    np.testing.assert_allclose(diffusion.min_snr_weight("eps", ab, 5.0), [1.0, 1.0, 0.1],
                               rtol=1e-6)


# ---- samplers against the exact denoiser of Gaussian data ---------------------------------

MU = jnp.linspace(-1.0, 1.0, 64)  # per-dimension data mean
SIGMA = 0.5                       # data standard deviation


def gaussian_denoiser(schedule, prediction):
    """E[x0 | x_t] for x0 ~ N(MU, SIGMA^2 I), given as the network output for `prediction`."""
    def fn(x_t, t):
        ab = schedule.alpha_bar(t)[:, None]
        gain = jnp.sqrt(ab) * SIGMA ** 2 / (ab * SIGMA ** 2 + 1 - ab)
        x0 = MU + gain * (x_t - jnp.sqrt(ab) * MU)
        eps = (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
        return diffusion.from_x0_eps(prediction, x0, eps, ab[:, 0])
    return fn


def predicted_moments(schedule, steps, sampler, eta):
    """Mean and variance (per unit of data mean, scalar data) of what the sampler produces
    from N(0, 1) with the exact denoiser: every step is affine in x plus Gaussian noise."""
    times = schedule.sampling_times(steps)
    ab = np.asarray(schedule.alpha_bar(times), np.float64)
    ab_prev = np.append(ab[1:], 1.0)
    m, v = 0.0, 1.0
    s2 = SIGMA ** 2
    for a, ap in zip(ab, ab_prev):
        gain = np.sqrt(a) * s2 / (a * s2 + 1 - a)            # x0 = gain x + (1 - gain sqrt(a)) mu
        x0_a, x0_b = gain, 1 - gain * np.sqrt(a)
        eps_a, eps_b = (1 - np.sqrt(a) * x0_a) / np.sqrt(1 - a), -np.sqrt(a) * x0_b / np.sqrt(1 - a)
        if sampler == "ddpm":
            c_x0 = np.sqrt(ap) * (1 - a / ap) / (1 - a)
            c_x = np.sqrt(a / ap) * (1 - ap) / (1 - a)
            var = (1 - a / ap) * (1 - ap) / (1 - a)
            a_coef, b_coef = c_x0 * x0_a + c_x, c_x0 * x0_b
        else:
            var = eta ** 2 * (1 - ap) / (1 - a) * (1 - a / ap)
            d = np.sqrt(1 - ap - var)
            a_coef, b_coef = np.sqrt(ap) * x0_a + d * eps_a, np.sqrt(ap) * x0_b + d * eps_b
        m, v = a_coef * m + b_coef, a_coef ** 2 * v + var
    return m, v


@pytest.mark.parametrize("schedule,prediction,sampler,eta,many", [
    (diffusion.Schedule("cosine", T), "eps", "ddim", 0.0, True),
    (diffusion.Schedule("linear", T), "v", "ddpm", 1.0, True),
    (diffusion.Schedule("cosine", 0), "x0", "ddim", 0.5, False),
])
def test_sampler_with_exact_denoiser_recovers_gaussian_data(schedule, prediction, sampler, eta,
                                                            many):
    keys = jax.random.split(jax.random.PRNGKey(3), 512)
    run = jax.jit(lambda k, steps: diffusion.sample(
        gaussian_denoiser(schedule, prediction), k, (64,), schedule, steps, prediction, sampler,
        eta), static_argnums=1)
    # Few steps: exactly the moments the sampler's affine steps imply (they shrink the spread).
    x = np.asarray(run(keys, 10))
    m, v = predicted_moments(schedule, 10, sampler, eta)
    assert np.sqrt(v) < 0.95 * SIGMA
    np.testing.assert_allclose(x.mean(0), m * np.asarray(MU), atol=5 * np.sqrt(v / len(x)))
    np.testing.assert_allclose((x - x.mean(0)).std(), np.sqrt(v), rtol=0.01)
    if many:  # many steps: the data distribution itself
        x = np.asarray(run(keys, 250))
        np.testing.assert_allclose(x.mean(0), MU, atol=5 * SIGMA / np.sqrt(len(x)))
        np.testing.assert_allclose((x - x.mean(0)).std(), SIGMA, rtol=0.03)


def test_ddpm_step_is_ddim_with_eta_one():
    k = jax.random.split(jax.random.PRNGKey(4), 3)
    x_t, x0, noise = (jax.random.normal(key, (5, 7)) for key in k)
    ab, ab_prev = jnp.full((5,), 0.3), jnp.full((5,), 0.6)
    eps = (x_t - jnp.sqrt(0.3) * x0) / jnp.sqrt(0.7)
    np.testing.assert_allclose(diffusion.ddpm_step(x_t, x0, ab, ab_prev, noise),
                               diffusion.ddim_step(x_t, x0, eps, ab, ab_prev, 1.0, noise),
                               atol=1e-5)


def toy_model(calls):
    def denoise(x, t, cond):
        calls.append(x.shape[0])
        return x * cond["scale"][:, None] + cond["shift"] + t[:, None]
    return denoise


def test_classifier_free_guidance_combination_in_one_batch():
    x = jax.random.normal(jax.random.PRNGKey(5), (3, 4))
    t = jnp.array([0.1, 0.5, 0.9])
    cond = {"scale": jnp.array([2.0, 3.0, 4.0]), "shift": jnp.ones((3, 4))}
    null = {"scale": jnp.zeros(3), "shift": jnp.zeros((3, 4))}
    calls = []
    model = toy_model(calls)
    c, u = model(x, t, cond), model(x, t, null)
    calls.clear()
    for scale, want in [(1.0, c), (0.0, u), (3.0, u + 3.0 * (c - u))]:
        np.testing.assert_allclose(diffusion.guided(model, cond, null, scale)(x, t), want,
                                   rtol=1e-5, atol=1e-5)
    # Conditional and unconditional rows in one call of 2B; a concrete scale 1 needs no null
    # rows, a traced one does.
    assert calls == [3, 6, 6]
    calls.clear()
    traced = jax.jit(lambda s: diffusion.guided(model, cond, null, s)(x, t))(1.0)
    np.testing.assert_allclose(traced, c, rtol=1e-5, atol=1e-5)
    assert calls == [6]


def test_dynamic_threshold():
    inside = jnp.linspace(-0.9, 0.9, 100).reshape(1, 10, 10)
    np.testing.assert_array_equal(diffusion.dynamic_threshold(inside), inside)
    wide = jnp.linspace(-3.0, 3.0, 1000).reshape(1, 1000)
    out = np.asarray(diffusion.dynamic_threshold(wide, 0.9))
    s = np.quantile(np.abs(np.asarray(wide)), 0.9)
    assert 2.5 < s < 3.0
    np.testing.assert_allclose(out, np.clip(np.asarray(wide), -s, s) / s, rtol=1e-5)
    assert np.abs(out).max() == pytest.approx(1.0) and np.all(np.diff(out[0]) >= 0)


def test_samples_depend_on_their_own_key_only():
    schedule = diffusion.Schedule("cosine", T)
    denoise = gaussian_denoiser(schedule, "eps")
    run = jax.jit(lambda k: diffusion.sample(denoise, k, (64,), schedule, 8, "eps", "ddpm"))
    keys = jax.random.split(jax.random.PRNGKey(6), 6)
    full = np.asarray(run(keys[:5]))
    # Other neighbours, other order: each row is a function of its own key.
    order = jnp.array([5, 3, 1, 0, 2])
    np.testing.assert_allclose(np.asarray(run(keys[order]))[1:], full[[3, 1, 0, 2]],
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(full[0], full[1])
    np.testing.assert_array_equal(np.asarray(run(keys[:5])), full)
