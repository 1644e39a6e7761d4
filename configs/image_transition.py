"""Image transition (issue 16): 4x-downsampled Fashion-MNIST -> the full-resolution image, with the bridge schedule.

The source x_1 is the image average-pooled over 4x4 blocks and repeated back to 28x28 (the `low_resolution(4)` transform: a
right answer exists, the image it came from). It enters the forward process through the identity encoder under a
'bridge' weight schedule of height 1: lambda_t = 1 - sqrt(abar_t), so z_T ~ N(x_1, I) carries the source and the
reverse process removes it while it generates the target (docs/design.md sections 2 and 3). It also reaches the
denoiser as extra input channels (condition 'concat', hidden with probability 0.2 for classifier-free guidance),
since the aggregation alone does not condition the denoiser (docs/design.md section 3b). It has no head: the
source is always given.

Compared at the same budget (steps, batch, optimizer, EMA), backbone and sampler:
  mt_diffusion   the bridge + the denoiser sees the source (the method)
  no_bridge      the same model with weight schedule 'zero': conditioned on the source, z_T ~ N(0, I)
  sdedit         plain DDPM (N = 0) from the source noised to t0 = 0.5 T
  low_resolution the source itself (what every method starts from)
With `--config.experiment.bridge_only_ablation=True` also the bridge alone (condition 'none': the paper's form).
The bridge height, SDEdit strength and guidance scale were fixed beforehand, not picked on the results.

Run (the CPU default, baselines and evaluation included; writes workdirs/image_transition):
  python -m experiments.image_transition
Tiny (seconds; tests/test_experiments_other.py):
  python -m experiments.image_transition --config=configs/image_transition.py:tiny --workdir=/tmp/transition_tiny
Real numbers (the 7.7M-parameter U-Net, 100k steps; one accelerator):
  python -m experiments.image_transition --config=configs/image_transition.py:full \
      --workdir=workdirs/image_transition_full
"""

import ml_collections

from configs.presets import apply_preset, check_preset, default_sampler, small_unet
from mmdiff_jax.tasks import base_config


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    """preset: '' (the CPU default), 'tiny' (the test) or 'full' (real numbers on a big machine)."""
    check_preset("configs/image_transition.py", preset)
    config = base_config()
    config.preset = preset
    config.seed = 0

    config.model.z_shape = (28, 28, 1)
    config.model.primary = "image"
    config.model.unet = small_unet()
    config.model.modalities = {
        "low_resolution": dict(
            kind="image",
            shape=(28, 28, 1),
            encoder="identity",
            weight_schedule=("bridge", 1.0),
            head="none",  # always given
            condition="concat",
            p_uncond=0.2,
        ),
    }
    config.diffusion.noise_schedule = "linear"
    config.diffusion.num_steps = 1000

    config.data.source = "fashion_mnist()"
    config.data.transforms = "value_range(-1, 1)|low_resolution(4)|keep('image', 'low_resolution')"
    config.data.batch_size = 32
    config.data.eval_batch_size = 96
    # The recipe of configs/masked_pretrain.py (bench/convergence.py on that model): v-prediction, 800 steps,
    # EMA 0.995. Three diffusion models fit the 20-minute CPU budget at 800 steps each.
    config.model.prediction = "v"
    config.train.steps = 800

    config.experiment = dict(
        # Feature spaces of FID: 'fmnist_cnn' (offline); add 'inception_v3' with the user's weights.
        feature_spaces=("fmnist_cnn",),
        sampler=default_sampler(),  # DPM-Solver++ 2M, 15 steps, as the other experiments (configs/presets.py)
        transition=dict(
            num_images=192,  # test images, their sources the inputs
            batch_size=96,
            cfg_scales=(2.0,),  # extra rows of the method with classifier-free guidance on the source
            sdedit_strength=0.5,
            # Against the target image (dm-pix PSNR / SSIM on [0, 1]; the LPIPS-proxy on the Fashion-MNIST CNN).
            metrics=("psnr", "ssim", "perceptual_fmnist_cnn"),
            num_reference=10_000,  # test images: the FID-proxy reference set
        ),
        # Also train the bridge alone (condition 'none', the paper's form) at the same budget.
        bridge_only_ablation=False,
        classifier=dict(steps=600, seed=0),  # the metrics' Fashion-MNIST CNN (shared, cached)
        grid_images=10,
        seed=1,
    )
    apply_preset(config, preset, ema_decay=0.995)
    if preset == "tiny":
        config.experiment.transition.update(num_images=8, batch_size=8, num_reference=16)
        config.experiment.bridge_only_ablation = True
    elif preset == "full":
        config.data.eval_batch_size = 500
        config.experiment.transition.update(num_images=2000, batch_size=500)
    return config
