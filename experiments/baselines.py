"""Baselines shared by the experiments, at the experiment's budget (steps, batch, optimizer, EMA) and backbone.

  plain_ddpm_config(config)         the same config with no auxiliary modality: N = 0 is plain DDPM
                                    (same U-Net, schedule, data order, t and noise draws)
  train_reconstruction(name, config, workdir) -> trainer.Trained
                                    the same U-Net trained by MSE to predict the image from the masked image
                                    [x * mask, mask] in one pass (t fixed at 0), by `train_and_evaluate`
  make_reconstruct_fn(trained)      reconstruct(params, masked_image, mask) -> image
  make_sdedit_fn(model, schedule, strength, num_steps)
                                    SDEdit restoration (Meng et al. 2022) with a plain diffusion model
  make_repaint_fn(model, schedule, **sampler_options)
                                    restoration by re-imposing the known pixels at every step (RePaint-style,
                                    without resampling) with a model that observes nothing else

Restoration functions take the masked image x * mask [B, H, W, C] (hidden pixels 0, mid-grey) and the
mask [B, H, W, 1] (1 = known) and return images in [-1, 1]; callers paste the known pixels back.
"""

from __future__ import annotations

import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import trainer
from mmdiff_jax import diffusion
from mmdiff_jax.modalities import MASK_KEY
from mmdiff_jax.models.unet import UNet, UNetConfig
from mmdiff_jax.sampling import ddim_step, known_region_hook, make_denoise, respace, sample_chain
from mmdiff_jax.training import Objective, config_io

Array = jax.Array


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


# ------------------------------------------------------------------------------------------------------ reconstruction
class ReconstructionNet(nn.Module):
    """The experiment's U-Net as a one-pass restorer: [x * mask, mask] [B, H, W, C + 1] -> x_hat [B, H, W, C]."""

    unet: UNetConfig
    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, masked_image: Array, mask: Array, *, train: bool = False) -> Array:
        mask = jnp.asarray(mask, jnp.float32)
        inputs = jnp.concatenate([jnp.asarray(masked_image, jnp.float32) * mask, mask], axis=-1)
        steps = jnp.zeros(inputs.shape[:1], jnp.int32)  # one pass: the time embedding is a constant
        output = UNet(self.unet, out_channels=self.channels, dtype=self.dtype)(inputs, steps, train=train)
        return output.output.astype(jnp.float32)


def reconstruction_model(config: ml_collections.ConfigDict) -> ReconstructionNet:
    return ReconstructionNet(
        UNetConfig(**dict(config.model.unet)),
        channels=config.model.z_shape[-1],
        dtype=config_io.DTYPES[config.model.dtype],
    )


def make_reconstruction_loss(model: ReconstructionNet, primary: str, masked: str):
    """loss_fn(params, batch, rng, train=True) -> (MSE over all pixels, {'mse', 'mse_hidden'})."""

    def loss_fn(params, batch, rng, train: bool = True):
        mask = jnp.asarray(batch[MASK_KEY], jnp.float32)
        prediction = model.apply({"params": params}, batch[masked], mask, train=train, rngs={"dropout": rng})
        squared = (prediction - jnp.asarray(batch[primary], jnp.float32)) ** 2
        hidden = jnp.broadcast_to(1.0 - mask, squared.shape)
        mse = jnp.mean(squared)
        return mse, {"mse": mse, "mse_hidden": jnp.sum(squared * hidden) / jnp.maximum(jnp.sum(hidden), 1.0)}

    return loss_fn


def train_reconstruction(name: str, config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> trainer.Trained:
    """Trains `ReconstructionNet` through the training path (`train_and_evaluate` with an `Objective`) with
    config's optim / train / data / mesh sections; resumes, or only restores a finished run."""
    model, masked = reconstruction_model(config), trainer.modality_name(config, "masked_image")
    height, width, channels = config.model.z_shape
    objective = Objective(
        init_params=lambda rng: model.init(
            rng, jnp.zeros((1, height, width, channels)), jnp.ones((1, height, width, 1))
        )["params"],
        loss_fn=make_reconstruction_loss(model, config.model.primary, masked),
        signature={
            "reconstruction": {
                "unet": config_io.unet_signature(config.model.unet),
                "input": masked,
                "z_shape": list(config.model.z_shape),
                "dtype": config.model.dtype,
            }
        },
    )
    return trainer.train_model(name, config, workdir, objective=objective, model=model)


def make_reconstruct_fn(trained: trainer.Trained):
    """reconstruct(params, masked_image, mask) -> image [B, H, W, C] clipped to [-1, 1] (jit-compiled)."""
    model = trained.model

    def reconstruct(params, masked_image, mask):
        return jnp.clip(model.apply({"params": params}, masked_image, mask, train=False), -1.0, 1.0)

    return jax.jit(reconstruct)


# --------------------------------------------------------------------------------------------- restoration by sampling
def make_sdedit_fn(model, schedule, *, strength: float, num_steps: int, eta: float = 0.0, clip_denoised: bool = True):
    """SDEdit restoration with a plain diffusion model (N = 0): sdedit(params, guide, rng) -> image.

    The guide (the masked image, hidden pixels mid-grey) is noised to t0 = round(strength T),
      z_t0 = sqrt(abar_t0) x_guide + sqrt(1 - abar_t0) xi,
    then denoised by `ddim_step`s over respace(t0, K), K = round(strength num_steps): the step size of a
    num_steps-step chain from T, so SDEdit costs `strength` of a full sample.
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

    def sdedit(params, guide, rng):
        guide = jnp.asarray(guide, jnp.float32)
        batch = guide.shape[:1]
        denoise = make_denoise(model, params, {})
        noise_key, chain_key = jax.random.split(rng)
        no_encodings = jnp.zeros((0,) + guide.shape, jnp.float32)
        z = diffusion.marginal_sample(
            schedule, guide, jnp.full(batch, t0, jnp.int32), no_encodings, jax.random.normal(noise_key, guide.shape)
        )

        def body(z_t, inputs):
            t, s, key = inputs
            prediction = denoise(z_t, jnp.full(batch, t))
            noise = jax.random.normal(key, z_t.shape) if eta else jnp.zeros_like(z_t)
            return ddim_step(schedule, z_t, t, s, prediction, noise, eta=eta, clip_denoised=clip_denoised), None

        keys = jax.random.split(chain_key, len(steps))
        z, _ = jax.lax.scan(body, z, (jnp.asarray(steps), jnp.asarray(next_steps), keys))
        return jnp.clip(z, -1.0, 1.0)

    return jax.jit(sdedit)


def make_repaint_fn(model, schedule, *, clip_denoised: bool = True, **sampler_options):
    """repaint(params, masked_image, mask, rng) -> image: the model's sampler from the prior, nothing observed,
    with the known pixels re-imposed after every step (`sampling.known_region_hook`). `sampler_options`:
    method, num_steps, ... of `sampling.sample_chain`."""

    def repaint(params, masked_image, mask, rng):
        masked_image = jnp.asarray(masked_image, jnp.float32)
        hook = known_region_hook(schedule, masked_image, mask)
        output = sample_chain(
            make_denoise(model, params, {}),
            schedule,
            rng,
            masked_image.shape,
            clip_denoised=clip_denoised,
            step_hook=hook,
            **sampler_options,
        )
        return jnp.clip(output.z_0, -1.0, 1.0)

    return jax.jit(repaint)
