"""The four-term multi-modal variational bound (docs/design.md section 4).

  L0 prior:      KL( q(z_T | z_0, X) || p(z_T) )                               `prior_kl`
  L1 diffusion:  sum_{t>=2} KL( q(z_{t-1} | z_t, z_0, X) || p(z_{t-1} | z_t) )  `posterior_kl` (one t)
  L2 recovery:   sum_i -log p_theta(x_i | z_t) through the heads D_i          `losses.categorical_nll` and
                                                                               `losses.gaussian_nll`
  L3 data:       -log p(z_0 | z_1), discretized Gaussian for 8-bit images     `data_nll`

`variational_bound` estimates their sum per example. A learned reverse variance (ADM) is trained by
`variance_vlb`, the bound's term at one t on the frozen mean, added to the simplified loss by
`losses.training_loss(vlb=...)` (the hybrid loss).

All terms are in nats (`variance_vlb`: bits per dimension, as ADM). Inputs carry one leading batch axis
([B, *S] as in `diffusion`, encodings [N, B, *S]) and each term returns one value per example, [B];
`jax.vmap` adds further leading axes.
Computation is in JAX's default float dtype (float64 under x64; lower-precision model outputs are upcast).
Steps follow `diffusion`'s rules: concrete out-of-range steps raise a ValueError, traced ones give NaN.
Arguments follow `diffusion`'s convention: (schedule, z, t, *operands, encodings=..., estimated_encodings=...).

Reverse variances at t = 1 (`data_nll`): 'small' and 'large_adm' use beta~_2 there (ADM's bits/dim), 'large'
uses beta_1 (see `diffusion.reverse_log_variance`); `posterior_kl` (t >= 2) is the same for both 'large' kinds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mmdiff_jax import diffusion
from mmdiff_jax.losses import discretized_gaussian_nll, gaussian_nll, normal_kl, sum_per_example
from mmdiff_jax.schedules import DiffusionSchedule, has_zero_terminal_snr

Array = jax.Array

# L0: prior.


def prior_kl(
    schedule: DiffusionSchedule, z_0: Array, *, encodings: Array | None = None, prior_mean: Array | None = None
) -> Array:
    """L0 = KL( N(sqrt(abar_T) z_0 + m_T, (1 - abar_T) I) || N(prior_mean, I) ), [B].

    `prior_mean` [B, *S] defaults to 0 (joint generation; `bump` weights keep m_T ~ 0). For a `bridge`
    schedule conditioned on its source, pass the prior N(m_T, I) mean.
    """
    t = jnp.full(z_0.shape[:1], schedule.num_steps)
    mean = diffusion.marginal_mean(schedule, z_0, t, encodings=encodings)
    prior_mean = jnp.zeros_like(mean) if prior_mean is None else prior_mean
    log_variance = diffusion.expand_to(jnp.log(diffusion.marginal_variance(schedule, t)), z_0)
    return sum_per_example(normal_kl(mean, log_variance, prior_mean, jnp.zeros_like(mean)))


# L1: one posterior term.


def posterior_kl(
    schedule: DiffusionSchedule,
    z_t: Array,
    t: Array,
    z_0: Array,
    eps_prediction: Array,
    *,
    encodings: Array | None = None,
    estimated_encodings: Array | None = None,
    variance_kind: str = "small",
    variance_interpolation: Array | None = None,
    z0_prediction: Array | None = None,
) -> Array:
    """L1 term at step t in 2..T: KL( q(z_{t-1} | z_t, z_0, X) || p_theta(z_{t-1} | z_t) ), [B].

    Exact Gaussian KL between the posterior (z0-form mean, variance beta~_t) and the reverse step
    (mean from eps_theta and the estimated encodings, variance per `reverse_log_variance`; where abar_t = 0, at
    the last step of a zero-terminal-SNR schedule, from the model's `z0_prediction`: `diffusion.reverse_mean`).
    It equals
    || beta_t / (sqrt(alpha_t) sqrt(1 - abar_t)) (eps_theta - eps) + sum_i w_t^(i) (ehat_i - e_i) ||^2
    / (2 sigma_t^2) plus a term that depends only on the variances.

    Concrete t outside 2..T raises ValueError (at t = 1 the posterior is a point mass: that step is the data
    term `data_nll`); traced t outside 2..T gives NaN for those examples.
    """
    t = diffusion.check_steps(t, schedule.num_steps, first=2)
    target_mean = diffusion.posterior_mean(schedule, z_t, t, z_0, encodings=encodings)
    target_log_variance = jnp.log(diffusion.posterior_variance(schedule, t))
    model_mean = diffusion.reverse_mean(
        schedule, z_t, t, eps_prediction, encodings=estimated_encodings, z0_prediction=z0_prediction
    )
    model_log_variance = diffusion.reverse_log_variance(schedule, t, variance_kind, variance_interpolation)
    kl = normal_kl(
        target_mean,
        diffusion.expand_to(target_log_variance, z_t),
        model_mean,
        diffusion.expand_to(model_log_variance, z_t),
    )
    return jnp.where(t >= 2, sum_per_example(kl), jnp.nan)


# L3: data term.


def data_nll(
    schedule: DiffusionSchedule,
    z_1: Array,
    z_0: Array,
    eps_prediction: Array,
    *,
    encodings: Array | None = None,
    variance_kind: str = "small",
    variance_interpolation: Array | None = None,
    discretized: bool = True,
) -> Array:
    """L3 = -log p_theta(z_0 | z_1), [B]: mean mu_theta(z_1, 1), variance sigma_1^2.

    z_1, z_0, eps_prediction: [B, *S]; encodings: [N, B, *S], the reverse mean's ehat_i (None: N = 0).
    `variance_interpolation` [B, *S]: a learned variance (`diffusion.reverse_log_variance`), else `variance_kind`.
    `discretized` treats z_0 as an 8-bit image in [-1, 1] (pixel space); otherwise a Gaussian density.
    """
    t = jnp.ones(z_0.shape[:1], jnp.int32)
    mean = diffusion.reverse_mean(schedule, z_1, t, eps_prediction, encodings=encodings)
    log_variance = diffusion.reverse_log_variance(schedule, t, variance_kind, variance_interpolation)
    log_scale = 0.5 * diffusion.expand_to(log_variance, z_0)
    if discretized:
        return discretized_gaussian_nll(z_0, mean, log_scale)
    return gaussian_nll(mean, z_0, log_scale)


# The bound, Monte-Carlo over t.


class DenoiserOutput(NamedTuple):
    """What the bound needs from a model at (z_t, t)."""

    eps_prediction: Array  # [B, *S]
    estimated_encodings: Array  # [N, B, *S], ehat_i
    recovery_nll: Array  # [B], sum_i -log p_theta(x_i | z_t) over the modalities with heads
    variance_interpolation: Array | None = None  # [B, *S], a learned reverse variance (else `variance_kind`)
    z0_prediction: Array | None = None  # [B, *S], the model's own z_0 (`targets.model_z0`): needed where abar_t = 0


class BoundTerms(NamedTuple):
    """The terms of the bound, each [B] in nats, and the total in bits per dimension of z_0."""

    prior: Array
    diffusion: Array
    recovery: Array
    data: Array
    total: Array
    bits_per_dim: Array


def variational_bound(
    schedule: DiffusionSchedule,
    denoise: Callable[[Array, Array], DenoiserOutput],
    z_0: Array,
    rng: Array,
    *,
    encodings: Array | None = None,
    variance_kind: str = "small",
    prior_mean: Array | None = None,
    discretized: bool = True,
) -> BoundTerms:
    """An unbiased one-sample estimate of the negative multi-modal ELBO, per example (nats and bits/dim).

    L1 is estimated as (T - 1) KL_t at t ~ U{2..T}; L2 is the heads' NLL at that same t, a one-sample
    estimate of E_t[-log p(x_i | z_t)], which bounds -log of the heads' mixture over t (Jensen). L3 uses
    a z_1 drawn from the marginal. Average over rng draws for a lower-variance estimate.

    Args:
      denoise: (z_t [B, *S], t [B]) -> DenoiserOutput; a closure over params and the auxiliary targets.
      z_0: [B, *S]; encodings: [N, B, *S]; rng: a PRNG key.
    """
    batch = z_0.shape[0]
    num_steps = schedule.num_steps
    step_rng, noise_rng, data_noise_rng = jax.random.split(rng, 3)

    prior = prior_kl(schedule, z_0, encodings=encodings, prior_mean=prior_mean)

    t = jax.random.randint(step_rng, (batch,), 2, num_steps + 1) if num_steps >= 2 else jnp.ones((batch,), jnp.int32)
    z_t = diffusion.marginal_sample(schedule, z_0, t, jax.random.normal(noise_rng, z_0.shape), encodings=encodings)
    output = denoise(z_t, t)
    if output.z0_prediction is None and has_zero_terminal_snr(schedule):
        raise ValueError(
            "a zero-terminal-SNR schedule (abar_T = 0) needs the denoiser's own z_0 at t = T: give "
            "DenoiserOutput.z0_prediction (a 'v' or 'z_0' model, `targets.model_z0`)"
        )
    if num_steps >= 2:
        kl = posterior_kl(
            schedule,
            z_t,
            t,
            z_0,
            output.eps_prediction,
            encodings=encodings,
            estimated_encodings=output.estimated_encodings,
            variance_kind=variance_kind,
            variance_interpolation=output.variance_interpolation,
            z0_prediction=output.z0_prediction,
        )
        diffusion_term = (num_steps - 1) * kl
    else:
        diffusion_term = jnp.zeros((batch,))

    one = jnp.ones((batch,), jnp.int32)
    z_1 = diffusion.marginal_sample(
        schedule, z_0, one, jax.random.normal(data_noise_rng, z_0.shape), encodings=encodings
    )
    data_output = denoise(z_1, one)
    data = data_nll(
        schedule,
        z_1,
        z_0,
        data_output.eps_prediction,
        encodings=data_output.estimated_encodings,
        variance_kind=variance_kind,
        variance_interpolation=data_output.variance_interpolation,
        discretized=discretized,
    )

    total = prior + diffusion_term + output.recovery_nll + data
    dimensions = math.prod(z_0.shape[1:])
    return BoundTerms(prior, diffusion_term, output.recovery_nll, data, total, total / (dimensions * math.log(2.0)))


# The learned variance's term of ADM's hybrid loss.


def variance_vlb(
    schedule: DiffusionSchedule,
    z_t: Array,
    t: Array,
    z_0: Array,
    eps_prediction: Array,
    variance_interpolation: Array,
    *,
    encodings: Array | None = None,
    estimated_encodings: Array | None = None,
    z0_prediction: Array | None = None,
    discretized: bool = True,
) -> Array:
    """The bound's term at step t, L_t in bits per dimension of z_0, [B], that trains a learned variance.

    L_t = KL( q(z_{t-1} | z_t, z_0, X) || p_theta(z_{t-1} | z_t) ) for t >= 2 (`posterior_kl`) and
    -log p_theta(z_0 | z_1) at t = 1 (`data_nll`), averaged over the dimensions and in bits, with the reverse
    variance from `variance_interpolation` [B, *S] and the reverse mean from stop_gradient(eps_prediction) and
    stop_gradient(estimated_encodings): only the variance learns from it, the mean keeps learning from
    L_simple (Nichol & Dhariwal 2021, section 3.1; ADM's `_vb_terms_bpd` on the frozen mean). The hybrid loss
    is L_simple + lambda L_vlb with L_vlb = T E_t[L_t] (`training_loss`'s `vlb`, `vlb_weight` = lambda).

    t: [B] in 1..T; z_t, z_0, eps_prediction: [B, *S] (eps_theta, converted from another target first);
    encodings, estimated_encodings: [N, B, *S] or None (N = 0); z0_prediction: [B, *S], the model's own z_0
    (`targets.model_z0`, frozen too), needed where abar_t = 0 (zero terminal SNR).
    """
    t = diffusion.check_steps(t, schedule.num_steps, first=1)
    eps_prediction, estimated_encodings, z0_prediction = jax.lax.stop_gradient(
        (eps_prediction, estimated_encodings, z0_prediction)
    )
    data = data_nll(
        schedule,
        z_t,
        z_0,
        eps_prediction,
        encodings=estimated_encodings,
        variance_interpolation=variance_interpolation,
        discretized=discretized,
    )
    if schedule.num_steps >= 2:  # t = 1 examples take the data term; their KL (at t = 2) is discarded
        kl = posterior_kl(
            schedule,
            z_t,
            jnp.maximum(t, 2),
            z_0,
            eps_prediction,
            encodings=encodings,
            estimated_encodings=estimated_encodings,
            variance_interpolation=variance_interpolation,
            z0_prediction=z0_prediction,
        )
        data = jnp.where(t == 1, data, kl)
    return data / (math.prod(z_0.shape[1:]) * math.log(2.0))
