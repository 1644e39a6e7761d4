"""Multi-object scenes from a source of small labelled items (the `scenes(...)` transform).

Scenes are a transform, not a prepared set: a scene is 2-4 pastes of an item (microseconds), the items are in
memory anyway, and composing them on the fly gives every epoch new layouts for free, with no extra disk format.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


def compose_scene(
    items: np.ndarray, labels: np.ndarray, positions: np.ndarray, size: int, foreground_threshold: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pastes items onto a black canvas in order (later items occlude earlier).

    Args:
      items: [K, h, w, C] uint8 images.
      labels: [K] class ids.
      positions: [K, 2] top-left (row, column) of each item.
      size: canvas side.
      foreground_threshold: item pixels whose largest channel is <= this are transparent (background).

    Returns:
      image [size, size, C] uint8 and segmentation [size, size] int32 with label + 1 where an item's pixel is
      drawn and 0 elsewhere: every pixel shows exactly the item its segmentation names, or black background.
    """
    image = np.zeros((size, size, items.shape[-1]), np.uint8)
    segmentation = np.zeros((size, size), np.int32)
    height, width = items.shape[1:3]
    for item, label, (row, col) in zip(items, labels, positions):
        drawn = item.max(axis=-1) > foreground_threshold
        window = (slice(row, row + height), slice(col, col + width))
        image[window][drawn] = item[drawn]
        segmentation[window][drawn] = label + 1
    return image, segmentation


@dataclasses.dataclass(frozen=True, eq=False)
class Scene:
    """Scene i = item i + 1-3 random items of the split, at uniform positions on the canvas.

    Item i is always in scene i, so an epoch shows every item at least once. The other items and all positions
    come from the per-example generator; the draw order is random, so item i is occluded as often as the
    others. Items can overlap, partly or (rarely) wholly.

    Attributes:
      items: random access to the split's checked raw examples (`image` uint8 [h, w, C], `label`).
    """

    items: Any
    image_size: int = 64
    min_objects: int = 2
    max_objects: int = 4
    foreground_threshold: int = 10

    def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        count = int(rng.integers(self.min_objects, self.max_objects + 1))
        others = rng.integers(0, len(self.items), count - 1)
        examples = [example] + [self.items[int(j)] for j in others]
        order = rng.permutation(count)
        items = np.stack([examples[k]["image"] for k in order])
        labels = np.array([examples[k]["label"] for k in order])
        height, width = items.shape[1:3]
        positions = np.stack(
            [
                rng.integers(0, self.image_size - height + 1, count),
                rng.integers(0, self.image_size - width + 1, count),
            ],
            axis=1,
        )
        image, segmentation = compose_scene(items, labels, positions, self.image_size, self.foreground_threshold)
        rest = {key: value for key, value in example.items() if key not in ("image", "label")}
        return {**rest, "image": image, "segmentation": segmentation}
