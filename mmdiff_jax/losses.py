"""Per-example likelihood terms and the simplified training loss (docs/design.md section 4).

  normal_kl                 KL between two diagonal Gaussians, elementwise
  categorical_nll           L2 for labels and segmentation masks (through a head's logits)
  gaussian_nll              L2 for images and embedding vectors; L3 for a continuous z_0
  discretized_gaussian_nll  L3 for 8-bit images (DDPM's decoder)
  training_loss             eps-MSE (or v / z_0) + aggregation MSE + sum_i lambda_i L2_i (+ ADM's lambda T L_t)

The bound these terms make up, and its Monte-Carlo estimate, are in `bound`.
All terms are in nats. Inputs carry one leading batch axis ([B, *S] as in `diffusion`, encodings [N, B, *S])
and each term returns one value per example, [B]; `jax.vmap` adds further leading axes. Computation is in
JAX's default float dtype (float64 under x64; lower-precision model outputs are upcast).
Arguments follow `diffusion`'s convention: (schedule, z, t, *operands, encodings=..., estimated_encodings=...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr, ndtr

from mmdiff_jax import diffusion, targets
from mmdiff_jax.schedules import DiffusionSchedule

Array = jax.Array


def sum_per_example(x: Array) -> Array:
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


# L2: modality recovery through the heads; L3 for 8-bit images.


def categorical_nll(logits: Array, labels: Array) -> Array:
    """-log softmax(logits)[label], summed per example: logits [B, ..., K], int labels [B, ...] -> [B].

    For class labels ([B, K] logits) and segmentation masks ([B, H, W, K] logits).
    """
    log_probabilities = jax.nn.log_softmax(logits.astype(float), axis=-1)
    picked = jnp.take_along_axis(log_probabilities, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return -sum_per_example(picked)


def gaussian_nll(mean: Array, target: Array, log_scale: Array | float = 0.0) -> Array:
    """-log N(target; mean, exp(log_scale)^2), summed per example: [B, ...] -> [B].

    For images and embedding vectors; with a fixed log_scale it is a scaled MSE plus a constant.
    """
    mean = mean.astype(float)
    log_scale = jnp.broadcast_to(jnp.asarray(log_scale, float), mean.shape)
    nll = 0.5 * jnp.square(target - mean) * jnp.exp(-2.0 * log_scale) + log_scale + 0.5 * math.log(2 * math.pi)
    return sum_per_example(nll)


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
    return -sum_per_example(log_probability)


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
