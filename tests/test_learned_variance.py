"""ADM's learned reverse variance: the L_vlb term, the hybrid loss, the model's variance channels, the samplers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mmdiff_jax import bound, diffusion, losses, schedules
from mmdiff_jax.modalities import Modality, modality_schedule
from mmdiff_jax.models.mt_diffusion import MTDiffusion, init_variables
from mmdiff_jax.objective import make_loss_fn
from mmdiff_jax.sampling import samplers
from mmdiff_jax.sampling.conditional import make_denoise
from mmdiff_jax.sampling.guidance import classifier_free_guidance
from tests.test_modalities import KEY, MICRO, Z_SHAPE, random_batch

T = 50


@pytest.fixture(scope="module")
def plain():
    """N = 0: a schedule, z_0 on the 8-bit grid, t with t = 1 and t >= 2 examples, a wrong eps_theta, v."""
    schedule = schedules.make_schedule("linear", T, [])
    rng = np.random.default_rng(0)
    shape = (5, 4, 4, 1)
    z_0 = np.round((rng.uniform(-1, 1, shape) + 1) * 127.5) / 127.5 - 1
    eps = rng.normal(size=shape)
    t = np.array([1, 2, 7, 30, T])
    z_t = np.asarray(diffusion.marginal_sample(schedule, jnp.asarray(z_0), jnp.asarray(t), jnp.asarray(eps)))
    eps_theta = eps + 0.3 * rng.normal(size=shape)
    interpolation = rng.uniform(0, 1, shape)
    return (
        schedule,
        *(np.asarray(x, np.float32) for x in (z_0, eps)),
        t,
        z_t,
        *(np.asarray(x, np.float32) for x in (eps_theta, interpolation)),
    )


def closed_form_vb(schedule, z_0, t, z_t, eps_theta, interpolation):
    """ADM's L_t in bits per dimension, written out with numpy (N = 0): the Gaussian KL for t >= 2, the
    discretized Gaussian NLL at t = 1, log sigma^2 = v log beta_t + (1 - v) log beta~_t (beta~_1 -> beta~_2)."""
    beta = np.asarray(schedule.beta, np.float64)
    alpha_bar = np.cumprod(1 - beta[1:])
    alpha_bar = np.concatenate([[1.0], alpha_bar])
    expand = (slice(None),) + (None,) * 3
    b, ab, ab_prev = beta[t][expand], alpha_bar[t][expand], alpha_bar[t - 1][expand]
    beta_tilde = b * (1 - ab_prev) / (1 - ab)
    beta_tilde_clipped = np.where(t[expand] == 1, beta[2] * (1 - alpha_bar[1]) / (1 - alpha_bar[2]), beta_tilde)
    log_variance = interpolation * np.log(b) + (1 - interpolation) * np.log(beta_tilde_clipped)
    model_mean = (z_t - b / np.sqrt(1 - ab) * eps_theta) / np.sqrt(1 - b)
    true_mean = np.sqrt(ab_prev) * b / (1 - ab) * z_0 + np.sqrt(1 - b) * (1 - ab_prev) / (1 - ab) * z_t
    safe = np.maximum(beta_tilde, 1e-30)
    kl = 0.5 * (log_variance - np.log(safe) - 1 + safe / np.exp(log_variance))
    kl = kl + 0.5 * (true_mean - model_mean) ** 2 / np.exp(log_variance)
    scale = np.exp(0.5 * log_variance)
    upper = np.where(z_0 > 1 - 1e-6, np.inf, z_0 + 1 / 255)
    lower = np.where(z_0 < -1 + 1e-6, -np.inf, z_0 - 1 / 255)
    nll = -np.log(stats.norm.cdf(upper, model_mean, scale) - stats.norm.cdf(lower, model_mean, scale))
    per_element = np.where(t[expand] == 1, nll, kl)
    return per_element.mean(axis=(1, 2, 3)) / math.log(2)


def test_variance_vlb_equals_the_closed_form_at_given_interpolations(plain):
    schedule, z_0, _, t, z_t, eps_theta, interpolation = plain
    got = bound.variance_vlb(
        schedule, jnp.asarray(z_t), jnp.asarray(t), jnp.asarray(z_0), jnp.asarray(eps_theta), jnp.asarray(interpolation)
    )
    expected = closed_form_vb(schedule, z_0, t, z_t, eps_theta, interpolation)
    np.testing.assert_allclose(got, expected, rtol=2e-3)
    # v = 0 / 1 are the fixed 'small' / 'large' variances of the bound's own terms (t >= 2).
    for v, kind in ((0.0, "small"), (1.0, "large")):
        fixed = bound.posterior_kl(schedule, z_t[1:], t[1:], z_0[1:], eps_theta[1:], variance_kind=kind)
        vlb = bound.variance_vlb(schedule, z_t[1:], t[1:], z_0[1:], eps_theta[1:], jnp.full(z_t[1:].shape, v))
        np.testing.assert_allclose(vlb, fixed / (16 * math.log(2)), rtol=1e-4)


def test_hybrid_loss_with_n0_is_adms_and_trains_only_the_variance(plain):
    """L_hybrid = L_simple + lambda L_vlb, L_vlb = T L_t (guided-diffusion's RESCALED_MSE with learn_sigma: vb *
    T / 1000), the mean frozen inside L_vlb."""
    schedule, z_0, eps, t, z_t, eps_theta, interpolation = plain

    def hybrid(eps_theta, interpolation):
        vlb = bound.variance_vlb(schedule, z_t, t, z_0, eps_theta, interpolation)
        return losses.training_loss(schedule, t, eps, eps_theta, vlb=vlb, vlb_weight=0.001)

    (loss, metrics), (grad_eps, grad_v) = jax.value_and_grad(hybrid, argnums=(0, 1), has_aux=True)(
        jnp.asarray(eps_theta), jnp.asarray(interpolation)
    )
    vb = closed_form_vb(schedule, z_0, t, z_t, eps_theta, interpolation)
    mse = ((eps - eps_theta) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(loss, np.mean(mse + vb * T / 1000), rtol=2e-3)
    np.testing.assert_allclose(metrics["vlb"], vb.mean(), rtol=2e-3)
    # The mean learns from the MSE alone; the variance from L_vlb.
    np.testing.assert_allclose(grad_eps, 2 * (eps_theta - eps) / (eps.size), rtol=1e-5, atol=1e-9)
    assert np.all(np.isfinite(grad_v)) and np.abs(np.asarray(grad_v)).sum() > 0
    with pytest.raises(ValueError, match="one value per example"):
        losses.training_loss(schedule, t, eps, eps_theta, vlb=jnp.zeros(3))


def test_the_bound_reads_a_learned_variance(plain):
    """variational_bound with interpolation 0 everywhere equals the 'small' variance's bound; 1 differs."""
    schedule, z_0, _, _, _, _, _ = plain

    def make_denoise_fn(interpolation):
        def denoise(z_t, t):
            eps = jnp.zeros_like(z_t) + 0.1
            v = None if interpolation is None else jnp.full(z_t.shape, interpolation)
            return bound.DenoiserOutput(eps, None, jnp.zeros(z_t.shape[:1]), v)

        return denoise

    rng = jax.random.key(3)
    totals = {
        v: bound.variational_bound(schedule, make_denoise_fn(v), jnp.asarray(z_0), rng).total for v in (None, 0.0, 1.0)
    }
    np.testing.assert_allclose(totals[0.0], totals[None], rtol=1e-6)
    assert np.all(np.abs(np.asarray(totals[1.0]) - np.asarray(totals[None])) > 1e-3)


def test_ddpm_step_takes_the_learned_variance(plain):
    schedule = plain[0]
    z_t = jnp.ones((2, 4, 4, 1))
    noise = jnp.ones_like(z_t)
    eps = jnp.zeros_like(z_t)
    for t in (7, 1):
        step = {
            kind: samplers.ddpm_step(schedule, z_t, jnp.asarray(t), samplers.Prediction(eps), noise, variance=kind)
            for kind in ("small", "large")
        }
        for v, kind in ((0.0, "small"), (1.0, "large")):
            learned = samplers.Prediction(eps, variance_interpolation=jnp.full(z_t.shape, v))
            got = samplers.ddpm_step(schedule, z_t, jnp.asarray(t), learned, noise, variance="large")
            np.testing.assert_allclose(got, step[kind] if t > 1 else step["small"], rtol=1e-6)
    # Per element: half the pixels small, half large.
    mixed = jnp.concatenate([jnp.zeros((2, 2, 4, 1)), jnp.ones((2, 2, 4, 1))], axis=1)
    got = samplers.ddpm_step(
        schedule, z_t, jnp.asarray(7), samplers.Prediction(eps, variance_interpolation=mixed), noise
    )
    small = samplers.ddpm_step(schedule, z_t, jnp.asarray(7), samplers.Prediction(eps), noise, variance="small")
    large = samplers.ddpm_step(schedule, z_t, jnp.asarray(7), samplers.Prediction(eps), noise, variance="large")
    np.testing.assert_allclose(got[:, :2], small[:, :2], rtol=1e-6)
    np.testing.assert_allclose(got[:, 2:], large[:, 2:], rtol=1e-6)


def test_guidance_keeps_the_conditional_variance():
    passes = samplers.Prediction(
        jnp.stack([jnp.zeros((1, 2)), jnp.ones((1, 2))]),
        variance_interpolation=jnp.stack([jnp.full((1, 2), 0.2), jnp.full((1, 2), 0.6)]),
    )
    guided = classifier_free_guidance(passes, jnp.asarray([3.0]))
    np.testing.assert_allclose(guided.eps, 3.0)
    np.testing.assert_allclose(guided.variance_interpolation, 0.6)


def test_model_with_learned_variance_trains_and_samples_with_it():
    modalities = (Modality("label", "label", num_classes=10, loss_weight=0.5, condition="embedding"),)
    model = MTDiffusion(MICRO, modalities, Z_SHAPE, learn_variance=True)
    schedule = modality_schedule("linear", T, modalities)
    params = jax.jit(lambda key: init_variables(model, key, 2))(KEY)["params"]
    batch = random_batch(modalities, batch_size=4)
    loss_fn = make_loss_fn(model, schedule)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch, jax.random.key(1))
    assert np.isfinite(loss) and metrics["vlb"] > 0
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # The U-Net's last conv has 2C outputs; the variance channels are read as v = (out + 1) / 2.
    output = model.apply({"params": params}, batch, batch["image"], jnp.full((4,), 9), train=False)
    assert output.prediction.shape == output.variance_interpolation.shape == (4,) + Z_SHAPE
    fixed = model.clone(learn_variance=False)
    fixed_count = sum(x.size for x in jax.tree.leaves(jax.eval_shape(lambda: init_variables(fixed, KEY, 1))))
    extra = 9 * MICRO.level_channels()[0] + 1  # one more 3x3 output channel (C = 1) and its bias
    assert sum(x.size for x in jax.tree.leaves(params)) == fixed_count + extra
    # The sampler's denoiser carries it, from the same model call.
    observed = {"label": batch["label"]}
    prediction = make_denoise(model, schedule, {"params": params}, observed)(batch["image"], jnp.full((4,), 9))
    direct = model.apply({"params": params}, batch["image"], jnp.full((4,), 9), observed, method=model.predict)
    np.testing.assert_allclose(prediction.variance_interpolation, direct.variance_interpolation, rtol=1e-6)
