"""Zero-terminal-SNR schedules (abar_T = 0) with v and z_0 targets (docs/design.md section 3d): the schedule, the
weights' limit at T, the z0-form where the eps-form divides by 0, every sampler and the bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdiff_jax import bound, diffusion, losses, schedules, targets
from mmdiff_jax.modalities import Modality, modality_schedule
from mmdiff_jax.sampling import (
    Prediction,
    classifier_guidance,
    ddim_sample,
    ddpm_sample,
    dpm_solver_sample,
    prediction_from_output,
)

NUM_STEPS = 20
BATCH = 16
POINT = 0.3  # point data: the exact denoiser's z_0 is POINT at every step
ENCODING = 0.5  # one observed modality, e = 0.5 everywhere, 'bump' weights


def zero_snr(kind="cosine", num_steps=NUM_STEPS):
    return schedules.rescale_zero_terminal_snr(schedules.noise_schedule(kind, num_steps))


def bump_schedule(noise):
    return schedules.diffusion_schedule(noise, [schedules.weight_schedule("bump", noise, 1.0)])


def encodings(shape=(BATCH, 2)):
    return jnp.full((1,) + shape, ENCODING, jnp.float32)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_the_rescaled_schedule_keeps_abar_1_and_ends_at_zero_snr(kind):
    original, rescaled = schedules.noise_schedule(kind, 1000), zero_snr(kind, 1000)
    before, after = (np.sqrt(np.cumprod(1 - np.asarray(s.beta, np.float64))) for s in (original, rescaled))
    assert after[-1] == 0 and float(rescaled.alpha_bar[-1]) == 0 and float(rescaled.beta[-1]) == 1
    assert float(rescaled.one_minus_alpha_bar[-1]) == 1
    np.testing.assert_allclose(after[1], before[1], rtol=1e-12)  # beta_1 kept
    # sqrt(abar_t) is an affine map of the original's (Lin et al. 2024, Algorithm 1).
    slope, offset = np.polyfit(before[1:], after[1:], 1)
    np.testing.assert_allclose(after[1:], slope * before[1:] + offset, atol=1e-6)
    assert np.all(np.diff(after) < 0) and np.all(np.asarray(rescaled.beta[1:-1]) < 1)


def test_only_the_last_beta_may_be_one():
    noise = schedules.schedule_from_beta(np.r_[np.full(19, 0.1), 1.0])
    assert float(noise.alpha_bar[-1]) == 0 and schedules.has_zero_terminal_snr(noise)
    assert not schedules.has_zero_terminal_snr(schedules.noise_schedule("cosine", 20))
    assert schedules.has_zero_terminal_snr(schedules.noise_schedule("cosine", 20, max_beta=1.0))  # unclipped
    with pytest.raises(ValueError, match=r"beta_3 = 1 .*only beta_T may be 1"):
        schedules.schedule_from_beta([0.1, 0.1, 1.0, 0.1])
    with pytest.raises(ValueError, match="needs T >= 2"):
        schedules.rescale_zero_terminal_snr(schedules.schedule_from_beta([0.1]))


def test_weights_end_at_lambda_0_and_w_T_takes_its_limit():
    noise = zero_snr()
    schedule = bump_schedule(noise)
    lambda_, w = np.asarray(schedule.lambda_[0], np.float64), np.asarray(schedule.w[0], np.float64)
    assert lambda_[-1] == 0 and np.all(np.isfinite(w))
    np.testing.assert_allclose(w[-1], -lambda_[-2], rtol=1e-6)  # lambda_T / sqrt(alpha_T) - lambda_T-1 -> 0 / 0
    # The recursion lambda_t = sqrt(alpha_t) (lambda_t-1 + w_t) gives the lambdas back, the last included.
    np.testing.assert_allclose(schedules.lambda_from_w(schedule.w, schedule.alpha)[0], lambda_, atol=1e-7)
    from_w = schedules.diffusion_schedule(noise, w=np.asarray(schedule.w))
    np.testing.assert_allclose(from_w.lambda_, schedule.lambda_, atol=1e-7)
    for kind in ("bridge", "constant"):
        with pytest.raises(ValueError, match=r"forces lambda_T = .* = 0, but the weights of modalities \[0\]"):
            schedules.diffusion_schedule(noise, [schedules.weight_schedule(kind, noise, 1.0)])
    spec = Modality("label", "label", (), num_classes=3, weight_schedule=("bridge", 0.5))
    with pytest.raises(ValueError, match=r"\['label'\] have 'bridge' or 'constant' weights"):
        modality_schedule("cosine", NUM_STEPS, [spec], zero_terminal_snr=True)
    assert modality_schedule("cosine", NUM_STEPS, [spec]).lambda_[0, -1] > 0  # fine without it


def test_the_reverse_mean_takes_the_z0_form_where_alpha_t_is_0():
    schedule = bump_schedule(zero_snr())
    keys = jax.random.split(jax.random.key(0), 3)
    z_0, z_t, eps = (jax.random.normal(key, (BATCH, 2)) for key in keys)
    T = jnp.full((BATCH,), NUM_STEPS)
    e = encodings()
    # At T the posterior mean is sqrt(abar_T-1) beta_T z_0 + m_T-1 (design.md 3d's u-form with alpha_T = 0).
    expected = np.sqrt(float(schedule.alpha_bar[-2])) * z_0 + float(schedule.lambda_[0, -2]) * ENCODING
    np.testing.assert_allclose(diffusion.posterior_mean(schedule, z_t, T, z_0, encodings=e), expected, atol=1e-6)
    np.testing.assert_allclose(
        diffusion.reverse_mean(schedule, z_t, T, eps, encodings=e, z0_prediction=z_0), expected, atol=1e-6
    )
    assert np.all(np.isnan(diffusion.reverse_mean(schedule, z_t, T, eps, encodings=e)))  # eps alone: undefined
    # Below T the eps-form is kept exactly (no committed number moves).
    t = jnp.arange(1, BATCH + 1) % NUM_STEPS + 1
    t = jnp.where(t == NUM_STEPS, 1, t)
    np.testing.assert_array_equal(
        diffusion.reverse_mean(schedule, z_t, t, eps, encodings=e, z0_prediction=z_0),
        diffusion.posterior_mean_from_eps(schedule, z_t, t, eps, encodings=e),
    )


@pytest.mark.parametrize("kind", ["v", "z_0"])
def test_v_and_z0_targets_recover_z0_at_every_step(kind):
    schedule = bump_schedule(zero_snr())
    keys = jax.random.split(jax.random.key(1), 2)
    z_0, eps = (jax.random.normal(key, (NUM_STEPS, 2)) for key in keys)
    t = jnp.arange(1, NUM_STEPS + 1)
    e = encodings((NUM_STEPS, 2))
    z_t = diffusion.marginal_sample(schedule, z_0, t, eps, encodings=e)
    target = targets.prediction_target(schedule, z_0, t, eps, kind)
    np.testing.assert_allclose(targets.z0_from_prediction(schedule, z_t, t, target, kind, encodings=e), z_0, atol=1e-5)
    eps_back = targets.eps_from_prediction(schedule, z_t, t, target, kind, encodings=e)
    np.testing.assert_allclose(eps_back, eps, atol=2e-4)  # at T: eps = u_T = z_T
    assert targets.model_z0(schedule, z_t, t, target, "eps", encodings=e) is None
    weights = targets.time_weight(schedule, t, kind, "min_snr")
    assert float(weights[-1]) == 0 and np.all(np.isfinite(weights))  # min(SNR_T, gamma) = 0 at T
    with pytest.raises(
        ValueError,
        match=r"zero-terminal-SNR schedule .* needs the 'v' or 'z_0' prediction target \(config.model.prediction\)",
    ):
        targets.check_prediction("eps", schedule)
    targets.check_prediction(kind, schedule)


def point_denoiser(schedule, kind):
    """The exact denoiser of data concentrated at POINT, read through a network output of target `kind`."""
    e = encodings()

    def denoise(z_t, t):
        t = jnp.broadcast_to(t, z_t.shape[:1])
        z_0 = jnp.full_like(z_t, POINT)
        u_t = z_t - diffusion.encoding_mean(schedule, z_t, t, encodings=e)
        alpha_bar, one_minus = (
            diffusion.at_step(a, t, z_t) for a in (schedule.alpha_bar, schedule.one_minus_alpha_bar)
        )
        eps = (u_t - jnp.sqrt(alpha_bar) * z_0) / jnp.sqrt(one_minus)
        output = targets.prediction_target(schedule, z_0, t, eps, kind)
        return prediction_from_output(
            schedule, z_t, t, output, kind, encodings=e, aux={"logits": jnp.zeros((BATCH, 2))}
        )

    return denoise


SAMPLERS = {
    "ddpm": lambda d, s, rng: ddpm_sample(d, s, rng, (BATCH, 2)),
    "ddpm_large_clipped": lambda d, s, rng: ddpm_sample(d, s, rng, (BATCH, 2), variance="large", clip_denoised=True),
    "ddim": lambda d, s, rng: ddim_sample(d, s, rng, (BATCH, 2), num_steps=5),
    "ddim_eta1_clipped": lambda d, s, rng: ddim_sample(d, s, rng, (BATCH, 2), num_steps=5, eta=1.0, clip_denoised=True),
    "dpm_2M": lambda d, s, rng: dpm_solver_sample(d, s, rng, (BATCH, 2), num_steps=6),
    "dpm_3M_logsnr": lambda d, s, rng: dpm_solver_sample(
        d, s, rng, (BATCH, 2), num_steps=6, variant="3M", spacing="logsnr"
    ),
    "dpm_2S": lambda d, s, rng: dpm_solver_sample(d, s, rng, (BATCH, 2), num_steps=6, variant="2S"),
}


@pytest.mark.parametrize("kind", ["v", "z_0"])
def test_every_sampler_lands_on_point_data_from_a_zero_snr_prior(kind):
    """z_T = eps holds no signal: the first step needs the denoiser's own z_0. With it every sampler (and
    classifier guidance with a flat likelihood) ends exactly at the data; with eps alone the chain is refused."""
    schedule = bump_schedule(zero_snr())
    denoise = point_denoiser(schedule, kind)
    guided = classifier_guidance(denoise, schedule, lambda p: jnp.sum(p.aux["logits"], -1), 3.0)

    @jax.jit
    def run(rng):
        return {name: sampler(denoise, schedule, rng).z_0 for name, sampler in SAMPLERS.items()} | {
            "guided_ddim": ddim_sample(guided, schedule, rng, (BATCH, 2), num_steps=5).z_0
        }

    for name, z_0 in run(jax.random.key(2)).items():
        np.testing.assert_allclose(z_0, POINT, atol=1e-5, err_msg=name)

    def eps_only(z_t, t):
        return denoise(z_t, t)._replace(z_0=None)

    for sampler in (SAMPLERS["ddpm"], SAMPLERS["ddim"], SAMPLERS["dpm_2M"]):
        with pytest.raises(ValueError, match="needs a denoiser that predicts z_0 itself"):
            jax.jit(lambda rng: sampler(eps_only, schedule, rng))(jax.random.key(0))  # noqa: B023


def test_classifier_guidance_shifts_z0_with_eps():
    """Below T z_0 moves as the z_0 of the guided eps does; at T (no signal) it is left as predicted."""
    schedule = bump_schedule(zero_snr())
    e = encodings()

    def denoise(z_t, t):
        return Prediction(jnp.sin(z_t), e, {"logits": jnp.cos(z_t) * z_t}, z_0=jnp.tanh(z_t))

    guided = classifier_guidance(denoise, schedule, lambda p: jnp.sum(p.aux["logits"], -1), 2.0)
    z_t = jax.random.normal(jax.random.key(3), (BATCH, 2))
    t = jnp.full((BATCH,), 7)
    prediction = guided(z_t, t)
    z0_of = lambda eps: diffusion.z0_from_eps(schedule, z_t, t, eps, encodings=e)  # noqa: E731
    np.testing.assert_allclose(prediction.z_0 - jnp.tanh(z_t), z0_of(prediction.eps) - z0_of(jnp.sin(z_t)), atol=1e-5)
    assert np.abs(prediction.z_0 - jnp.tanh(z_t)).mean() > 0.01
    T = jnp.full((BATCH,), NUM_STEPS)
    np.testing.assert_array_equal(guided(z_t, T).z_0, jnp.tanh(z_t))


def test_the_bound_and_the_hybrid_loss_are_finite_at_T():
    """The exact point denoiser's KL at T is 0 (its z_0-form mean is the posterior's); the whole bound is finite,
    and so are the gradients of the training terms at t = T (the eps-form's 1 / sqrt(alpha_T) never leaks)."""
    schedule = bump_schedule(zero_snr())
    e = encodings()
    denoise = point_denoiser(schedule, "v")
    z_0 = jnp.full((BATCH, 2), POINT)
    T = jnp.full((BATCH,), NUM_STEPS)
    z_T = diffusion.marginal_sample(schedule, z_0, T, jax.random.normal(jax.random.key(4), (BATCH, 2)), encodings=e)
    prediction = denoise(z_T, T)
    kl = bound.posterior_kl(
        schedule, z_T, T, z_0, prediction.eps, encodings=e, estimated_encodings=e, z0_prediction=prediction.z_0
    )
    np.testing.assert_allclose(kl, 0.0, atol=1e-6)
    np.testing.assert_allclose(bound.prior_kl(schedule, z_0, encodings=e), 0.0, atol=1e-6)  # q(z_T) = N(0, I)

    def denoiser_output(z_t, t):
        p = denoise(z_t, t)
        return bound.DenoiserOutput(p.eps, p.estimated_encodings, jnp.zeros(z_t.shape[:1]), z0_prediction=p.z_0)

    key = jax.random.key(6)
    estimate = jax.vmap(lambda key: bound.variational_bound(schedule, denoiser_output, z_0, key, encodings=e))
    terms = jax.jit(estimate)(jax.random.split(jax.random.key(5), 64))
    assert np.all(np.isfinite(terms.total))
    with pytest.raises(ValueError, match="needs the denoiser's own z_0"):
        bound.variational_bound(
            schedule, lambda z, t: denoiser_output(z, t)._replace(z0_prediction=None), z_0, key, encodings=e
        )

    def training_terms(v, encodings_, interpolation, noise):
        z_t = diffusion.marginal_sample(schedule, z_0, T, noise, encodings=encodings_)
        z0_prediction = targets.model_z0(schedule, z_t, T, v, "v", encodings=encodings_)
        eps_prediction = targets.eps_from_prediction(schedule, z_t, T, v, "v", encodings=encodings_)
        vlb = bound.variance_vlb(
            schedule,
            z_t,
            T,
            z_0,
            eps_prediction,
            interpolation,
            encodings=e,
            estimated_encodings=encodings_,
            z0_prediction=z0_prediction,
            discretized=False,
        )
        target = targets.prediction_target(schedule, z_0, T, noise, "v")
        loss, _ = losses.training_loss(
            schedule,
            T,
            target,
            v,
            encodings=e,
            estimated_encodings=encodings_,
            prediction="v",
            time_weighting="min_snr",
            vlb=vlb,
        )
        return loss

    inputs = (jax.random.normal(key, (BATCH, 2)), e + 0.1, jnp.full((BATCH, 2), 0.5), jnp.ones((BATCH, 2)))
    loss, gradients = jax.jit(jax.value_and_grad(training_terms, argnums=(0, 1, 2, 3)))(*inputs)
    assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in gradients)
    assert np.abs(gradients[2]).sum() > 0  # the learned variance learns at T
