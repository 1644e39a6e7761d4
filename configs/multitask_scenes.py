"""Multitask, the scenes variant (issue 16): one MT-Diffusion model on the multi-object Fashion-MNIST scenes with
the image x_0 and two auxiliary modalities at once (a masked image and the segmentation mask), against each
task's pairwise model and single-task baseline (experiments/multitask.py).

The scenes are image_segmentation's (2-3 items on a black canvas, 48x48 on the CPU; configs/image_segmentation.py
says why), each with a patch mask drawn as masked_pretrain draws it (`scenes(48)|value_range()|masked_image(...)`). Each modality
is set as in its pairwise experiment (configs/masked_pretrain.py, image_segmentation.py), resized to the scenes:
the masked image through the identity encoder under a 'bump' of height 0.3, the mask through a conv on its one-hot
under a 'bump' of height 1, both seen by the denoiser as extra channels ('concat') and hidden from it with
probability 0.5 each (configs/multitask.py says why 0.5).

Tasks: restoration at three mask ratios (PSNR and SSIM on the hidden pixels), mask -> image (foreground IoU of
the sample's lit pixels with the given test mask), image -> mask (mIoU and pixel accuracy at t = 1) and joint
samples (foreground IoU of each sample with its own generated mask). No FID-proxy, no LPIPS-proxy: the
Fashion-MNIST CNN reads single centred 28x28 items, not scenes.

Comparators: pairwise, the image with the masked image / with the mask; single-task, plain DDPM (restoration by
RePaint; unconditional samples), a mask-conditional DDPM (the mask seen as channels only: no aggregation, no
head) and the same U-Net with the segmentation head trained alone on clean images (the segmenter). Equal total
compute: the pairwise set train.steps / 2 each, the single-task set train.steps / 3 (configs/multitask.py says
how the checkpoints give them).

Run (the CPU default; writes workdirs/multitask_scenes):
  python -m experiments.multitask --config=configs/multitask_scenes.py --workdir=workdirs/multitask_scenes
Tiny (seconds; tests/test_experiments_other.py):
  python -m experiments.multitask --config=configs/multitask_scenes.py:tiny --workdir=/tmp/multitask_scenes_tiny
Real numbers (the 7.7M-parameter U-Net, 96k steps on 64x64 scenes; one accelerator):
  python -m experiments.multitask --config=configs/multitask_scenes.py:full --workdir=workdirs/multitask_scenes_full
"""

import ml_collections

from configs import image_segmentation, masked_pretrain, multitask
from configs.presets import apply_preset, check_preset, default_sampler, small_unet
from mmdiff_jax.tasks import base_config


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    """preset: '' (the CPU default), 'tiny' (the test) or 'full' (real numbers on a big machine)."""
    check_preset("configs/multitask_scenes.py", preset)
    # 'tiny': 28x28, the smallest canvas that holds an item (every item fills it): the test's seconds.
    size = {"full": 64, "tiny": 28}.get(preset, 48)
    config = base_config()
    config.preset = preset
    config.seed = 0

    config.model.z_shape = (size, size, 1)
    config.model.primary = "image"
    config.model.unet = small_unet(attention_resolutions=(12,))  # levels 48, 24, 12 (image_segmentation's)
    masked = masked_pretrain.get_config().model.modalities["masked_image"].to_dict()
    masked.update(shape=(size, size, 1), loss_weight=1.0 / (size * size * 2), p_uncond=0.5)  # per value of [x, m]
    segmentation = image_segmentation.get_config().model.modalities["segmentation"].to_dict()
    segmentation.update(shape=(size, size), loss_weight=1.0 / size**2, p_uncond=0.5)
    config.model.modalities = {"masked_image": masked, "segmentation": segmentation}
    config.diffusion.noise_schedule = "linear"
    config.diffusion.num_steps = 1000

    config.data.source = "fashion_mnist()"
    max_objects = 3 if preset != "full" else 4
    config.data.transforms = (
        f"scenes({size}, min_objects=2, max_objects={max_objects})|value_range(-1, 1)"
        "|masked_image(kind='patch', ratio=(0.1, 0.6), patch_size=4)"
    )
    config.data.batch_size = 16
    config.data.eval_batch_size = 64
    # v-prediction (configs/masked_pretrain.py's and image_segmentation.py's recipe). Six runs share the 20-minute
    # CPU budget: 120 steps each (a multiple of 6, the equal-compute shares 60 and 40). 144 steps with 64
    # restoration images took 21.5 min (per run ~30 s of set-up and compilation and ~0.7 s a step, evaluation 7.5
    # min, of which restoration 3.9).
    config.model.prediction = "v"
    config.train.steps = 120

    config.experiment = dict(
        feature_spaces=(),  # no judge or FID-proxy on scenes (the module docstring)
        sampler=default_sampler(),  # DPM-Solver++ 2M, 15 steps; the conditional sampler, no guidance, every model
        restoration=dict(
            mask_ratios=(0.1, 0.25, 0.5),
            num_images=32,
            batch_size=32,
            metrics=(("psnr", {"region": "masked"}), ("ssim", {"region": "masked"})),
        ),
        generation=dict(num_samples=64, batch_size=64),  # mask -> image (test masks) and joint samples, per model
        segmentation=dict(num_images=128, batch_size=64, noise_level=1),  # image -> mask at t
        classifier=dict(steps=600, seed=0),  # unused: no Fashion-MNIST CNN on scenes
        grid_images=8,
        seed=1,
    )
    apply_preset(config, preset, full_attention=(16,))
    multitask.comparison_training(config, preset)  # the warmup, 30 steps, below the single-task share 120 / 3
    if preset == "tiny":
        config.train.steps = 6  # a multiple of 6: the equal-compute checkpoints at 3 and 2 steps
        config.data.eval_batch_size = 8
        config.experiment.restoration.update(num_images=4, batch_size=4)
        config.experiment.generation.update(num_samples=8, batch_size=8)
        config.experiment.segmentation.update(num_images=8, batch_size=8)
    elif preset == "full":
        config.data.eval_batch_size = 250
        config.experiment.restoration.update(num_images=2000, batch_size=250)
        config.experiment.generation.update(num_samples=2000, batch_size=250)
        config.experiment.segmentation.update(num_images=2000, batch_size=250)
    return config
