"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095) over the multi-modal chain (docs/design.md section 3c); no Flax.

As for DDIM (`samplers` module docstring), the solver runs on the plain DDPM chain u_t = z_t - m_t,
u_t = alpha_t u_0 + sigma_t eps with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), and adds m_s back with
the prediction's ehat. In half-log-SNR time lambda_t = log(alpha_t / sigma_t) the probability-flow ODE for the
data prediction x_theta(u_t, t) = u0hat (`diffusion.z0_from_eps`, clipped to [-1, 1] with `clip_denoised`) is
solved exactly in its linear part (the exponential integrator); from t to s < t, h = lambda_s - lambda_t > 0:

  order 1 (= DDIM, eta = 0):  u_s = (sigma_s / sigma_t) u_t - alpha_s phi_1 x_t,          phi_1 = expm1(-h)
  2M (multistep, one earlier prediction x_1 at t_1 > t; r = (lambda_t - lambda_{t_1}) / h):
                              u_s = order 1 - 0.5 alpha_s phi_1 (x_t - x_1) / r
  3M (two earlier, x_1 at t_1 and x_2 at t_2; r_0 = (lambda_t - lambda_{t_1}) / h, r_1 = (lambda_{t_1} -
      lambda_{t_2}) / h, D_0 = (x_t - x_1) / r_0, D_1 = (x_1 - x_2) / r_1):
                              u_s = order 1 + alpha_s phi_2 (D_0 + r_0 (D_0 - D_1) / (r_0 + r_1))
                                    - alpha_s phi_3 (D_0 - D_1) / (r_0 + r_1),
                              phi_2 = phi_1 / h + 1,  phi_3 = phi_2 / h - 1/2
  2S (single step, a second model call at the step m between s and t nearest lambda_t + h / 2,
      r = (lambda_m - lambda_t) / h; u_m by order 1 from t):
                              u_s = order 1 - 0.5 alpha_s phi_1 (x_m - x_t) / r

Multistep solvers start at order 1 and rise as earlier predictions become available; the last step into
s = 0 (sigma_0 = 0, lambda_0 = inf) is order 1, which there gives u_0 = alpha_0 x_t exactly as DDIM does.
One model call per step (2S: two, except on steps with no integer step strictly between s and t, which
fall back to order 1). The discrete chain is respected: every step is an integer step of the model's
schedule, and the solver uses the exact alpha, sigma and lambda there.

Step spacing: 'time_uniform' (DDIM's `respace`) or 'logsnr' (uniform in lambda from T to step 1, each
rounded to the nearest integer step, kept strictly descending).

Zero terminal SNR (lambda_T = -inf, docs/design.md section 3d): x_T is the denoiser's own z_0, and the order-1
update from T is its limit u_s = sigma_s u_T + alpha_s x_T; the step after it is first order (its difference
with x_T is divided by r = inf), 2S makes no midpoint call from T, and 'logsnr' spacing starts from lambda_{T-1}.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmdiff_jax import diffusion
from mmdiff_jax.sampling.samplers import Denoise, Prediction, SamplerOutput, StepHook, denoised, respace, run_chain
from mmdiff_jax.schedules import DiffusionSchedule

Array = jax.Array
SPACINGS = ("time_uniform", "logsnr")
VARIANTS = ("2M", "3M", "2S", "1")  # '1': first order (DDIM with eta = 0, in this solver's arithmetic)


def half_log_snr(schedule: DiffusionSchedule) -> np.ndarray:
    """lambda_t = log(alpha_t / sigma_t) = (log abar_t - log(1 - abar_t)) / 2 for t = 0..T, float64 [T + 1]
    (lambda_0 = inf where abar_0 = 1)."""
    log_alpha, log_sigma = _log_alpha_sigma(schedule)
    return log_alpha - log_sigma


def _log_alpha_sigma(schedule: DiffusionSchedule) -> tuple[np.ndarray, np.ndarray]:
    """(log alpha_t, log sigma_t), t = 0..T, float64 on the host (the schedule must be concrete: closed over,
    not a jit argument)."""
    with np.errstate(divide="ignore"):  # log 0: lambda_0 = inf, and lambda_T = -inf at zero terminal SNR
        log_abar = np.cumsum(np.log(np.asarray(schedule.alpha, np.float64)))
        return 0.5 * log_abar, 0.5 * np.log(-np.expm1(log_abar))


def solver_timesteps(schedule: DiffusionSchedule, num_steps: int, spacing: str = "time_uniform") -> np.ndarray:
    """The chain's steps, int32 [num_steps + 1]: T first, 0 last, strictly descending; `num_steps` updates."""
    T = schedule.num_steps
    if spacing not in SPACINGS:
        raise ValueError(f"unknown step spacing {spacing!r}; known: {SPACINGS}")
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must lie in 1..T = 1..{T}, got {num_steps}")
    if spacing == "time_uniform":
        steps = respace(T, num_steps)
    else:
        lam = half_log_snr(schedule)[1:]  # lambda_1 .. lambda_T, decreasing in t
        start = lam[-1] if np.isfinite(lam[-1]) else lam[-2]  # lambda_T = -inf at zero terminal SNR (T is kept)
        targets = np.linspace(start, lam[0], num_steps)  # from lambda_T up to lambda_1
        steps = 1 + np.searchsorted(-lam, -targets).clip(0, T - 1)  # the first t with lambda_t <= target
        nearer = (steps > 1) & (np.abs(lam[steps - 2] - targets) < np.abs(lam[steps - 1] - targets))
        steps = np.where(nearer, steps - 1, steps)
        steps[0] = T
        for index in range(1, num_steps):  # strictly descending and room for the steps still to come
            steps[index] = min(max(steps[index], num_steps - index), steps[index - 1] - 1)
    return np.concatenate([steps, [0]]).astype(np.int32)


def data_prediction(
    schedule: DiffusionSchedule, z_t: Array, t: Array, prediction: Prediction, clip_denoised: bool
) -> Array:
    """x_theta = u0hat = (u_t - sigma_t eps) / alpha_t (the prediction's own z_0 where alpha_t = 0), clipped to
    [-1, 1] with `clip_denoised` (`samplers.denoised`)."""
    return denoised(schedule, z_t, jnp.broadcast_to(t, z_t.shape[:1]), prediction, clip_denoised)[1]


def midpoint_steps(schedule: DiffusionSchedule, timesteps: np.ndarray) -> np.ndarray:
    """2S's second model call on each step t -> s of the chain `timesteps`: the integer step strictly between s
    and t nearest the half-way point in lambda, or -1 where there is none (or s = 0, or lambda_t = -inf at a
    zero-terminal-SNR T, which has no half-way point), [len(timesteps) - 1]."""
    log_alpha, log_sigma = _log_alpha_sigma(schedule)
    lam = log_alpha - log_sigma
    midpoints = []
    for t, s in zip(timesteps[:-1], timesteps[1:]):
        inside = np.arange(s + 1, t)
        if s == 0 or not len(inside) or not np.isfinite(lam[t]):
            midpoints.append(-1)
            continue
        target = lam[t] + 0.5 * (lam[s] - lam[t])
        midpoints.append(int(inside[np.argmin(np.abs(lam[inside] - target))]))
    return np.asarray(midpoints, np.int32)


def model_calls(schedule: DiffusionSchedule, num_steps: int, variant: str = "2M", spacing: str = "time_uniform") -> int:
    """Denoiser calls of one `dpm_solver_sample` chain (the prior's refinement calls not counted): one per step,
    and for '2S' one more on every step with a midpoint (`midpoint_steps`)."""
    if variant != "2S":
        return num_steps
    return num_steps + int(np.sum(midpoint_steps(schedule, solver_timesteps(schedule, num_steps, spacing)) >= 0))


def dpm_solver_sample(
    denoise: Denoise,
    schedule: DiffusionSchedule,
    rng: Array,
    shape: tuple[int, ...],
    *,
    num_steps: int = 20,
    variant: str = "2M",
    spacing: str = "time_uniform",
    timesteps: np.ndarray | None = None,
    clip_denoised: bool = False,
    prior_noise: Array | None = None,
    prior_refinements: int = 1,
    step_hook: StepHook | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> SamplerOutput:
    """DPM-Solver++ from z_T ~ N(m_T, I) (module docstring); deterministic given the prior noise.

    Args:
      variant: '2M' (default), '3M', '2S' or '1' (first order). num_steps: solver steps (model calls; '2S'
        makes up to two per step). spacing: 'time_uniform' or 'logsnr'. timesteps: an explicit chain instead
        (descending ints from T to its end, e.g. `solver_timesteps(...)`; an end above 0 stops there).
      Other arguments as `samplers.ddim_sample`.
    Returns:
      SamplerOutput(z at the chain's end [B, *S], the denoiser's aux from its last call at a chain step).
    Raises:
      ValueError: unknown variant or spacing, or a malformed chain.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown DPM-Solver++ variant {variant!r}; known: {VARIANTS}")
    if timesteps is None:
        timesteps = solver_timesteps(schedule, num_steps, spacing)
    timesteps = np.asarray(timesteps, np.int32)
    log_alpha, log_sigma = _log_alpha_sigma(schedule)
    log_alpha, log_sigma, lam = (jnp.asarray(x, jnp.float32) for x in (log_alpha, log_sigma, log_alpha - log_sigma))
    midpoints = midpoint_steps(schedule, timesteps)
    order = {"1": 1, "2M": 2, "3M": 3, "2S": 1}[variant]
    # Each step's order: rises with the predictions available, order 1 into s = 0 (lambda_0 = inf).
    orders = np.minimum(order, np.arange(1, len(timesteps)))
    orders[timesteps[1:] == 0] = 1
    orders, midpoints = jnp.asarray(orders), jnp.asarray(midpoints, jnp.int32)

    def first_order(u_t, x_t, t, s):
        phi_1 = jnp.expm1(lam[t] - lam[s])
        return jnp.exp(log_sigma[s] - log_sigma[t]) * u_t - jnp.exp(log_alpha[s]) * phi_1 * x_t

    def step(z_t, t, s, prediction, noise, state):
        del noise
        index, history, history_lambda = state
        encodings = prediction.estimated_encodings
        x_t = data_prediction(schedule, z_t, t, prediction, clip_denoised)
        u_t = z_t - diffusion.encoding_mean(schedule, z_t, t, encodings=encodings)
        u_s = u_first = first_order(u_t, x_t, t, s)
        step_order = orders[index]
        h = lam[s] - lam[t]
        alpha_s, phi_1 = jnp.exp(log_alpha[s]), jnp.expm1(-h)
        if variant in ("2M", "3M"):
            r_0 = (lam[t] - history_lambda[0]) / h
            d_0 = (x_t - history[0]) / r_0
            second = u_s - 0.5 * alpha_s * phi_1 * d_0
            u_s = jnp.where(step_order >= 2, second, u_s)
            if variant == "3M":
                r_1 = (history_lambda[0] - history_lambda[1]) / h
                d_1 = (history[0] - history[1]) / r_1
                phi_2 = phi_1 / h + 1.0
                phi_3 = phi_2 / h - 0.5
                third = (
                    u_first
                    + alpha_s * phi_2 * (d_0 + r_0 * (d_0 - d_1) / (r_0 + r_1))
                    - alpha_s * phi_3 * (d_0 - d_1) / (r_0 + r_1)
                )
                u_s = jnp.where(step_order >= 3, third, u_s)
        elif variant == "2S":
            m = midpoints[index]

            def second_order(u_s):  # the midpoint's model call, only on steps that have one (lax.cond)
                u_m = first_order(u_t, x_t, t, m)
                z_m = u_m + diffusion.encoding_mean(schedule, z_t, m, encodings=encodings)
                x_m = data_prediction(schedule, z_m, m, denoise(z_m, jnp.full(z_t.shape[:1], m)), clip_denoised)
                return u_s - 0.5 * alpha_s * phi_1 * (x_m - x_t) / ((lam[m] - lam[t]) / h)

            u_s = jax.lax.cond(m > 0, second_order, lambda u_s: u_s, u_s)
        z_s = u_s + diffusion.encoding_mean(schedule, z_t, s, encodings=encodings)
        history = jnp.stack([x_t, history[0]])
        history_lambda = jnp.stack([lam[t], history_lambda[0]])
        return z_s, (index + 1, history, history_lambda)

    zeros = jnp.zeros((2,) + tuple(shape), jnp.float32)
    state: Any = (jnp.zeros((), jnp.int32), zeros, jnp.zeros((2,), jnp.float32))
    return run_chain(
        denoise,
        schedule,
        step,
        timesteps,
        rng,
        shape,
        prior_noise=prior_noise,
        prior_refinements=prior_refinements,
        step_hook=step_hook,
        sharding=sharding,
        stochastic=False,
        state=state,
    )
