"""The derived multi-modal datasets, as deterministic per-example transforms.

Each transform maps one raw example to one model example. The random ones are
`grain` random maps: grain seeds a Philox generator from (seed, index), where
index is the example's index in its split plus epoch * split size. So example
i of epoch e is a pure function of (seed, e, i): random access stays
deterministic, any process computes the same example, and every epoch draws
fresh masks / scene layouts (augmentation). `make_map_dataset` (no repeat)
gives the epoch-0 version, a fixed dataset.

Scenes are transforms too, not a prepared builder: a scene is 2-4 pastes of a
28x28 item (microseconds), the items are in memory anyway, and computing them
on the fly gives every epoch new layouts for free, with no extra disk format.

Fashion-MNIST images (28x28) are zero-padded to `image_size` (default 32,
since U-Nets halve the resolution several times); padding is black, -1 after
scaling. All images are float32 NHWC in [-1, 1] (x / 127.5 - 1).

Shapes per example (S = image_size):
  fashion_mnist:           image [S, S, 1], label [] int32 in [0, 10)
  fashion_mnist_masked:    image, masked_image [S, S, 1] float32,
                           mask [S, S, 1] float32 (1 = kept, 0 = hidden),
                           masked_image = image * mask (hidden pixels are 0,
                           mid-grey)
  fashion_mnist_scenes:    image [S, S, 1] (S default 64),
                           segmentation [S, S] int32 (0 = background,
                           Fashion-MNIST class c -> c + 1, 11 classes)
  fashion_mnist_embedding: image [S, S, 1], embedding [D] float32
  fashion_mnist_lowres:    image, low_resolution [S, S, 1] float32: the image
                           average-pooled over factor x factor blocks and
                           upsampled back by repetition (the source of the
                           image-transition experiment; a right answer exists)
  fashion_mnist_multitask: the fields of fashion_mnist_masked, label and
                           embedding at once (the multitask experiment)
  fashion_mnist_scenes_masked: the fields of fashion_mnist_scenes, and
                           masked_image and mask of the scene as in
                           fashion_mnist_masked (the multitask experiment's
                           scenes variant)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

MASK_RATIO_RANGE = (0.1, 0.75)
SEGMENTATION_NUM_CLASSES = 11  # background + 10 Fashion-MNIST classes


def to_signed_unit(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return image.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1)


def pad_to(image: np.ndarray, size: int) -> np.ndarray:
    """Zero-pads an [H, W, C] image to [size, size, C], content centred."""
    height, width = image.shape[:2]
    if size < max(height, width):
        raise ValueError(f"image_size {size} is smaller than the image ({height}x{width})")
    if size == height == width:
        return image
    top, left = (size - height) // 2, (size - width) // 2
    out = np.zeros((size, size) + image.shape[2:], image.dtype)
    out[top : top + height, left : left + width] = image
    return out


def check_mask_ratio(mask_ratio: float | tuple[float, float]) -> None:
    """Mask ratios (fraction of hidden pixels) must lie in [0.1, 0.75]."""
    low, high = (mask_ratio, mask_ratio) if np.isscalar(mask_ratio) else mask_ratio
    if not MASK_RATIO_RANGE[0] <= low <= high <= MASK_RATIO_RANGE[1]:
        raise ValueError(f"mask_ratio {mask_ratio} must be a number or a (low, high) range within {MASK_RATIO_RANGE}")


def pixel_mask(rng: np.random.Generator, size: int, ratio: float) -> np.ndarray:
    """[size, size, 1] float32, exactly round(ratio * size^2) pixels hidden (0)."""
    num_pixels = size * size
    hidden = rng.choice(num_pixels, round(ratio * num_pixels), replace=False)
    mask = np.ones(num_pixels, np.float32)
    mask[hidden] = 0
    return mask.reshape(size, size, 1)


def patch_mask(rng: np.random.Generator, size: int, ratio: float, patch_size: int) -> np.ndarray:
    """[size, size, 1] float32 hiding round(ratio * P) of the P grid patches.

    The image is tiled into (size / patch_size)^2 non-overlapping patches (as in
    MAE), so the hidden fraction is exact up to 1 / (2P).
    """
    if size % patch_size:
        raise ValueError(f"patch_size {patch_size} must divide image_size {size}")
    grid = size // patch_size
    patches = np.ones(grid * grid, np.float32)
    patches[rng.choice(grid * grid, round(ratio * grid * grid), replace=False)] = 0
    patches = np.broadcast_to(patches.reshape(grid, 1, grid, 1), (grid, patch_size, grid, patch_size))
    return patches.reshape(size, size, 1)


def compose_scene(
    items: np.ndarray, labels: np.ndarray, positions: np.ndarray, size: int, foreground_threshold: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pastes items onto a black canvas in order (later items occlude earlier).

    Args:
      items: [K, h, w, 1] uint8 Fashion-MNIST images.
      labels: [K] class ids in [0, 10).
      positions: [K, 2] top-left (row, column) of each item.
      size: canvas side.
      foreground_threshold: item pixels <= this are transparent (background).

    Returns:
      image [size, size, 1] uint8 and segmentation [size, size] int32 with
      label + 1 where an item's pixel is drawn and 0 elsewhere: every pixel
      shows exactly the item its segmentation names, or black background.
    """
    image = np.zeros((size, size, 1), np.uint8)
    segmentation = np.zeros((size, size), np.int32)
    height, width = items.shape[1:3]
    for item, label, (row, col) in zip(items, labels, positions):
        drawn = item[..., 0] > foreground_threshold
        window = (slice(row, row + height), slice(col, col + width))
        image[window][drawn] = item[drawn]
        segmentation[window][drawn] = label + 1
    return image, segmentation


@dataclasses.dataclass(frozen=True)
class ImageLabel:
    """fashion_mnist: uint8 image + label -> image [S, S, 1], label [] int32."""

    image_size: int = 32

    def __call__(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        return {
            "image": to_signed_unit(pad_to(example["image"], self.image_size)),
            "label": np.int32(example["label"]),
        }


@dataclasses.dataclass(frozen=True)
class MaskedImage:
    """fashion_mnist_masked: image, masked_image, mask; see the module docstring.

    `mask_ratio` is the hidden fraction, a number, or a (low, high) range
    sampled uniformly per example; `mask_kind` is 'patch' or 'pixel'.
    """

    image_size: int = 32
    mask_kind: str = "patch"
    mask_ratio: float | tuple[float, float] = 0.5
    patch_size: int = 4

    def __post_init__(self):
        if self.mask_kind not in ("patch", "pixel"):
            raise ValueError(f"mask_kind {self.mask_kind!r} must be 'patch' or 'pixel'")
        check_mask_ratio(self.mask_ratio)
        if self.mask_kind == "patch" and self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide image_size {self.image_size}")

    def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = to_signed_unit(pad_to(example["image"], self.image_size))
        return {"image": image, **self.hide(image, rng)}

    def hide(self, image: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """image [S, S, C] in [-1, 1] -> masked_image, mask: a fresh mask drawn from `rng`."""
        ratio = self.mask_ratio if np.isscalar(self.mask_ratio) else rng.uniform(*self.mask_ratio)
        if self.mask_kind == "patch":
            mask = patch_mask(rng, self.image_size, ratio, self.patch_size)
        else:
            mask = pixel_mask(rng, self.image_size, ratio)
        return {"masked_image": image * mask, "mask": mask}


@dataclasses.dataclass(frozen=True, eq=False)
class Scene:
    """fashion_mnist_scenes: scene i = item i + 1-3 random items of the split.

    Item i is always in scene i, so an epoch shows every item at least once.
    The other items and all positions (uniform over the canvas) come from the
    per-example generator; the draw order is random, so item i is occluded as
    often as the others. Items can overlap, partly or (rarely) wholly.

    Attributes:
      items: random-access dataset of validated raw examples (`image` uint8
        [28, 28, 1], `label`), typically the split's checked grain MapDataset.
    """

    items: Any
    image_size: int = 64
    min_objects: int = 2
    max_objects: int = 4
    foreground_threshold: int = 10

    def __post_init__(self):
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects ({self.min_objects}) <= max_objects ({self.max_objects})")

    def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        count = int(rng.integers(self.min_objects, self.max_objects + 1))
        others = rng.integers(0, len(self.items), count - 1)
        examples = [example] + [self.items[int(j)] for j in others]
        order = rng.permutation(count)
        items = np.stack([examples[k]["image"] for k in order])
        labels = np.array([examples[k]["label"] for k in order])
        height, width = items.shape[1:3]
        if self.image_size < max(height, width):
            raise ValueError(f"image_size {self.image_size} cannot hold a {height}x{width} item")
        positions = np.stack(
            [
                rng.integers(0, self.image_size - height + 1, count),
                rng.integers(0, self.image_size - width + 1, count),
            ],
            axis=1,
        )
        image, segmentation = compose_scene(items, labels, positions, self.image_size, self.foreground_threshold)
        return {"image": to_signed_unit(image), "segmentation": segmentation}


@dataclasses.dataclass(frozen=True, eq=False)
class MaskedScene:
    """fashion_mnist_scenes_masked: `scene`'s image and segmentation, and `masked`'s masked_image and mask of
    that image (one generator: the layout first, then the mask)."""

    scene: Scene
    masked: MaskedImage

    def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        scene = self.scene(example, rng)
        return {**scene, **self.masked.hide(scene["image"], rng)}


@dataclasses.dataclass(frozen=True, eq=False)
class ImageEmbedding:
    """fashion_mnist_embedding: image [S, S, 1] + embeddings[index] [D].

    Used with `map_with_index`; `index` modulo the table length is the example's
    index in its split (grain passes epoch * N + i after a repeat).
    """

    embeddings: np.ndarray  # [N, D] float32, row i belongs to example i
    image_size: int = 32

    def __call__(self, index: int, example: dict[str, Any]) -> dict[str, np.ndarray]:
        return {
            "image": to_signed_unit(pad_to(example["image"], self.image_size)),
            "embedding": self.embeddings[index % len(self.embeddings)],
        }


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddingRow:
    """map_with_index: adds `embeddings[index]` [D] to the raw example as 'embedding' (index as `ImageEmbedding`)."""

    embeddings: np.ndarray

    def __call__(self, index: int, example: dict[str, Any]) -> dict[str, Any]:
        return {**example, "embedding": self.embeddings[index % len(self.embeddings)]}


@dataclasses.dataclass(frozen=True)
class MultiTask:
    """fashion_mnist_multitask (a random map after `EmbeddingRow`): `masked`'s image, masked_image and mask, the
    label [] int32 and the embedding [D]."""

    masked: MaskedImage

    def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {**self.masked(example, rng), "label": np.int32(example["label"]), "embedding": example["embedding"]}


def low_resolution(image: np.ndarray, factor: int) -> np.ndarray:
    """[S, S, C] -> the mean over each factor x factor block, repeated back to [S, S, C]; factor divides S."""
    size, channels = image.shape[0], image.shape[-1]
    if size % factor:
        raise ValueError(f"factor {factor} must divide image_size {size}")
    blocks = image.reshape(size // factor, factor, size // factor, factor, channels).mean(axis=(1, 3))
    return np.repeat(np.repeat(blocks, factor, axis=0), factor, axis=1).astype(image.dtype)


@dataclasses.dataclass(frozen=True)
class LowResolution:
    """fashion_mnist_lowres: image [S, S, 1] and its `low_resolution(image, factor)` version."""

    image_size: int = 32
    factor: int = 4

    def __post_init__(self):
        if self.factor < 1 or self.image_size % self.factor:
            raise ValueError(f"factor {self.factor} must be >= 1 and divide image_size {self.image_size}")

    def __call__(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        image = to_signed_unit(pad_to(example["image"], self.image_size))
        return {"image": image, "low_resolution": low_resolution(image, self.factor)}
