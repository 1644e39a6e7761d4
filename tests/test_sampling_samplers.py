"""The pure samplers against exact oracles on toy Gaussian data (closed-form eps, observed encodings)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from mmdiff_jax import diffusion, schedules
from mmdiff_jax.sampling import (
    Prediction,
    classifier_guidance,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    known_region_hook,
    respace,
    sdedit_sample,
)
from tests.training_helpers import FAST_COMPILE

NUM_STEPS = 1000
MU = np.array([1.0, -0.5])  # toy data z_0 ~ N(MU, S^2 I), two coordinates
S = 0.5
ENCODINGS = np.array([[2.0, -1.0], [0.5, 1.5]])  # e_1, e_2 (observed, fixed)


def make_schedule(normalized=False):
    """Linear T = 1000 with a bridge (m_T = e_1 != 0: the prior mean matters) and a constant weight."""
    noise = schedules.noise_schedule("linear", NUM_STEPS)
    if normalized:
        noise = schedules.normalize_by_modalities(noise, 2)
    return schedules.diffusion_schedule(
        noise, [schedules.weight_schedule("bridge", noise, 1.0), schedules.weight_schedule("constant", noise, 0.3)]
    )


def stacked(encodings, batch_size):
    return jnp.broadcast_to(jnp.asarray(encodings, jnp.float32)[:, None], (len(encodings), batch_size, 2))


def gaussian_oracle(schedule, batch_size, mu=MU, s=S):
    """Exact eps for Gaussian data: z_t ~ N(sqrt(abar) mu + m_t, v_t I), v_t = abar s^2 + 1 - abar, and
    E[eps | z_t] = sqrt(1 - abar_t) (z_t - sqrt(abar_t) mu - m_t) / v_t."""
    encodings = stacked(ENCODINGS, batch_size)

    def denoise(z_t, t):
        alpha_bar = diffusion.at_step(schedule.alpha_bar, t, z_t)
        one_minus = diffusion.at_step(schedule.one_minus_alpha_bar, t, z_t)
        residual = z_t - jnp.sqrt(alpha_bar) * mu - diffusion.encoding_mean(schedule, z_t, t, encodings=encodings)
        return Prediction(one_minus**0.5 * residual / (alpha_bar * s**2 + one_minus), encodings, {"t": t})

    return denoise


def exact_ddpm_moments(schedule, mu, s):
    """Mean and variance of the (linear-Gaussian) DDPM chain driven by the oracle, in float64.

    u_t = z_t - m_t: u_{t-1} = A_t u_t + b_t + sigma_t xi with A_t = (1 - beta_t / v_t) / sqrt(alpha_t),
    b_t = beta_t sqrt(abar_t) mu / (v_t sqrt(alpha_t)), sigma_t^2 = beta~_t (0 at t = 1), u_T ~ N(0, 1).
    """
    beta = np.asarray(schedule.beta, np.float64)
    one_minus = np.asarray(schedule.one_minus_alpha_bar, np.float64)
    alpha_bar = 1.0 - one_minus
    mean, variance = np.zeros_like(mu), 1.0
    for t in range(len(beta) - 1, 0, -1):
        v = alpha_bar[t] * s**2 + one_minus[t]
        gain = (1.0 - beta[t] / v) / np.sqrt(1.0 - beta[t])
        mean = gain * mean + beta[t] * np.sqrt(alpha_bar[t]) * mu / (v * np.sqrt(1.0 - beta[t]))
        variance = gain**2 * variance + (beta[t] * one_minus[t - 1] / one_minus[t] if t > 1 else 0.0)
    return mean, variance


def test_respace_is_even_descending_and_includes_T():
    steps = respace(1000, 50)
    assert steps[0] == 1000 and steps[-1] == 20 and len(steps) == 50
    assert np.all(np.diff(steps) == -20)
    np.testing.assert_array_equal(respace(7, 7), np.arange(7, 0, -1))
    assert len(np.unique(respace(1000, 333))) == 333
    with pytest.raises(ValueError, match="num_steps"):
        respace(10, 11)


@pytest.mark.parametrize("normalized", [False, True], ids=["plain", "modality_normalized"])
def test_ddim_step_with_true_eps_lands_exactly_on_the_marginal(normalized):
    """From z_t = sqrt(abar_t) z_0 + m_t + sqrt(1 - abar_t) eps, an eta = 0 step to any s with the true eps
    gives sqrt(abar_s) z_0 + m_s + sqrt(1 - abar_s) eps: respacing is exact (also where abar_t underflows)."""
    schedule = make_schedule(normalized)
    keys = jax.random.split(jax.random.key(0), 2)
    z_0 = jax.random.normal(keys[0], (6, 2))
    eps = jax.random.normal(keys[1], (6, 2))
    encodings = stacked(ENCODINGS, 6)
    t = jnp.array([1000, 1000, 500, 37, 2, 1])
    s = jnp.array([980, 0, 100, 36, 1, 0])
    z_t = diffusion.marginal_sample(schedule, z_0, t, eps, encodings=encodings)
    z_s = ddim_step(schedule, z_t, t, s, Prediction(eps, encodings), jnp.zeros_like(z_0), eta=0.0)
    expected = diffusion.marginal_sample(schedule, z_0, s, eps, encodings=encodings)
    if normalized:
        # abar_t underflows float32 for t >~ 80; steps whose ratio abar_s / abar_t is still a float32 are exact
        # (1000 -> 980), the others (1000 -> 0) cannot recover z_0 from z_t in float32 at all.
        log_alpha_bar = np.cumsum(np.log(np.asarray(schedule.alpha, np.float64)))
        keep = log_alpha_bar[np.asarray(s)] - log_alpha_bar[np.asarray(t)] < 80
        assert keep.sum() == 4 and keep[0]
        np.testing.assert_allclose(np.asarray(z_s)[keep], np.asarray(expected)[keep], atol=2e-4)
    else:
        np.testing.assert_allclose(z_s, expected, atol=2e-4)


@pytest.mark.parametrize("normalized", [False, True], ids=["plain", "modality_normalized"])
def test_ddpm_reproduces_the_data_distribution(normalized):
    schedule = make_schedule(normalized)
    num_samples = 10_000 if not normalized else 2_000
    sample = jax.jit(lambda rng: ddpm_sample(gaussian_oracle(schedule, num_samples), schedule, rng, (num_samples, 2)))
    output = sample(jax.random.key(1))
    z_0 = np.asarray(output.z_0, np.float64)
    assert np.all(np.asarray(output.aux["t"]) == 1)  # aux from the last call, at t = 1
    mean, variance = z_0.mean(0), z_0.var(0)
    exact_mean, exact_variance = exact_ddpm_moments(schedule, MU, S)
    # Statistical tolerance: 5 standard errors around the exact moments of the sampler's chain.
    np.testing.assert_allclose(mean, exact_mean, atol=5 * np.sqrt(exact_variance / num_samples))
    np.testing.assert_allclose(variance, exact_variance, atol=5 * exact_variance * np.sqrt(2 / num_samples))
    if not normalized:
        # ... which, for T = 1000, are the data's: the small reverse variance costs 1.5% of S^2.
        np.testing.assert_allclose(exact_mean, MU, atol=1e-4)
        np.testing.assert_allclose(exact_variance, S**2, rtol=0.02)
        np.testing.assert_allclose(mean, MU, atol=5 * S / np.sqrt(num_samples))
        pooled_variance = variance.mean()  # two independent coordinates: SE = S^2 sqrt(2 / (2 n))
        np.testing.assert_allclose(pooled_variance, S**2, rtol=0.02 + 5 / np.sqrt(num_samples))
    else:
        # alpha_t / (N + 1) decays so fast that the Gaussian reverse steps cannot reach the data variance.
        assert exact_variance < 0.2 * S**2


def probability_flow_closed_form(schedule, prior_noise):
    """For Gaussian data the flow keeps the standardised coordinate: u_t = sqrt(abar_t) mu + sqrt(v_t) xi,
    so with z_T = m_T + xi_T: z_0 = mu + S (xi_T - sqrt(abar_T) mu) / sqrt(v_T)."""
    alpha_bar = float(schedule.alpha_bar[-1])
    return MU + S * (prior_noise - np.sqrt(alpha_bar) * MU) / np.sqrt(alpha_bar * S**2 + 1 - alpha_bar)


def test_probability_flow_closed_form_matches_an_ode_solver():
    """The closed form against solve_ivp on dxbar/dsigma = eps(sqrt(abar) xbar), abar = 1 / (1 + sigma^2),
    xbar = u / sqrt(abar), sigma = sqrt((1 - abar) / abar) (the VP probability-flow ODE, reparametrised)."""
    schedule = make_schedule()
    prior_noise = np.array([[-1.3, 0.4], [0.7, 2.1], [0.0, -2.5]])
    mu = np.broadcast_to(MU, prior_noise.shape).reshape(-1)
    alpha_bar_T = float(schedule.alpha_bar[-1])

    def eps(sigma, xbar):
        alpha_bar = 1.0 / (1.0 + sigma**2)
        u = np.sqrt(alpha_bar) * xbar
        return np.sqrt(1 - alpha_bar) * (u - np.sqrt(alpha_bar) * mu) / (alpha_bar * S**2 + 1 - alpha_bar)

    sigma_T = np.sqrt((1 - alpha_bar_T) / alpha_bar_T)
    xbar_T = prior_noise.reshape(-1) / np.sqrt(alpha_bar_T)  # u_T = z_T - m_T = the prior noise
    solution = solve_ivp(eps, (sigma_T, 0.0), xbar_T, rtol=1e-10, atol=1e-10)
    assert solution.success
    np.testing.assert_allclose(
        solution.y[:, -1].reshape(prior_noise.shape), probability_flow_closed_form(schedule, prior_noise), atol=1e-5
    )


def test_ddim_eta0_is_deterministic_and_follows_the_probability_flow():
    schedule = make_schedule()
    num_samples = 1_000
    prior_noise = jax.random.normal(jax.random.key(7), (num_samples, 2))
    flow = probability_flow_closed_form(schedule, np.asarray(prior_noise, np.float64))
    errors = {}
    for num_steps in (250, 1000):
        sample = jax.jit(
            lambda rng: (
                ddim_sample(
                    gaussian_oracle(schedule, num_samples),
                    schedule,
                    rng,
                    (num_samples, 2),
                    num_steps=num_steps,
                    prior_noise=prior_noise,
                ).z_0
            )
        )
        z_0 = np.asarray(sample(jax.random.key(1)))
        np.testing.assert_array_equal(z_0, np.asarray(sample(jax.random.key(2))))  # rng plays no part
        errors[num_steps] = np.abs(z_0 - flow).max()
    assert errors[1000] < 0.015
    assert errors[1000] < errors[250] / 2  # converges (first order) to the flow as steps are added


def test_ddim_eta1_on_the_full_schedule_is_ddpm():
    schedule = make_schedule()
    denoise = gaussian_oracle(schedule, 64)

    @jax.jit
    def samples():
        ddpm = ddpm_sample(denoise, schedule, jax.random.key(3), (64, 2)).z_0
        ddim = ddim_sample(denoise, schedule, jax.random.key(3), (64, 2), num_steps=NUM_STEPS, eta=1.0).z_0
        return ddpm, ddim, ddpm_sample(denoise, schedule, jax.random.key(4), (64, 2)).z_0

    ddpm, ddim, other = samples()
    np.testing.assert_allclose(ddim, ddpm, atol=1e-3)
    assert np.abs(np.asarray(other) - np.asarray(ddpm)).mean() > 0.1  # the match is not trivial


def test_exact_denoiser_samples_point_data_on_a_clipped_cosine_schedule():
    """Data concentrated at 0.3, the exact eps = (z_t - sqrt(abar_t) 0.3 - m_t) / sqrt(1 - abar_t) on the
    cosine T = 20 schedule with its default max_beta = 0.999 (and an observed bump modality): DDPM and DDIM
    land on 0.3."""
    noise = schedules.noise_schedule("cosine", 20)
    schedule = schedules.diffusion_schedule(noise, [schedules.weight_schedule("bump", noise, 1.0)])
    batch, point = 64, 0.3
    encodings = stacked(ENCODINGS[:1], batch)

    def denoise(z_t, t):
        alpha_bar = diffusion.at_step(schedule.alpha_bar, t, z_t)
        one_minus = diffusion.at_step(schedule.one_minus_alpha_bar, t, z_t)
        u_t = z_t - diffusion.encoding_mean(schedule, z_t, t, encodings=encodings)
        return Prediction((u_t - jnp.sqrt(alpha_bar) * point) / jnp.sqrt(one_minus), encodings)

    @jax.jit
    def samples(rng):
        return (
            ddpm_sample(denoise, schedule, rng, (batch, 2)).z_0,
            ddim_sample(denoise, schedule, rng, (batch, 2), num_steps=20).z_0,
            ddim_sample(denoise, schedule, rng, (batch, 2), num_steps=5, eta=1.0).z_0,
        )

    for z_0 in samples(jax.random.key(0)):
        np.testing.assert_allclose(z_0, point, atol=1e-5)


MIXTURE_MEANS = np.array([[2.0, 0.0], [-2.0, 1.0]])  # two equally likely classes, each N(mu_k, S^2 I)


def mixture_oracle(schedule, batch_size):
    """Exact eps of the two-class Gaussian mixture and, as aux, the exact class logits log p(y | z_t)."""
    encodings = stacked(ENCODINGS, batch_size)

    def denoise(z_t, t):
        alpha_bar = diffusion.at_step(schedule.alpha_bar, t, z_t)
        one_minus = diffusion.at_step(schedule.one_minus_alpha_bar, t, z_t)
        variance = alpha_bar * S**2 + one_minus
        u = z_t - diffusion.encoding_mean(schedule, z_t, t, encodings=encodings)
        residuals = u[:, None] - jnp.sqrt(alpha_bar)[:, None] * MIXTURE_MEANS  # [B, K, 2]
        logits = -jnp.sum(residuals**2, -1) / (2 * variance)
        responsibilities = jax.nn.softmax(logits, -1)[..., None]
        eps = jnp.sqrt(one_minus) * jnp.sum(responsibilities * residuals, 1) / variance
        return Prediction(eps, encodings, logits)

    return denoise


def test_guidance_at_scale_one_is_the_exact_class_conditional_eps():
    schedule = make_schedule()
    z_t = 3 * jax.random.normal(jax.random.key(0), (5, 2))
    t = jnp.array([1000, 700, 300, 50, 3])
    labels = jnp.array([0, 1, 1, 0, 1])
    guided = classifier_guidance(
        mixture_oracle(schedule, 5), schedule, lambda p: jax.nn.log_softmax(p.aux)[jnp.arange(5), labels], 1.0
    )
    conditional = gaussian_oracle(schedule, 5, mu=MIXTURE_MEANS[np.asarray(labels)])
    np.testing.assert_allclose(guided(z_t, t).eps, conditional(z_t, t).eps, atol=1e-5)


def test_guided_ddpm_samples_the_chosen_class():
    schedule = make_schedule()
    num_samples = 2_000
    labels = jnp.ones(num_samples, jnp.int32)

    def sample(rng, scale):
        guided = classifier_guidance(
            mixture_oracle(schedule, num_samples),
            schedule,
            lambda p: jax.nn.log_softmax(p.aux)[jnp.arange(num_samples), labels],
            scale,
        )
        return ddpm_sample(guided, schedule, rng, (num_samples, 2)).z_0

    z_0 = np.asarray(jax.jit(sample)(jax.random.key(0), 1.0))
    np.testing.assert_allclose(z_0.mean(0), MIXTURE_MEANS[1], atol=5 * S / np.sqrt(num_samples))
    np.testing.assert_allclose(z_0.var(0), S**2, rtol=0.15)
    unguided = np.asarray(jax.jit(sample)(jax.random.key(0), 0.0))
    assert 0.4 < np.mean(unguided[:, 0] < 0) < 0.6  # scale 0: both classes


def test_known_region_hook_keeps_known_pixels_and_the_marginal():
    schedule = make_schedule()
    num_samples = 20_000
    x_known = jnp.broadcast_to(jnp.array([0.5, -0.25]), (num_samples, 2))
    mask = jnp.array([1.0, 0.0])
    hook = known_region_hook(schedule, x_known, mask)
    encodings = stacked(ENCODINGS, num_samples)
    z = jnp.full((num_samples, 2), 7.0)
    at_zero = hook(z, jnp.zeros(num_samples, jnp.int32), encodings, jax.random.key(0))
    np.testing.assert_array_equal(at_zero[:, 0], 0.5)  # s = 0: exactly the known pixel
    np.testing.assert_array_equal(at_zero[:, 1], 7.0)  # unknown pixels untouched
    s = jnp.full(num_samples, 400)
    at_400 = np.asarray(hook(z, s, encodings, jax.random.key(1)))[:, 0]
    mean = np.asarray(diffusion.marginal_mean(schedule, x_known, s, encodings=encodings))[0, 0]
    variance = float(schedule.one_minus_alpha_bar[400])
    assert abs(at_400.mean() - mean) < 5 * np.sqrt(variance / num_samples)
    assert abs(at_400.var() / variance - 1) < 5 * np.sqrt(2 / num_samples)


def test_sdedit_with_an_exact_denoiser_lands_on_point_data_and_refuses_bad_input():
    """Data concentrated at 0.3 and its exact eps (N = 0): SDEdit from any guide, at any strength, with or without
    step noise, ends on 0.3."""
    noise = schedules.noise_schedule("linear", NUM_STEPS)
    schedule = schedules.diffusion_schedule(noise, [])
    point = 0.3

    def denoise(z_t, t):
        alpha_bar = diffusion.at_step(schedule.alpha_bar, t, z_t)
        one_minus = diffusion.at_step(schedule.one_minus_alpha_bar, t, z_t)
        return Prediction((z_t - jnp.sqrt(alpha_bar) * point) / jnp.sqrt(one_minus))

    guide = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (16, 2)), jnp.float32)
    for strength, eta in ((0.3, 0.0), (1.0, 1.0), (0.05, 1.0)):
        output = sdedit_sample(denoise, schedule, jax.random.key(1), guide, strength=strength, num_steps=20, eta=eta)
        np.testing.assert_allclose(output.z_0, point, atol=1e-4)
    with pytest.raises(ValueError, match="strength must lie in"):
        sdedit_sample(denoise, schedule, jax.random.key(1), guide, strength=0.0, num_steps=20)
    with pytest.raises(ValueError, match="plain diffusion models"):
        sdedit_sample(denoise, make_schedule(), jax.random.key(1), guide, strength=0.5, num_steps=20)


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from tests.test_sampling_samplers import gaussian_oracle, make_schedule
    from mmdiff_jax.sampling import ddim_sample
    assert jax.device_count() == 2
    schedule = make_schedule()
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
    def run(rng, sharding):
        return ddim_sample(gaussian_oracle(schedule, 8), schedule, rng, (8, 2), num_steps=20, eta=0.5,
                           sharding=sharding).z_0
    sharded = jax.jit(run, static_argnums=1)(jax.random.key(0), sharding)
    assert sharded.sharding.is_equivalent_to(sharding, 2), sharded.sharding
    assert len(sharded.addressable_shards) == 2 and sharded.addressable_shards[0].data.shape == (4, 2)
    np.testing.assert_allclose(sharded, jax.jit(run, static_argnums=1)(jax.random.key(0), None), atol=1e-5)
    print("ok")
""")


def test_batch_sharded_sampling_on_two_devices():
    """Two forced CPU devices: the batch stays split over the 'data' axis and the samples are unchanged."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=root,
    )
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_pure_layers_import_without_flax():
    """The math and the pure samplers are importable into a user's JAX code without Flax or the models
    (`mmdiff_jax.sampling` loads its Flax-backed wiring only when one of its names is used)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = (
        "import sys\n"
        "import mmdiff_jax.schedules, mmdiff_jax.diffusion, mmdiff_jax.targets, mmdiff_jax.losses, mmdiff_jax.bound\n"
        "import mmdiff_jax.resample\n"
        "from mmdiff_jax.sampling import samplers, dpm_solver, guidance, restoration, methods\n"
        "assert 'flax' not in sys.modules, sorted(m for m in sys.modules if m.startswith(('flax', 'mmdiff')))\n"
        "from mmdiff_jax.sampling import make_sample_fn\n"
        "assert 'flax' in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
