"""Image + class label (issue 7): MT-Diffusion on Fashion-MNIST with the image x_0 and its label x_1.

The label enters the forward process through a learned table encoder (class -> a z-shaped map, RMS-normalised)
under a 'bump' weight schedule (lambda_t = 0 at both ends, so the prior stays N(0, I) and joint generation
starts from pure noise); an MLP head on the U-Net's bottleneck recovers it. Baselines at the same budget and
backbone: a class-conditional DDPM (ADM class embedding) and the same U-Net trained alone as a classifier.

Run (the CPU default: about 10 minutes on 2 idle CPU cores, baselines and evaluation included; writes
workdirs/joint_image_label):
  python -m experiments.joint_image_label --workdir=workdirs/joint_image_label \
      --results_dir=results/joint_image_label
Real numbers (a 7.7M-parameter U-Net trained 100k steps; one accelerator):
  python -m experiments.joint_image_label --config.preset=full --workdir=workdirs/joint_image_label_full
Tiny (seconds; tests/test_experiments_other.py):
  python -m experiments.joint_image_label --config=configs/joint_image_label.py:tiny --workdir=/tmp/jil_tiny
"""

import dataclasses

import ml_collections

from mmdiff_jax.models.unet import unet_preset
from mmdiff_jax.training.config_io import base_config

PRESETS = ("", "tiny", "full")


def small_unet(**overrides) -> dict:
    """The CPU default's 0.3M-parameter U-Net (levels 28, 14, 7 on Fashion-MNIST's 28x28)."""
    return dataclasses.asdict(unet_preset(
        "default", **{**dict(base_channels=16, channel_multipliers=(1, 2, 2), num_res_blocks=1,
                             attention_resolutions=(7,), num_head_channels=32, dropout=0.0, num_groups=8,
                             resblock_updown=False), **overrides}))


def tiny_unet() -> dict:
    return dataclasses.asdict(unet_preset(
        "tiny", base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, attention_resolutions=(),
        num_head_channels=8, num_groups=4, dropout=0.0, resblock_updown=False))


def apply_preset(config: ml_collections.ConfigDict, preset: str, full_attention=(7,)) -> None:
    """The training budget of each preset, shared by the three two-modality experiments' configs."""
    config.optim.learning_rate = 2e-3
    config.optim.end_learning_rate = 1e-4
    config.optim.warmup_steps = 50
    config.optim.ema_decay = 0.98  # averages over ~50 steps: the CPU defaults train only 200-300 steps
    config.train.log_every = 50
    config.train.eval_every = config.train.steps  # the last step (every that many if --config.train.steps is raised)
    config.train.eval_batches = 2
    config.train.checkpoint_every = 0  # the last step only
    config.train.keep_checkpoints = 1
    config.sample.every = config.train.steps
    config.sample.num_images = 8
    config.sample.noise_levels = (0.3, 0.6)
    config.data.num_threads = 1
    config.data.prefetch_batches = 4
    if preset == "tiny":
        config.prng_impl = "rbg"  # compiles the initialisers ~4x faster (config_io.base_config)
        config.model.unet = tiny_unet()
        config.diffusion.num_steps = 50
        config.data.batch_size = 8
        config.data.eval_batch_size = 8
        config.data.prefetch_batches = 1
        config.optim.warmup_steps = 1
        config.optim.decay_steps = 100
        config.optim.ema_decay = 0.5
        config.train.steps = 3
        config.train.log_every = 1
        config.train.eval_batches = 1
        config.train.async_checkpointing = False
        config.train.progress_bar = False
        config.sample.num_images = 2
        config.sample.noise_levels = (0.5,)
        config.experiment.sampler.num_steps = 2
        config.experiment.classifier.steps = 2
        config.experiment.grid_images = 4
    elif preset == "full":
        config.model.unet = dataclasses.asdict(unet_preset("default", attention_resolutions=full_attention))
        config.data.batch_size = 128
        config.data.num_threads = 2
        config.optim.learning_rate = 2e-4
        config.optim.end_learning_rate = 0.0
        config.optim.warmup_steps = 1000
        config.optim.ema_decay = 0.9999
        config.train.steps = 100_000
        config.train.log_every = 100
        config.train.eval_every = 5000
        config.train.eval_batches = 8
        config.train.checkpoint_every = 5000
        config.train.keep_checkpoints = 3
        config.sample.every = 5000
        config.experiment.sampler.num_steps = 100


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    """preset: '' (the CPU default), 'tiny' (the test) or 'full' (real numbers on a big machine)."""
    if preset not in PRESETS:
        raise ValueError(f"configs/joint_image_label.py: unknown preset {preset!r}; use one of {PRESETS}")
    config = base_config()
    config.preset = preset  # `--config.preset=full` rebuilds the config (experiments.common.resolve_preset)
    config.seed = 0

    config.model.z_shape = (28, 28, 1)
    config.model.primary = "image"
    config.model.unet = small_unet()
    # L2 of the label is its cross-entropy in nats per example (~2.3 at chance).
    config.model.modalities = {
        "label": dict(kind="label", shape=(), num_classes=10, weight_schedule=("bump", 1.0), loss_weight=0.1),
    }
    config.diffusion.noise_schedule = "linear"
    config.diffusion.num_steps = 1000

    config.data.name = "fashion_mnist"
    config.data.options = dict(image_size=28)
    config.data.batch_size = 32
    config.data.eval_batch_size = 100
    config.train.steps = 200

    # Everything the experiment evaluates (experiments/joint_image_label.py).
    config.experiment = dict(
        # Feature spaces of FID / precision / recall: 'fmnist_cnn' (offline); add 'inception_v3' for Inception
        # FIDs with the user's weights ($MMDIFF_INCEPTION_WEIGHTS; mmdiff_jax.metrics.inception).
        feature_spaces=("fmnist_cnn",),
        sampler=dict(method="ddim", num_steps=25, eta=0.0),  # every diffusion model; z_0 estimates clipped
        generation=dict(
            num_samples=256, batch_size=128,  # joint samples, and label -> image with balanced labels, per model
            num_reference=10_000,  # test images: the FID-proxy reference set
            metrics=(("feature_distribution", {"metrics": ("fid", "precision", "recall")}),),
        ),
        classification=dict(num_images=1000, batch_size=250, noise_levels=(1, 50)),  # image -> label at t
        classifier=dict(steps=600, seed=0),  # the judge / feature CNN (shared, cached default)
        grid_images=10,
        seed=1,
    )
    if preset == "tiny":
        config.data.eval_batch_size = 8
        config.experiment.generation.update(num_samples=16, batch_size=8, num_reference=16)
        config.experiment.classification.update(num_images=8, batch_size=8, noise_levels=(1,))
    elif preset == "full":
        config.data.eval_batch_size = 500
        config.experiment.generation.update(num_samples=10_000, batch_size=500)
        config.experiment.classification.update(num_images=10_000, batch_size=500)
    apply_preset(config, preset)
    return config
