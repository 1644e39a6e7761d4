"""The presets every experiment config shares: '' (the CPU default: minutes on 2 CPU cores), 'tiny' (seconds,
for the tests) and 'full' (real numbers on one accelerator). Pick one with `--config=configs/<file>.py:<preset>`
(the one way: an override --config.preset=... is refused, `mmdiff_jax.training.cli.config_value`)."""

import dataclasses

import ml_collections

from mmdiff_jax.models.unet import unet_preset

PRESETS = ("", "tiny", "full")


# The CPU default's 0.3M-parameter U-Net (levels 28, 14, 7 on Fashion-MNIST's 28x28) and the tests' tiny one (one
# level: 70 parameter arrays instead of two levels' 110; a train step compiled in 4.5 s instead of 6.0 s).
SMALL_UNET = dict(
    base_channels=16, channel_multipliers=(1, 2, 2), num_res_blocks=1, attention_resolutions=(7,),
    num_head_channels=32, dropout=0.0, num_groups=8, resblock_updown=False,
)  # fmt: skip
TINY_UNET = dict(
    base_channels=8, channel_multipliers=(1,), num_res_blocks=1, attention_resolutions=(), num_head_channels=8,
    num_groups=4, dropout=0.0, resblock_updown=False,
)  # fmt: skip


def small_unet(**overrides) -> dict:
    """`SMALL_UNET` on the 'default' U-Net preset, with `overrides` (e.g. other attention resolutions)."""
    return dataclasses.asdict(unet_preset("default", **{**SMALL_UNET, **overrides}))


def tiny_unet() -> dict:
    return dataclasses.asdict(unet_preset("tiny", **TINY_UNET))


def default_sampler() -> dict:
    """The experiments' sampler section: DPM-Solver++ 2M, 15 steps (docs/design.md section 3c), z_0 estimates
    clipped to [-1, 1]. On the masked_pretrain model it matched DDIM-50's FID-proxy with 16 model calls
    (bench/NOTES.md: 49.1 vs DDIM-25's 54.7 and DDIM-50's 50.5). Keys: method 'ddim' | 'ddpm' | 'dpm_solver++',
    num_steps, eta, variant '2M' | '3M' | '2S', spacing 'time_uniform' | 'logsnr'. A fresh dict per call."""
    return dict(method="dpm_solver++", num_steps=15, eta=0.0, variant="2M", spacing="time_uniform")


def check_preset(path: str, preset: str) -> None:
    """ValueError naming the config file unless `preset` is one of PRESETS."""
    if preset not in PRESETS:
        raise ValueError(f"{path}: unknown preset {preset!r}; use one of {PRESETS}")


def apply_preset(config: ml_collections.ConfigDict, preset: str, full_attention=(7,), ema_decay: float = 0.98) -> None:
    """The training budget of each preset (after the experiment set config.train.steps and its `experiment`
    section): the CPU default's optimizer, logging and checkpointing; 'tiny' (3 steps of the tiny U-Net, no
    evaluation or grids while training, for the tests); 'full' (the 7.7M-parameter U-Net, 100k steps, attention at
    `full_attention`). `ema_decay`: the CPU default's EMA decay (0.98 averages over ~50 steps)."""
    config.optim.learning_rate = 2e-3
    config.optim.end_learning_rate = 1e-4
    config.optim.warmup_steps = 50
    config.optim.ema_decay = ema_decay
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
        config.prng_impl = "rbg"  # compiles the initialisers ~4x faster (training.config_io.base_config)
        config.model.unet = tiny_unet()
        config.diffusion.num_steps = 50
        config.data.batch_size = 8
        config.data.eval_batch_size = 8
        config.data.prefetch_batches = 1
        config.optim.warmup_steps = 1
        config.optim.decay_steps = 100
        config.optim.ema_decay = 0.5
        config.train.steps = 3
        # No held-out loss or grids while training (the trainer's tests cover them): each is a compiled program
        # per model, seconds of a test that trains several.
        config.train.eval_every = 0
        config.sample.every = 0
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
        config.experiment.sampler.num_steps = 25
