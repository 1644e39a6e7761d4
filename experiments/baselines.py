"""Baselines shared by the experiments, at the experiment's budget (steps, batch, optimizer, EMA) and backbone.

  plain_ddpm_config(config)         the same config with no auxiliary modality: N = 0 is plain DDPM
                                    (same U-Net, schedule, data order, t and noise draws)
  train_reconstruction(name, config, workdir) -> common.Trained
                                    the same U-Net trained by MSE to predict the image from the masked image
                                    [x * mask, mask] in one pass (t fixed at 0); the training path's pieces
                                    (optimizer, EMA, sharded step, Orbax checkpoints, TensorBoard / JSONL, bar)
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

import json
import pathlib
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import common
from mmdiff_jax import diffusion
from mmdiff_jax.modalities import MASK_KEY
from mmdiff_jax.models.unet import UNet, UNetConfig
from mmdiff_jax.sampling import ddim_sample, ddim_step, ddpm_sample, known_region_hook, make_denoise, respace
from mmdiff_jax.training import Checkpointer, NonFiniteLossError, config_io, make_optimizer, writers
from mmdiff_jax.training import mesh as mesh_lib
from mmdiff_jax.training import steps as steps_lib
from mmdiff_jax.training.loop import save_config
from mmdiff_jax.training.state import TrainState, count_params

Array = jax.Array


def plain_ddpm_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with no auxiliary modality (plain DDPM); everything else, the seed included, unchanged."""
    plain = common.copy_config(config)
    plain.model.modalities = {}
    return plain


def masked_modality(config: ml_collections.ConfigDict) -> str:
    """The name of the config's (first) masked-image modality."""
    for name, spec in config.model.modalities.items():
        if spec["kind"] == "masked_image":
            return name
    raise ValueError(f"the config has no masked_image modality (modalities: {list(config.model.modalities)})")


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
    return ReconstructionNet(UNetConfig(**dict(config.model.unet)), channels=config.model.z_shape[-1],
                             dtype=config_io.DTYPES[config.model.dtype])


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


def train_reconstruction(name: str, config: ml_collections.ConfigDict,
                         workdir: str | pathlib.Path) -> common.Trained:
    """Trains `ReconstructionNet` with config's optim / train / data / mesh sections; resumes from the
    workdir's latest checkpoint (a finished run is only restored). Workdir layout as train_and_evaluate's."""
    workdir = pathlib.Path(workdir)
    resumed_from = common.latest_checkpoint_step(workdir)
    start = time.perf_counter()
    train = config.train
    save_config(config, workdir)
    mesh = mesh_lib.make_mesh(config.mesh.shape)
    model = reconstruction_model(config)
    masked = masked_modality(config)
    optimizer, learning_rate_fn = make_optimizer(config.optim, train.steps)
    height, width, channels = config.model.z_shape

    def init(rng):
        init_rng, train_rng = jax.random.split(rng)
        params = model.init(init_rng, jnp.zeros((1, height, width, channels)), jnp.ones((1, height, width, 1)))
        params = params["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                          opt_state=optimizer.init(params), rng=jax.random.key_data(train_rng),
                          first_nonfinite_step=jnp.full((), -1, jnp.int32))

    rng = jax.random.key(config.seed)
    abstract = jax.eval_shape(init, rng)
    shardings = mesh_lib.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
    abstract = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                            abstract, shardings)
    iterator = config_io.make_train_iterator(config)
    signature = json.loads(json.dumps({"reconstruction": {"unet": dict(config.model.unet), "input": masked,
                                                          "z_shape": list(config.model.z_shape),
                                                          "dtype": config.model.dtype}}))
    checkpointer = Checkpointer(workdir / "checkpoints", signature=signature, save_every=train.checkpoint_every,
                                keep=train.keep_checkpoints, best_metric="",
                                async_save=train.async_checkpointing)
    writer = writers.MetricWriter(workdir)
    progress = None
    try:
        if checkpointer.latest_step() is not None:
            state = checkpointer.restore(abstract, iterator)
        else:
            state = jax.jit(init, out_shardings=shardings)(rng)
        step = int(jax.device_get(state.step))
        train_step = steps_lib.jit_train_step(
            mesh, shardings, loss_fn=make_reconstruction_loss(model, config.model.primary, masked),
            optimizer=optimizer, learning_rate_fn=learning_rate_fn, ema_decay=config.optim.ema_decay,
            accumulation_steps=config.optim.grad_accumulation_steps)
        batch_sharding = mesh_lib.batch_sharding(mesh)
        progress = writers.Progress(train.steps, step, enabled=train.progress_bar)
        while step < train.steps:
            state, metrics = train_step(state, mesh_lib.global_batch(next(iterator), batch_sharding))
            step += 1
            progress.update(step)
            last = step == train.steps
            if step % train.log_every == 0 or last:
                values = jax.device_get(metrics)
                bad = int(jax.device_get(state.first_nonfinite_step))
                if bad >= 0:
                    raise NonFiniteLossError(f"{name}: loss or gradient norm became NaN/inf at step {bad}")
                values["steps_per_second"] = progress.rate(step)
                progress.show(loss=values["loss"], steps_per_s=values["steps_per_second"])
                writer.write_scalars(step, values)
            if last or (train.checkpoint_every and step % train.checkpoint_every == 0):
                checkpointer.save(step, state, iterator, force=last)
        checkpointer.wait_until_finished()
        writers.plot_losses(workdir / "metrics.jsonl", workdir / "loss.png", keys=("loss",))
    finally:
        if progress is not None:
            progress.close()
        checkpointer.wait_until_finished()
        checkpointer.close()
        writer.close()
    return common.Trained(name, model, None, state.ema_params, config, workdir, count_params(state.params), step,
                          time.perf_counter() - start, resumed_from)


def make_reconstruct_fn(trained: common.Trained):
    """reconstruct(params, masked_image, mask) -> image [B, H, W, C] clipped to [-1, 1] (jit-compiled)."""
    model = trained.model

    def reconstruct(params, masked_image, mask):
        return jnp.clip(model.apply({"params": params}, masked_image, mask, train=False), -1.0, 1.0)

    return jax.jit(reconstruct)


# --------------------------------------------------------------------------------------------- restoration by sampling
def make_sdedit_fn(model, schedule, *, strength: float, num_steps: int, eta: float = 0.0,
                   clip_denoised: bool = True):
    """SDEdit restoration with a plain diffusion model (N = 0): sdedit(params, guide, rng) -> image.

    The guide (the masked image, hidden pixels mid-grey) is noised to t0 = round(strength T),
      z_t0 = sqrt(abar_t0) x_guide + sqrt(1 - abar_t0) xi,
    then denoised by `ddim_step`s over respace(t0, K), K = round(strength num_steps): the step size of a
    num_steps-step chain from T, so SDEdit costs `strength` of a full sample.
    """
    if schedule.num_modalities:
        raise ValueError(f"SDEdit here is for plain diffusion models (N = 0); the schedule has "
                         f"{schedule.num_modalities} auxiliary modalities")
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
        z = diffusion.marginal_sample(schedule, guide, jnp.full(batch, t0, jnp.int32), no_encodings,
                                      jax.random.normal(noise_key, guide.shape))

        def body(z_t, inputs):
            t, s, key = inputs
            prediction = denoise(z_t, jnp.full(batch, t))
            noise = jax.random.normal(key, z_t.shape) if eta else jnp.zeros_like(z_t)
            return ddim_step(schedule, z_t, t, s, prediction, noise, eta=eta, clip_denoised=clip_denoised), None

        keys = jax.random.split(chain_key, len(steps))
        z, _ = jax.lax.scan(body, z, (jnp.asarray(steps), jnp.asarray(next_steps), keys))
        return jnp.clip(z, -1.0, 1.0)

    return jax.jit(sdedit)


def make_repaint_fn(model, schedule, *, method: str = "ddim", num_steps: int = 50, eta: float = 0.0,
                    clip_denoised: bool = True):
    """repaint(params, masked_image, mask, rng) -> image: the model's sampler from the prior, nothing observed,
    with the known pixels re-imposed after every step (`sampling.known_region_hook`)."""

    def repaint(params, masked_image, mask, rng):
        masked_image = jnp.asarray(masked_image, jnp.float32)
        denoise = make_denoise(model, params, {})
        hook = known_region_hook(schedule, masked_image, mask)
        options = dict(clip_denoised=clip_denoised, step_hook=hook)
        if method == "ddpm":
            output = ddpm_sample(denoise, schedule, rng, masked_image.shape, **options)
        else:
            output = ddim_sample(denoise, schedule, rng, masked_image.shape, num_steps=num_steps, eta=eta, **options)
        return jnp.clip(output.z_0, -1.0, 1.0)

    return jax.jit(repaint)
