"""The experiments' baseline networks as tasks, on MT-Diffusion's backbone (the config's U-Net, z, dtype).

  make_reconstruction_task(config)           ReconstructionNet: the U-Net as a one-pass restorer, pixel MSE
  make_class_conditional_ddpm_task(config)   ClassConditionalDenoiser: ADM's class-conditional DDPM, eps-MSE
  make_classifier_task(config)               BackbonePredictor: the U-Net (t = 0) with MT-Diffusion's label
                                             head, cross-entropy on clean images
  make_segmenter_task(config)                BackbonePredictor with the segmentation head, per-pixel
                                             cross-entropy on clean images

Plain DDPM needs no network of its own: it is the MT-Diffusion task with no auxiliary modality (N = 0).
Each reads the config's `model` section (and the names of its masked-image / label modalities); training
uses the config's optim / train / data / mesh sections like any task.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mmdiff_jax import diffusion, targets
from mmdiff_jax.data.fashion_mnist import CLASS_NAMES
from mmdiff_jax.modalities import MASK_KEY, modality_schedule
from mmdiff_jax.models.decoders import make_head
from mmdiff_jax.models.unet import UNet, UNetConfig
from mmdiff_jax.tasks.mt_diffusion import (
    build_modalities,
    compute_dtype,
    describe_loss,
    modality_name,
    section_signature,
    unet_config,
    unet_signature,
)
from mmdiff_jax.training.task import Task

Array = jax.Array


class ReconstructionNet(nn.Module):
    """The U-Net as a one-pass restorer: [x * mask, mask] [B, H, W, C + 1] -> x_hat [B, H, W, C]."""

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


class ClassConditionalDenoiser(nn.Module):
    """ADM's class-conditional DDPM: eps_theta(z_t, t, y) with y added to the time embedding."""

    unet: UNetConfig
    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z_t: Array, t: Array, labels: Array, *, train: bool = False) -> Array:
        output = UNet(self.unet, out_channels=self.channels, dtype=self.dtype)(z_t, t, labels, train=train)
        return output.output.astype(jnp.float32)


class BackbonePredictor(nn.Module):
    """The U-Net (t = 0) with MT-Diffusion's head of one modality, on clean images: image [B, H, W, C] ->
    logits [B, *head_shape]: the label head (MLP on the pooled bottleneck) gives [B, K], the segmentation head
    (conv on the full-resolution features) [B, H, W, K]."""

    unet: UNetConfig
    channels: int
    head: str  # 'mlp' | 'conv' (`Modality.head`)
    head_features: str  # 'bottleneck' | 'features' (`Modality.head_features`)
    head_shape: tuple[int, ...]
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image: Array, *, train: bool = False) -> Array:
        steps = jnp.zeros(image.shape[:1], jnp.int32)
        output = UNet(self.unet, out_channels=self.channels, dtype=self.dtype)(image, steps, train=train)
        size = self.head_shape[-1] if self.head == "conv" else math.prod(self.head_shape)
        head = make_head(self.head, size, self.hidden, num_groups=self.unet.num_groups, dtype=self.dtype)
        return head(getattr(output, self.head_features)).reshape(image.shape[:1] + tuple(self.head_shape))


def _signature(config: ml_collections.ConfigDict, **extra: Any) -> dict[str, Any]:
    return {"unet": unet_signature(config.model.unet), "z_shape": list(config.model.z_shape), **extra}


def make_reconstruction_task(config: ml_collections.ConfigDict) -> Task:
    """`ReconstructionNet` trained by MSE over all pixels (metrics 'mse', 'mse_hidden': the hidden pixels')
    to predict the primary image from the config's masked image."""
    masked, primary = modality_name(config, "masked_image"), config.model.primary
    height, width, channels = config.model.z_shape
    model = ReconstructionNet(unet_config(config), channels=channels, dtype=compute_dtype(config))

    def loss_fn(params, batch, rng, train: bool = True):
        mask = jnp.asarray(batch[MASK_KEY], jnp.float32)
        prediction = model.apply({"params": params}, batch[masked], mask, train=train, rngs={"dropout": rng})
        squared = (prediction - jnp.asarray(batch[primary], jnp.float32)) ** 2
        hidden = jnp.broadcast_to(1.0 - mask, squared.shape)
        mse = jnp.mean(squared)
        return mse, {"mse": mse, "mse_hidden": jnp.sum(squared * hidden) / jnp.maximum(jnp.sum(hidden), 1.0)}

    example = (jnp.zeros((1, height, width, channels)), jnp.ones((1, height, width, 1)))
    return Task(
        name="reconstruction",
        init_params=lambda rng: model.init(rng, *example)["params"],
        loss_fn=loss_fn,
        signature={"reconstruction": _signature(config, input=masked, dtype=config.model.dtype)},
        model=model,
        loss_description="pixel MSE",
    )


def make_class_conditional_ddpm_task(config: ml_collections.ConfigDict) -> Task:
    """`ClassConditionalDenoiser` trained by the MSE of the config's prediction target (`model.prediction`:
    eps, v or z_0, `targets.prediction_target`) with t ~ U{1..T}, z_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps,
    on the config's label modality; its schedule is the config's diffusion schedule with no auxiliary
    modality. A learned variance (`model.learn_variance`) is not built for it: its reverse variance is fixed
    (the report's training table names each model's loss)."""
    height, width, channels = config.model.z_shape
    model = ClassConditionalDenoiser(unet_config(config, num_classes=len(CLASS_NAMES)), channels, compute_dtype(config))
    schedule = modality_schedule(
        config.diffusion.noise_schedule,
        config.diffusion.num_steps,
        (),
        zero_terminal_snr=config.diffusion.zero_terminal_snr,
    )
    primary, label = config.model.primary, modality_name(config, "label")
    prediction = config.model.prediction
    targets.check_prediction(prediction, schedule)
    # The target joins the signature unless it is eps, so checkpoints saved before it existed restore.
    target = {} if prediction == "eps" else {"prediction": prediction}

    def loss_fn(params, batch, rng, train: bool = True):
        image = jnp.asarray(batch[primary], jnp.float32)
        t_key, noise_key, dropout_key = jax.random.split(rng, 3)
        t = jax.random.randint(t_key, image.shape[:1], 1, schedule.num_steps + 1)
        noise = jax.random.normal(noise_key, image.shape)
        z_t = diffusion.marginal_sample(schedule, image, t, noise)
        output = model.apply({"params": params}, z_t, t, batch[label], train=train, rngs={"dropout": dropout_key})
        mse = jnp.mean((output - targets.prediction_target(schedule, image, t, noise, prediction)) ** 2)
        return mse, {f"{prediction}_mse": mse}

    example = (jnp.zeros((1, height, width, channels)), jnp.ones((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
    return Task(
        name="class_conditional_ddpm",
        init_params=lambda rng: model.init(rng, *example)["params"],
        loss_fn=loss_fn,
        signature={
            "class_conditional_ddpm": _signature(
                config, diffusion=section_signature("diffusion", config.diffusion), **target
            )
        },
        model=model,
        schedule=schedule,
        loss_description=describe_loss((), prediction, zero_terminal_snr=config.diffusion.zero_terminal_snr),
    )


def make_classifier_task(config: ml_collections.ConfigDict) -> Task:
    """`BackbonePredictor` with the config's label head, trained by cross-entropy on clean images (metrics
    'cross_entropy', 'accuracy')."""
    return _predictor_task(config, "label", "classifier")


def make_segmenter_task(config: ml_collections.ConfigDict) -> Task:
    """`BackbonePredictor` with the config's segmentation head, trained by the per-pixel cross-entropy on clean
    images (metrics 'cross_entropy', 'accuracy': the pixel accuracy)."""
    return _predictor_task(config, "segmentation", "segmenter")


def _predictor_task(config: ml_collections.ConfigDict, kind: str, name: str) -> Task:
    """The U-Net with the head of the config's `kind` modality (its head, features and hidden width, else the
    U-Net's base channels), trained alone on clean images: cross-entropy against that modality's classes."""
    height, width, channels = config.model.z_shape
    primary, target = config.model.primary, modality_name(config, kind)
    (modality,) = [m for m in build_modalities(config) if m.name == target]
    if modality.head == "none":
        raise ValueError(f"config.model.modalities.{target}: head 'none'; the {name} needs its head")
    hidden = modality.head_hidden or config.model.unet.base_channels
    model = BackbonePredictor(
        unet_config(config),
        channels,
        modality.head,
        modality.head_features,
        modality.head_shape,
        hidden,
        compute_dtype(config),
    )

    def loss_fn(params, batch, rng, train: bool = True):
        logits = model.apply({"params": params}, batch[primary], train=train, rngs={"dropout": rng})
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[target]))
        return loss, {"cross_entropy": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch[target])}

    extra = {} if kind == "label" else {"head": modality.head, "head_shape": list(modality.head_shape)}
    return Task(
        name=name,
        init_params=lambda rng: model.init(rng, jnp.zeros((1, height, width, channels)))["params"],
        loss_fn=loss_fn,
        signature={name: _signature(config, **extra)},
        model=model,
        loss_description="cross-entropy" if kind == "label" else "per-pixel cross-entropy",
    )
