"""The FID Inception-V3 (pytorch-fid's, the TF graph of 2015-12-05) in Flax: images -> pool3 [B, 2048].

  features = inception_features(load_params(), images)    # images [B, H, W, 1 or 3] in [-1, 1]

The network of pytorch-fid 0.3.0's `InceptionV3([3], use_fid_inception=True)`,
which is that of the original TensorFlow FID code (TTUR): BasicConv2d = conv (no bias) + BatchNorm (eps
0.001, running statistics) + ReLU; the stem Conv2d_1a..4a with two 3x3/2 max
pools; Mixed_5b-5d (InceptionA), Mixed_6a (B), Mixed_6b-6e (C), Mixed_7a (D),
Mixed_7b, Mixed_7c (E); global average pool. It differs from torchvision's
ImageNet Inception-V3 in its weights (1008 classes) and its pools: the 3x3
average pools of A, C and the first E do not count the zero padding (as
TensorFlow), and the second E (Mixed_7c) max-pools instead.

Input as pytorch-fid: grayscale repeated to RGB, bilinear resize to 299x299 as
torch's `F.interpolate(mode="bilinear", align_corners=False)` (no antialiasing);
pytorch-fid maps its [0, 1] input to [-1, 1], which our images already are.
Convolutions run at HIGHEST precision so accelerators do not use bf16/TF32.

Weights. The user supplies pytorch-fid's port of the TF weights,
`pt_inception-2015-12-05-6726825d.pth` (its GitHub release "fid_weights",
see WEIGHTS_URL; nothing is downloaded here), converted once:

  pip install torch==2.13.0          # CPU wheel, only to read the .pth
  python -m mmdiff_jax.metrics.convert_inception_weights --pth pt_inception-2015-12-05-6726825d.pth

which writes `default_weights_path()` ($MMDIFF_INCEPTION_WEIGHTS, else
~/.cache/mmdiff_jax/pt_inception-2015-12-05.npz): the Flax variables flattened
with "/" ("params/Mixed_5b/branch1x1/conv/kernel" [1, 1, 192, 64],
"batch_stats/Mixed_5b/branch1x1/bn/var" [64], ...).

Checked against pytorch-fid 0.3.0 itself (torch 2.14.1, torchvision 0.29.1,
CPU, in a throwaway venv; tests/test_metrics_inception_reference.py re-runs it
with MMDIFF_INCEPTION_REFERENCE=1): random weights with non-trivial BatchNorm
statistics, images [4, 32, 32, 1], [2, 64, 64, 3] and [1, 331, 331, 3] in
[-1, 1]: max |difference| of the 2048-d features 2.9e-6 (features up to 7.6,
mean 0.5: relative 3.8e-7 of the largest), on CPU; the resize alone matches
F.interpolate within 1.8e-7, up- and downsampling. The .pth converter, run on
those random weights saved as a .pth, gives the same features. The released
weights themselves were not at hand, so their features were not compared.
tests/test_metrics_inception.py checks the whole network, loaded through the
converter, against an independent NumPy statement in torch's layout.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mmdiff_jax.metrics import weight_files

WEIGHTS_ENV = "MMDIFF_INCEPTION_WEIGHTS"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
INPUT_SIZE = 299
SMALLEST_SIZE = 75  # the smallest input every layer of the network accepts
HIGHEST = jax.lax.Precision.HIGHEST


def average_pool_3x3(x):
    """3x3 / 1 average pool, padding 1, the padding not counted (TF; count_include_pad=False)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3(x, stride: int):
    """3x3 max pool: stride 2 without padding (floor), or stride 1 with padding 1."""
    padding = "VALID" if stride == 2 else ((1, 1), (1, 1))
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class BasicConv2d(nn.Module):
    """conv (no bias) + BatchNorm (eps 0.001, running statistics) + ReLU, [B, H, W, C] -> [B, H', W', F]."""

    features: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        (pad_height, pad_width), stride = self.padding, (self.stride, self.stride)
        padding = ((pad_height, pad_height), (pad_width, pad_width))
        x = nn.Conv(self.features, self.kernel_size, stride, padding, use_bias=False, precision=HIGHEST, name="conv")(x)
        return nn.relu(nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x))


def _conv(name, features, kernel_size=(1, 1), stride=1, padding=(0, 0)):
    return BasicConv2d(features, kernel_size, stride, padding, name=name)


class InceptionA(nn.Module):
    """Mixed_5b-5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1 -> 224 + pool_features channels."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        branch1x1 = _conv("branch1x1", 64)(x)
        branch5x5 = _conv("branch5x5_2", 64, (5, 5), padding=(2, 2))(_conv("branch5x5_1", 48)(x))
        branch3x3dbl = _conv("branch3x3dbl_1", 64)(x)
        branch3x3dbl = _conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(branch3x3dbl)
        branch3x3dbl = _conv("branch3x3dbl_3", 96, (3, 3), padding=(1, 1))(branch3x3dbl)
        branch_pool = _conv("branch_pool", self.pool_features)(average_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], -1)


class InceptionB(nn.Module):
    """Mixed_6a, stride 2: 3x3 | 1x1-3x3-3x3 | max pool -> 480 + C channels."""

    @nn.compact
    def __call__(self, x):
        branch3x3 = _conv("branch3x3", 384, (3, 3), stride=2)(x)
        branch3x3dbl = _conv("branch3x3dbl_1", 64)(x)
        branch3x3dbl = _conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(branch3x3dbl)
        branch3x3dbl = _conv("branch3x3dbl_3", 96, (3, 3), stride=2)(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, max_pool_3x3(x, 2)], -1)


class InceptionC(nn.Module):
    """Mixed_6b-6e, factorised 7x7: 1x1 | 1x1-1x7-7x1 | 1x1-(7x1-1x7)x2 | avg pool-1x1 -> 768 channels."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        row, column = {"kernel_size": (1, 7), "padding": (0, 3)}, {"kernel_size": (7, 1), "padding": (3, 0)}
        branch1x1 = _conv("branch1x1", 192)(x)
        branch7x7 = _conv("branch7x7_1", c7)(x)
        branch7x7 = _conv("branch7x7_2", c7, **row)(branch7x7)
        branch7x7 = _conv("branch7x7_3", 192, **column)(branch7x7)
        branch7x7dbl = _conv("branch7x7dbl_1", c7)(x)
        branch7x7dbl = _conv("branch7x7dbl_2", c7, **column)(branch7x7dbl)
        branch7x7dbl = _conv("branch7x7dbl_3", c7, **row)(branch7x7dbl)
        branch7x7dbl = _conv("branch7x7dbl_4", c7, **column)(branch7x7dbl)
        branch7x7dbl = _conv("branch7x7dbl_5", 192, **row)(branch7x7dbl)
        branch_pool = _conv("branch_pool", 192)(average_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], -1)


class InceptionD(nn.Module):
    """Mixed_7a, stride 2: 1x1-3x3 | 1x1-1x7-7x1-3x3 | max pool -> 512 + C channels."""

    @nn.compact
    def __call__(self, x):
        branch3x3 = _conv("branch3x3_2", 320, (3, 3), stride=2)(_conv("branch3x3_1", 192)(x))
        branch7x7x3 = _conv("branch7x7x3_1", 192)(x)
        branch7x7x3 = _conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(branch7x7x3)
        branch7x7x3 = _conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(branch7x7x3)
        branch7x7x3 = _conv("branch7x7x3_4", 192, (3, 3), stride=2)(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, max_pool_3x3(x, 2)], -1)


class InceptionE(nn.Module):
    """Mixed_7b (pool "average"), 7c (pool "max").

    1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1 -> 2048 channels.
    """

    pool: str

    @nn.compact
    def __call__(self, x):
        branch1x1 = _conv("branch1x1", 320)(x)
        branch3x3 = _conv("branch3x3_1", 384)(x)
        branch3x3 = [
            _conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(branch3x3),
            _conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(branch3x3),
        ]
        branch3x3dbl = _conv("branch3x3dbl_1", 448)(x)
        branch3x3dbl = _conv("branch3x3dbl_2", 384, (3, 3), padding=(1, 1))(branch3x3dbl)
        branch3x3dbl = [
            _conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(branch3x3dbl),
            _conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(branch3x3dbl),
        ]
        pooled = average_pool_3x3(x) if self.pool == "average" else max_pool_3x3(x, 1)
        branch_pool = _conv("branch_pool", 192)(pooled)
        return jnp.concatenate([branch1x1, *branch3x3, *branch3x3dbl, branch_pool], -1)


class InceptionV3(nn.Module):
    """The FID Inception-V3 trunk: [B, H, W, 3] (H, W >= 75, scaled to [-1, 1]) -> pool3 [B, 2048]."""

    @nn.compact
    def __call__(self, x):
        x = _conv("Conv2d_1a_3x3", 32, (3, 3), stride=2)(x)
        x = _conv("Conv2d_2a_3x3", 32, (3, 3))(x)
        x = _conv("Conv2d_2b_3x3", 64, (3, 3), padding=(1, 1))(x)
        x = max_pool_3x3(x, 2)
        x = _conv("Conv2d_3b_1x1", 80)(x)
        x = _conv("Conv2d_4a_3x3", 192, (3, 3))(x)
        x = max_pool_3x3(x, 2)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, channels_7x7 in zip(("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"), (128, 160, 160, 192)):
            x = InceptionC(channels_7x7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("average", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        return x.mean(axis=(1, 2))


def preprocess(images):
    """[B, H, W, 1 or 3] in [-1, 1] -> [B, 299, 299, 3]: gray to RGB, bilinear resize.

    The resize is torch's F.interpolate(mode="bilinear", align_corners=False).
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"Inception-V3 takes images [B, H, W, 1 or 3], got {images.shape}")
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, -1)
    # without antialiasing, jax's bilinear kernel is torch's align_corners=False one, up or down
    return jax.image.resize(images, (images.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear", antialias=False)


@jax.jit
def inception_features(params, images):
    """pool3 features [B, 2048] of images [B, H, W, 1 or 3] in [-1, 1].

    params: {"params", "batch_stats"} (load_params()). One compilation per
    input shape; call it on equal-sized batches.
    """
    return InceptionV3().apply(params, preprocess(images))


@functools.lru_cache(maxsize=None)
def _expected_shapes() -> tuple[tuple[str, tuple[int, ...]], ...]:
    shapes = jax.eval_shape(
        lambda: InceptionV3().init(jax.random.key(0), jnp.zeros((1, SMALLEST_SIZE, SMALLEST_SIZE, 3)))
    )
    return tuple((k, v.shape) for k, v in traverse_util.flatten_dict(shapes, sep="/").items())


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Flat "/"-joined variable names ("params/...", "batch_stats/...") -> shapes."""
    return dict(_expected_shapes())


def init_random_params(rng):
    """Random {"params", "batch_stats"} (tests, shape checks): He-normal kernels, BatchNorm the identity.

    Not `InceptionV3().init`, whose compilation takes ~20 s on a CPU.
    """
    shapes = expected_shapes()
    kernels = {k: shape for k, shape in shapes.items() if k.endswith("/kernel")}
    noise = np.asarray(jax.random.normal(rng, (sum(int(np.prod(shape)) for shape in kernels.values()),)))
    flat, start = {}, 0
    for name, shape in shapes.items():
        if name in kernels:
            size, fan_in = int(np.prod(shape)), int(np.prod(shape[:3]))
            flat[name] = noise[start : start + size].reshape(shape) * np.sqrt(2 / fan_in)
            start += size
        else:
            flat[name] = np.ones(shape) if name.endswith(("/scale", "/var")) else np.zeros(shape)
    return traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}, sep="/")


def check_flat_params(flat: Mapping[str, np.ndarray], source: str, unexpected=()) -> None:
    """Raises one error listing every missing, unexpected or mis-shaped weight."""
    weight_files.check_flat_params(flat, expected_shapes(), "FID Inception-V3", source, unexpected)


save_params = weight_files.save_flat


def default_weights_path() -> pathlib.Path:
    return weight_files.cache_path(WEIGHTS_ENV, "pt_inception-2015-12-05.npz")


def load_params(path=None):
    """{"params", "batch_stats"} from a converted .npz (default_weights_path())."""
    path = pathlib.Path(path) if path is not None else default_weights_path()
    return weight_files.load_tree(
        path,
        (
            f"Inception-V3 weights {path} not found. FID's Inception needs pytorch-fid's port of the "
            "TF 2015-12-05 weights, which you supply: download pt_inception-2015-12-05-6726825d.pth "
            f"({WEIGHTS_URL}) and convert it once with\n"
            "  python -m mmdiff_jax.metrics.convert_inception_weights --pth "
            f"pt_inception-2015-12-05-6726825d.pth --out {path}\n(or set ${WEIGHTS_ENV}). Without them, use "
            "the offline features 'fmnist_cnn'."
        ),
        check_flat_params,
    )
