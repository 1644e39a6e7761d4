"""Noise and aggregation-weight schedules: exact conversions, named shapes, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdiff_jax import schedules


@pytest.fixture(params=["linear", "cosine"])
def noise(request):
    return schedules.noise_schedule(request.param, 200)


def test_noise_schedules_are_valid_ddpm_schedules(noise):
    beta, alpha, alpha_bar, one_minus_alpha_bar = (np.asarray(a, np.float64) for a in noise)
    assert noise.num_steps == 200 and beta.shape == (201,)
    assert beta[0] == 0 and alpha[0] == 1 and alpha_bar[0] == 1
    assert np.all((beta[1:] > 0) & (beta[1:] <= 0.999 + 1e-6))
    np.testing.assert_allclose(alpha, 1 - beta, atol=1e-7)
    np.testing.assert_allclose(alpha_bar, np.cumprod(alpha), rtol=1e-5)
    exact = 1 - np.cumprod(1 - beta)  # float64 throughout
    np.testing.assert_allclose(one_minus_alpha_bar, exact, rtol=1e-6)
    assert np.max(np.abs((1 - alpha_bar[1:5]) / exact[1:5] - 1)) > 1e-6  # what the field is for
    assert np.all(np.diff(alpha_bar) < 0) and alpha_bar[-1] < 1e-3


def test_linear_schedule_spans_the_same_range_for_any_num_steps():
    for num_steps in (50, 1000, 4000):
        beta = np.asarray(schedules.noise_schedule("linear", num_steps).beta)
        np.testing.assert_allclose([beta[1], beta[-1]], np.array([1e-4, 0.02]) * 1000 / num_steps, rtol=1e-5)


def test_cosine_schedule_follows_its_alpha_bar_formula():
    num_steps, offset = 100, 0.008
    alpha_bar = np.asarray(schedules.noise_schedule("cosine", num_steps).alpha_bar, np.float64)
    t = np.arange(num_steps + 1) / num_steps
    f = np.cos((t + offset) / (1 + offset) * np.pi / 2) ** 2
    np.testing.assert_allclose(alpha_bar[:-5], (f / f[0])[:-5], rtol=1e-4)  # the last betas are clipped


@pytest.mark.parametrize("normalized_modalities", [None, 2])
def test_w_and_lambda_round_trip_exactly(noise, normalized_modalities):
    if normalized_modalities:
        noise = schedules.normalize_by_modalities(noise, normalized_modalities)
    rng = np.random.default_rng(0)
    w = rng.uniform(-0.5, 0.5, (3, noise.num_steps + 1)).astype(np.float32)
    w[:, 0] = 0
    lambda_ = schedules.lambda_from_w(w, noise.alpha)
    np.testing.assert_allclose(schedules.w_from_lambda(lambda_, noise.alpha), w, atol=2e-5)
    lambda_given = rng.uniform(0, 2, (3, noise.num_steps + 1)).astype(np.float32)
    lambda_given[:, 0] = 0
    round_trip = schedules.lambda_from_w(schedules.w_from_lambda(lambda_given, noise.alpha), noise.alpha)
    np.testing.assert_allclose(round_trip, lambda_given, atol=2e-5)


def test_lambda_matches_its_closed_form_sum(noise):
    """lambda_t = sum_{s<=t} w_s sqrt(abar_t / abar_{s-1}), evaluated in float64."""
    rng = np.random.default_rng(1)
    w = rng.uniform(0, 0.05, noise.num_steps + 1)
    w[0] = 0
    alpha_bar = np.cumprod(1 - np.asarray(noise.beta, np.float64))
    expected = [
        sum(w[s] * np.sqrt(alpha_bar[t] / alpha_bar[s - 1]) for s in range(1, t + 1))
        for t in range(noise.num_steps + 1)
    ]
    np.testing.assert_allclose(schedules.lambda_from_w(w, noise.alpha), expected, rtol=1e-4, atol=1e-6)


def test_named_weight_schedules(noise):
    gamma = 1.7
    sqrt_alpha_bar_final = float(np.sqrt(noise.alpha_bar[-1]))
    bump = np.asarray(schedules.weight_schedule("bump", noise, gamma))
    assert bump[0] == 0 and abs(bump[-1]) < 0.05 * gamma  # lambda_T ~ 0: the prior stays N(0, I)
    np.testing.assert_allclose(bump[-1], gamma * 4 * sqrt_alpha_bar_final * (1 - sqrt_alpha_bar_final), rtol=1e-5)
    assert bump.max() == pytest.approx(gamma, rel=0.02)  # peak where sqrt(abar) = 1/2
    bridge = np.asarray(schedules.weight_schedule("bridge", noise, gamma))
    np.testing.assert_allclose(bridge[-1], gamma * (1 - sqrt_alpha_bar_final), rtol=1e-6)
    assert bridge[0] == 0 and np.all(np.diff(bridge) > 0)
    constant = np.asarray(schedules.weight_schedule("constant", noise, gamma))
    assert constant[0] == 0 and np.all(constant[1:] == np.float32(gamma))
    assert not np.any(schedules.weight_schedule("zero", noise))


def test_make_schedule_carries_both_forms_consistently():
    schedule = schedules.make_schedule("linear", 100, [("bump", 1.0), ("bridge", 0.5), ("zero", 0.0)])
    assert schedule.num_modalities == 3 and schedule.w.shape == schedule.lambda_.shape == (3, 101)
    np.testing.assert_allclose(schedules.lambda_from_w(schedule.w, schedule.alpha), schedule.lambda_, atol=2e-5)
    plain = schedules.make_schedule("cosine", 10)
    assert plain.num_modalities == 0 and plain.w.shape == (0, 11)


def test_modality_normalized_replaces_alpha():
    noise = schedules.noise_schedule("linear", 100)
    schedule = schedules.make_schedule("linear", 100, [("bump", 1.0), ("bump", 1.0)], modality_normalized=True)
    np.testing.assert_allclose(schedule.alpha[1:], noise.alpha[1:] / 3, rtol=1e-6)
    np.testing.assert_allclose(schedule.beta[1:], 1 - noise.alpha[1:] / 3, rtol=1e-6)
    assert schedule.alpha[0] == 1 and schedule.alpha_bar[0] == 1


def test_given_w_is_used_as_the_transition_weights():
    noise = schedules.noise_schedule("cosine", 10)
    w = np.full((1, 11), 0.1, np.float32)
    schedule = schedules.diffusion_schedule(noise, w=w)
    np.testing.assert_allclose(schedule.w[0, 1:], 0.1)
    assert schedule.w[0, 0] == 0 and schedule.lambda_[0, 0] == 0


def test_schedules_work_under_jit_and_grad():
    noise = schedules.noise_schedule("linear", 30)
    w = jnp.full((30 + 1,), 0.01)
    jitted = jax.jit(schedules.lambda_from_w)(w, noise.alpha)
    np.testing.assert_allclose(jitted, schedules.lambda_from_w(w, noise.alpha), rtol=1e-6)
    # d lambda_T / d w_T = sqrt(alpha_T).
    grad = jax.grad(lambda w: schedules.lambda_from_w(w, noise.alpha)[-1])(w)
    np.testing.assert_allclose(grad[-1], np.sqrt(noise.alpha[-1]), rtol=1e-6)
    assert grad[0] == 0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: schedules.noise_schedule("quadratic", 10), "unknown noise schedule"),
        (lambda: schedules.noise_schedule("linear", 0), "num_steps"),
        (lambda: schedules.noise_schedule("linear", 10), "cosine schedule"),
        (
            lambda: schedules.weight_schedule("wiggle", schedules.noise_schedule("cosine", 10)),
            "unknown weight schedule",
        ),
        (lambda: schedules.diffusion_schedule(schedules.noise_schedule("cosine", 10), [np.zeros(7)]), "T \\+ 1"),
        (lambda: schedules.diffusion_schedule(schedules.noise_schedule("cosine", 10), [np.ones(11)]), "lambda_0"),
        (
            lambda: schedules.diffusion_schedule(
                schedules.noise_schedule("cosine", 10), [np.zeros(11)], w=[np.zeros(11)]
            ),
            "not both",
        ),
        (lambda: schedules.diffusion_schedule(schedules.noise_schedule("cosine", 3), [[0, np.nan, 1, 1]]), "finite"),
        (lambda: schedules.schedule_from_beta([0.1, 1.5]), "beta"),
    ],
)
def test_bad_schedules_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
