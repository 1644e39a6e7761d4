"""Prediction by the model's own heads: classification and segmentation of an observed image.

With the primary image x_0 observed, the heads read z_t at a chosen noise level t (docs/design.md section 2):
  z_t = sqrt(abar_t) x_0 + m_t + sqrt(1 - abar_t) xi,   xi ~ N(0, I),   m_t = sum_i lambda_t^(i) ehat_i,
with ehat_i = E_i(x_i) for further observed modalities and, for the unknown ones (the label being
predicted, say), E_i(D_i(h)) found by `refinements` fixed-point steps z <- base + m_t(ehat(z)) from
z = base = sqrt(abar_t) x_0 + sqrt(1 - abar_t) xi. The heads' estimates (probabilities, means) are
averaged over `num_noise_samples` draws of xi, then decoded (`conditional.decode_heads`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mmdiff_jax import diffusion
from mmdiff_jax.models.mt_diffusion import MTDiffusion
from mmdiff_jax.modalities import check_schedule
from mmdiff_jax.sampling.conditional import Observed, decode_heads, head_estimates, make_denoise
from mmdiff_jax.schedules import DiffusionSchedule

Array = jax.Array


def make_predict_fn(
    model: MTDiffusion,
    schedule: DiffusionSchedule,
    *,
    num_noise_samples: int = 1,
    refinements: int = 1,
    sharding: jax.sharding.Sharding | None = None,
):
    """predict(params, image, rng, observed=None, t=1) -> decoded heads, name -> dict (`decode_heads`).

    image: x_0 [B, *S]; t: the noise level in 1..T (traced: no recompilation per level). Jit-compiled
    once per batch shape and observed subset; `sharding` constrains the batch axis of z_t.
    """
    check_schedule(model.modalities, schedule)
    if num_noise_samples < 1:
        raise ValueError(f"num_noise_samples must be >= 1, got {num_noise_samples}")

    def constrain(x):
        return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

    def predict(
        params: Any, image: Array, rng: Array, observed: Observed | None = None, t: int | Array = 1
    ) -> dict[str, dict[str, Array]]:
        observed = dict(observed or {})
        image = jnp.asarray(image, jnp.float32)
        if image.shape[1:] != tuple(model.z_shape):
            raise ValueError(f"image must have shape [B, *{model.z_shape}], got {image.shape}")
        denoise = make_denoise(model, schedule, params, observed)
        steps = jnp.full(image.shape[:1], t, jnp.int32)

        def estimate(key):
            noise = jax.random.normal(key, image.shape, jnp.float32)
            base = constrain(
                diffusion.marginal_sample(
                    schedule, image, steps, noise, encodings=jnp.zeros((schedule.num_modalities,) + image.shape)
                )
            )
            z_t = base
            for _ in range(refinements if schedule.num_modalities else 0):
                encodings = denoise(z_t, steps).estimated_encodings
                z_t = constrain(base + diffusion.encoding_mean(schedule, base, steps, encodings=encodings))
            return head_estimates(model.modalities, denoise(z_t, steps).aux)

        estimates = jax.lax.map(estimate, jax.random.split(rng, num_noise_samples))
        return decode_heads(model.modalities, jax.tree.map(lambda x: jnp.mean(x, axis=0), estimates))

    return jax.jit(predict)


def _head_fn(model, schedule, name, kind, **options):
    names = [m.name for m in model.modalities if m.kind == kind and m.head != "none"]
    name = name or (names[0] if names else None)
    if name not in names:
        raise ValueError(f"no {kind} modality with a head named {name!r} (candidates: {names})")
    predict = make_predict_fn(model, schedule, **options)

    def head_fn(params, image, rng, observed=None, t=1):
        if name in (observed or {}):
            raise ValueError(f"{name!r} is what is predicted: it cannot be observed")
        return predict(params, image, rng, observed, t)[name]

    return head_fn


def make_classify_fn(model: MTDiffusion, schedule: DiffusionSchedule, name: str | None = None, **options):
    """classify(params, image, rng, observed=None, t=1) -> {'class_ids': [B], 'probabilities': [B, K]}.

    `name`: the label modality (default: the first); options as `make_predict_fn`.
    """
    return _head_fn(model, schedule, name, "label", **options)


def make_segment_fn(model: MTDiffusion, schedule: DiffusionSchedule, name: str | None = None, **options):
    """segment(params, image, rng, observed=None, t=1) -> {'class_map': [B, H, W], 'probabilities': [B, H, W, K]}.

    `name`: the segmentation modality (default: the first); options as `make_predict_fn`.
    """
    return _head_fn(model, schedule, name, "segmentation", **options)
