"""What the denoiser predicts and how its error is weighted by t (docs/design.md section 3d); pure, no Flax.

Prediction targets: eps (the default), v or z_0, each of u_t = z_t - m_t, converted exactly into each other
(`prediction_target`, `eps_from_prediction`, `prediction_from_eps`; arguments follow `diffusion`'s
convention). Loss weighting by t: `time_weight` ('uniform' or min-SNR-gamma).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmdiff_jax import diffusion
from mmdiff_jax.schedules import DiffusionSchedule, has_zero_terminal_snr

Array = jax.Array

# All refer to u_t = z_t - m_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t)
# eps, the plain DDPM chain inside the multi-modal one, so each converts exactly into the others given z_t and
# the encodings: eps; z_0; v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0 (Salimans & Ho 2022, "velocity"), from
# which eps = sqrt(abar_t) v + sqrt(1 - abar_t) u_t and z_0 = sqrt(abar_t) u_t - sqrt(1 - abar_t) v.

PREDICTIONS = ("eps", "v", "z_0")


def check_prediction(kind: str, schedule: DiffusionSchedule | None = None) -> None:
    """ValueError unless `kind` is one of PREDICTIONS, and, given a (concrete) schedule with zero terminal SNR
    (`schedules.has_zero_terminal_snr`), unless it is 'v' or 'z_0': at abar_T = 0 an eps-prediction says nothing
    about z_0 (docs/design.md section 3d)."""
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction target {kind!r}; known: {PREDICTIONS}")
    if kind == "eps" and schedule is not None and has_zero_terminal_snr(schedule):
        raise ValueError(
            "a zero-terminal-SNR schedule (abar_T = 0, config.diffusion.zero_terminal_snr) needs the 'v' or 'z_0' "
            "prediction target (config.model.prediction): at t = T, z_T = eps holds no signal, and eps-prediction "
            "cannot recover z_0 from it"
        )


def prediction_target(schedule: DiffusionSchedule, z_0: Array, t: Array, eps: Array, kind: str) -> Array:
    """What a denoiser predicting `kind` ('eps', 'v' or 'z_0') learns at (z_0, t, eps); t in 0..T."""
    check_prediction(kind)
    if kind == "eps":
        return eps
    if kind == "z_0":
        return z_0
    alpha_bar = diffusion.at_step(schedule.alpha_bar, t, z_0)
    return jnp.sqrt(alpha_bar) * eps - jnp.sqrt(diffusion.at_step(schedule.one_minus_alpha_bar, t, z_0)) * z_0


def _plain_chain(schedule: DiffusionSchedule, z_t: Array, t: Array, encodings: Array | None):
    """(u_t = z_t - m_t, sqrt(abar_t), sqrt(1 - abar_t)) at steps t in 1..T, shaped like z_t."""
    t = diffusion.check_steps(t, schedule.num_steps, first=1)
    u_t = z_t - diffusion.encoding_mean(schedule, z_t, t, encodings=encodings)
    signal = jnp.sqrt(diffusion.at_step(schedule.alpha_bar, t, z_t))
    return u_t, signal, jnp.sqrt(diffusion.at_step(schedule.one_minus_alpha_bar, t, z_t))


def eps_from_prediction(
    schedule: DiffusionSchedule, z_t: Array, t: Array, prediction: Array, kind: str, *, encodings: Array | None = None
) -> Array:
    """eps from a denoiser's output of kind `kind` at z_t (module comment above); t in 1..T."""
    check_prediction(kind)
    if kind == "eps":
        return prediction
    if kind == "z_0":
        return diffusion.eps_from_z0(schedule, z_t, t, prediction, encodings=encodings)
    u_t, signal, noise = _plain_chain(schedule, z_t, t, encodings)
    return signal * prediction + noise * u_t


def z0_from_prediction(
    schedule: DiffusionSchedule, z_t: Array, t: Array, prediction: Array, kind: str, *, encodings: Array | None = None
) -> Array:
    """z_0 from a denoiser's output of kind `kind` at z_t; t in 1..T. For 'v' and 'z_0' it is finite at every
    step, abar_t = 0 included (z_0 = -v there); for 'eps' it is `diffusion.z0_from_eps` (inf where abar_t = 0)."""
    check_prediction(kind)
    if kind == "z_0":
        return prediction
    if kind == "eps":
        return diffusion.z0_from_eps(schedule, z_t, t, prediction, encodings=encodings)
    u_t, signal, noise = _plain_chain(schedule, z_t, t, encodings)
    return signal * u_t - noise * prediction


def model_z0(
    schedule: DiffusionSchedule, z_t: Array, t: Array, prediction: Array, kind: str, *, encodings: Array | None = None
) -> Array | None:
    """The z_0 a denoiser of target `kind` gives at every step, abar_t = 0 included: `z0_from_prediction` for 'v'
    and 'z_0'; None for 'eps', whose z_0 is undefined there (the samplers and the bound derive it from eps
    elsewhere, and read this only where abar_t = 0)."""
    return None if kind == "eps" else z0_from_prediction(schedule, z_t, t, prediction, kind, encodings=encodings)


def prediction_from_eps(
    schedule: DiffusionSchedule, z_t: Array, t: Array, eps: Array, kind: str, *, encodings: Array | None = None
) -> Array:
    """The output of kind `kind` that `eps_from_prediction` maps to eps (its inverse); t in 1..T."""
    check_prediction(kind)
    if kind == "eps":
        return eps
    if kind == "z_0":
        return diffusion.z0_from_eps(schedule, z_t, t, eps, encodings=encodings)
    u_t, signal, noise = _plain_chain(schedule, z_t, t, encodings)
    return (eps - noise * u_t) / signal


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
