"""What the denoiser predicts and how its error is weighted by t (docs/design.md section 3d); pure, no Flax.

Prediction targets: eps (the default), v or z_0, each of u_t = z_t - m_t, converted exactly into each other
(`prediction_target`, `eps_from_prediction`, `prediction_from_eps`; arguments follow `diffusion`'s
convention). Loss weighting by t: `time_weight` ('uniform' or min-SNR-gamma).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmdiff_jax import diffusion
from mmdiff_jax.schedules import DiffusionSchedule

Array = jax.Array

# All refer to u_t = z_t - m_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t)
# eps, the plain DDPM chain inside the multi-modal one, so each converts exactly into the others given z_t and
# the encodings: eps; z_0; v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0 (Salimans & Ho 2022, "velocity"), from
# which eps = sqrt(abar_t) v + sqrt(1 - abar_t) u_t and z_0 = sqrt(abar_t) u_t - sqrt(1 - abar_t) v.

PREDICTIONS = ("eps", "v", "z_0")


def check_prediction(kind: str) -> None:
    """ValueError unless `kind` is one of PREDICTIONS."""
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction target {kind!r}; known: {PREDICTIONS}")


def prediction_target(schedule: DiffusionSchedule, z_0: Array, t: Array, eps: Array, kind: str) -> Array:
    """What a denoiser predicting `kind` ('eps', 'v' or 'z_0') learns at (z_0, t, eps); t in 0..T."""
    check_prediction(kind)
    if kind == "eps":
        return eps
    if kind == "z_0":
        return z_0
    alpha_bar = diffusion.at_step(schedule.alpha_bar, t, z_0)
    return jnp.sqrt(alpha_bar) * eps - jnp.sqrt(diffusion.at_step(schedule.one_minus_alpha_bar, t, z_0)) * z_0


def eps_from_prediction(
    schedule: DiffusionSchedule, z_t: Array, t: Array, prediction: Array, kind: str, *, encodings: Array | None = None
) -> Array:
    """eps from a denoiser's output of kind `kind` at z_t (module comment above); t in 1..T."""
    check_prediction(kind)
    if kind == "eps":
        return prediction
    if kind == "z_0":
        return diffusion.eps_from_z0(schedule, z_t, t, prediction, encodings=encodings)
    t = diffusion.check_steps(t, schedule.num_steps, first=1)
    u_t = z_t - diffusion.encoding_mean(schedule, z_t, t, encodings=encodings)
    alpha_bar, one_minus = (
        diffusion.at_step(schedule.alpha_bar, t, z_t),
        diffusion.at_step(schedule.one_minus_alpha_bar, t, z_t),
    )
    return jnp.sqrt(alpha_bar) * prediction + jnp.sqrt(one_minus) * u_t


def prediction_from_eps(
    schedule: DiffusionSchedule, z_t: Array, t: Array, eps: Array, kind: str, *, encodings: Array | None = None
) -> Array:
    """The output of kind `kind` that `eps_from_prediction` maps to eps (its inverse); t in 1..T."""
    check_prediction(kind)
    if kind == "eps":
        return eps
    if kind == "z_0":
        return diffusion.z0_from_eps(schedule, z_t, t, eps, encodings=encodings)
    t = diffusion.check_steps(t, schedule.num_steps, first=1)
    u_t = z_t - diffusion.encoding_mean(schedule, z_t, t, encodings=encodings)
    alpha_bar, one_minus = (
        diffusion.at_step(schedule.alpha_bar, t, z_t),
        diffusion.at_step(schedule.one_minus_alpha_bar, t, z_t),
    )
    return (eps - jnp.sqrt(one_minus) * u_t) / jnp.sqrt(alpha_bar)


TIME_WEIGHTINGS = ("uniform", "min_snr")


def time_weight(
    schedule: DiffusionSchedule, t: Array, prediction: str = "eps", weighting: str = "uniform", gamma: float = 5.0
) -> Array:
    """Per-example weight [B] of the prediction term at steps t [B]: 1 ('uniform'), or min-SNR-gamma
    (Hang et al. 2023), min(SNR_t, gamma) / SNR_t for eps, / (SNR_t + 1) for v and / 1 for z_0 targets, with
    SNR_t = abar_t / (1 - abar_t): each is the z_0-MSE weighted by min(SNR_t, gamma)."""
    if weighting not in TIME_WEIGHTINGS:
        raise ValueError(f"unknown time weighting {weighting!r}; known: {TIME_WEIGHTINGS}")
    if weighting == "uniform":
        return jnp.ones(jnp.shape(t))
    if not gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
    snr = diffusion.lookup(schedule.alpha_bar, t) / diffusion.lookup(schedule.one_minus_alpha_bar, t)
    target_weight = {"eps": snr, "v": snr + 1.0, "z_0": jnp.ones_like(snr)}[prediction]
    return jnp.minimum(snr, gamma) / target_weight
