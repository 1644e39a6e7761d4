"""The multi-modal forward and reverse processes, exact and pure (docs/design.md sections 2-3).

Shapes used throughout:
  z_0, z_t, noise, eps   [B, *S]      a batch of points in the shared diffusion space (e.g. S = H, W, C)
  encodings              [N, B, *S]   e_i = E_i(x_i) for the N >= 0 auxiliary modalities, stacked
  t                      [B] or []    integer steps, used as indices into the [T + 1] schedule arrays
Scalars per step broadcast against z; every function also works unbatched (under `jax.vmap`), with
z of shape S, encodings [N, *S] and t of shape [].

Arguments, in one order for every function here and in `losses` and `bound` (the library's pure-math convention):
  f(schedule, z, t, *operands, encodings=None)
the schedule; the point the function maps (z_0 for the marginal, z_{t-1} for the forward transition, z_t for
the posterior, the reverse step and the z_0 / eps conversions); the step; the other arrays in the order of the
equation (noise, eps, z_0); the stacked encodings last, by keyword: None is the empty stack of a schedule
with N = 0 (plain DDPM), an error otherwise.

The forward transition
  q(z_t | z_{t-1}, X) = N( sqrt(alpha_t) (z_{t-1} + a_t), beta_t I ),   a_t = sum_i w_t^(i) e_i
has the marginal
  q(z_t | z_0, X) = N( sqrt(abar_t) z_0 + m_t, (1 - abar_t) I ),        m_t = sum_i lambda_t^(i) e_i,
and u_t = z_t - m_t is a standard DDPM chain started at u_0 = z_0, from which the posterior follows.

Steps.  Each function states its range of t (0..T for the marginal, 1..T for transition, posterior, reverse
step and the z_0 / eps conversions). Steps known outside a trace (Python ints, NumPy arrays, JAX arrays in
eager mode, static arguments of `jit`) outside that range raise a ValueError naming it; float steps raise
too. Traced steps (arguments of `jit`, `vmap`, `grad`, `scan`) cannot be checked: a traced step outside 0..T
reads NaN from the schedule (`lookup`), so the result is NaN rather than a silently clamped or wrapped-around
value; a traced step that is inside 0..T but below a function's range is not caught here (e.g. t = 0 gives
`eps_from_z0` 0 / 0 = NaN and `transition_mean` the identity).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmdiff_jax.schedules import DiffusionSchedule

Array = jax.Array

VARIANCE_KINDS = ("large", "large_adm", "small")


def _encodings(schedule: DiffusionSchedule, encodings: Array | None, z: Array) -> Array:
    """The encodings [N, *z.shape]; None stands for the empty stack of a schedule with N = 0 (plain DDPM).
    ValueError (at trace time: shapes are static) for any other shape, or None with N > 0."""
    expected = (schedule.num_modalities,) + z.shape
    if encodings is None:
        if schedule.num_modalities:
            raise ValueError(
                f"the schedule has weights for N = {schedule.num_modalities} modalities: pass their encodings "
                f"[N, *z.shape] = {expected}"
            )
        return jnp.zeros(expected, z.dtype)
    if encodings.shape != expected:
        raise ValueError(
            f"encodings must have shape [N, *z.shape] = {expected} (the schedule has weights for "
            f"N = {schedule.num_modalities} modalities), got {encodings.shape}"
        )
    return encodings


def check_steps(t: Array, num_steps: int, first: int = 0) -> Array:
    """t as an integer step array, checked against the range first..T (T = `num_steps`) where it can be.

    Raises ValueError for a non-integer dtype, and for concrete steps outside first..T. Traced steps (under
    `jit`, `vmap`, `grad`, `scan`) are not checked; see the module docstring for what they give.
    """
    if not isinstance(t, jax.core.Tracer):
        steps = np.asarray(t)
        if np.issubdtype(steps.dtype, np.integer) and steps.size and (steps.min() < first or steps.max() > num_steps):
            bad = np.unique(steps[(steps < first) | (steps > num_steps)])
            raise ValueError(
                f"steps t must lie in {first}..T = {first}..{num_steps} here, got t = "
                f"{', '.join(str(step) for step in bad[:5])}{' ...' if bad.size > 5 else ''}"
            )
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"t must hold integer steps, got dtype {t.dtype}")
    return t


def lookup(values: Array, t: Array) -> Array:
    """values[t] for a schedule array [T + 1] and integer steps t (any shape) -> t.shape.

    Every read of a schedule entry goes through here: concrete steps outside 0..T raise (`check_steps`),
    traced ones read NaN (not JAX's clamped or wrapped-around index).
    """
    num_steps = values.shape[-1] - 1
    t = check_steps(t, num_steps)
    return jnp.where((t >= 0) & (t <= num_steps), values[jnp.clip(t, 0, num_steps)], jnp.nan)


def expand_to(values: Array, z: Array) -> Array:
    """Per-example values (shape a batch prefix of z.shape, e.g. t.shape) reshaped to broadcast against z."""
    shape = jnp.shape(values)
    if len(shape) > z.ndim or z.shape[: len(shape)] != shape:
        raise ValueError(f"t (or a per-step value) of shape {shape} is not a batch prefix of z of shape {z.shape}")
    return jnp.reshape(values, jnp.shape(values) + (1,) * (z.ndim - jnp.ndim(values)))


def at_step(values: Array, t: Array, z: Array) -> Array:
    """values[t] shaped to broadcast against z: [T + 1] -> t.shape + (1,) * (z.ndim - t.ndim)."""
    return expand_to(lookup(values, t), z)


def _weighted_sum(weights: Array, t: Array, encodings: Array, z: Array) -> Array:
    """sum_i weights[i, t] e_i for weights [N, T + 1] and encodings [N, *z.shape] -> z.shape."""
    per_modality = jax.vmap(at_step, in_axes=(0, None, None))(weights, t, z)  # [N, *t.shape, 1, ...]
    return jnp.sum(per_modality * encodings, axis=0, dtype=z.dtype)


def aggregation(schedule: DiffusionSchedule, z: Array, t: Array, *, encodings: Array | None = None) -> Array:
    """a_t = sum_i w_t^(i) e_i, shape z.shape (zeros for N = 0); z only gives the batch layout."""
    encodings = _encodings(schedule, encodings, z)
    return _weighted_sum(schedule.w, t, encodings, z)


def encoding_mean(schedule: DiffusionSchedule, z: Array, t: Array, *, encodings: Array | None = None) -> Array:
    """m_t = sum_i lambda_t^(i) e_i, the encodings' part of the marginal mean, shape z.shape."""
    encodings = _encodings(schedule, encodings, z)
    return _weighted_sum(schedule.lambda_, t, encodings, z)


# Forward transition q(z_t | z_{t-1}, X).


def transition_mean(
    schedule: DiffusionSchedule, z_previous: Array, t: Array, *, encodings: Array | None = None
) -> Array:
    """sqrt(alpha_t) (z_{t-1} + a_t), shape z.shape; t in 1..T."""
    t = check_steps(t, schedule.num_steps, first=1)
    a_t = aggregation(schedule, z_previous, t, encodings=encodings)
    return jnp.sqrt(at_step(schedule.alpha, t, z_previous)) * (z_previous + a_t)


def transition_variance(schedule: DiffusionSchedule, t: Array) -> Array:
    """beta_t, shape t.shape; t in 1..T."""
    return lookup(schedule.beta, check_steps(t, schedule.num_steps, first=1))


def transition_sample(
    schedule: DiffusionSchedule, z_previous: Array, t: Array, noise: Array, *, encodings: Array | None = None
) -> Array:
    """z_t = sqrt(alpha_t) (z_{t-1} + a_t) + sqrt(beta_t) noise, noise ~ N(0, I) of shape z.shape."""
    mean = transition_mean(schedule, z_previous, t, encodings=encodings)
    return mean + jnp.sqrt(at_step(schedule.beta, t, z_previous)) * noise


# Marginal q(z_t | z_0, X).


def marginal_mean(schedule: DiffusionSchedule, z_0: Array, t: Array, *, encodings: Array | None = None) -> Array:
    """sqrt(abar_t) z_0 + m_t, shape z.shape; t in 0..T."""
    return jnp.sqrt(at_step(schedule.alpha_bar, t, z_0)) * z_0 + encoding_mean(schedule, z_0, t, encodings=encodings)


def marginal_variance(schedule: DiffusionSchedule, t: Array) -> Array:
    """1 - abar_t, shape t.shape; t in 0..T."""
    return lookup(schedule.one_minus_alpha_bar, t)


def marginal_sample(
    schedule: DiffusionSchedule, z_0: Array, t: Array, noise: Array, *, encodings: Array | None = None
) -> Array:
    """z_t = sqrt(abar_t) z_0 + m_t + sqrt(1 - abar_t) noise, noise ~ N(0, I) of shape z.shape."""
    mean = marginal_mean(schedule, z_0, t, encodings=encodings)
    return mean + jnp.sqrt(at_step(schedule.one_minus_alpha_bar, t, z_0)) * noise


# Conversions between z_0 and eps given z_t (the marginal solved for one or the other).


def z0_from_eps(
    schedule: DiffusionSchedule, z_t: Array, t: Array, eps: Array, *, encodings: Array | None = None
) -> Array:
    """z_0 = (z_t - m_t - sqrt(1 - abar_t) eps) / sqrt(abar_t); t in 1..T."""
    t = check_steps(t, schedule.num_steps, first=1)
    u_t = z_t - encoding_mean(schedule, z_t, t, encodings=encodings)
    noise_scale = jnp.sqrt(at_step(schedule.one_minus_alpha_bar, t, z_t))
    return (u_t - noise_scale * eps) / jnp.sqrt(at_step(schedule.alpha_bar, t, z_t))


def eps_from_z0(
    schedule: DiffusionSchedule, z_t: Array, t: Array, z_0: Array, *, encodings: Array | None = None
) -> Array:
    """eps = (z_t - m_t - sqrt(abar_t) z_0) / sqrt(1 - abar_t); t in 1..T."""
    t = check_steps(t, schedule.num_steps, first=1)
    u_t = z_t - encoding_mean(schedule, z_t, t, encodings=encodings)
    signal_scale = jnp.sqrt(at_step(schedule.alpha_bar, t, z_t))
    return (u_t - signal_scale * z_0) / jnp.sqrt(at_step(schedule.one_minus_alpha_bar, t, z_t))


# Posterior q(z_{t-1} | z_t, z_0, X).


def posterior_mean(
    schedule: DiffusionSchedule, z_t: Array, t: Array, z_0: Array, *, encodings: Array | None = None
) -> Array:
    """mu~_t in z0-form; t in 1..T.

    mu~_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) z_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) z_t
            + beta_t / (1 - abar_t) m_{t-1} - alpha_t (1 - abar_{t-1}) / (1 - abar_t) a_t
    """
    encodings = _encodings(schedule, encodings, z_t)
    t = check_steps(t, schedule.num_steps, first=1)
    beta, alpha = at_step(schedule.beta, t, z_t), at_step(schedule.alpha, t, z_t)
    alpha_bar_previous = at_step(schedule.alpha_bar, t - 1, z_t)
    one_minus, one_minus_previous = (at_step(schedule.one_minus_alpha_bar, step, z_t) for step in (t, t - 1))
    return (
        jnp.sqrt(alpha_bar_previous) * beta / one_minus * z_0
        + jnp.sqrt(alpha) * one_minus_previous / one_minus * z_t
        + beta / one_minus * encoding_mean(schedule, z_t, t - 1, encodings=encodings)
        - alpha * one_minus_previous / one_minus * aggregation(schedule, z_t, t, encodings=encodings)
    )


def posterior_mean_from_eps(
    schedule: DiffusionSchedule, z_t: Array, t: Array, eps: Array, *, encodings: Array | None = None
) -> Array:
    """mu~_t in eps-form: ( z_t - beta_t / sqrt(1 - abar_t) eps ) / sqrt(alpha_t) - a_t; t in 1..T.

    The DDPM posterior mean minus this step's aggregation. Equals `posterior_mean` when
    z_t = sqrt(abar_t) z_0 + m_t + sqrt(1 - abar_t) eps. Undefined where alpha_t = 0 (the last step of a
    zero-terminal-SNR schedule, `is_terminal`): there it returns a finite placeholder, so that gradients through
    `reverse_mean`'s choice of the z0-form stay finite.
    """
    t = check_steps(t, schedule.num_steps, first=1)
    beta, alpha = at_step(schedule.beta, t, z_t), at_step(schedule.alpha, t, z_t)
    sqrt_alpha = jnp.sqrt(jnp.where(alpha > 0, alpha, 1.0))
    ddpm_mean = (z_t - beta / jnp.sqrt(at_step(schedule.one_minus_alpha_bar, t, z_t)) * eps) / sqrt_alpha
    return ddpm_mean - aggregation(schedule, z_t, t, encodings=encodings)


def is_terminal(schedule: DiffusionSchedule, t: Array, z: Array) -> Array:
    """alpha_t = 0, shaped to broadcast against z: the last step of a zero-terminal-SNR schedule, where abar_t = 0
    and z_t holds no signal, so z_0 cannot be recovered from eps (only from a v or z_0 prediction)."""
    return at_step(schedule.alpha, t, z) == 0


def posterior_variance(schedule: DiffusionSchedule, t: Array) -> Array:
    """beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t), shape t.shape; 0 at t = 1; t in 1..T."""
    t = check_steps(t, schedule.num_steps, first=1)
    return (
        lookup(schedule.beta, t) * lookup(schedule.one_minus_alpha_bar, t - 1) / lookup(schedule.one_minus_alpha_bar, t)
    )


# Reverse process p(z_{t-1} | z_t).


def reverse_mean(
    schedule: DiffusionSchedule,
    z_t: Array,
    t: Array,
    eps_prediction: Array,
    *,
    encodings: Array | None = None,
    z0_prediction: Array | None = None,
) -> Array:
    """mu_theta = ( z_t - beta_t / sqrt(1 - abar_t) eps_theta ) / sqrt(alpha_t) - sum_i w_t^(i) ehat_i.

    The eps-form posterior mean evaluated at the model's eps_theta and its encodings ehat_i ([N, *z.shape]):
    ehat_i = e_i for observed modalities, E_i(D_i(h_theta(z_t, t))) for the rest. Where alpha_t = 0 (the last
    step of a zero-terminal-SNR schedule, `is_terminal`) the eps-form divides by 0 and the z0-form
    (`posterior_mean`) at the model's `z0_prediction` [B, *S] is taken instead: it must then be given
    (docs/design.md section 3d); without it those steps give NaN.
    """
    eps_form = posterior_mean_from_eps(schedule, z_t, t, eps_prediction, encodings=encodings)
    z0_form = jnp.nan if z0_prediction is None else posterior_mean(schedule, z_t, t, z0_prediction, encodings=encodings)
    return jnp.where(is_terminal(schedule, t, z_t), z0_form, eps_form)


def reverse_log_variance(
    schedule: DiffusionSchedule, t: Array, kind: str = "small", interpolation: Array | None = None
) -> Array:
    """log sigma_t^2 of the reverse step, shape t.shape (or interpolation's shape); t in 1..T.

    The kinds differ from beta_t / beta~_t only at t = 1, where beta~_1 = 0:
      'small'      sigma_t^2 = beta~_t, with beta~_1 replaced by beta~_2 (ADM's clipped log variance, so the
                   t = 1 data term stays finite).
      'large'      sigma_t^2 = beta_t at every t, sigma_1^2 = beta_1 included (the DDPM paper's sigma_t^2 =
                   beta_t, read literally). The library's default for 'large'.
      'large_adm'  sigma_t^2 = beta_t for t >= 2 and beta~_2 at t = 1: the convention of the DDPM and ADM code
                   (guided-diffusion's fixed-large, log(append(posterior_variance[1], betas[1:]))). Only the
                   t = 1 data term differs from 'large'; use it for bits/dim comparable with ADM's likelihoods.
    `interpolation` v in [0, 1] gives ADM's learned variance, log sigma^2 = v log beta_t + (1 - v) log beta~_t,
    beta~ clipped as in 'small' and beta_1 unclipped (as guided-diffusion's learned range); it overrides `kind`.
    Its shape is t.shape, or t.shape followed by more axes (per element, e.g. [B, *S] for t [B]).
    """
    t = check_steps(t, schedule.num_steps, first=1)
    clipped = jnp.where(t == 1, min(2, schedule.num_steps), t)  # beta~_1 = 0 -> beta~_2
    small = jnp.log(posterior_variance(schedule, clipped))
    large = jnp.log(lookup(schedule.beta, t))
    if interpolation is not None:
        large, small = expand_to(large, interpolation), expand_to(small, interpolation)
        return interpolation * large + (1.0 - interpolation) * small
    if kind == "large":
        return large
    if kind == "large_adm":
        return jnp.where(t == 1, small, large)
    if kind == "small":
        return small
    raise ValueError(f"unknown reverse variance {kind!r}; known: {VARIANCE_KINDS}")
