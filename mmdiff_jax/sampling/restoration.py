"""Restoration by re-imposing known pixels at every step (RePaint-style, Lugmayr et al. 2022); no Flax.

After each reverse step to z_s, the known region is replaced by a fresh forward sample of the known
image at level s, with the step's encodings:
  z_s <- mask * ( sqrt(abar_s) x + m_s + sqrt(1 - abar_s) xi ) + (1 - mask) * z_s,   xi ~ N(0, I),
(`diffusion.marginal_sample`; at s = 0 this is x itself, so the result keeps the known pixels exactly).
Together with the masked image observed as a modality (ehat = E(x * mask, mask) in the reverse mean),
the sampler generates the unknown region consistently with the known one. RePaint's resampling
(jumping back and forth) is not implemented.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmdiff_jax import diffusion
from mmdiff_jax.sampling.samplers import StepHook
from mmdiff_jax.schedules import DiffusionSchedule

Array = jax.Array


def known_region_hook(schedule: DiffusionSchedule, x_known: Array, mask: Array) -> StepHook:
    """A sampler step hook re-imposing x_known [B, *S] where mask (broadcastable, 1 = known) is 1."""
    mask = jnp.asarray(mask, jnp.float32)

    def hook(z_s: Array, s: Array, estimated_encodings: Array, key: Array) -> Array:
        noise = jax.random.normal(key, z_s.shape, z_s.dtype)
        known = diffusion.marginal_sample(schedule, x_known.astype(z_s.dtype), s, estimated_encodings, noise)
        return mask * known + (1.0 - mask) * z_s

    return hook
