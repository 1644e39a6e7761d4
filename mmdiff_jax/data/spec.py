"""What a data set's examples hold, known before any data is read: field -> (shape, dtype), class counts.

Sources state the spec of their raw examples (`sources.py`); each transform maps a spec to the spec of its
output (`transforms.py`), so the model can be built and checked against the data before anything is read or
compiled. A `None` in a shape is a size that varies between examples (an image folder of mixed sizes, TFDS
ImageNet); the final spec of a pipeline must have none (a batch stacks its examples).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

Shape = tuple[int | None, ...]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Per-example fields: key -> (shape, dtype); integer class fields -> number of classes.

    Batches add a leading batch dimension. `num_classes[key] = K` means the field's values lie in [0, K).
    """

    features: Mapping[str, tuple[Shape, np.dtype]]
    num_classes: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def replace(self, features=None, num_classes=None, drop: tuple[str, ...] = ()) -> DatasetSpec:
        """A copy with `features` / `num_classes` added or replaced and the keys in `drop` removed."""
        new_features = {k: v for k, v in {**self.features, **(features or {})}.items() if k not in drop}
        new_classes = {k: v for k, v in {**self.num_classes, **(num_classes or {})}.items() if k in new_features}
        return DatasetSpec(new_features, new_classes)


def uint8_image(shape: Shape) -> tuple[Shape, np.dtype]:
    return tuple(shape), np.dtype(np.uint8)


def float_field(shape: Shape) -> tuple[Shape, np.dtype]:
    return tuple(shape), np.dtype(np.float32)


def class_field(shape: Shape = ()) -> tuple[Shape, np.dtype]:
    return tuple(shape), np.dtype(np.int32)
