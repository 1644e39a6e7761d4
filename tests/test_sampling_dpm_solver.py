"""DPM-Solver++ (`mmdiff_jax.sampling.dpm_solver`): convergence order against the exact probability-flow ODE
on Gaussian data with an exact denoiser, first order = DDIM, the encodings' mean m_t handled exactly, and the
model-level sampler (guidance, RePaint, bad options)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdiff_jax import diffusion
from mmdiff_jax.modalities import MASK_KEY, Modality, modality_schedule
from mmdiff_jax.models.mt_diffusion import MTDiffusion, init_variables
from mmdiff_jax.models.unet import unet_preset
from mmdiff_jax.sampling import Prediction, ddim_sample, dpm_solver_sample, make_sample_fn, solver_timesteps
from mmdiff_jax.sampling.dpm_solver import half_log_snr, model_calls
from mmdiff_jax.schedules import make_schedule

T, MU, SCALE = 1000, 0.3, 0.5  # data u_0 ~ N(MU, SCALE^2) per value
SHAPE = (512, 4)
PLAIN = make_schedule("linear", T, [])
NOISE = jax.random.normal(jax.random.key(0), SHAPE)


def _exact_eps(schedule, u_t, t):
    """E[eps | u_t] for Gaussian data: sigma_t (u_t - alpha_t MU) / (alpha_t^2 SCALE^2 + sigma_t^2)."""
    alpha = jnp.sqrt(diffusion.at_step(schedule.alpha_bar, t, u_t))
    sigma = jnp.sqrt(diffusion.at_step(schedule.one_minus_alpha_bar, t, u_t))
    return sigma * (u_t - alpha * MU) / (alpha**2 * SCALE**2 + sigma**2)


def _plain_denoise(z_t, t):
    return Prediction(_exact_eps(PLAIN, z_t, t))


def _ode_solution(t_end):
    """The probability-flow ODE maps u_T to u_end keeping (u - alpha MU) / sqrt(alpha^2 SCALE^2 + sigma^2)."""
    abar = np.asarray(PLAIN.alpha_bar, np.float64)
    std = lambda t: np.sqrt(abar[t] * SCALE**2 + 1 - abar[t])  # noqa: E731
    return np.sqrt(abar[t_end]) * MU + std(t_end) * (np.asarray(NOISE, np.float64) - np.sqrt(abar[T]) * MU) / std(T)


def _errors(variant, step_counts, t_end=40):
    """RMS error at step t_end against the exact ODE solution, for chains uniform in lambda from T to t_end."""
    lam, reference = half_log_snr(PLAIN), _ode_solution(t_end)
    errors = []
    for count in step_counts:
        chain = np.array([np.argmin(np.abs(lam[1:] - x)) + 1 for x in np.linspace(lam[T], lam[t_end], count + 1)])
        chain[0], chain[-1] = T, t_end
        out = jax.jit(
            lambda chain=chain: (
                dpm_solver_sample(
                    _plain_denoise, PLAIN, jax.random.key(1), SHAPE, variant=variant, timesteps=chain, prior_noise=NOISE
                ).z_0
            )
        )()
        errors.append(float(np.sqrt(np.mean((np.asarray(out, np.float64) - reference) ** 2))))
    return np.asarray(errors)


def _slopes(errors):
    return -np.diff(np.log2(errors))  # error ~ h^p: p per doubling of the number of steps


def test_error_falls_at_the_solver_order_as_the_steps_double():
    """Measured (float32, t_end = 40): order 1 slopes 0.89 / 0.94 / 0.97; 2M 1.9 / 1.2 / 1.8 / 1.9 over 10 .. 160
    steps (the integer steps' rounding makes the 20 -> 40 doubling uneven); 2S 1.8 / 1.9 / 2.0; 3M 2.8 / 2.8 /
    2.4 / 2.1: its first two steps are of lower order (no earlier predictions yet), which bounds the
    asymptotic order at 2 as the steps shrink, while 3M stays the most accurate at every step count."""
    first, two_m, two_s = _errors("1", (10, 20, 40)), _errors("2M", (40, 80, 160)), _errors("2S", (10, 20, 40))
    three_m = _errors("3M", (10, 20, 40))
    print(f"\nslopes: order 1 {_slopes(first)}, 2M {_slopes(two_m)}, 2S {_slopes(two_s)}, 3M {_slopes(three_m)}")
    assert np.all((0.8 < _slopes(first)) & (_slopes(first) < 1.2))
    assert np.all(_slopes(two_m) > 1.6) and np.all(_slopes(two_s) > 1.6)
    assert np.mean(_slopes(three_m)) > 2.5
    assert three_m[2] < _errors("2M", (40,))[0] < first[2]


def test_first_order_equals_ddim():
    for num_steps in (7, 25):
        ours = dpm_solver_sample(
            _plain_denoise, PLAIN, jax.random.key(1), SHAPE, variant="1", num_steps=num_steps, prior_noise=NOISE
        ).z_0
        ddim = ddim_sample(_plain_denoise, PLAIN, jax.random.key(1), SHAPE, num_steps=num_steps, prior_noise=NOISE).z_0
        np.testing.assert_allclose(ours, ddim, atol=2e-6)


@pytest.mark.parametrize("variant", ["2M", "3M", "2S"])
def test_the_encodings_mean_is_handled_exactly_with_two_modalities(variant):
    """With N = 2 observed encodings e and a denoiser that is the plain one applied to u_t = z_t - m_t(e), the
    chain of z is the plain chain of u plus m_t: z_0 = u_0 + m_0, whatever the weight schedules."""
    schedule = make_schedule("linear", T, [("bump", 1.0), ("bridge", 0.5)])
    encodings = jax.random.normal(jax.random.key(2), (2,) + SHAPE)

    def denoise(z_t, t):
        u_t = z_t - diffusion.encoding_mean(schedule, z_t, t, encodings=encodings)
        return Prediction(_exact_eps(schedule, u_t, t), encodings)

    options = dict(variant=variant, num_steps=12, spacing="logsnr", prior_noise=NOISE)
    z_0 = dpm_solver_sample(denoise, schedule, jax.random.key(1), SHAPE, **options).z_0
    u_0 = dpm_solver_sample(_plain_denoise, PLAIN, jax.random.key(1), SHAPE, **options).z_0
    m_0 = diffusion.encoding_mean(schedule, u_0, jnp.zeros(SHAPE[:1], jnp.int32), encodings=encodings)
    np.testing.assert_allclose(z_0, u_0 + m_0, atol=2e-5)


def test_step_spacings():
    lam = half_log_snr(PLAIN)
    for spacing in ("time_uniform", "logsnr"):
        for num_steps in (1, 5, 20, 100):
            chain = solver_timesteps(PLAIN, num_steps, spacing)
            assert len(chain) == num_steps + 1 and chain[0] == T and chain[-1] == 0 and np.all(np.diff(chain) < 0)
    gaps = np.diff(lam[solver_timesteps(PLAIN, 20, "logsnr")[:-1]])
    # Uniform in lambda up to the integer steps' rounding, which is coarse near t = 1 (the last few gaps).
    assert np.std(gaps[:-4]) < 0.05 * np.mean(gaps[:-4]) and np.all(gaps > 0)
    with pytest.raises(ValueError, match="unknown step spacing"):
        solver_timesteps(PLAIN, 10, "karras")


def test_model_sampler_with_guidance_and_repaint_and_clear_errors():
    shape = (8, 8, 1)
    unet = unet_preset(
        "tiny", base_channels=8, channel_multipliers=(1, 2), attention_resolutions=(), num_head_channels=8, num_groups=4
    )
    modalities = (Modality("masked_image", "masked_image", shape, condition="concat"),)
    model = MTDiffusion(unet, modalities, shape)
    variables = jax.jit(lambda key: init_variables(model, key))(jax.random.key(0, impl="rbg"))
    schedule = modality_schedule("linear", 50, modalities)
    mask = jnp.zeros((3, 8, 8, 1)).at[:, :4].set(1.0)  # the top half known
    observed = {"masked_image": jnp.full((3,) + shape, 0.5), MASK_KEY: mask}
    # One compiled sampler: 3M on logSNR steps, classifier-free guidance and RePaint re-imposition composed.
    sample = make_sample_fn(
        model, schedule, method="dpm_solver++", num_steps=6, variant="3M", spacing="logsnr", repaint="masked_image"
    )
    restored = sample(variables, jax.random.key(1), observed, cfg_scales=2.0).image
    known = np.asarray(observed[MASK_KEY]) > 0
    assert np.all(np.isfinite(restored)) and known.any() and not known.all()
    np.testing.assert_allclose(np.asarray(restored)[known], 0.5, atol=1e-5)  # re-imposed after the last step
    with pytest.raises(ValueError, match="unknown DPM-Solver\\+\\+ variant"):
        make_sample_fn(model, schedule, method="dpm_solver++", variant="4M")
    with pytest.raises(ValueError, match="unknown sampling method"):
        make_sample_fn(model, schedule, method="euler")
    with pytest.raises(ValueError, match="num_steps must lie in"):
        make_sample_fn(model, schedule, method="dpm_solver++", num_steps=51)


@pytest.mark.parametrize("variant, spacing", [("2M", "time_uniform"), ("2S", "time_uniform"), ("2S", "logsnr")])
def test_model_calls_counts_the_denoiser_calls_of_a_chain(variant, spacing):
    calls = []

    def counting_denoise(z_t, t):
        jax.debug.callback(lambda: calls.append(1))
        return _plain_denoise(z_t, t)

    chain = jax.jit(
        lambda: (
            dpm_solver_sample(
                counting_denoise,
                PLAIN,
                jax.random.key(1),
                (2, 4),
                num_steps=6,
                variant=variant,
                spacing=spacing,
                prior_refinements=0,
            ).z_0
        )
    )
    jax.block_until_ready(chain())
    jax.effects_barrier()
    assert len(calls) == model_calls(PLAIN, 6, variant, spacing)
    assert model_calls(PLAIN, 6, variant, spacing) == (6 if variant == "2M" else 11)  # 2S: none into t = 0
