"""Restoration with any denoiser: RePaint-style re-imposition and SDEdit; no Flax.

RePaint-style (Lugmayr et al. 2022), `known_region_hook`: after each reverse step to z_s, the known region is replaced by a fresh forward sample of the known
image at level s, with the step's encodings:
  z_s <- mask * ( sqrt(abar_s) x + m_s + sqrt(1 - abar_s) xi ) + (1 - mask) * z_s,   xi ~ N(0, I),
(`diffusion.marginal_sample`; at s = 0 this is x itself, so the result keeps the known pixels exactly).
Together with the masked image observed as a modality (ehat = E(x * mask, mask) in the reverse mean),
the sampler generates the unknown region consistently with the known one. RePaint's resampling
(jumping back and forth) is not implemented.

SDEdit (Meng et al. 2022), `sdedit_sample`: a guide image (e.g. the masked image, hidden pixels mid-grey) is
noised to t0 = round(strength T) and denoised from there, for models that observe nothing (N = 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmdiff_jax import diffusion
from mmdiff_jax.sampling.samplers import Denoise, SamplerOutput, StepHook, ddim_step, respace
from mmdiff_jax.schedules import DiffusionSchedule

Array = jax.Array


def known_region_hook(schedule: DiffusionSchedule, x_known: Array, mask: Array) -> StepHook:
    """A sampler step hook re-imposing x_known [B, *S] where mask (broadcastable, 1 = known) is 1."""
    mask = jnp.asarray(mask, jnp.float32)

    def hook(z_s: Array, s: Array, estimated_encodings: Array, key: Array) -> Array:
        noise = jax.random.normal(key, z_s.shape, z_s.dtype)
        known = diffusion.marginal_sample(schedule, x_known.astype(z_s.dtype), s, noise, encodings=estimated_encodings)
        return mask * known + (1.0 - mask) * z_s

    return hook


def sdedit_sample(
    denoise: Denoise,
    schedule: DiffusionSchedule,
    rng: Array,
    guide: Array,
    *,
    strength: float,
    num_steps: int,
    eta: float = 0.0,
    clip_denoised: bool = True,
) -> SamplerOutput:
    """SDEdit from `guide` [B, *S] with a denoiser of a plain diffusion model (N = 0).

    The guide is noised to t0 = round(strength T),
      z_t0 = sqrt(abar_t0) x_guide + sqrt(1 - abar_t0) xi,
    then denoised by `ddim_step`s (stochasticity `eta`) over respace(t0, K), K = round(strength num_steps):
    the step size of a num_steps-step chain from T, so SDEdit costs `strength` of a full sample.
    Returns the chain's z_0 (unclipped) and the denoiser's aux of its last call. ValueError for a schedule
    with auxiliary modalities or a strength outside (0, 1].
    """
    if schedule.num_modalities:
        raise ValueError(
            f"SDEdit here is for plain diffusion models (N = 0); the schedule has "
            f"{schedule.num_modalities} auxiliary modalities"
        )
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"SDEdit strength must lie in (0, 1], got {strength}")
    t0 = max(1, round(strength * schedule.num_steps))
    steps = respace(t0, max(1, min(t0, round(strength * num_steps))))
    next_steps = np.concatenate([steps[1:], [0]]).astype(np.int32)
    guide = jnp.asarray(guide, jnp.float32)
    batch = guide.shape[:1]
    noise_key, chain_key = jax.random.split(rng)
    z = diffusion.marginal_sample(
        schedule, guide, jnp.full(batch, t0, jnp.int32), jax.random.normal(noise_key, guide.shape)
    )
    aux = jax.tree.map(
        lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), jax.eval_shape(denoise, z, jnp.full(batch, t0)).aux
    )

    def body(carry, inputs):
        z_t, _ = carry
        t, s, key = inputs
        prediction = denoise(z_t, jnp.full(batch, t))
        noise = jax.random.normal(key, z_t.shape) if eta else jnp.zeros_like(z_t)
        z_s = ddim_step(schedule, z_t, t, s, prediction, noise, eta=eta, clip_denoised=clip_denoised)
        return (z_s, prediction.aux), None

    keys = jax.random.split(chain_key, len(steps))
    (z, aux), _ = jax.lax.scan(body, (z, aux), (jnp.asarray(steps), jnp.asarray(next_steps), keys))
    return SamplerOutput(z, aux)
