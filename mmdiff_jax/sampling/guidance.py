"""Classifier guidance by a likelihood the denoiser itself computes (docs/design.md section 3); no Flax.

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


def classifier_guidance(denoise: Denoise, schedule: DiffusionSchedule,
                        log_likelihood: Callable[[Prediction], Array], scale: float | Array) -> Denoise:
    """The guided denoiser: eps~ = eps - scale sqrt(1 - abar_t) grad_{z_t} log p(y | z_t).

    Args:
      denoise: the denoiser; its examples must not interact (true of the U-Net: per-example group norm),
        so the gradient of the batch sum is every example's own gradient.
      log_likelihood: Prediction -> [B] log p(y | z_t), e.g. the label head's log-softmax at the targets
        (read from `prediction.aux`).
      scale: guidance scale (0 turns guidance off).
    Returns:
      A denoiser with the same estimated encodings and aux as `denoise` and the shifted eps.
    """
    def guided(z_t: Array, t: Array) -> Prediction:
        def objective(z):
            prediction = denoise(z, t)
            return jnp.sum(log_likelihood(prediction)), prediction

        gradient, prediction = jax.grad(objective, has_aux=True)(z_t)
        noise_scale = jnp.sqrt(diffusion.at_step(schedule.one_minus_alpha_bar, t, z_t))
        return prediction._replace(eps=prediction.eps - scale * noise_scale * gradient)

    return guided
