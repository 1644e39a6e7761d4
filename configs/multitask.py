"""Multitask (issue 16): one MT-Diffusion model on Fashion-MNIST with the image x_0 and three auxiliary modalities
at once (a masked image, the class label and the 64-d CNN embedding), against each task's pairwise model and
single-task baseline.

Each modality is set as in its pairwise experiment (configs/masked_pretrain.py, joint_image_label.py,
image_embedding.py): the masked image through the identity encoder under a 'bump' of height 0.3 and seen by the
denoiser as extra channels ('concat'); the label and the embedding through learned encoders under 'bump's of
height 1 and seen through ADM's class path ('embedding', their offsets added). Every modality is hidden from the
denoiser with probability 0.5, independently per example: the evaluations observe one modality alone, which
p_uncond = 0.2 would show the denoiser in 3% of the examples (0.2^2 x 0.8), 0.5 in 12.5%. The same modality
settings in every model of the comparison.

Comparators (experiments/multitask.py), the same backbone, batch, optimizer, data order and sampler:
  pairwise     the image with one auxiliary modality (the three pairwise experiments' models)
  single-task  plain DDPM (restoration by RePaint; unconditional samples), a label-conditional and an
               embedding-conditional DDPM (the modality seen through ADM's class path, no aggregation, no head),
               the same U-Net trained alone as a classifier (image -> label)
each at two compute matchings: equal steps per task (train.steps, what the multitask model took for every task at
once) and equal total compute (the pairwise set shares train.steps: train.steps / 3 each; the single-task set
train.steps / 4 each). A comparator trains once, for train.steps, and its checkpoint at its share is the
equal-compute model: with a constant learning rate after the warmup and an EMA of fixed decay, that state is the
state of a run of that length (a decaying schedule would break this; the experiment refuses one). EMA decay 0.9
(~10 steps): the shortest run, the single-task set's 36 steps, leaves 0.9^36 = 2.5% of the initialisation in it
(0.95 would leave 16%, the other experiments' 0.98 48%).

The scenes variant (a masked image and the segmentation mask on the multi-object scenes) is
configs/multitask_scenes.py.

Run (the CPU default; writes workdirs/multitask):
  python -m experiments.multitask
Tiny (seconds; tests/test_experiments_other.py, with a stand-in embedding file):
  python -m experiments.multitask --config=configs/multitask.py:tiny --workdir=/tmp/multitask_tiny
Real numbers (the 7.7M-parameter U-Net, 96k steps; one accelerator):
  python -m experiments.multitask --config=configs/multitask.py:full --workdir=workdirs/multitask_full
"""

import ml_collections

from configs import image_embedding, joint_image_label, masked_pretrain
from configs.presets import apply_preset, check_preset, default_sampler, small_unet
from mmdiff_jax.tasks import base_config


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    """preset: '' (the CPU default), 'tiny' (the test) or 'full' (real numbers on a big machine)."""
    check_preset("configs/multitask.py", preset)
    config = base_config()
    config.preset = preset
    config.seed = 0

    config.model.z_shape = (28, 28, 1)
    config.model.primary = "image"
    config.model.unet = small_unet()
    # Each modality exactly as its pairwise experiment sets it, but hidden with probability 0.5 (the docstring).
    pairwise = ((masked_pretrain, "masked_image"), (joint_image_label, "label"), (image_embedding, "embedding"))
    config.model.modalities = {
        name: {**module.get_config().model.modalities[name].to_dict(), "p_uncond": 0.5} for module, name in pairwise
    }
    config.diffusion.noise_schedule = "linear"
    config.diffusion.num_steps = 1000

    # One set with every modality (and the label the classifier reads): masks as in masked_pretrain's training.
    config.data.source = "fashion_mnist()"
    # embedding(): the project's default CNN embeddings (embedding('FILE') for a user's table).
    config.data.transforms = "value_range(-1, 1)|embedding()|masked_image(kind='patch', ratio=(0.1, 0.6), patch_size=4)"
    config.data.batch_size = 32
    config.data.eval_batch_size = 96
    # v-prediction (configs/masked_pretrain.py's recipe). 144 steps per run: eight runs share the 20-minute CPU
    # budget (300 took 27.5 min: per run ~45 s of set-up and compilation and ~0.42 s a step, plus ~5 min of
    # evaluation).
    config.model.prediction = "v"
    config.train.steps = 144

    config.experiment = dict(
        feature_spaces=("fmnist_cnn",),
        # DPM-Solver++ 2M, 15 steps, as the other experiments (configs/presets.py); the conditional sampler (no
        # classifier-free guidance) for every model, so that no row gets a scale the others lack.
        sampler=default_sampler(),
        restoration=dict(
            mask_ratios=(0.1, 0.25, 0.5),
            num_images=96,
            batch_size=96,
            metrics=(("psnr", {"region": "masked"}), "perceptual_fmnist_cnn"),
        ),
        # label -> image (balanced labels), embedding -> image (test embeddings) and joint samples, per model.
        generation=dict(
            num_samples=100,
            batch_size=100,
            num_reference=10_000,  # test images: the FID-proxy reference set
            num_statistics=10_000,  # train images: the per-dimension mean / std that standardise the CNN features
            metrics=(("feature_distribution", {"metrics": ("fid",)}),),
        ),
        classification=dict(num_images=500, batch_size=250, noise_level=1),  # image -> label at t
        classifier=dict(steps=600, seed=0),  # the judge / feature CNN (the shared, cached default)
        grid_images=10,
        seed=1,
    )
    apply_preset(config, preset)
    comparison_training(config, preset)
    if preset == "tiny":
        config.train.steps = 12  # a multiple of 12: the equal-compute checkpoints at 4 and 3 steps
        config.data.eval_batch_size = 8
        config.experiment.restoration.update(num_images=4, batch_size=4)
        config.experiment.generation.update(num_samples=8, batch_size=8, num_reference=16, num_statistics=16)
        config.experiment.classification.update(num_images=8, batch_size=8)
    elif preset == "full":
        config.data.eval_batch_size = 500
        config.experiment.restoration.update(num_images=2000, batch_size=250)
        config.experiment.generation.update(num_samples=10_000, batch_size=500)
        config.experiment.classification.update(num_images=10_000, batch_size=500)
    return config


def comparison_training(config: ml_collections.ConfigDict, preset: str) -> None:
    """What every model of a multitask comparison trains with (after `apply_preset`; configs/multitask_scenes.py
    too). A constant learning rate after the warmup (ADM's schedule; the module docstring says why), half the
    other experiments' peak since no decay follows it; EMA decay 0.9; fixed beforehand, not tuned on the results.
    No held-out loss or grids while training (the comparison is the evaluation). 'full': 96k steps (a multiple of
    12 and of 6), 2e-4, EMA 0.999, held-out loss and grids every 8000 steps; the CPU default: a 30-step warmup
    (below the smallest equal-compute share) and 'rbg' keys (compiles the runs' initialisers ~2.5x faster:
    configs/presets.py)."""
    config.optim.schedule = "constant"
    config.optim.learning_rate = 1e-3
    config.optim.ema_decay = 0.9
    config.train.eval_every = config.sample.every = 0
    if preset == "tiny":
        config.optim.ema_decay = 0.5
    elif preset == "full":
        config.train.steps = 96_000
        config.optim.learning_rate = 2e-4
        config.optim.ema_decay = 0.999
        config.train.eval_every = config.sample.every = 8000
    else:
        config.optim.warmup_steps = 30
        config.prng_impl = "rbg"
