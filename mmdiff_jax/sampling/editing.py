"""Editing with a trained model (docs/design.md section 3): restoration, SDEdit and image transition.

Each is a jit-compiled function of (params, the input, rng) returning `conditional.Samples` (image clipped
to [-1, 1], raw z_0, decoded heads), built on `make_sample_fn` and the pure `restoration` functions:
  make_restore_fn     inpainting: the masked image observed as a modality and/or its known pixels
                      re-imposed at every step (RePaint-style); a model that observes nothing (plain DDPM,
                      N = 0) restores by re-imposition alone
  make_sdedit_fn      SDEdit from the masked image, with a model that observes nothing (N = 0)
  make_transition_fn  source -> target under a `bridge` weight schedule (z_T carries the source)
"""

from __future__ import annotations

import jax

from mmdiff_jax.modalities import MASK_KEY, check_schedule
from mmdiff_jax.models.mt_diffusion import MTDiffusion
from mmdiff_jax.sampling.conditional import (
    Samples,
    check_modality,
    decode_samples,
    make_denoise,
    make_sample_fn,
)
from mmdiff_jax.sampling.restoration import sdedit_sample
from mmdiff_jax.schedules import DiffusionSchedule


def make_restore_fn(
    model: MTDiffusion, schedule: DiffusionSchedule, masked: str | None, *, repaint: bool = True, **sampler_options
):
    """Inpainting: restore(params, image, mask, rng, observed=None, **call_options) -> Samples.

    The masked image (image [B, H, W, C], mask [B, H, W, 1], 1 = known) is observed as modality `masked`;
    with `repaint` its known pixels are re-imposed at every step. `masked` None: the model observes nothing
    (e.g. plain DDPM) and restores by re-imposition alone (`repaint` must be True). Other options as
    `make_sample_fn`.
    """
    if masked is None:
        if not repaint:
            raise ValueError("restoration with nothing observed needs repaint=True (else it is unconditional sampling)")
        sample = make_sample_fn(model, schedule, **sampler_options)

        def reimpose(params, image, mask, rng, observed=None, **call_options) -> Samples:
            return sample(params, rng, observed, batch_size=image.shape[0], known_region=(image, mask), **call_options)

        return reimpose
    check_modality(model, masked, ("masked_image",), "restoration")
    sample = make_sample_fn(model, schedule, repaint=masked if repaint else None, **sampler_options)

    def restore(params, image, mask, rng, observed=None, **call_options) -> Samples:
        return sample(params, rng, {**(observed or {}), masked: image, MASK_KEY: mask}, **call_options)

    return restore


def make_sdedit_fn(
    model: MTDiffusion,
    schedule: DiffusionSchedule,
    *,
    strength: float,
    num_steps: int,
    eta: float = 0.0,
    clip_denoised: bool = True,
):
    """SDEdit: sdedit(params, guide [B, *S], rng) -> Samples, with a model that observes nothing (N = 0);
    `restoration.sdedit_sample` (strength, num_steps: of a full chain from T, eta, clip_denoised)."""
    check_schedule(model.modalities, schedule)

    def sdedit(params, guide, rng) -> Samples:
        output = sdedit_sample(
            make_denoise(model, schedule, params, {}),
            schedule,
            rng,
            guide,
            strength=strength,
            num_steps=num_steps,
            eta=eta,
            clip_denoised=clip_denoised,
        )
        return decode_samples(model, output)

    return jax.jit(sdedit)


def make_transition_fn(model: MTDiffusion, schedule: DiffusionSchedule, source: str, **sampler_options):
    """Image transition: transition(params, source_image, rng, observed=None, **call_options) -> Samples.

    The source is observed as image modality `source`; under its `bridge` weight schedule the prior
    N(m_T, I) already carries lambda_T E(source), and the reverse process removes it while generating
    the target. Other options as `make_sample_fn`.
    """
    check_modality(model, source, ("image",), "transition")
    sample = make_sample_fn(model, schedule, **sampler_options)

    def transition(params, source_image, rng, observed=None, **call_options) -> Samples:
        return sample(params, rng, {**(observed or {}), source: source_image}, **call_options)

    return transition
