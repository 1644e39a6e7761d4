"""Guidance (docs/design.md sections 3 and 3b); no Flax.

Classifier-free guidance (Ho & Salimans 2022) combines predictions of one denoiser under several
condition sets, stacked on a leading pass axis: pass 0 the base set, pass k the base plus modality k:
  guided = P_0 + sum_k s_k (P_k - P_0)
for every leaf of the prediction (eps, the estimated encodings of unobserved modalities, the heads'
outputs): all scales 0 give the base prediction, a single scale 1 the prediction of pass 1.

Classifier guidance by a likelihood the denoiser itself computes:
With p(z_t | y) proportional to p(z_t) p(y | z_t) and eps(z_t) = -sqrt(1 - abar_t) grad log p(z_t),
  eps~(z_t, t) = eps(z_t, t) - scale * sqrt(1 - abar_t) * grad_{z_t} log p(y | z_t)
is the conditional model's eps at scale 1 (exactly, for exact eps and p(y | z_t)) and sharpens the
conditioning for scale > 1 (Dhariwal & Nichol 2021). MT-Diffusion's label head gives log p(y | z_t)
from the same forward pass as eps, so the guided denoiser differentiates one call of the denoiser.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mmdiff_jax import diffusion
from mmdiff_jax.sampling.samplers import Denoise, Prediction
from mmdiff_jax.schedules import DiffusionSchedule

Array = jax.Array


def classifier_free_guidance(passes: Prediction, scales: Array) -> Prediction:
    """P_0 + sum_k s_k (P_k - P_0) over every leaf but a learned variance, which is the mean of the conditional
    passes' (k >= 1: with one, GLIDE's choice; a guided combination could leave [0, 1]).

    Args:
      passes: a Prediction whose leaves carry a leading pass axis of size K + 1 (pass 0: the base).
      scales: [K] guidance scales s_k (traced or concrete).
    Returns:
      A Prediction without the pass axis.
    """
    scales = jnp.asarray(scales, jnp.float32)

    def combine(leaf: Array) -> Array:
        # (1 - sum_k s_k) P_0 + sum_k s_k P_k: the same sum, exact at s = 0 (P_0) and at a single s = 1 (P_1).
        weights = jnp.concatenate([1.0 - jnp.sum(scales, keepdims=True), scales]).astype(leaf.dtype)
        return jnp.tensordot(weights, leaf, axes=1)

    num_passes = jax.tree.leaves(passes)[0].shape[0]
    if scales.shape != (num_passes - 1,):
        raise ValueError(f"{num_passes} passes need {num_passes - 1} scales, got shape {scales.shape}")
    variance = passes.variance_interpolation
    combined = jax.tree.map(combine, passes._replace(variance_interpolation=None))
    return combined._replace(variance_interpolation=None if variance is None else jnp.mean(variance[1:], axis=0))


def classifier_guidance(
    denoise: Denoise, schedule: DiffusionSchedule, log_likelihood: Callable[[Prediction], Array], scale: float | Array
) -> Denoise:
    """The guided denoiser: eps~ = eps - scale sqrt(1 - abar_t) grad_{z_t} log p(y | z_t).

    Args:
      denoise: the denoiser; its examples must not interact (true of the U-Net: per-example group norm),
        so the gradient of the batch sum is every example's own gradient.
      log_likelihood: Prediction -> [B] log p(y | z_t), e.g. the label head's log-softmax at the targets
        (read from `prediction.aux`).
      scale: guidance scale (0 turns guidance off).
    Returns:
      A denoiser with the same estimated encodings and aux as `denoise` and the shifted eps (and z_0).
    """

    def guided(z_t: Array, t: Array) -> Prediction:
        def objective(z):
            prediction = denoise(z, t)
            return jnp.sum(log_likelihood(prediction)), prediction

        gradient, prediction = jax.grad(objective, has_aux=True)(z_t)
        one_minus = diffusion.at_step(schedule.one_minus_alpha_bar, t, z_t)
        shifted = prediction._replace(eps=prediction.eps - scale * jnp.sqrt(one_minus) * gradient)
        if prediction.z_0 is None:
            return shifted
        # The same shift of z_0 = (u_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): + scale (1 - abar_t) / sqrt(abar_t)
        # times the gradient, taken as 0 where abar_t = 0 (z_T holds no signal: p(y | z_T) = p(y)).
        alpha_bar = diffusion.at_step(schedule.alpha_bar, t, z_t)
        shift = jnp.where(alpha_bar > 0, one_minus / jnp.sqrt(jnp.where(alpha_bar > 0, alpha_bar, 1.0)), 0.0)
        return shifted._replace(z_0=prediction.z_0 + scale * shift * gradient)

    return guided
