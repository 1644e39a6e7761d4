"""The four-term multi-modal variational bound and the simplified training loss (docs/design.md section 4).

  L0 prior:      KL( q(z_T | z_0, X) || p(z_T) )                               `prior_kl`
  L1 diffusion:  sum_{t>=2} KL( q(z_{t-1} | z_t, z_0, X) || p(z_{t-1} | z_t) )  `posterior_kl` (one t)
  L2 recovery:   sum_i -log p_theta(x_i | z_t) through the heads D_i          `categorical_nll`, `gaussian_nll`
  L3 data:       -log p(z_0 | z_1), discretized Gaussian for 8-bit images     `data_nll`

A learned reverse variance (ADM) is trained by `variance_vlb`, the bound's term at one t on the frozen mean,
added to the simplified loss by `training_loss(vlb=...)` (the hybrid loss).

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
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr, ndtr

from mmdiff_jax import diffusion, targets
from mmdiff_jax.schedules import DiffusionSchedule

Array = jax.Array


def _sum_per_example(x: Array) -> Array:
    """[B, ...] -> [B], summing every axis but the first."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def _mean_per_example(x: Array) -> Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean_1: Array, log_variance_1: Array, mean_2: Array, log_variance_2: Array) -> Array:
    """Elementwise KL( N(mean_1, exp(log_variance_1)) || N(mean_2, exp(log_variance_2)) ), broadcasting."""
    return 0.5 * (
        log_variance_2
        - log_variance_1
        - 1.0
        + jnp.exp(log_variance_1 - log_variance_2)
        + jnp.square(mean_1 - mean_2) * jnp.exp(-log_variance_2)
    )


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
    return _sum_per_example(normal_kl(mean, log_variance, prior_mean, jnp.zeros_like(mean)))


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
) -> Array:
    """L1 term at step t in 2..T: KL( q(z_{t-1} | z_t, z_0, X) || p_theta(z_{t-1} | z_t) ), [B].

    Exact Gaussian KL between the posterior (z0-form mean, variance beta~_t) and the reverse step
    (mean from eps_theta and the estimated encodings, variance per `reverse_log_variance`). It equals
    || beta_t / (sqrt(alpha_t) sqrt(1 - abar_t)) (eps_theta - eps) + sum_i w_t^(i) (ehat_i - e_i) ||^2
    / (2 sigma_t^2) plus a term that depends only on the variances.

    Concrete t outside 2..T raises ValueError (at t = 1 the posterior is a point mass: that step is the data
    term `data_nll`); traced t outside 2..T gives NaN for those examples.
    """
    t = diffusion.check_steps(t, schedule.num_steps, first=2)
    target_mean = diffusion.posterior_mean(schedule, z_t, t, z_0, encodings=encodings)
    target_log_variance = jnp.log(diffusion.posterior_variance(schedule, t))
    model_mean = diffusion.reverse_mean(schedule, z_t, t, eps_prediction, encodings=estimated_encodings)
    model_log_variance = diffusion.reverse_log_variance(schedule, t, variance_kind, variance_interpolation)
    kl = normal_kl(
        target_mean,
        diffusion.expand_to(target_log_variance, z_t),
        model_mean,
        diffusion.expand_to(model_log_variance, z_t),
    )
    return jnp.where(t >= 2, _sum_per_example(kl), jnp.nan)


# L2: modality recovery through the heads.


def categorical_nll(logits: Array, labels: Array) -> Array:
    """-log softmax(logits)[label], summed per example: logits [B, ..., K], int labels [B, ...] -> [B].

    For class labels ([B, K] logits) and segmentation masks ([B, H, W, K] logits).
    """
    log_probabilities = jax.nn.log_softmax(logits.astype(float), axis=-1)
    picked = jnp.take_along_axis(log_probabilities, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return -_sum_per_example(picked)


def gaussian_nll(mean: Array, target: Array, log_scale: Array | float = 0.0) -> Array:
    """-log N(target; mean, exp(log_scale)^2), summed per example: [B, ...] -> [B].

    For images and embedding vectors; with a fixed log_scale it is a scaled MSE plus a constant.
    """
    mean = mean.astype(float)
    log_scale = jnp.broadcast_to(jnp.asarray(log_scale, float), mean.shape)
    nll = 0.5 * jnp.square(target - mean) * jnp.exp(-2.0 * log_scale) + log_scale + 0.5 * math.log(2 * math.pi)
    return _sum_per_example(nll)


# L3: data term.


def discretized_gaussian_nll(x: Array, mean: Array, log_scale: Array, num_bins: int = 256) -> Array:
    """-log P(x) for x on the grid of `num_bins` values in [-1, 1] under N(mean, exp(log_scale)^2), [B].

    Each value owns the interval of width 2 / (num_bins - 1) around it; the end values own the tails
    (as DDPM's decoder). Uses log_ndtr and the symmetric form of the CDF difference to stay accurate.
    """
    half_bin = 1.0 / (num_bins - 1)
    inverse_scale = jnp.exp(-log_scale)
    upper = (x - mean + half_bin) * inverse_scale
    lower = (x - mean - half_bin) * inverse_scale
    # ndtr(upper) - ndtr(lower) == ndtr(-lower) - ndtr(-upper): use the side far from 1.
    flip = lower > 0
    mass = jnp.where(flip, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
    log_probability = jnp.where(
        x < -1.0 + half_bin,
        log_ndtr(upper),
        jnp.where(x > 1.0 - half_bin, log_ndtr(-lower), jnp.log(jnp.maximum(mass, 1e-30))),
    )
    return -_sum_per_example(log_probability)


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
    encodings, estimated_encodings: [N, B, *S] or None (N = 0).
    """
    t = diffusion.check_steps(t, schedule.num_steps, first=1)
    eps_prediction = jax.lax.stop_gradient(eps_prediction)
    if estimated_encodings is not None:
        estimated_encodings = jax.lax.stop_gradient(estimated_encodings)
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
        )
        data = jnp.where(t == 1, data, kl)
    return data / (math.prod(z_0.shape[1:]) * math.log(2.0))


# The simplified training loss.


def training_loss(
    schedule: DiffusionSchedule,
    t: Array,
    eps: Array,
    eps_prediction: Array,
    recovery_nll: Mapping[str, Array] | None = None,
    *,
    encodings: Array | None = None,
    estimated_encodings: Array | None = None,
    eps_weight: float = 1.0,
    aggregation_weight: float = 1.0,
    recovery_weights: Mapping[str, float] | None = None,
    reduction: str = "mean",
    prediction: str = "eps",
    time_weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
    vlb: Array | None = None,
    vlb_weight: float = 0.001,
) -> tuple[Array, dict[str, Array]]:
    """eps-MSE + weighted aggregation-matching MSE + sum_i lambda_i L2_i (+ lambda T L_t), and per-term metrics.

    The L1 term is || c_t (eps_theta - eps) + sum_i w_t^(i) (ehat_i - e_i) ||^2 / (2 sigma_t^2) with
    c_t = beta_t / (sqrt(alpha_t) sqrt(1 - abar_t)). As DDPM's L_simple drops the factor c_t^2 / (2 sigma_t^2)
    from the eps part, the aggregation part is measured in the same units:
      aggregation_mse = mean( ( sum_i w_t^(i) (ehat_i - e_i) / c_t )^2 ),
    so both parts have the same relative weight as in the bound, up to the config's `aggregation_weight`.

    Args:
      t: [B] steps in 1..T; eps, eps_prediction: [B, *S]; encodings, estimated_encodings: [N, B, *S] (both
        None: N = 0).
      recovery_nll: name -> [B] NLL of each modality head (L2); every name needs a `recovery_weights` entry.
      reduction: 'mean' (the batch mean) or 'none' (the loss per example, [B], for callers that weight
        examples themselves; its batch mean is the 'mean' loss up to float rounding).
      prediction: what the denoiser predicts: 'eps' (the default), or 'v' / 'z_0', for which `eps` and
        `eps_prediction` are that target (`targets.prediction_target`) and the network's output, their MSE
        the first term (weighted by `eps_weight`), reported as '<prediction>_mse'.
      time_weighting: 'uniform' (DDPM's L_simple) or 'min_snr' (`targets.time_weight` with `min_snr_gamma`): the
        prediction term of each example weighted by its step; the loss then sums '<prediction>_mse_weighted'
        (also reported) where the unweighted '<prediction>_mse' stands otherwise.
      vlb: [B], `variance_vlb` at t (bits per dimension) for a model with a learned variance: ADM's hybrid loss
        adds `vlb_weight` * T * vlb (lambda L_vlb with L_vlb = T E_t[L_t]; ADM: lambda = 0.001), reported as 'vlb'.
    Returns:
      (loss: scalar or [B], metrics) with metrics 'loss', 'eps_mse' (or 'v_mse', 'z_0_mse'), 'aggregation_mse'
      and 'recovery/<name>' (and 'vlb'), batch means whatever the reduction.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    targets.check_prediction(prediction)
    recovery_nll = dict(recovery_nll or {})
    recovery_weights = dict(recovery_weights or {})
    missing = sorted(set(recovery_nll) - set(recovery_weights))
    if missing:
        raise ValueError(f"no recovery weight given for modality heads {missing}")
    if eps_prediction.shape != eps.shape:
        raise ValueError(f"eps_prediction shape {eps_prediction.shape} != eps shape {eps.shape}")
    if (encodings is None) != (estimated_encodings is None):
        raise ValueError("encodings and estimated_encodings are given together (both None: N = 0)")
    if encodings is not None and estimated_encodings.shape != encodings.shape:
        raise ValueError(f"estimated_encodings shape {estimated_encodings.shape} != encodings shape {encodings.shape}")

    t = diffusion.check_steps(t, schedule.num_steps, first=1)
    if vlb is not None and jnp.shape(vlb) != jnp.shape(t):
        raise ValueError(f"vlb must have one value per example, shape {jnp.shape(t)}, got {jnp.shape(vlb)}")
    beta, alpha = diffusion.at_step(schedule.beta, t, eps), diffusion.at_step(schedule.alpha, t, eps)
    eps_coefficient = beta / (jnp.sqrt(alpha) * jnp.sqrt(diffusion.at_step(schedule.one_minus_alpha_bar, t, eps)))
    difference = None if encodings is None else estimated_encodings.astype(float) - encodings
    aggregation_error = diffusion.aggregation(schedule, eps, t, encodings=difference)
    first = f"{prediction}_mse"
    per_example = {
        first: _mean_per_example(jnp.square(eps_prediction.astype(float) - eps)),
        "aggregation_mse": _mean_per_example(jnp.square(aggregation_error / eps_coefficient)),
        **{f"recovery/{name}": nll for name, nll in recovery_nll.items()},
        **({} if vlb is None else {"vlb": vlb}),
    }
    if time_weighting != "uniform":  # an unknown weighting raises in `time_weight`
        first = f"{prediction}_mse_weighted"
        weight = targets.time_weight(schedule, t, prediction, time_weighting, min_snr_gamma)
        per_example[first] = weight * per_example[f"{prediction}_mse"]

    def weighted_sum(terms):
        total = eps_weight * terms[first] + aggregation_weight * terms["aggregation_mse"]
        if vlb is not None:
            total = total + vlb_weight * schedule.num_steps * terms["vlb"]
        for name in sorted(recovery_nll):
            total = total + recovery_weights[name] * terms[f"recovery/{name}"]
        return total

    metrics = {key: jnp.mean(value) for key, value in per_example.items()}
    metrics["loss"] = weighted_sum(metrics)
    return (metrics["loss"] if reduction == "mean" else weighted_sum(per_example)), metrics
