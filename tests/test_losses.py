"""The four bound terms, the Monte-Carlo bound and the simplified training loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mmdiff_jax import bound, diffusion, losses, schedules


@pytest.fixture
def schedule():
    return schedules.make_schedule("linear", 100, [("bump", 1.0), ("bridge", 0.5)])


def random_inputs(seed, batch=4, shape=(4, 4, 1), num_modalities=2):
    keys = jax.random.split(jax.random.key(seed), 3)
    z_0 = jnp.clip(jax.random.normal(keys[0], (batch, *shape)) * 0.5, -1, 1)
    eps = jax.random.normal(keys[1], (batch, *shape))
    encodings = jax.random.normal(keys[2], (num_modalities, batch, *shape))
    return z_0, eps, encodings


def test_posterior_kl_is_nonnegative_and_zero_exactly_at_the_posterior(schedule):
    z_0, eps, encodings = random_inputs(0)
    t = jnp.array([2, 10, 60, 100])
    z_t = diffusion.marginal_sample(schedule, z_0, t, eps, encodings=encodings)
    exact = bound.posterior_kl(schedule, z_t, t, z_0, eps, encodings=encodings, estimated_encodings=encodings)
    np.testing.assert_allclose(exact, 0.0, atol=2e-3)  # float32 cancellation only
    keys = jax.random.split(jax.random.key(1), 2)
    for kind in ("small", "large"):
        wrong_eps = eps + 0.3 * jax.random.normal(keys[0], eps.shape)
        wrong_encodings = encodings + 0.3 * jax.random.normal(keys[1], encodings.shape)
        kl = bound.posterior_kl(
            schedule,
            z_t,
            t,
            z_0,
            wrong_eps,
            encodings=encodings,
            estimated_encodings=wrong_encodings,
            variance_kind=kind,
        )
        assert np.all(np.asarray(kl) > 0.05)
    # The right mean with the wrong variance: beta_t differs from beta~_t most at small t (they meet as t -> T).
    large = bound.posterior_kl(
        schedule, z_t, t, z_0, eps, encodings=encodings, estimated_encodings=encodings, variance_kind="large"
    )
    assert np.all(np.asarray(large[:2]) > np.asarray(exact[:2]) + 0.1)


def test_posterior_kl_equals_its_closed_form(schedule):
    """|| c_t (eps_theta - eps) + sum_i w_t^i (ehat_i - e_i) ||^2 / (2 sigma^2) + variance term (docs/design.md)."""
    z_0, eps, encodings = random_inputs(2)
    keys = jax.random.split(jax.random.key(3), 2)
    eps_theta = eps + 0.2 * jax.random.normal(keys[0], eps.shape)
    encodings_hat = encodings + 0.5 * jax.random.normal(keys[1], encodings.shape)
    t = jnp.array([2, 30, 70, 100])
    z_t = diffusion.marginal_sample(schedule, z_0, t, eps, encodings=encodings)
    beta, alpha = (np.asarray(a, np.float64)[np.asarray(t)] for a in (schedule.beta, schedule.alpha))
    one_minus_alpha_bar = np.asarray(schedule.one_minus_alpha_bar, np.float64)
    previous = one_minus_alpha_bar[np.asarray(t) - 1]
    current = one_minus_alpha_bar[np.asarray(t)]
    posterior_variance = beta * previous / current
    eps_coefficient = beta / (np.sqrt(alpha) * np.sqrt(current))
    w = np.asarray(schedule.w, np.float64)[:, np.asarray(t)]
    for kind, model_variance in (("small", posterior_variance), ("large", beta)):
        difference = eps_coefficient[:, None, None, None] * (np.asarray(eps_theta) - np.asarray(eps)) + np.einsum(
            "nb,nbhwc->bhwc", w, np.asarray(encodings_hat) - np.asarray(encodings)
        )
        ratio = posterior_variance / model_variance
        dimensions = 16
        expected = np.sum(difference**2, axis=(1, 2, 3)) / (2 * model_variance) + dimensions * 0.5 * (
            ratio - 1 - np.log(ratio)
        )
        kl = bound.posterior_kl(
            schedule, z_t, t, z_0, eps_theta, encodings=encodings, estimated_encodings=encodings_hat, variance_kind=kind
        )
        np.testing.assert_allclose(kl, expected, rtol=2e-3)


def test_prior_kl_matches_textbook_ddpm_and_depends_on_encodings():
    plain = schedules.make_schedule("linear", 200)
    z_0, _, _ = random_inputs(4, num_modalities=0)
    alpha_bar = float(np.cumprod(1 - np.asarray(plain.beta, np.float64))[-1])
    z = np.asarray(z_0, np.float64)
    expected = 0.5 * np.sum(alpha_bar * z**2 + (1 - alpha_bar) - 1 - np.log(1 - alpha_bar), axis=(1, 2, 3))
    np.testing.assert_allclose(
        bound.prior_kl(plain, z_0, encodings=jnp.zeros((0, *z_0.shape))), expected, rtol=1e-3, atol=1e-6
    )
    assert np.all(np.asarray(bound.prior_kl(plain, z_0, encodings=jnp.zeros((0, *z_0.shape)))) >= 0)
    # bump keeps m_T ~ 0; bridge moves the prior: with p(z_T) = N(0, I) its KL grows, with N(m_T, I) it does not.
    encodings = jnp.ones((1, *z_0.shape))
    bump = schedules.make_schedule("linear", 200, [("bump", 1.0)])
    bridge = schedules.make_schedule("linear", 200, [("bridge", 1.0)])
    bump_kl = bound.prior_kl(bump, z_0, encodings=encodings)
    bridge_kl = bound.prior_kl(bridge, z_0, encodings=encodings)
    assert np.all(np.asarray(bridge_kl) > np.asarray(bump_kl) + 5)
    t = jnp.full((z_0.shape[0],), 200)
    bridge_prior = diffusion.encoding_mean(bridge, z_0, t, encodings=encodings)
    np.testing.assert_allclose(
        bound.prior_kl(bridge, z_0, encodings=encodings, prior_mean=bridge_prior), expected, rtol=1e-3, atol=1e-4
    )


def test_discretized_gaussian_is_a_distribution_over_the_pixel_grid():
    grid = jnp.linspace(-1, 1, 256)[:, None]  # each of the 256 values as a batch of one pixel
    for mean, log_scale in ((0.0, np.log(0.1)), (0.93, np.log(0.004)), (-1.2, np.log(0.5)), (0.3, np.log(1e-4))):
        nll = losses.discretized_gaussian_nll(grid, jnp.full_like(grid, mean), jnp.full_like(grid, log_scale))
        np.testing.assert_allclose(np.exp(-np.asarray(nll, np.float64)).sum(), 1.0, atol=2e-4)
    # An interior bin is the normal mass of its interval.
    x, mean, scale = 0.2, 0.15, 0.05
    half = 1 / 255
    expected = -np.log(stats.norm.cdf(x + half, mean, scale) - stats.norm.cdf(x - half, mean, scale))
    got = losses.discretized_gaussian_nll(jnp.array([[x]]), jnp.array([[mean]]), jnp.log(jnp.array([[scale]])))
    np.testing.assert_allclose(got, [expected], rtol=1e-4)


def test_recovery_likelihoods_match_scipy():
    keys = jax.random.split(jax.random.key(5), 3)
    logits = jax.random.normal(keys[0], (3, 2, 7))
    labels = jax.random.randint(keys[1], (3, 2), 0, 7)
    expected = -np.sum(
        np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(labels)[..., None], -1), axis=(1, 2)
    )
    np.testing.assert_allclose(losses.categorical_nll(logits, labels), expected, rtol=1e-5)
    mean, target = jax.random.normal(keys[2], (2, 2, 5)), jnp.zeros((2, 2, 5))
    expected = -stats.norm.logpdf(np.asarray(target), np.asarray(mean), 0.3).sum(axis=(1, 2))
    np.testing.assert_allclose(losses.gaussian_nll(mean, target, np.log(0.3)), expected, rtol=1e-5)


def oracle(schedule, z_0, encodings, error_scale, recovery_nll):
    """A model that knows the true eps up to an error of relative size `error_scale`."""

    def denoise(z_t, t):
        eps = diffusion.eps_from_z0(schedule, z_t, t, z_0, encodings=encodings)
        error = jnp.sin(3.0 * z_t + t[:, None, None, None])  # a fixed function of the input
        return bound.DenoiserOutput(eps + error_scale * error, encodings, recovery_nll)

    return denoise


def test_bound_decreases_as_eps_theta_approaches_eps(schedule):
    z_0, _, encodings = random_inputs(6, batch=8)
    z_0 = jnp.round((z_0 + 1) * 127.5) / 127.5 - 1  # an 8-bit image
    recovery = jnp.full((8,), 0.7)

    @jax.jit
    def estimate(error_scale, rng):
        return bound.variational_bound(
            schedule, oracle(schedule, z_0, encodings, error_scale, recovery), z_0, rng, encodings=encodings
        )

    totals = []
    for error_scale in (1.0, 0.3, 0.1, 0.0):
        draws = [estimate(error_scale, jax.random.key(seed)) for seed in range(16)]
        totals.append(np.mean([np.mean(d.total) for d in draws]))
    assert all(a > b for a, b in zip(totals, totals[1:])), totals
    terms = estimate(0.0, jax.random.key(0))
    np.testing.assert_allclose(terms.recovery, 0.7)
    np.testing.assert_allclose(terms.total, terms.prior + terms.diffusion + terms.recovery + terms.data, rtol=1e-6)
    np.testing.assert_allclose(terms.bits_per_dim, terms.total / (16 * math.log(2)), rtol=1e-6)
    assert np.all(np.asarray(terms.diffusion) >= 0) and np.all(np.asarray(terms.prior) >= 0)


def test_bound_with_no_auxiliary_modality_is_the_ddpm_bound():
    """N = 0, T = 3: the one-sample estimate averages to L_T + L_2 + L_3 + L_0 of DDPM computed by enumeration."""
    plain = schedules.noise_schedule("cosine", 3)
    schedule = schedules.diffusion_schedule(plain)
    z_0 = jnp.array([[[[0.5]], [[-0.25]]]])  # [1, 2, 1, 1]
    no_encodings = jnp.zeros((0, *z_0.shape))

    def denoise(z_t, t):
        return bound.DenoiserOutput(0.1 * z_t, no_encodings, jnp.zeros(z_t.shape[:1]))

    estimates = jax.jit(
        jax.vmap(lambda rng: bound.variational_bound(schedule, denoise, z_0, rng, encodings=no_encodings).total)
    )(jax.random.split(jax.random.key(7), 20000))
    # Independent evaluation: E over t of (T - 1) KL_t is the sum over t = 2..T of KL_t, each averaged over noise.
    eps = jax.random.normal(jax.random.key(8), (20000, 2, 1, 1))
    z_0_many = jnp.broadcast_to(z_0[0], (20000, 2, 1, 1))
    no_many = jnp.zeros((0, 20000, 2, 1, 1))
    expected = float(bound.prior_kl(schedule, z_0, encodings=no_encodings)[0])
    for t in (2, 3):
        steps = jnp.full((20000,), t)
        z_t = diffusion.marginal_sample(schedule, z_0_many, steps, eps, encodings=no_many)
        expected += float(
            jnp.mean(
                bound.posterior_kl(
                    schedule, z_t, steps, z_0_many, 0.1 * z_t, encodings=no_many, estimated_encodings=no_many
                )
            )
        )
    ones = jnp.ones((20000,), jnp.int32)
    z_1 = diffusion.marginal_sample(schedule, z_0_many, ones, eps, encodings=no_many)
    expected += float(jnp.mean(bound.data_nll(schedule, z_1, z_0_many, 0.1 * z_1, encodings=no_many)))
    assert float(jnp.mean(estimates)) == pytest.approx(expected, rel=0.03)


def test_training_loss_terms_and_weights(schedule):
    z_0, eps, encodings = random_inputs(9)
    t = jnp.array([1, 5, 50, 100])
    perfect, metrics = losses.training_loss(schedule, t, eps, eps, encodings=encodings, estimated_encodings=encodings)
    assert float(perfect) == 0.0 and float(metrics["aggregation_mse"]) == 0.0
    eps_theta = eps + 0.5
    loss, metrics = losses.training_loss(
        schedule, t, eps, eps_theta, encodings=encodings, estimated_encodings=encodings
    )
    np.testing.assert_allclose(metrics["eps_mse"], 0.25, rtol=1e-5)
    encodings_hat = encodings.at[0].add(1.0)
    inputs = (schedule, t, eps, eps_theta, {"label": jnp.array([1.0, 2, 3, 4])})
    weights = dict(
        encodings=encodings,
        estimated_encodings=encodings_hat,
        eps_weight=2.0,
        aggregation_weight=0.5,
        recovery_weights={"label": 0.1},
    )
    loss, metrics = losses.training_loss(*inputs, **weights)
    # aggregation error in eps units: (w_t / c_t)^2 for a unit error in modality 0.
    beta, alpha = (np.asarray(a, np.float64)[np.asarray(t)] for a in (schedule.beta, schedule.alpha))
    c = beta / (np.sqrt(alpha) * np.sqrt(np.asarray(schedule.one_minus_alpha_bar, np.float64)[np.asarray(t)]))
    expected_aggregation = np.mean((np.asarray(schedule.w, np.float64)[0, np.asarray(t)] / c) ** 2)
    np.testing.assert_allclose(metrics["aggregation_mse"], expected_aggregation, rtol=1e-4)
    assert 0.01 < expected_aggregation < 100  # the eps-unit scaling keeps it comparable to the eps-MSE
    np.testing.assert_allclose(metrics["recovery/label"], 2.5)
    np.testing.assert_allclose(loss, 2 * 0.25 + 0.5 * expected_aggregation + 0.1 * 2.5, rtol=1e-4)
    np.testing.assert_allclose(metrics["loss"], loss)
    # Per example (reduction 'none'): each example's own terms, the same weights; the batch mean is the loss.
    per_example, same_metrics = losses.training_loss(*inputs, **weights, reduction="none")
    expected = 2 * 0.25 + 0.5 * (np.asarray(schedule.w, np.float64)[0, np.asarray(t)] / c) ** 2 + 0.1 * np.arange(1, 5)
    np.testing.assert_allclose(per_example, expected, rtol=1e-4)
    np.testing.assert_allclose(np.mean(per_example), loss, rtol=1e-6)
    assert same_metrics.keys() == metrics.keys()
    with pytest.raises(ValueError, match="reduction"):
        losses.training_loss(schedule, t, eps, eps, encodings=encodings, estimated_encodings=encodings, reduction="sum")


def test_training_loss_reduces_to_ddpm_simple_loss_with_no_modality():
    plain = schedules.make_schedule("linear", 100)
    _, eps, _ = random_inputs(10, num_modalities=0)
    eps_theta = 0.8 * eps
    loss, _ = losses.training_loss(
        plain,
        jnp.array([1, 2, 3, 4]),
        eps,
        eps_theta,
        encodings=jnp.zeros((0, *eps.shape)),
        estimated_encodings=jnp.zeros((0, *eps.shape)),
    )
    np.testing.assert_allclose(loss, np.mean((0.2 * np.asarray(eps)) ** 2), rtol=1e-5)
    without_stacks, _ = losses.training_loss(plain, jnp.array([1, 2, 3, 4]), eps, eps_theta)  # N = 0: None
    np.testing.assert_array_equal(without_stacks, loss)


@pytest.mark.parametrize("prediction", ["eps", "v", "z_0"])
def test_min_snr_weighting_weighs_each_example_by_its_step(schedule, prediction):
    """Every example's prediction MSE is 0.25; min-SNR-5 weighs it by min(SNR_t, 5) / SNR_t (eps), / (SNR_t + 1)
    (v) or by min(SNR_t, 5) (z_0), SNR_t = abar_t / (1 - abar_t), so the term is the mean of those weights x 0.25."""
    _, eps, encodings = random_inputs(12)
    t = jnp.array([1, 5, 50, 100])
    target, output = eps, eps + 0.5
    options = dict(encodings=encodings, estimated_encodings=encodings, prediction=prediction)
    uniform, metrics = losses.training_loss(schedule, t, target, output, **options)
    weighted, weighted_metrics = losses.training_loss(
        schedule, t, target, output, **options, time_weighting="min_snr", min_snr_gamma=5.0
    )
    alpha_bar = np.asarray(schedule.alpha_bar, np.float64)[np.asarray(t)]
    snr = alpha_bar / (1.0 - alpha_bar)
    weights = np.minimum(snr, 5.0) / {"eps": snr, "v": snr + 1.0, "z_0": np.ones_like(snr)}[prediction]
    np.testing.assert_allclose(uniform, 0.25, rtol=1e-5)
    np.testing.assert_allclose(weighted, 0.25 * np.mean(weights), rtol=1e-4)
    np.testing.assert_allclose(weighted_metrics[f"{prediction}_mse"], metrics[f"{prediction}_mse"], rtol=1e-6)
    np.testing.assert_allclose(weighted_metrics[f"{prediction}_mse_weighted"], weighted, rtol=1e-6)
    assert not np.allclose(weights, 1.0)  # the schedule's SNR spans gamma: the weighting changes the loss
    with pytest.raises(ValueError, match="unknown time weighting"):
        losses.training_loss(schedule, t, target, output, **options, time_weighting="snr")


def test_losses_work_under_jit_vmap_and_grad(schedule):
    z_0, eps, encodings = random_inputs(11)
    t = jnp.array([1, 5, 50, 100])

    def loss(eps_theta, encodings_hat):
        return losses.training_loss(
            schedule, t, eps, eps_theta, encodings=encodings, estimated_encodings=encodings_hat
        )[0]

    eps_theta = eps * 0.5
    grad_eps, grad_encodings = jax.jit(jax.grad(loss, argnums=(0, 1)))(eps_theta, encodings + 0.1)
    np.testing.assert_allclose(grad_eps, 2 * (eps_theta - eps) / eps.size, rtol=1e-4, atol=1e-7)
    assert np.all(np.isfinite(np.asarray(grad_encodings))) and np.any(np.asarray(grad_encodings) != 0)
    # vmap over independent draws of the bound: one row per key.
    denoise = oracle(schedule, z_0, encodings, 0.1, jnp.zeros(4))
    rows = jax.jit(
        jax.vmap(lambda key: bound.variational_bound(schedule, denoise, z_0, key, encodings=encodings).total)
    )(jax.random.split(jax.random.key(0), 3))
    assert rows.shape == (3, 4)
    first = bound.variational_bound(
        schedule, denoise, z_0, jax.random.split(jax.random.key(0), 3)[0], encodings=encodings
    )
    np.testing.assert_allclose(rows[0], first.total, rtol=1e-5)


def test_training_loss_rejects_inconsistent_inputs(schedule):
    _, eps, encodings = random_inputs(12)
    t = jnp.array([1, 2, 3, 4])
    with pytest.raises(ValueError, match="no recovery weight"):
        losses.training_loss(
            schedule, t, eps, eps, {"label": jnp.zeros(4)}, encodings=encodings, estimated_encodings=encodings
        )
    with pytest.raises(ValueError, match="eps_prediction shape"):
        losses.training_loss(schedule, t, eps, eps[:, :2], encodings=encodings, estimated_encodings=encodings)
    with pytest.raises(ValueError, match="estimated_encodings shape"):
        losses.training_loss(schedule, t, eps, eps, encodings=encodings, estimated_encodings=encodings[:1])


def numpy_posterior_kl(num_steps, t, z_0, eps, encoding, eps_theta, encoding_hat):
    """float64 NumPy: KL( q(z_{t-1} | z_t, z_0, e) || p(z_{t-1} | z_t) ) summed per example, for the linear
    schedule and one bump modality, with sigma_t^2 = beta~_t, stated on the plain chain u_t = z_t - m_t."""
    beta = np.r_[0.0, np.linspace(1e-4, 0.02, num_steps) * 1000 / num_steps]
    alpha = 1.0 - beta
    one_minus = -np.expm1(np.cumsum(np.log1p(-beta)))
    alpha_bar = np.cumprod(alpha)
    lambda_ = 4 * np.sqrt(alpha_bar) * (1 - np.sqrt(alpha_bar))
    w = np.r_[0.0, lambda_[1:] / np.sqrt(alpha[1:]) - lambda_[:-1]]
    col = lambda values: values[t].reshape(-1, 1, 1, 1)  # noqa: E731
    col_previous = lambda values: values[t - 1].reshape(-1, 1, 1, 1)  # noqa: E731
    u_t = np.sqrt(col(alpha_bar)) * z_0 + np.sqrt(col(one_minus)) * eps
    z_t = u_t + col(lambda_) * encoding
    posterior_mean = (
        np.sqrt(col_previous(alpha_bar)) * col(beta) / col(one_minus) * z_0
        + np.sqrt(col(alpha)) * col_previous(one_minus) / col(one_minus) * u_t
        + col_previous(lambda_) * encoding
    )
    model_mean = (z_t - col(beta) / np.sqrt(col(one_minus)) * eps_theta) / np.sqrt(col(alpha)) - col(w) * encoding_hat
    variance = col(beta) * col_previous(one_minus) / col(one_minus)
    return z_t, np.sum((posterior_mean - model_mean) ** 2 / (2 * variance), axis=(1, 2, 3))


def test_x64_mode_computes_schedules_and_the_bound_in_float64():
    """With x64 on, nothing is cast to float32: the posterior KL matches a float64 NumPy statement to ~1e-13
    relative (float32 schedules gave 1.4e-5 to 1.9e-5: two differently rounded means are subtracted)."""
    rng = np.random.default_rng(0)
    z_0 = rng.uniform(-1, 1, (4, 8, 8, 1))
    eps, encoding = rng.normal(size=z_0.shape), rng.normal(size=z_0.shape)
    eps_theta, encoding_hat = eps + 0.1 * rng.normal(size=z_0.shape), encoding + 0.1 * rng.normal(size=z_0.shape)
    t = np.array([2, 10, 500, 1000])
    z_t, expected = numpy_posterior_kl(1000, t, z_0, eps, encoding, eps_theta, encoding_hat)
    with jax.enable_x64(True):
        schedule = schedules.make_schedule("linear", 1000, [("bump", 1.0)])
        assert {array.dtype for array in schedule} == {np.dtype(np.float64)}
        noise = schedules.noise_schedule("cosine", 10)
        assert schedules.lambda_from_w(np.zeros(11), noise.alpha).dtype == np.float64
        assert schedules.w_from_lambda(np.zeros(11), noise.alpha).dtype == np.float64
        kl = bound.posterior_kl(
            schedule, z_t, t, z_0, eps_theta, encodings=encoding[None], estimated_encodings=encoding_hat[None]
        )
        assert kl.dtype == np.float64
        np.testing.assert_allclose(kl, expected, rtol=1e-12)
        loss, _ = losses.training_loss(
            schedule, t, eps, eps_theta, encodings=encoding[None], estimated_encodings=encoding_hat[None]
        )
        assert loss.dtype == np.float64


def test_data_term_under_adm_large_variance_uses_the_clipped_posterior_variance(schedule):
    """'large_adm' (guided-diffusion's fixed-large) decodes z_0 with beta~_2 at t = 1, as 'small' does;
    'large' with beta_1."""
    z_0, eps, encodings = random_inputs(4)
    t = jnp.ones(4, jnp.int32)
    z_1 = diffusion.marginal_sample(schedule, z_0, t, eps, encodings=encodings)
    nll = {
        kind: bound.data_nll(schedule, z_1, z_0, eps, encodings=encodings, variance_kind=kind)
        for kind in ("small", "large", "large_adm")
    }
    np.testing.assert_allclose(nll["large_adm"], nll["small"], rtol=1e-6)
    assert np.all(np.abs(np.asarray(nll["large"]) - np.asarray(nll["small"])) > 1.0)


def test_posterior_kl_refuses_steps_outside_2_to_T_and_gives_nan_for_traced_ones(schedule):
    """t = 1 was +inf, t = 0 NaN and t > T silently T; now concrete steps raise, traced ones give NaN."""
    z_0, eps, encodings = random_inputs(5)
    z_t = diffusion.marginal_sample(schedule, z_0, jnp.full(4, 50), eps, encodings=encodings)

    def kl(t):
        return bound.posterior_kl(schedule, z_t, t, z_0, 0.5 * eps, encodings=encodings, estimated_encodings=encodings)

    for bad in (0, 1, 101):
        with pytest.raises(ValueError, match=rf"2\.\.T = 2\.\.100 here, got t = {bad}"):
            kl(jnp.full(4, bad))
    with pytest.raises(ValueError, match="integer steps"):
        kl(jnp.full(4, 50.0))
    traced = np.asarray(jax.jit(kl)(jnp.array([0, 1, 50, 101])))
    assert np.all(np.isnan(traced[[0, 1, 3]])) and np.isfinite(traced[2])
    np.testing.assert_allclose(traced[2], kl(jnp.full(4, 50))[2], rtol=1e-6)
