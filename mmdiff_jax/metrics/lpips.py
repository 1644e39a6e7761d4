"""LPIPS (Zhang et al. 2018, v0.1, VGG-16 trunk) in Flax, with official weights.

  d(x0, x1) = sum_l  mean_{h,w}  sum_c  w_l[c] (n(f_l(x0)) - n(f_l(x1)))[h, w, c]^2
  n(f) = f / (sqrt(sum_c f^2) + 1e-10)      (unit norm over channels, per pixel)

f_l: the VGG-16 activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the
input scaled as (x - shift) / scale (the `lpips` package's ScalingLayer);
w_l >= 0: the 1x1 linear calibration weights. Images: [B, H, W, 3] in [-1, 1]
(grayscale [B, H, W, 1] is repeated to RGB). Convolutions run at HIGHEST
precision so accelerators do not silently use bf16/TF32 passes.

Weights. The VGG-16 ImageNet weights come from the user (torchvision's
`vgg16-397923af.pth`); the linear weights are in the `lpips` wheel
(`lpips/weights/v0.1/vgg.pth`). Convert both once to one .npz:

  pip install torch==2.13.0          # CPU wheel, only to read .pth files
  python -m mmdiff_jax.metrics.convert_lpips_weights \
      --vgg16 vgg16-397923af.pth --lin .../lpips/weights/v0.1/vgg.pth

which writes `default_weights_path()` ($MMDIFF_LPIPS_WEIGHTS, else
~/.cache/mmdiff_jax/lpips_vgg16_v0.1.npz). The .npz holds the Flax parameter
tree flattened with "/" ("features/conv1_1/kernel" [3, 3, 3, 64],
"lin0/kernel" [1, 1, 64, 1], ...).

Checked against the reference PyTorch package (lpips 0.1.4, torch 2.14.1 -
its CUDA build, run on CPU - and torchvision 0.29.1, in a throwaway venv;
tests/test_metrics_lpips_reference.py re-runs it with
MMDIFF_LPIPS_REFERENCE=1): on a randomly initialised VGG-16 with
the official v0.1 linear weights, and again with random linear weights,
random images [4, 64, 64, 3] and [4, 32, 32, 3] in [-1, 1]: max |difference|
9.3e-9 with the official linear weights (distances ~0.027, relative 3.5e-7),
3.0e-8 with random ones (distances ~0.17, relative 1.8e-7), on CPU. The .pth
converter, run on that random trunk saved as a .pth plus the wheel's own
vgg.pth, reproduces lpips' distances within 1e-5 relative.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mmdiff_jax.metrics import base
from mmdiff_jax.metrics import weight_files

WEIGHTS_ENV = "MMDIFF_LPIPS_WEIGHTS"
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# VGG-16 `features`: (name, output channels, index in torchvision's Sequential).
VGG16_BLOCKS = (
    (("conv1_1", 64, 0), ("conv1_2", 64, 2)),
    (("conv2_1", 128, 5), ("conv2_2", 128, 7)),
    (("conv3_1", 256, 10), ("conv3_2", 256, 12), ("conv3_3", 256, 14)),
    (("conv4_1", 512, 17), ("conv4_2", 512, 19), ("conv4_3", 512, 21)),
    (("conv5_1", 512, 24), ("conv5_2", 512, 26), ("conv5_3", 512, 28)),
)
LAYER_CHANNELS = tuple(block[-1][1] for block in VGG16_BLOCKS)


def normalize_channels(features, eps: float = 1e-10):
    """features [..., C] / (L2 norm over C + eps), as lpips.normalize_tensor."""
    return features / (jnp.sqrt(jnp.sum(features**2, -1, keepdims=True)) + eps)


def layer_distances(
    features0: Sequence[jax.Array], features1: Sequence[jax.Array], linear: Sequence[nn.Module] | None = None
) -> list[jax.Array]:
    """Per-layer LPIPS terms [B] from lists of [B, H, W, C] (or [B, C]) features.

    With `linear` (callables on [B, H, W, C] -> [B, H, W, 1]), the calibrated
    form; without, the unit-weight "baseline" (sum over channels).
    """
    terms = []
    for index, (f0, f1) in enumerate(zip(features0, features1)):
        if f0.ndim == 2:
            f0, f1 = f0[:, None, None], f1[:, None, None]
        diff = (normalize_channels(f0) - normalize_channels(f1)) ** 2
        weighted = linear[index](diff) if linear is not None else diff.sum(-1, keepdims=True)
        terms.append(weighted.mean(axis=(1, 2, 3)))
    return terms


class VGG16Features(nn.Module):
    """VGG-16 convolutional trunk: [B, H, W, 3] -> the 5 relu*_* activations."""

    @nn.compact
    def __call__(self, x):
        outputs = []
        for index, block in enumerate(VGG16_BLOCKS):
            if index:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))  # floor, as torch MaxPool2d(2)
            for name, channels, _ in block:
                x = nn.relu(nn.Conv(channels, (3, 3), padding=1, name=name, precision=jax.lax.Precision.HIGHEST)(x))
            outputs.append(x)
        return outputs


class LPIPS(nn.Module):
    """LPIPS v0.1 with a VGG-16 trunk: (images0, images1) [B, H, W, 3] -> [B]."""

    @nn.compact
    def __call__(self, images0, images1):
        scaled = (jnp.concatenate([images0, images1]) - jnp.array(SHIFT)) / jnp.array(SCALE)
        features = VGG16Features(name="features")(scaled)
        half = images0.shape[0]
        linear = [
            nn.Conv(1, (1, 1), use_bias=False, name=f"lin{i}", precision=jax.lax.Precision.HIGHEST)
            for i in range(len(features))
        ]
        terms = layer_distances([f[:half] for f in features], [f[half:] for f in features], linear)
        return sum(terms)


def _to_rgb(images):
    images = jnp.asarray(images, jnp.float32)
    return jnp.repeat(images, 3, -1) if images.shape[-1] == 1 else images


def init_random_params(rng, image_size: int = 32):
    """Randomly initialised LPIPS params (tests and shape checks)."""
    images = jnp.zeros((1, image_size, image_size, 3))
    return LPIPS().init(rng, images, images)


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Flat "/"-joined parameter names -> shapes of the Flax LPIPS."""
    shapes = jax.eval_shape(lambda: init_random_params(jax.random.key(0), 16))
    return {k: v.shape for k, v in traverse_util.flatten_dict(shapes["params"], sep="/").items()}


# ---- official PyTorch layout -> our .npz ----------------------------------

_VGG_KEY = re.compile(r"^(?:features\.|net\.slice\d\.|)(\d+)\.(weight|bias)$")
_LIN_KEY = re.compile(r"^lin(\d)\.model\.\d+\.weight$")


def convert_torch_state_dicts(*state_dicts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Official PyTorch tensors (as NumPy arrays) -> flat Flax params.

    Accepts any mix of: torchvision's VGG-16 state dict ("features.N.weight"
    [O, I, 3, 3], "features.N.bias"; "classifier.*" is ignored), the `lpips`
    linear weights ("linL.model.1.weight" [1, C, 1, 1]), or a whole
    `lpips.LPIPS` state dict ("net.sliceK.N.weight", "linL.model.1.weight").
    Raises naming every missing or mis-shaped weight.
    """
    by_index = {index: name for block in VGG16_BLOCKS for name, _, index in block}
    flat = {}
    for state in state_dicts:
        for key, value in state.items():
            value = np.asarray(value, np.float32)
            if match := _VGG_KEY.match(key):
                index, kind = int(match.group(1)), match.group(2)
                if index not in by_index:
                    raise ValueError(f"{key}: VGG-16 features[{index}] has no weights")
                name = f"features/{by_index[index]}"
                if kind == "weight":
                    flat[f"{name}/kernel"] = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
                else:
                    flat[f"{name}/bias"] = value
            elif match := _LIN_KEY.match(key):
                flat[f"lin{match.group(1)}/kernel"] = value.transpose(2, 3, 1, 0)
    check_flat_params(flat, "the converted state dicts")
    return flat


def check_flat_params(flat: Mapping[str, np.ndarray], source: str) -> None:
    """Raises one error listing every missing, unexpected or mis-shaped weight."""
    weight_files.check_flat_params(flat, expected_shapes(), "VGG-16 LPIPS network", source)


save_params = weight_files.save_flat


def default_weights_path() -> pathlib.Path:
    return weight_files.cache_path(WEIGHTS_ENV, "lpips_vgg16_v0.1.npz")


def load_params(path=None):
    """LPIPS params {"params": ...} from a converted .npz (default_weights_path())."""
    path = pathlib.Path(path) if path is not None else default_weights_path()
    return {
        "params": weight_files.load_tree(
            path,
            (
                f"LPIPS weights {path} not found. LPIPS needs the VGG-16 ImageNet "
                "weights, which you supply (torchvision's vgg16-397923af.pth), and "
                "the lpips package's lpips/weights/v0.1/vgg.pth, converted once with:\n"
                "  python -m mmdiff_jax.metrics.convert_lpips_weights --vgg16 "
                f"vgg16-397923af.pth --out {path}\n(or set ${WEIGHTS_ENV}). For an "
                "offline perceptual distance use 'perceptual_fmnist_cnn' instead."
            ),
            check_flat_params,
        )
    }


@jax.jit
def lpips_distance(params, images0, images1):
    """LPIPS per image pair [B]; images [B, H, W, 3 or 1] in [-1, 1]."""
    return LPIPS().apply(params, _to_rgb(images0), _to_rgb(images1))


@base.register("lpips_vgg")
class LPIPSEvaluator(base.MeanEvaluator):
    """Mean VGG-16 LPIPS (official weights) of batch[prediction] vs batch[reference].

    Reports "lpips_vgg". `weights`: the converted .npz (default_weights_path()).
    `resize`: optional side length to bilinearly resize both images to first.
    """

    def __init__(
        self,
        weights=None,
        reference: str = "image",
        prediction: str = "sample",
        resize: int | None = None,
        name: str = "lpips_vgg",
    ):
        self.params = load_params(weights)
        self.keys, self.resize, self.name = (reference, prediction), resize, name
        super().__init__()

    def per_example(self, batch):
        images = [jnp.asarray(base.require(batch, key, self.name), jnp.float32) for key in self.keys]
        if self.resize:
            images = [
                jax.image.resize(x, x.shape[:1] + (self.resize, self.resize) + x.shape[3:], "bilinear") for x in images
            ]
        return lpips_distance(self.params, *images)
