"""The forward and reverse processes against independent statements of the same math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdiff_jax import diffusion, schedules, targets

NUM_STEPS = 50


def random_schedule(num_modalities: int, normalized: bool, seed: int = 0) -> schedules.DiffusionSchedule:
    """A cosine schedule with random aggregation weights w_t in [0, 0.3)."""
    noise = schedules.noise_schedule("cosine", NUM_STEPS)
    if normalized:
        noise = schedules.normalize_by_modalities(noise, num_modalities)
    w = np.random.default_rng(seed).uniform(0, 0.3, (num_modalities, NUM_STEPS + 1)).astype(np.float32)
    return schedules.diffusion_schedule(noise, w=w)


def float64(schedule):
    """The schedule's arrays in float64, with lambda recomputed in float64 from w (closed-form sum)."""
    beta = np.asarray(schedule.beta, np.float64)
    alpha = 1.0 - beta
    alpha_bar = np.cumprod(alpha)
    w = np.asarray(schedule.w, np.float64)
    lambda_ = np.zeros_like(w)
    for t in range(1, len(beta)):
        lambda_[:, t] = sum(w[:, s] * np.sqrt(alpha_bar[t] / alpha_bar[s - 1]) for s in range(1, t + 1))
    return beta, alpha, alpha_bar, w, lambda_


@pytest.mark.parametrize("normalized", [False, True], ids=["plain", "modality_normalized"])
def test_closed_form_marginal_matches_monte_carlo_forward_chain(normalized):
    """Simulate z_t = sqrt(alpha_t)(z_{t-1} + sum_i w_t^i e_i) + sqrt(beta_t) noise step by step."""
    schedule = random_schedule(2, normalized)
    num_samples = 20_000
    z_0 = jnp.array([0.8, -0.5, 0.1])
    encodings = jnp.array([[1.0, 0.5, -1.2], [-0.7, 1.5, 0.3]])  # e_1, e_2
    beta, alpha, w = schedule.beta, schedule.alpha, schedule.w

    def step(z, inputs):
        t, noise = inputs
        aggregation = w[:, t] @ encodings
        z = jnp.sqrt(alpha[t]) * (z + aggregation) + jnp.sqrt(beta[t]) * noise
        return z, z

    noises = jax.random.normal(jax.random.key(0), (NUM_STEPS, num_samples, 3))
    _, chain = jax.lax.scan(step, jnp.broadcast_to(z_0, (num_samples, 3)), (jnp.arange(1, NUM_STEPS + 1), noises))
    chain = np.asarray(chain, np.float64)

    batch_encodings = jnp.broadcast_to(encodings[:, None], (2, 1, 3))
    encoding_effect = []
    for t in (1, 5, 20, 35, NUM_STEPS):
        t_batch = jnp.array([t])
        mean = np.asarray(diffusion.marginal_mean(schedule, z_0[None], t_batch, encodings=batch_encodings))[0]
        variance = float(diffusion.marginal_variance(schedule, t))
        samples = chain[t - 1]
        mean_tolerance = 5 * np.sqrt(variance / num_samples)
        variance_tolerance = 5 * variance * np.sqrt(2 / (num_samples - 1))
        np.testing.assert_allclose(samples.mean(0), mean, atol=mean_tolerance, err_msg=f"mean at t={t}")
        np.testing.assert_allclose(samples.var(0), variance, atol=variance_tolerance, err_msg=f"variance at t={t}")
        encoding_effect.append(
            np.max(np.abs(mean - np.sqrt(float(schedule.alpha_bar[t])) * np.asarray(z_0))) / mean_tolerance
        )
    # The encodings really are in the mean: without m_t the chain would be far off the closed form.
    assert max(encoding_effect) > 10


def test_transition_sample_is_the_transition_formula():
    schedule = random_schedule(2, False)
    keys = jax.random.split(jax.random.key(1), 3)
    z, noise = jax.random.normal(keys[0], (4, 3)), jax.random.normal(keys[1], (4, 3))
    encodings = jax.random.normal(keys[2], (2, 4, 3))
    t = jnp.array([1, 7, 30, 50])
    beta, alpha, _, w, _ = float64(schedule)
    expected = np.sqrt(alpha[t])[:, None] * (np.asarray(z) + np.einsum("nb,nbd->bd", w[:, t], encodings)) + np.sqrt(
        beta[t]
    )[:, None] * np.asarray(noise)
    np.testing.assert_allclose(
        diffusion.transition_sample(schedule, z, t, noise, encodings=encodings), expected, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(diffusion.transition_variance(schedule, t), beta[t], rtol=1e-6)


@pytest.mark.parametrize("normalized", [False, True], ids=["plain", "modality_normalized"])
def test_posterior_matches_exact_gaussian_conditioning(normalized):
    """Condition the joint (z_{t-1}, z_t | z_0, X), built in float64 from the transition, on z_t."""
    schedule = random_schedule(2, normalized, seed=3)
    beta, alpha, alpha_bar, w, lambda_ = float64(schedule)
    keys = jax.random.split(jax.random.key(2), 3)
    batch = 6
    z_0 = np.asarray(jax.random.normal(keys[0], (batch, 5)), np.float64)
    z_t = np.asarray(jax.random.normal(keys[1], (batch, 5)), np.float64)
    encodings = np.asarray(jax.random.normal(keys[2], (2, batch, 5)), np.float64)
    t = np.array([2, 3, 10, 25, 49, 50])

    mean_previous = np.sqrt(alpha_bar[t - 1])[:, None] * z_0 + np.einsum(
        "nb,nbd->bd", lambda_[:, t - 1], encodings
    )  # E[z_{t-1} | z_0, X]
    variance_previous = 1 - alpha_bar[t - 1]
    a_t = np.einsum("nb,nbd->bd", w[:, t], encodings)
    mean_current = np.sqrt(alpha[t])[:, None] * (mean_previous + a_t)  # E[z_t | z_0, X]
    variance_current = alpha[t] * variance_previous + beta[t]
    covariance = np.sqrt(alpha[t]) * variance_previous  # Cov(z_{t-1}, z_t)
    expected_mean = mean_previous + (covariance / variance_current)[:, None] * (z_t - mean_current)
    expected_variance = variance_previous - covariance**2 / variance_current

    as32 = lambda x: jnp.asarray(x, jnp.float32)
    mean = diffusion.posterior_mean(schedule, as32(z_t), jnp.asarray(t), as32(z_0), encodings=as32(encodings))
    np.testing.assert_allclose(mean, expected_mean, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(diffusion.posterior_variance(schedule, jnp.asarray(t)), expected_variance, rtol=2e-4)
    np.testing.assert_allclose(variance_current, 1 - alpha_bar[t], rtol=1e-9)  # the marginal's variance

    # eps-form == z0-form for z_t on the marginal.
    eps = jax.random.normal(jax.random.key(5), (batch, 5))
    z_t_marginal = diffusion.marginal_sample(schedule, as32(z_0), jnp.asarray(t), eps, encodings=as32(encodings))
    np.testing.assert_allclose(
        diffusion.posterior_mean_from_eps(schedule, z_t_marginal, jnp.asarray(t), eps, encodings=as32(encodings)),
        diffusion.posterior_mean(schedule, z_t_marginal, jnp.asarray(t), as32(z_0), encodings=as32(encodings)),
        rtol=1e-4,
        atol=2e-4,
    )


def test_posterior_at_t1_is_the_data():
    schedule = random_schedule(2, False)
    z_0, z_1 = jnp.ones((2, 3)), jnp.full((2, 3), 5.0)
    encodings = jnp.ones((2, 2, 3))
    one = jnp.array([1, 1])
    np.testing.assert_allclose(diffusion.posterior_mean(schedule, z_1, one, z_0, encodings=encodings), z_0, atol=1e-5)
    np.testing.assert_allclose(diffusion.posterior_variance(schedule, one), 0.0, atol=1e-9)


def test_z0_and_eps_conversions_invert_the_marginal():
    schedule = random_schedule(2, False)
    keys = jax.random.split(jax.random.key(3), 3)
    z_0, eps = jax.random.normal(keys[0], (4, 2, 2, 1)), jax.random.normal(keys[1], (4, 2, 2, 1))
    encodings = jax.random.normal(keys[2], (2, 4, 2, 2, 1))
    t = jnp.array([1, 10, 25, 40])
    z_t = diffusion.marginal_sample(schedule, z_0, t, eps, encodings=encodings)
    np.testing.assert_allclose(
        diffusion.z0_from_eps(schedule, z_t, t, eps, encodings=encodings), z_0, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        diffusion.eps_from_z0(schedule, z_t, t, z_0, encodings=encodings), eps, rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("kind", targets.PREDICTIONS)
def test_prediction_targets_convert_exactly_into_each_other(kind):
    """For z_t drawn from the marginal (with encodings): the target of each kind, read back as eps, is the eps
    that drew z_t; eps -> target -> eps round-trips; v is sqrt(abar) eps - sqrt(1 - abar) z_0 (float64)."""
    rng = np.random.default_rng(4)
    z_0, eps = rng.standard_normal((2, 4, 2, 2, 1))
    encodings = rng.standard_normal((2, 4, 2, 2, 1))
    t = np.array([1, 10, 25, 50])
    with jax.enable_x64(True):
        schedule = random_schedule(2, False)  # built in float64 under x64
        z_t = diffusion.marginal_sample(schedule, z_0, t, eps, encodings=encodings)
        target = targets.prediction_target(schedule, z_0, t, eps, kind)
        back = targets.eps_from_prediction(schedule, z_t, t, target, kind, encodings=encodings)
        np.testing.assert_allclose(back, eps, rtol=1e-9, atol=1e-9)
        forward = targets.prediction_from_eps(schedule, z_t, t, eps, kind, encodings=encodings)
        np.testing.assert_allclose(forward, target, rtol=1e-9, atol=1e-9)
        other = rng.standard_normal(eps.shape)  # any eps, not only the one that drew z_t
        round_trip = targets.eps_from_prediction(
            schedule,
            z_t,
            t,
            targets.prediction_from_eps(schedule, z_t, t, other, kind, encodings=encodings),
            kind,
            encodings=encodings,
        )
        np.testing.assert_allclose(round_trip, other, rtol=1e-9, atol=1e-9)
    if kind == "v":
        alpha_bar = np.asarray(schedule.alpha_bar)[t][:, None, None, None]
        np.testing.assert_allclose(target, np.sqrt(alpha_bar) * eps - np.sqrt(1 - alpha_bar) * z_0, rtol=1e-12)
    with pytest.raises(ValueError, match="unknown prediction target 'x'"):
        targets.prediction_target(schedule, z_0, t, eps, "x")


def test_with_no_auxiliary_modality_everything_is_textbook_ddpm():
    """N = 0: compare with Ho et al. (2020) written out here in float64."""
    schedule = schedules.make_schedule("linear", 200)
    assert schedule.num_modalities == 0
    beta = np.asarray(schedule.beta, np.float64)
    alpha = 1 - beta
    alpha_bar = np.cumprod(alpha)
    keys = jax.random.split(jax.random.key(4), 4)
    x_0, x_t, eps, eps_model = (jax.random.normal(k, (5, 3, 3, 2)) for k in keys)
    t = jnp.array([1, 2, 50, 150, 200])
    no_encodings = jnp.zeros((0, 5, 3, 3, 2))
    col = lambda a: np.asarray(a[np.asarray(t)])[:, None, None, None]
    x_0_, x_t_, eps_, eps_model_ = (np.asarray(a, np.float64) for a in (x_0, x_t, eps, eps_model))

    q_sample = np.sqrt(col(alpha_bar)) * x_0_ + np.sqrt(1 - col(alpha_bar)) * eps_
    np.testing.assert_allclose(
        diffusion.marginal_sample(schedule, x_0, t, eps, encodings=no_encodings), q_sample, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        diffusion.marginal_variance(schedule, t), 1 - np.asarray(alpha_bar[np.asarray(t)]), rtol=1e-5
    )
    previous = np.asarray(alpha_bar[np.asarray(t) - 1])[:, None, None, None]
    posterior_mean = (
        beta[np.asarray(t)][:, None, None, None] * np.sqrt(previous) / (1 - col(alpha_bar)) * x_0_
        + (1 - previous) * np.sqrt(col(alpha)) / (1 - col(alpha_bar)) * x_t_
    )
    np.testing.assert_allclose(
        diffusion.posterior_mean(schedule, x_t, t, x_0, encodings=no_encodings), posterior_mean, rtol=1e-4, atol=1e-5
    )
    posterior_variance = beta[np.asarray(t)] * (1 - previous[:, 0, 0, 0]) / (1 - alpha_bar[np.asarray(t)])
    np.testing.assert_allclose(diffusion.posterior_variance(schedule, t), posterior_variance, rtol=1e-4, atol=1e-12)
    reverse = (x_t_ - col(beta) / np.sqrt(1 - col(alpha_bar)) * eps_model_) / np.sqrt(col(alpha))
    np.testing.assert_allclose(
        diffusion.reverse_mean(schedule, x_t, t, eps_model, encodings=no_encodings), reverse, rtol=1e-4, atol=1e-5
    )
    x_0_from_eps = np.sqrt(1 / col(alpha_bar)) * x_t_ - np.sqrt(1 / col(alpha_bar) - 1) * eps_model_
    np.testing.assert_allclose(
        diffusion.z0_from_eps(schedule, x_t, t, eps_model, encodings=no_encodings), x_0_from_eps, rtol=1e-4, atol=1e-3
    )
    np.testing.assert_allclose(
        diffusion.transition_mean(schedule, x_0, t, encodings=no_encodings), np.sqrt(col(alpha)) * x_0_, rtol=1e-6
    )
    np.testing.assert_allclose(
        diffusion.reverse_log_variance(schedule, t, "large"), np.log(beta[np.asarray(t)]), rtol=1e-5
    )


def test_reverse_log_variance_kinds():
    schedule = random_schedule(1, False)
    t = jnp.array([1, 2, 30])
    small = diffusion.reverse_log_variance(schedule, t, "small")
    np.testing.assert_allclose(small[0], small[1])  # beta~_1 = 0 is clipped to beta~_2
    np.testing.assert_allclose(small[2], np.log(diffusion.posterior_variance(schedule, jnp.array(30))), rtol=1e-5)
    large = diffusion.reverse_log_variance(schedule, t, "large")
    np.testing.assert_allclose(diffusion.reverse_log_variance(schedule, t, interpolation=jnp.ones(3)), large)
    np.testing.assert_allclose(diffusion.reverse_log_variance(schedule, t, interpolation=jnp.zeros(3)), small)
    with pytest.raises(ValueError, match="unknown reverse variance"):
        diffusion.reverse_log_variance(schedule, t, "huge")


def test_functions_work_under_jit_vmap_and_grad():
    schedule = random_schedule(2, False)
    keys = jax.random.split(jax.random.key(6), 3)
    z_0, eps = jax.random.normal(keys[0], (4, 2, 2, 1)), jax.random.normal(keys[1], (4, 2, 2, 1))
    encodings = jax.random.normal(keys[2], (2, 4, 2, 2, 1))
    t = jnp.array([3, 10, 25, 40])
    batched = diffusion.marginal_sample(schedule, z_0, t, eps, encodings=encodings)
    jitted = jax.jit(diffusion.marginal_sample)(schedule, z_0, t, eps, encodings=encodings)
    per_example = jax.vmap(  # encodings are [N, B, ...]: mapped over their axis 1
        lambda z, step, e, noise: diffusion.marginal_sample(schedule, z, step, noise, encodings=e), in_axes=(0, 0, 1, 0)
    )(z_0, t, encodings, eps)
    np.testing.assert_allclose(jitted, batched, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(per_example, batched, rtol=1e-5, atol=1e-7)
    posterior = jax.vmap(
        lambda z_t, step, z, e: diffusion.posterior_mean(schedule, z_t, step, z, encodings=e), in_axes=(0, 0, 0, 1)
    )(batched, t, z_0, encodings)
    np.testing.assert_allclose(
        posterior, diffusion.posterior_mean(schedule, batched, t, z_0, encodings=encodings), rtol=1e-6
    )
    # d z_t / d e_i = lambda_t^(i): the gradient reads the schedule back.
    grad = jax.grad(lambda e: diffusion.marginal_sample(schedule, z_0, t, eps, encodings=e).sum())(encodings)
    np.testing.assert_allclose(grad[:, :, 0, 0, 0], schedule.lambda_[:, t], rtol=1e-6)


def test_inconsistent_inputs_raise_clear_errors():
    schedule = random_schedule(2, False)
    z = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match="N = 2"):
        diffusion.marginal_mean(schedule, z, jnp.ones(4, jnp.int32), encodings=jnp.zeros((3, 4, 3)))
    with pytest.raises(ValueError, match="N = 2"):
        diffusion.posterior_mean(schedule, z, jnp.ones(4, jnp.int32), z, encodings=jnp.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="integer"):
        diffusion.marginal_mean(schedule, z, jnp.ones(4), encodings=jnp.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match="batch prefix"):
        diffusion.marginal_mean(schedule, z, jnp.ones(5, jnp.int32), encodings=jnp.zeros((2, 4, 3)))


def test_large_adm_variance_is_guided_diffusions_fixed_large():
    """guided-diffusion's fixed-large log variance in its own 0-based terms (index t - 1),
    log(append(posterior_variance[1], betas[1:])); 'large' keeps log beta_1 at t = 1 and agrees elsewhere."""
    betas = np.linspace(1e-4, 0.02, 1000)
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    adm_log_variance = np.log(np.append(posterior_variance[1], betas[1:]))
    schedule = schedules.make_schedule("linear", 1000)
    t = jnp.array([1, 2, 3, 500, 1000])
    adm = diffusion.reverse_log_variance(schedule, t, "large_adm")
    np.testing.assert_allclose(adm, adm_log_variance[np.asarray(t) - 1], rtol=1e-6)
    large = diffusion.reverse_log_variance(schedule, t, "large")
    np.testing.assert_allclose(large[0], np.log(betas[0]), rtol=1e-6)
    np.testing.assert_allclose(large[1:], adm[1:])
    assert abs(float(large[0] - adm[0])) > 0.5  # log(beta~_2 / beta_1) = log 1.98: what the option changes


def test_out_of_range_steps_raise_when_concrete_and_read_nan_when_traced():
    """Steps above T were clamped to T and t - 1 = -1 wrapped around to T; now concrete steps outside a function's
    range raise a ValueError naming it, and traced steps outside 0..T give NaN."""
    schedule = random_schedule(1, False)
    z = jnp.ones((3, 2))
    encodings = jnp.ones((1, 3, 2))
    calls = {
        "marginal_mean": (lambda t: diffusion.marginal_mean(schedule, z, t, encodings=encodings), 0),
        "marginal_variance": (lambda t: diffusion.marginal_variance(schedule, t), 0),
        "transition_mean": (lambda t: diffusion.transition_mean(schedule, z, t, encodings=encodings), 1),
        "transition_variance": (lambda t: diffusion.transition_variance(schedule, t), 1),
        "posterior_mean": (lambda t: diffusion.posterior_mean(schedule, z, t, z, encodings=encodings), 1),
        "posterior_variance": (lambda t: diffusion.posterior_variance(schedule, t), 1),
        "reverse_mean": (lambda t: diffusion.reverse_mean(schedule, z, t, z, encodings=encodings), 1),
        "reverse_log_variance": (lambda t: diffusion.reverse_log_variance(schedule, t, "large_adm"), 1),
        "z0_from_eps": (lambda t: diffusion.z0_from_eps(schedule, z, t, z, encodings=encodings), 1),
        "eps_from_z0": (lambda t: diffusion.eps_from_z0(schedule, z, t, z, encodings=encodings), 1),
    }
    for name, (call, first) in calls.items():
        for bad in (first - 1, NUM_STEPS + 1):
            with pytest.raises(ValueError, match=rf"{first}\.\.T = {first}\.\.{NUM_STEPS} here, got t = {bad}"):
                call(jnp.array([2, bad, 3]))
        assert np.all(np.isfinite(call(jnp.array([first, 2, NUM_STEPS])))), name
        traced = np.asarray(jax.jit(call)(jnp.array([-1, 2, NUM_STEPS + 1])))
        assert np.all(np.isnan(traced[0])) and np.all(np.isnan(traced[2])) and np.all(np.isfinite(traced[1])), name
    # t - 1 at t = 0 reads NaN (it wrapped around to abar_T), a static step is checked at trace time.
    assert np.all(np.isnan(jax.jit(calls["posterior_mean"][0])(jnp.zeros(3, jnp.int32))))
    with pytest.raises(ValueError, match="got t = 51"):
        jax.jit(calls["marginal_mean"][0], static_argnums=0)(NUM_STEPS + 1)
