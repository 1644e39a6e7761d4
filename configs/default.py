"""MT-Diffusion on Fashion-MNIST 32x32: image x_0 plus a masked image (patch masks, half the pixels hidden).

The masked image x_1 = [x * mask, mask] enters the forward process through a learned 1x1-conv encoder with
a 'bump' weight schedule (lambda_t zero at both ends, so the prior stays N(0, I)); a conv head recovers it.

Run (about 6M parameters; one H100, or many CPU hours):
  python -m mmdiff_jax.train --config=configs/default.py --workdir=workdirs/default
Tiny preset (50k parameters, T = 100, batch 8: a minute on one CPU core, mostly compilation; used by the tests):
  python -m mmdiff_jax.train --config=configs/default.py:tiny --workdir=/tmp/mmdiff_tiny
Overrides, e.g.:
  --config.train.steps=100 --config.model.dtype=bfloat16 --config.mesh.shape="(-1, 2)"
"""

import dataclasses

import ml_collections

from mmdiff_jax.models.unet import unet_preset
from mmdiff_jax.tasks import base_config


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    """preset: '' (the full run: this file has no CPU default) or 'tiny' (the tests)."""
    if preset not in ("", "tiny"):
        raise ValueError(f"configs/default.py: unknown preset {preset!r}; use '' or 'tiny'")
    tiny = preset == "tiny"
    config = base_config()
    config.preset = preset
    config.seed = 0

    config.model.unet = dataclasses.asdict(unet_preset("default"))
    config.model.z_shape = (32, 32, 1)
    config.model.primary = "image"
    config.model.dtype = "float32"
    # L2 of the masked image is a Gaussian NLL summed over its 32 * 32 * 2 values (nats per example);
    # weighting it by 1 / 2048 puts it on the per-value scale of the eps-MSE term.
    config.model.modalities = {
        "masked_image": dict(
            kind="masked_image", shape=(32, 32, 1), weight_schedule=("bump", 1.0), loss_weight=1.0 / (32 * 32 * 2)
        ),
    }
    config.diffusion.noise_schedule = "linear"
    config.diffusion.num_steps = 1000

    config.data.source = "fashion_mnist()"
    config.data.transforms = (
        "pad(32)|value_range(-1, 1)|masked_image(kind='patch', ratio=0.5, patch_size=4)"
        "|keep('image', 'masked_image', 'mask')"
    )
    config.data.batch_size = 128
    config.data.eval_batch_size = 128

    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 1000
    config.optim.ema_decay = 0.9999
    config.train.steps = 100_000
    config.sample.kinds = ("one_step_x0", "ddim_conditional", "ddim_joint")
    config.sample.num_images = 16

    if tiny:
        config.prng_impl = "rbg"  # compiles the initialisers ~4x faster (training.config_io.base_config)
        config.model.unet = dataclasses.asdict(
            unet_preset(
                "tiny",
                base_channels=8,
                channel_multipliers=(1, 2),
                num_res_blocks=1,
                attention_resolutions=(),
                num_head_channels=8,
                num_groups=4,
                dropout=0.0,
            )
        )
        config.diffusion.num_steps = 100
        config.data.batch_size = 8
        config.data.eval_batch_size = 8
        config.data.num_threads = 1
        config.data.prefetch_batches = 2
        config.optim.learning_rate = 1e-3
        config.optim.warmup_steps = 5
        config.optim.decay_steps = 1000  # fixed, so that runs of different lengths share the schedule
        config.optim.ema_decay = 0.9
        config.train.steps = 20
        config.train.log_every = 5
        config.train.eval_every = 10
        config.train.eval_batches = 1
        config.train.checkpoint_every = 10
        config.train.keep_checkpoints = 2
        config.sample.every = 10
        config.sample.kinds = ("one_step_x0",)
        config.sample.num_images = 4
        config.sample.noise_levels = (0.5,)
        config.sample.sampler.num_steps = 5
    return config
