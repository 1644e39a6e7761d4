"""The chain samplers by name (a config's `sampler.method`), one entry for every caller; no Flax.

'ddpm'          ancestral, all T steps (`samplers.ddpm_sample`; `variance` 'small' or 'large')
'ddim'          `num_steps` respaced steps, stochasticity `eta` (`samplers.ddim_sample`)
'dpm_solver++'  `num_steps` steps of DPM-Solver++ `variant` ('2M', '3M', '2S', '1') with `spacing`
                ('time_uniform', 'logsnr') (`dpm_solver.dpm_solver_sample`)
"""

from __future__ import annotations

from typing import Any

import jax

from mmdiff_jax.sampling import dpm_solver
from mmdiff_jax.sampling.samplers import Denoise, SamplerOutput, ddim_sample, ddpm_sample
from mmdiff_jax.schedules import DiffusionSchedule

METHODS = ("ddpm", "ddim", "dpm_solver++")


def check_sampler(
    schedule: DiffusionSchedule,
    method: str,
    num_steps: int | None = None,
    variant: str = "2M",
    spacing: str = "time_uniform",
) -> int:
    """Validates a sampler's options before anything is traced; returns its number of steps (default:
    T for 'ddpm', min(50, T) otherwise). Raises ValueError naming the bad option."""
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; known: {METHODS}")
    if method == "ddpm":
        if num_steps not in (None, schedule.num_steps):
            raise ValueError(
                f"DDPM runs all T = {schedule.num_steps} steps; for fewer use method='ddim' (eta=1 is "
                f"ancestral sampling on the respaced chain)"
            )
        return schedule.num_steps
    num_steps = num_steps or min(50, schedule.num_steps)
    if method == "dpm_solver++":
        if variant not in dpm_solver.VARIANTS:
            raise ValueError(f"unknown DPM-Solver++ variant {variant!r}; known: {dpm_solver.VARIANTS}")
        dpm_solver.solver_timesteps(schedule, num_steps, spacing)  # checks spacing and num_steps
    return num_steps


def sample_chain(
    denoise: Denoise,
    schedule: DiffusionSchedule,
    rng: jax.Array,
    shape: tuple[int, ...],
    *,
    method: str = "ddim",
    num_steps: int | None = None,
    eta: float = 0.0,
    variance: str = "small",
    variant: str = "2M",
    spacing: str = "time_uniform",
    **chain_options: Any,
) -> SamplerOutput:
    """The sampler `method` (module docstring) from the prior to z_0; options a method does not use are
    ignored (a config's sampler section passes all of them). `chain_options`: clip_denoised, prior_noise,
    prior_refinements, step_hook, sharding (see `samplers.ddim_sample`)."""
    num_steps = check_sampler(schedule, method, num_steps, variant, spacing)
    if method == "ddpm":
        return ddpm_sample(denoise, schedule, rng, shape, variance=variance, **chain_options)
    if method == "ddim":
        return ddim_sample(denoise, schedule, rng, shape, num_steps=num_steps, eta=eta, **chain_options)
    return dpm_solver.dpm_solver_sample(
        denoise, schedule, rng, shape, num_steps=num_steps, variant=variant, spacing=spacing, **chain_options
    )
