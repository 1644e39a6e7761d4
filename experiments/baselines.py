"""Baselines shared by the experiments, at the experiment's budget (steps, batch, optimizer, EMA) and backbone
(their networks and losses are tasks: `mmdiff_jax.tasks.baselines`).

  plain_ddpm_config(config)         the same config with no auxiliary modality: N = 0 is plain DDPM
                                    (same U-Net, schedule, data order, t and noise draws)
  aggregation_only_config(config)   every modality's condition path 'none' (the ablation)
  make_reconstruct_fn(trained)      reconstruct(params, masked_image, mask) -> image, of the reconstruction
                                    task (the U-Net predicting the image from [x * mask, mask] in one pass)
  make_sdedit(config, ddpm, strength)   fn(guide, rng) -> images: SDEdit with a trained plain DDPM, the
                                    experiment's sampler steps

The sampling baselines (SDEdit, RePaint with plain DDPM) are `sampling.make_sdedit_fn` and
`sampling.make_restore_fn(..., masked=None)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from experiments import trainer
from mmdiff_jax import sampling


def plain_ddpm_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with no auxiliary modality (plain DDPM); everything else, the seed included, unchanged."""
    plain = trainer.copy_config(config)
    plain.model.modalities = {}
    return plain


def aggregation_only_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with every modality's condition path 'none': the denoiser sees nothing observed and
    conditioning enters through the aggregation only (the ablation of docs/design.md section 3b)."""
    ablation = trainer.copy_config(config)
    for spec in ablation.model.modalities.values():
        spec["condition"] = "none"
    return ablation


# --------------------------------------------------------------------------------------------- restoration baselines
def make_reconstruct_fn(trained: trainer.Trained):
    """reconstruct(params, masked_image, mask) -> image [B, H, W, C] clipped to [-1, 1] (jit-compiled), of a
    trained `tasks.make_reconstruction_task`."""
    model = trained.model

    def reconstruct(params, masked_image, mask):
        return jnp.clip(model.apply({"params": params}, masked_image, mask, train=False), -1.0, 1.0)

    return jax.jit(reconstruct)


def make_sdedit(config: ml_collections.ConfigDict, ddpm: trainer.Trained, strength: float):
    """fn(guide [B, *S], rng) -> images [B, *S]: SDEdit (`sampling.make_sdedit_fn`) with the trained plain DDPM
    `ddpm` from `guide` noised to t0 = strength * T, with `config.experiment.sampler`'s number of steps (all T for
    'ddpm') and eta."""
    section = config.experiment.sampler
    sdedit = sampling.make_sdedit_fn(
        ddpm.model,
        ddpm.schedule,
        strength=strength,
        num_steps=ddpm.schedule.num_steps if section.method == "ddpm" else section.num_steps,
        eta=section.get("eta", 1.0),
    )
    return lambda guide, rng: sdedit(ddpm.params, guide, rng).image
