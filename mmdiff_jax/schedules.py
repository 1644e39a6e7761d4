"""Noise schedules and per-modality aggregation-weight schedules (docs/design.md sections 1-2).

Every schedule array is indexed by the diffusion step t = 0..T and so has length T + 1; entry 0 holds
the t = 0 convention (`beta_0 = 0`, `alpha_0 = alpha_bar_0 = 1`, `w_0 = lambda_0 = 0`). A step argument
`t` anywhere in the library is therefore used as a plain index: `schedule.alpha_bar[t]`.

Aggregation weights come in two equivalent forms (docs/design.md section 2):
  w_t^(i)       the weight of encoding e_i in the transition at step t,
  lambda_t^(i)  how much of e_i the marginal z_t carries:  m_t = sum_i lambda_t^(i) e_i,
related exactly by  lambda_t = sqrt(alpha_t) (lambda_{t-1} + w_t)  and  w_t = lambda_t / sqrt(alpha_t) - lambda_{t-1}.
Users think in lambda_t; the transition uses w_t; `DiffusionSchedule` carries both.

Pure functions of arrays, no Flax. Schedules are built in float64 NumPy and stored in JAX's default float
dtype: float32, or float64 when x64 is enabled (`jax.config.update("jax_enable_x64", True)`); the math layer
(`diffusion`, `losses`) then computes in float64 throughout.

Every beta_t must lie in (0, 1), except beta_T, which may be 1: alpha_bar_T = 0, a zero-terminal-SNR schedule
(Lin et al. 2024; `rescale_zero_terminal_snr` makes one from any schedule). z_T then carries no signal, so
eps-prediction cannot recover z_0 there (z_0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) divides by 0): such
a schedule needs a v or z_0 denoiser (docs/design.md section 3d), and its aggregation weights must end at
lambda_T = 0 (`diffusion_schedule`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

NOISE_SCHEDULES = ("linear", "cosine")
WEIGHT_SCHEDULES = ("zero", "constant", "bump", "bridge")


class NoiseSchedule(NamedTuple):
    """A DDPM noise schedule; each field has shape [T + 1], entry 0 being the t = 0 convention."""

    beta: Array  # beta_t, beta_0 = 0
    alpha: Array  # alpha_t = 1 - beta_t
    alpha_bar: Array  # prod_{s<=t} alpha_s, alpha_bar_0 = 1
    one_minus_alpha_bar: Array  # 1 - alpha_bar_t, from float64 (float32 `1 - alpha_bar` loses it at small t)

    @property
    def num_steps(self) -> int:
        """T, the number of diffusion steps."""
        return self.beta.shape[-1] - 1


class DiffusionSchedule(NamedTuple):
    """The noise schedule plus every auxiliary modality's aggregation weights (a pytree: jit-able).

    Fields `beta`, `alpha`, `alpha_bar`, `one_minus_alpha_bar` have shape [T + 1] (see `NoiseSchedule`);
    `w` and `lambda_` have shape [N, T + 1] for N >= 0 auxiliary modalities (N = 0 is plain DDPM).
    """

    beta: Array
    alpha: Array
    alpha_bar: Array
    one_minus_alpha_bar: Array
    w: Array  # [N, T + 1], w_0 = 0
    lambda_: Array  # [N, T + 1], lambda_0 = 0

    @property
    def num_steps(self) -> int:
        return self.beta.shape[-1] - 1

    @property
    def num_modalities(self) -> int:
        """N, the number of auxiliary modalities."""
        return self.w.shape[0]

    @property
    def noise(self) -> NoiseSchedule:
        return NoiseSchedule(self.beta, self.alpha, self.alpha_bar, self.one_minus_alpha_bar)


def default_float(x) -> Array:
    """x as a JAX array of the default float dtype: float32, or float64 under x64 (never a hard-coded float32)."""
    return jnp.asarray(x, dtype=float)


def schedule_from_beta(beta: np.ndarray | Sequence[float]) -> NoiseSchedule:
    """Builds a `NoiseSchedule` from beta_1..beta_T (shape [T]), each in (0, 1) but beta_T in (0, 1].

    beta_T = 1 gives alpha_bar_T = 0 exactly (zero terminal SNR, see the module docstring). Raises ValueError
    for a beta outside that range, naming the first offending t; a beta_t = 1 before T would leave no signal
    for the steps after it.
    """
    beta = np.asarray(beta, dtype=np.float64)
    if beta.ndim != 1 or beta.size == 0:
        raise ValueError(f"beta must be a non-empty vector beta_1..beta_T, got shape {beta.shape}")
    allowed = (beta > 0) & (beta < 1)
    allowed[-1] |= beta[-1] == 1
    outside = np.flatnonzero(~allowed)
    if outside.size:
        t = int(outside[0]) + 1
        reason = (
            f" (only beta_T may be 1, a zero-terminal-SNR schedule; beta_{t} = 1 at t < T = {beta.size} would "
            "leave no signal for the steps after it)"
            if beta[t - 1] == 1
            else ""
        )
        raise ValueError(f"every beta_t must lie in (0, 1), got beta_{t} = {beta[t - 1]:g}{reason}")
    beta = np.concatenate([[0.0], beta])
    alpha = 1.0 - beta
    alpha_bar = np.cumprod(alpha)
    with np.errstate(divide="ignore"):  # log1p(-1) = -inf at a zero-terminal-SNR step: 1 - abar_T = 1
        one_minus_alpha_bar = -np.expm1(np.cumsum(np.log1p(-beta)))
    return NoiseSchedule(*(default_float(a) for a in (beta, alpha, alpha_bar, one_minus_alpha_bar)))


def rescale_zero_terminal_snr(schedule: NoiseSchedule) -> NoiseSchedule:
    """The schedule rescaled to zero terminal SNR (Lin et al. 2024, "Common diffusion noise schedules and
    sample steps are flawed", Algorithm 1; diffusers' `rescale_betas_zero_snr`).

    sqrt(abar_t) is mapped affinely so that sqrt(abar_1) is kept and sqrt(abar_T) becomes 0:
      sqrt(abar_t) <- (sqrt(abar_t) - sqrt(abar_T)) sqrt(abar_1) / (sqrt(abar_1) - sqrt(abar_T)),
    and the betas follow, beta_t = 1 - abar_t / abar_{t-1}, so beta_1 is kept and beta_T = 1. Needs T >= 2.
    """
    if schedule.num_steps < 2:
        raise ValueError("a zero-terminal-SNR schedule needs T >= 2 (with T = 1 no step keeps any signal)")
    sqrt_alpha_bar = np.sqrt(np.cumprod(1.0 - np.asarray(schedule.beta, np.float64)))
    first, last = sqrt_alpha_bar[1], sqrt_alpha_bar[-1]
    sqrt_alpha_bar = (sqrt_alpha_bar[1:] - last) * first / (first - last)
    alpha_bar = np.concatenate([[1.0], np.square(sqrt_alpha_bar)])
    return schedule_from_beta(1.0 - alpha_bar[1:] / alpha_bar[:-1])


def has_zero_terminal_snr(schedule: NoiseSchedule | DiffusionSchedule) -> bool:
    """Whether alpha_bar_T = 0 (beta_T = 1), for the checks made before tracing. A traced schedule (a jit
    argument) cannot be checked and gives False, as traced steps go unchecked in `diffusion`."""
    alpha = schedule.alpha  # read on the host: indexing it with jnp inside a trace would stage the read
    return not isinstance(alpha, jax.core.Tracer) and float(np.asarray(alpha)[-1]) == 0.0


def linear_beta(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM's linear betas [T], rescaled by 1000 / T so that any T spans the same noise range (as ADM)."""
    scale = 1000.0 / num_steps
    if scale * beta_end >= 1.0:
        raise ValueError(
            f"a linear schedule with T = {num_steps} would need beta_T = {scale * beta_end:g} >= 1; "
            f"use T > {int(1000 * beta_end)} or the cosine schedule"
        )
    return np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)


def cosine_beta(num_steps: int, offset: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved-DDPM cosine betas [T]: alpha_bar(t) = cos^2(pi/2 (t/T + s) / (1 + s)), betas clipped at
    `max_beta` (max_beta = 1 keeps the unclipped beta_T = 1: zero terminal SNR, see `schedule_from_beta`)."""
    steps = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    f = np.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def noise_schedule(kind: str, num_steps: int, **kwargs) -> NoiseSchedule:
    """The named noise schedule ('linear' or 'cosine') with T = `num_steps`."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if kind == "linear":
        return schedule_from_beta(linear_beta(num_steps, **kwargs))
    if kind == "cosine":
        return schedule_from_beta(cosine_beta(num_steps, **kwargs))
    raise ValueError(f"unknown noise schedule {kind!r}; known: {NOISE_SCHEDULES}")


def normalize_by_modalities(schedule: NoiseSchedule, num_modalities: int) -> NoiseSchedule:
    """The weighted-average transition of the seed: alpha_t replaced by alpha_t / (N + 1).

    The transition becomes N( sqrt(alpha_t/(N+1)) (z_{t-1} + a_t), (1 - alpha_t/(N+1)) I ): variance
    preserving given X, with the signal decaying N + 1 times faster per step. Every closed form of the
    library holds with the replaced alpha, so the result is an ordinary `NoiseSchedule`.
    """
    alpha = np.asarray(schedule.alpha, np.float64)[1:] / (num_modalities + 1)
    return schedule_from_beta(1.0 - alpha)


def lambda_from_w(w: Array, alpha: Array) -> Array:
    """lambda_t = sqrt(alpha_t) (lambda_{t-1} + w_t), lambda_0 = 0.

    Args:
      w: [..., T + 1] aggregation weights (w_0 is ignored).
      alpha: [T + 1].
    Returns:
      [..., T + 1]; equals sum_{s<=t} w_s sqrt(alpha_bar_t / alpha_bar_{s-1}). Computed by the
      recursion (a scan), which stays accurate where alpha_bar_t underflows.
    """
    w = default_float(w)
    sqrt_alpha = jnp.sqrt(default_float(alpha))

    def step(previous, inputs):
        w_t, sqrt_alpha_t = inputs
        current = sqrt_alpha_t * (previous + w_t)
        return current, current

    w_steps = jnp.moveaxis(w, -1, 0)[1:]
    _, lambdas = jax.lax.scan(step, jnp.zeros(w.shape[:-1], w.dtype), (w_steps, sqrt_alpha[1:]))
    lambdas = jnp.concatenate([jnp.zeros((1,) + w.shape[:-1], w.dtype), lambdas], axis=0)
    return jnp.moveaxis(lambdas, 0, -1)


def w_from_lambda(lambda_: Array, alpha: Array) -> Array:
    """w_t = lambda_t / sqrt(alpha_t) - lambda_{t-1} for t >= 1, w_0 = 0.

    Where alpha_t = 0 (beta_T = 1, zero terminal SNR) lambda_t = sqrt(alpha_t) (lambda_{t-1} + w_t) is 0 whatever
    w_t, and w_t is taken as its limit -lambda_{t-1} (lambda_T must be 0 there: `diffusion_schedule` checks).

    Args:
      lambda_: [..., T + 1] with lambda_0 = 0 (a nonzero lambda_0 is rejected by `diffusion_schedule`).
      alpha: [T + 1].
    Returns:
      [..., T + 1].
    """
    lambda_ = default_float(lambda_)
    sqrt_alpha = jnp.sqrt(default_float(alpha)[1:])
    ratio = jnp.where(sqrt_alpha > 0, lambda_[..., 1:] / jnp.where(sqrt_alpha > 0, sqrt_alpha, 1.0), 0.0)
    w = ratio - lambda_[..., :-1]
    return jnp.concatenate([jnp.zeros_like(lambda_[..., :1]), w], axis=-1)


def weight_schedule(kind: str, schedule: NoiseSchedule, gamma: float = 1.0) -> Array:
    """A named aggregation schedule for one modality, in lambda form, shape [T + 1].

    zero:      lambda_t = 0 (the modality does not enter the forward process).
    constant:  lambda_t = gamma for t >= 1 (z_t carries a fixed amount of e at every noise level).
    bump:      lambda_t = gamma * 4 sqrt(abar_t) (1 - sqrt(abar_t)); zero at both ends, so m_T ~ 0 and
               the prior stays N(0, I): suits unconditional joint generation.
    bridge:    lambda_t = gamma * (1 - sqrt(abar_t)); z_T carries the source, prior N(m_T, I): suits
               image transition.
    The paper leaves the schedule open; these are the library's choices (docs/design.md section 2).
    """
    sqrt_alpha_bar = jnp.sqrt(schedule.alpha_bar)
    if kind == "zero":
        return jnp.zeros_like(sqrt_alpha_bar)
    if kind == "constant":
        return jnp.full_like(sqrt_alpha_bar, gamma).at[0].set(0.0)
    if kind == "bump":
        return gamma * 4.0 * sqrt_alpha_bar * (1.0 - sqrt_alpha_bar)
    if kind == "bridge":
        return gamma * (1.0 - sqrt_alpha_bar)
    raise ValueError(f"unknown weight schedule {kind!r}; known: {WEIGHT_SCHEDULES}")


def _weight_matrix(weights: Sequence[Array] | Array, length: int) -> np.ndarray:
    """Concrete weights as an [N, T + 1] float64 matrix, validated."""
    weights = np.asarray(weights, np.float64)
    if weights.size == 0:
        return np.zeros((0, length), np.float64)
    weights = weights[None] if weights.ndim == 1 else weights
    if weights.ndim != 2 or weights.shape[1] != length:
        raise ValueError(f"weights must have shape [N, T + 1] = [N, {length}], got {weights.shape}")
    if not np.all(np.isfinite(weights)):
        raise ValueError("aggregation weights must be finite")
    return weights


def diffusion_schedule(
    noise: NoiseSchedule,
    lambdas: Sequence[Array] | Array = (),
    *,
    w: Sequence[Array] | Array | None = None,
) -> DiffusionSchedule:
    """Assembles a `DiffusionSchedule` from a noise schedule and one weight schedule per modality.

    Give concrete weights in exactly one form: `lambdas` ([N, T + 1], or a list of N [T + 1] arrays)
    or `w`; the other form is derived exactly. No weights at all gives N = 0 (plain DDPM).
    """
    length = noise.num_steps + 1
    if w is not None:
        if len(lambdas):
            raise ValueError("give the aggregation weights as lambdas or as w, not both")
        w = default_float(_weight_matrix(w, length)).at[:, 0].set(0.0)
        return DiffusionSchedule(*noise, w=w, lambda_=lambda_from_w(w, noise.alpha))
    lambdas = _weight_matrix(lambdas, length)
    if np.any(lambdas[:, 0] != 0):
        raise ValueError("lambda_0 must be 0: z_0 carries no encoding")
    if has_zero_terminal_snr(noise) and np.any(lambdas[:, -1] != 0):
        rows = np.flatnonzero(lambdas[:, -1] != 0).tolist()
        raise ValueError(
            f"a zero-terminal-SNR schedule (beta_T = 1) forces lambda_T = sqrt(alpha_T) (lambda_T-1 + w_T) = 0, but "
            f"the weights of modalities {rows} end at lambda_T = {lambdas[rows[0], -1]:g}: use 'zero' or 'bump' "
            "weights ('bridge' and 'constant' keep lambda_T > 0), or a schedule with beta_T < 1"
        )
    lambdas = default_float(lambdas)
    return DiffusionSchedule(*noise, w=w_from_lambda(lambdas, noise.alpha), lambda_=lambdas)


def make_schedule(
    noise_kind: str,
    num_steps: int,
    weights: Sequence[tuple[str, float]] = (),
    *,
    modality_normalized: bool = False,
    zero_terminal_snr: bool = False,
) -> DiffusionSchedule:
    """The schedule a config describes: a named noise schedule and one (kind, gamma) per modality.

    Example: `make_schedule('linear', 1000, [('bump', 1.0), ('bridge', 0.5)])`. With
    `modality_normalized`, alpha_t is replaced by alpha_t / (N + 1) before the weights are built; then, with
    `zero_terminal_snr`, the noise schedule is rescaled to abar_T = 0 (`rescale_zero_terminal_snr`).
    """
    noise = noise_schedule(noise_kind, num_steps)
    if modality_normalized:
        noise = normalize_by_modalities(noise, len(weights))
    if zero_terminal_snr:
        noise = rescale_zero_terminal_snr(noise)
    return diffusion_schedule(noise, [weight_schedule(kind, noise, gamma) for kind, gamma in weights])
