"""Ancestral (DDPM) and DDIM samplers over a generic denoiser (docs/design.md section 3); no Flax.

A denoiser is any function `denoise(z_t, t) -> Prediction(eps, estimated_encodings, aux, ..., z_0)` with
  z_t [B, *S], t [B] int32 in 1..T  ->  eps [B, *S], estimated_encodings [N, B, *S] (ehat_i; None: N = 0),
  aux (any pytree), z_0 [B, *S] or None (the denoiser's own z_0, needed only at a zero-terminal-SNR T).
ehat_i is E_i(x_i) for observed modalities and E_i(D_i(h_theta(z_t, t))) for the rest (the model layer
decides, see `sampling.conditional`); `aux` (e.g. the heads' outputs) is returned from the last call.

The samplers rest on the key identity of the forward process (docs/design.md section 2): u_t = z_t - m_t,
m_t = sum_i lambda_t^(i) e_i, is a plain DDPM chain, u_t = sqrt(abar_t) u_0 + sqrt(1 - abar_t) eps with
u_0 = z_0. Everything DDPM/DDIM knows applies to u; the encodings only shift z by m_t.

Prior.  q(z_T | z_0, X) ~ N(m_T, I) (abar_T ~ 0), so z_T = xi + m_T, xi ~ N(0, I). m_T needs ehat, and
ehat of an unobserved modality depends on z_T: `prior_sample` solves z = xi + m_T(ehat(z, T)) by
`refinements` fixed-point steps from z = xi. Observed ehat_i = e_i do not depend on z, so one step
already gives their exact contribution lambda_T^(i) e_i (bridge schedules: z_T carries the source).

DDPM (ancestral, every step t -> t - 1):
  z_{t-1} = mu_theta + sigma_t xi,  mu_theta = (z_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) - a_t,
  a_t = sum_i w_t^(i) ehat_i (`diffusion.reverse_mean`), sigma_t^2 = beta~_t or beta_t, no noise at t = 1.

DDIM (from t to any s < t of a respaced subsequence; s = 0 at the end).  DDIM's family for the plain
chain u,  q_sigma(u_s | u_t, u_0) = N( sqrt(abar_s) u_0 + sqrt(1 - abar_s - sigma^2) (u_t - sqrt(abar_t) u_0)
/ sqrt(1 - abar_t), sigma^2 I ),  has the marginal q(u_s | u_0) = N(sqrt(abar_s) u_0, (1 - abar_s) I) for any
sigma: that of z_s - m_s. Plugging the model's u_0-estimate
  z0hat = (z_t - m_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)            (`diffusion.z0_from_eps`, ehat in m_t)
(so that (u_t - sqrt(abar_t) z0hat) / sqrt(1 - abar_t) = eps) and adding m_s back:
  z_s = sqrt(abar_s) z0hat + sqrt(1 - abar_s - sigma_ts^2) eps + m_s + sigma_ts xi,
  sigma_ts^2 = eta^2 (1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s),
with m_t, m_s = sum_i lambda^(i) ehat_i from the prediction at t. Only abar and lambda of the original
schedule at the kept steps enter, so respacing is exact: no betas or weights of a shorter chain are needed.
- eta = 1, s = t - 1 gives sigma^2 = beta~_t and exactly the DDPM step with the small variance (u's
  posterior mean plus m_{t-1}, which equals mu_theta since m_t = sqrt(alpha_t) (m_{t-1} + a_t)); on a
  respaced subsequence eta = 1 is the ancestral sampler of the shorter chain.
- eta = 0 is deterministic: with xbar = u / sqrt(abar), sigma = sqrt((1 - abar) / abar) the step reads
  xbar_s = xbar_t + (sigma_s - sigma_t) eps, the Euler step of the probability-flow ODE dxbar/dsigma = eps.

`clip_denoised` clips z0hat to [-1, 1] (pixel images) and recomputes eps from it (`diffusion.eps_from_z0`)
before either update (`denoised`). Both samplers are `jax.lax.scan`s; trace them inside `jax.jit` (the model
layer's `make_sample_fn` does) with the number of steps static.

Zero terminal SNR (abar_T = 0, docs/design.md section 3d).  At T, eps = u_T says nothing about z_0: the
denoiser's own z_0 (`Prediction.z_0`, given by v and z_0 targets, `prediction_from_output`) replaces the eps-based
z0hat where alpha_t = 0, DDPM takes the z0-form of the posterior mean there and DDIM sqrt(abar_s) z0hat; a chain
on such a schedule whose denoiser gives no z_0 is refused before tracing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmdiff_jax import diffusion, targets
from mmdiff_jax.schedules import DiffusionSchedule, has_zero_terminal_snr

Array = jax.Array


class Prediction(NamedTuple):
    """What a denoiser returns at (z_t [B, *S], t [B] int32 in 1..T): its eps (converted from the network's own
    target first: `prediction_from_output`), the estimated encodings that make up m_t and a_t, anything the caller
    wants back (`aux`), and, optionally, a learned variance and its own z_0. Guidance combines every leaf."""

    eps: Array  # [B, *S]
    estimated_encodings: Array | None = None  # [N, B, *S], ehat_i; None for a model with N = 0
    aux: Any = None  # any pytree (e.g. the heads' outputs); the samplers return the last one
    # [B, *S], a learned reverse variance (`diffusion.reverse_log_variance`'s interpolation): DDPM steps use it
    # in place of their fixed `variance`; DDIM and DPM-Solver do not read a variance.
    variance_interpolation: Array | None = None
    # [B, *S], the denoiser's own z_0 estimate where its target gives one at every step (v, z_0; None for eps, whose
    # z_0 is derived from eps). Read only where alpha_t = 0 (the last step of a zero-terminal-SNR schedule), where
    # eps = u_T carries no information about z_0 (docs/design.md section 3d).
    z_0: Array | None = None


class SamplerOutput(NamedTuple):
    z_0: Array  # [B, *S]
    aux: Any  # the denoiser's aux from its last call (at the smallest step of the chain)


Denoise = Callable[[Array, Array], Prediction]
# step_hook(z_s, s [B], estimated_encodings [N, B, *S], key) -> z_s: runs after every step (e.g. RePaint).
StepHook = Callable[[Array, Array, Array, Array], Array]


def respace(num_diffusion_steps: int, num_steps: int) -> np.ndarray:
    """`num_steps` evenly spaced steps of 1..T, descending, always including T: int32 [num_steps].

    round(linspace(T, 0, K + 1)) without its final 0; the smallest step is round(T / K) >= 1 and
    K = T gives T, T - 1, ..., 1.
    """
    if not 1 <= num_steps <= num_diffusion_steps:
        raise ValueError(f"num_steps must lie in 1..T = 1..{num_diffusion_steps}, got {num_steps}")
    steps = np.round(np.linspace(num_diffusion_steps, 0, num_steps + 1))[:-1].astype(np.int32)
    assert len(np.unique(steps)) == num_steps and steps[0] == num_diffusion_steps
    return steps


def _constrain(x: Array, sharding: jax.sharding.Sharding | None) -> Array:
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def prediction_from_output(
    schedule: DiffusionSchedule,
    z_t: Array,
    t: Array,
    output: Array,
    kind: str,
    *,
    encodings: Array | None = None,
    **fields: Any,
) -> Prediction:
    """The samplers' `Prediction` from a network's output of target `kind` ('eps', 'v', 'z_0') at (z_t, t): eps by
    `targets.eps_from_prediction` (ehat = `encodings` in m_t), and for 'v' and 'z_0' the network's own z_0
    (`targets.model_z0`), which the samplers read where abar_t = 0. `fields`: aux, variance_interpolation."""
    eps = targets.eps_from_prediction(schedule, z_t, t, output, kind, encodings=encodings)
    z_0 = targets.model_z0(schedule, z_t, t, output, kind, encodings=encodings)
    return Prediction(eps, encodings, z_0=z_0, **fields)


def denoised(
    schedule: DiffusionSchedule, z_t: Array, t: Array, prediction: Prediction, clip_denoised: bool = False
) -> tuple[Array, Array]:
    """(eps, z0hat) of a prediction at (z_t, t): z0hat = `diffusion.z0_from_eps` with its ehat in m_t, or the
    prediction's own z_0 where alpha_t = 0 (`diffusion.is_terminal`). With `clip_denoised`, z0hat is clipped to
    [-1, 1] and eps recomputed from it (`diffusion.eps_from_z0`, the same ehat)."""
    encodings = prediction.estimated_encodings
    z_0 = diffusion.z0_from_eps(schedule, z_t, t, prediction.eps, encodings=encodings)
    if prediction.z_0 is not None:
        z_0 = jnp.where(diffusion.is_terminal(schedule, t, z_t), prediction.z_0, z_0)
    if not clip_denoised:
        return prediction.eps, z_0
    # Where abar_t underflows z0hat is inf but irrelevant: eps_from_z0 weighs it by sqrt(abar_t) = 0.
    z_0 = jnp.clip(jnp.nan_to_num(z_0), -1.0, 1.0)
    return diffusion.eps_from_z0(schedule, z_t, t, z_0, encodings=encodings), z_0


def prior_sample(denoise: Denoise, schedule: DiffusionSchedule, noise: Array, *, refinements: int = 1) -> Array:
    """z_T = xi + m_T(ehat), xi = `noise` [B, *S]; ehat by `refinements` fixed-point steps (see module doc).

    With N = 0 or refinements = 0 this is z_T = xi (the plain N(0, I) prior).
    """
    t = jnp.full(noise.shape[:1], schedule.num_steps, jnp.int32)
    z_T = noise
    for _ in range(refinements if schedule.num_modalities else 0):
        encodings = denoise(z_T, t).estimated_encodings
        z_T = noise + diffusion.encoding_mean(schedule, noise, t, encodings=encodings.astype(noise.dtype))
    return z_T


def ddpm_step(
    schedule: DiffusionSchedule,
    z_t: Array,
    t: Array,
    prediction: Prediction,
    noise: Array,
    *,
    variance: str = "small",
    clip_denoised: bool = False,
) -> Array:
    """One ancestral step t -> t - 1 (t [B] or [] in 1..T): mu_theta + sigma_t noise, no noise where t = 1.

    sigma_t^2: the prediction's learned variance where it has one, else `variance` ('small' or 'large')."""
    eps, z_0 = denoised(schedule, z_t, t, prediction, clip_denoised)
    mean = diffusion.reverse_mean(
        schedule,
        z_t,
        t,
        eps,
        encodings=prediction.estimated_encodings,
        z0_prediction=None if prediction.z_0 is None else z_0,
    )
    log_variance = diffusion.reverse_log_variance(schedule, t, variance, prediction.variance_interpolation)
    scale = jnp.exp(0.5 * diffusion.expand_to(log_variance, z_t))
    return mean + jnp.where(diffusion.expand_to(t > 1, z_t), scale, 0.0) * noise


def _log_alpha_bar(schedule: DiffusionSchedule) -> Array:
    """log abar_t = sum_{r<=t} log alpha_r, [T + 1]: finite where abar_t underflows float32 (long
    `modality_normalized` chains), so ratios abar_s / abar_t stay exact."""
    return jnp.cumsum(jnp.log(schedule.alpha))


def ddim_sigma(schedule: DiffusionSchedule, t: Array, s: Array, eta: float | Array) -> Array:
    """sigma_ts = eta sqrt( (1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s) ), shape t.shape; 0 at s = 0."""
    log_alpha_bar = _log_alpha_bar(schedule)
    decay = -jnp.expm1(log_alpha_bar[t] - log_alpha_bar[s])  # 1 - abar_t / abar_s
    one_minus_t, one_minus_s = schedule.one_minus_alpha_bar[t], schedule.one_minus_alpha_bar[s]
    return eta * jnp.sqrt(jnp.maximum(one_minus_s / one_minus_t * decay, 0.0))


def ddim_step(
    schedule: DiffusionSchedule,
    z_t: Array,
    t: Array,
    s: Array,
    prediction: Prediction,
    noise: Array,
    *,
    eta: float | Array = 0.0,
    clip_denoised: bool = False,
) -> Array:
    """One DDIM step t -> s (t, s [B] or [], t in 1..T, s in 0..t-1), eq. in the module docstring:

    z_s = sqrt(abar_s) z0hat + sqrt(1 - abar_s - sigma_ts^2) eps + m_s + sigma_ts noise,
    computed as sqrt(abar_s / abar_t) (z_t - m_t - sqrt(1 - abar_t) eps) + ... (the ratio from log abar), which
    stays finite where abar_t underflows; where abar_t = 0 (the last step of a zero-terminal-SNR schedule) the
    prediction's own z_0 gives sqrt(abar_s) z0hat.
    """
    encodings = prediction.estimated_encodings
    eps, z_0 = denoised(schedule, z_t, t, prediction, clip_denoised)
    log_alpha_bar = _log_alpha_bar(schedule)
    signal_ratio = jnp.exp(0.5 * (diffusion.at_step(log_alpha_bar, s, z_t) - diffusion.at_step(log_alpha_bar, t, z_t)))
    u_t = z_t - diffusion.encoding_mean(schedule, z_t, t, encodings=encodings)
    scaled_z_0 = signal_ratio * (u_t - jnp.sqrt(diffusion.at_step(schedule.one_minus_alpha_bar, t, z_t)) * eps)
    if prediction.z_0 is not None:
        terminal = diffusion.is_terminal(schedule, t, z_t)
        scaled_z_0 = jnp.where(terminal, jnp.sqrt(diffusion.at_step(schedule.alpha_bar, s, z_t)) * z_0, scaled_z_0)
    sigma = diffusion.expand_to(ddim_sigma(schedule, t, s, eta), z_t)
    direction = jnp.sqrt(jnp.maximum(diffusion.at_step(schedule.one_minus_alpha_bar, s, z_t) - sigma**2, 0.0))
    return scaled_z_0 + direction * eps + diffusion.encoding_mean(schedule, z_t, s, encodings=encodings) + sigma * noise


# step(z_t, t, s, prediction, noise, state) -> (z_s, state): one update t -> s (scalars), `state` any pytree the
# sampler carries from step to step (a multistep solver's earlier predictions; () for DDPM / DDIM).
Step = Callable[[Array, Array, Array, Prediction, Array, Any], tuple[Array, Any]]


def run_chain(
    denoise: Denoise,
    schedule: DiffusionSchedule,
    step: Step,
    timesteps: np.ndarray,
    rng: Array,
    shape: tuple[int, ...],
    *,
    prior_noise: Array | None = None,
    prior_refinements: int = 1,
    step_hook: StepHook | None = None,
    sharding: jax.sharding.Sharding | None = None,
    stochastic: bool = True,
    state: Any = (),
) -> SamplerOutput:
    """The prior at T, then a `lax.scan` of `step` over the pairs (t, s) of `timesteps` (descending int, first T,
    last the end of the chain, usually 0), one model call per pair; `stochastic` False skips drawing the step
    noise (it would be multiplied by 0). `state`: the step's initial carry."""
    shape = tuple(shape)
    timesteps = np.asarray(timesteps, np.int32)
    if (
        timesteps.ndim != 1
        or len(timesteps) < 2
        or np.any(np.diff(timesteps) >= 0)
        or timesteps[-1] < 0
        or timesteps[0] != schedule.num_steps
    ):
        raise ValueError(
            f"timesteps must descend strictly from T = {schedule.num_steps} to an end >= 0, got {timesteps.tolist()}"
        )
    prior_key, chain_key = jax.random.split(rng)
    if prior_noise is None:
        prior_noise = jax.random.normal(prior_key, shape, jnp.float32)
    elif prior_noise.shape != shape:
        raise ValueError(f"prior_noise must have shape {shape}, got {prior_noise.shape}")
    z_T = _constrain(
        prior_sample(denoise, schedule, _constrain(prior_noise, sharding), refinements=prior_refinements), sharding
    )
    batch = shape[:1]
    prediction_shape = jax.eval_shape(denoise, z_T, jnp.ones(batch, jnp.int32))
    if prediction_shape.z_0 is None and has_zero_terminal_snr(schedule):
        raise ValueError(
            "a zero-terminal-SNR schedule (abar_T = 0) needs a denoiser that predicts z_0 itself (Prediction.z_0: "
            "a model with the 'v' or 'z_0' target): from z_T = eps alone z_0 cannot be recovered"
        )
    aux = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), prediction_shape.aux)

    def body(carry, inputs):
        z_t, _, state = carry
        t_step, s_step, key = inputs
        noise_key, hook_key = jax.random.split(key)
        prediction = denoise(z_t, jnp.full(batch, t_step))
        noise = jax.random.normal(noise_key, shape, jnp.float32) if stochastic else jnp.zeros(shape, jnp.float32)
        noise = _constrain(noise, sharding)
        # The step is the same for the whole batch: scalar steps broadcast and spare per-example gathers.
        z_s, state = step(z_t, t_step, s_step, prediction, noise, state)
        if step_hook is not None:
            z_s = step_hook(z_s, jnp.full(batch, s_step), prediction.estimated_encodings, hook_key)
        return (_constrain(z_s.astype(jnp.float32), sharding), prediction.aux, state), None

    keys = jax.random.split(chain_key, len(timesteps) - 1)
    (z_0, aux, _), _ = jax.lax.scan(
        body, (z_T, aux, state), (jnp.asarray(timesteps[:-1]), jnp.asarray(timesteps[1:]), keys)
    )
    return SamplerOutput(z_0, aux)


def _with_end(steps: np.ndarray) -> np.ndarray:
    return np.concatenate([steps, [0]]).astype(np.int32)


def ddpm_sample(
    denoise: Denoise,
    schedule: DiffusionSchedule,
    rng: Array,
    shape: tuple[int, ...],
    *,
    variance: str = "small",
    clip_denoised: bool = False,
    prior_noise: Array | None = None,
    prior_refinements: int = 1,
    step_hook: StepHook | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> SamplerOutput:
    """Ancestral sampling over all T steps: z_T ~ N(m_T, I), then T `ddpm_step`s.

    Args:
      denoise: the denoiser (module docstring). schedule: the model's schedule (N weight rows).
      rng: drives the prior noise (unless `prior_noise` [B, *S] is given) and every step's noise.
      shape: (B, *S). variance: 'small' (beta~_t) or 'large' (beta_t).
      clip_denoised: clip z0hat to [-1, 1] at every step (`denoised`). prior_refinements: see `prior_sample`.
      step_hook: applied to z_{t-1} after each step. sharding: the batch sharding of z (constraint).
    Returns:
      SamplerOutput(z_0 [B, *S], the denoiser's aux from its last call, at t = 1).
    Raises:
      ValueError: a zero-terminal-SNR schedule with a denoiser that gives no z_0 (`run_chain`).
    """

    def step(z_t, t, s, prediction, noise, state):
        del s
        return ddpm_step(schedule, z_t, t, prediction, noise, variance=variance, clip_denoised=clip_denoised), state

    return run_chain(
        denoise,
        schedule,
        step,
        _with_end(respace(schedule.num_steps, schedule.num_steps)),
        rng,
        shape,
        prior_noise=prior_noise,
        prior_refinements=prior_refinements,
        step_hook=step_hook,
        sharding=sharding,
    )


def ddim_sample(
    denoise: Denoise,
    schedule: DiffusionSchedule,
    rng: Array,
    shape: tuple[int, ...],
    *,
    num_steps: int = 50,
    eta: float = 0.0,
    clip_denoised: bool = False,
    prior_noise: Array | None = None,
    prior_refinements: int = 1,
    step_hook: StepHook | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> SamplerOutput:
    """DDIM over `respace(T, num_steps)`: z_T ~ N(m_T, I), then `ddim_step`s t -> s, the last to s = 0.

    eta = 0: deterministic given the prior noise (probability flow); eta = 1 with num_steps = T: DDPM.
    Other arguments as `ddpm_sample`.
    """

    def step(z_t, t, s, prediction, noise, state):
        return ddim_step(schedule, z_t, t, s, prediction, noise, eta=eta, clip_denoised=clip_denoised), state

    deterministic = isinstance(eta, (int, float)) and eta == 0
    return run_chain(
        denoise,
        schedule,
        step,
        _with_end(respace(schedule.num_steps, num_steps)),
        rng,
        shape,
        prior_noise=prior_noise,
        prior_refinements=prior_refinements,
        step_hook=step_hook,
        sharding=sharding,
        stochastic=not deterministic,
    )
