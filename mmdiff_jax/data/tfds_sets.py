"""Real TFDS image sets by name, read with `tfds.data_source` (no TensorFlow).

The user prepares them beforehand in `array_record` format (`tfds.data_source`
reads only random-access formats), e.g. in an environment with TensorFlow:

  tfds build cifar10 --file_format=array_record --data_dir=DIR

or converts an existing TFRecord preparation with `tfds convert_format
--dataset_dir=DIR/cifar10/3.0.2 --out_file_format=array_record`. Images are
decoded with PIL, then center-cropped to a square and resized to
`image_size` where needed (area-averaging for images, nearest for masks).

Examples (S = image_size, images float32 in [-1, 1] after the pipeline):
  cifar10:                     image [32, 32, 3], label [] int32 in [0, 10)
  imagenet2012:                image [S, S, 3] (S default 64),
                               label [] int32 in [0, 1000)
  downsampled_imagenet/64x64:  image [64, 64, 3]  (the set has no labels)
  oxford_iiit_pet:             image [S, S, 3] (S default 64),
                               label [] int32 in [0, 37) (breed),
                               segmentation [S, S] int32 from the trimap:
                               0 = background, 1 = pet, 2 = pet border
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mmdiff_jax.data import checks
from mmdiff_jax.data import derived


@dataclasses.dataclass(frozen=True)
class TfdsSet:
    """How to read one TFDS set into the common example format."""

    tfds_name: str
    default_image_size: int
    num_classes: int | None = None  # None: the set has no label
    segmentation_classes: int | None = None
    fixed_size: bool = True  # stored images already have the default size


TFDS_SETS = {
    "cifar10": TfdsSet("cifar10", 32, num_classes=10),
    "imagenet2012": TfdsSet("imagenet2012", 64, num_classes=1000, fixed_size=False),
    "downsampled_imagenet/64x64": TfdsSet("downsampled_imagenet/64x64", 64),
    "oxford_iiit_pet": TfdsSet("oxford_iiit_pet", 64, num_classes=37, segmentation_classes=3, fixed_size=False),
}
# Trimap value -> class id: 1 pet -> 1, 2 background -> 0, 3 border -> 2.
_TRIMAP_TO_CLASS = np.array([0, 1, 0, 2], np.int32)


def open_tfds_source(name: str, split: str, data_dir: str | os.PathLike | None):
    """`tfds.data_source` of a prepared set, or an error saying how to prepare it."""
    tfds_name = TFDS_SETS[name].tfds_name
    try:
        return tfds.data_source(
            tfds_name, split=split, download=False, data_dir=None if data_dir is None else os.fspath(data_dir)
        )
    except (
        NotImplementedError,
        AssertionError,
        FileNotFoundError,
        tfds.core.registered.DatasetNotFoundError,
    ) as error:
        where = data_dir or "the default TFDS data_dir ($TFDS_DATA_DIR or "
        where = where if data_dir else where + "~/tensorflow_datasets)"
        raise FileNotFoundError(
            f"TFDS set {tfds_name!r} split {split!r} is not prepared in "
            f"array_record format in {where}. Prepare it with `tfds build "
            f"{tfds_name} --file_format=array_record --data_dir=DIR` (needs "
            "TensorFlow for encoding, so in another environment) and pass "
            f"data_dir=DIR. TFDS said: {error}"
        ) from error


def example_spec(name: str, split: str) -> checks.ExampleSpec:
    """The checks applied to each raw example of a TFDS set."""
    tfds_set = TFDS_SETS[name]
    size = tfds_set.default_image_size if tfds_set.fixed_size else None
    shapes = {"image": (size, size, 3)}
    num_classes = {}
    allowed = {}
    if tfds_set.num_classes:
        shapes["label"] = ()
        num_classes["label"] = tfds_set.num_classes
    if tfds_set.segmentation_classes:
        shapes["segmentation_mask"] = (None, None, 1)
        allowed["segmentation_mask"] = (1, 2, 3)
    return checks.ExampleSpec(f"{tfds_set.tfds_name}/{split}", shapes, num_classes, allowed)


def _square_resize(array: np.ndarray, size: int, resample) -> np.ndarray:
    """Center-crops [H, W, C] uint8 to a square, then resizes to [size, size, C]."""
    height, width = array.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    array = array[top : top + side, left : left + side]
    if side == size:
        return array
    channels = array.shape[2]
    image = Image.fromarray(array[..., 0] if channels == 1 else array)
    resized = np.asarray(image.resize((size, size), resample))
    return resized.reshape(size, size, channels)


@dataclasses.dataclass(frozen=True)
class StandardizeTfdsExample:
    """Raw TFDS example -> image float32 [S, S, 3] in [-1, 1], label, segmentation."""

    name: str
    image_size: int

    def __call__(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        tfds_set = TFDS_SETS[self.name]
        out = {
            "image": derived.to_signed_unit(_square_resize(np.asarray(example["image"]), self.image_size, Image.BOX))
        }
        if tfds_set.num_classes:
            out["label"] = np.int32(example["label"])
        if tfds_set.segmentation_classes:
            trimap = _square_resize(np.asarray(example["segmentation_mask"]), self.image_size, Image.NEAREST)
            out["segmentation"] = _TRIMAP_TO_CLASS[trimap[..., 0]]
        return out
