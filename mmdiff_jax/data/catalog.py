"""The named data sets: their names, their options with defaults, and the fields of one example.

`make_dataset` (pipeline.py) reads any of `KNOWN_DATASETS`; `dataset_spec` says what its batches hold without
reading data (models are built from it). The Fashion-MNIST sets are made here from Debian's IDX files
(`fashion_mnist`, `derived`); the others are TFDS sets read through `tfds.data_source` (`tfds_sets`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from mmdiff_jax.data import derived
from mmdiff_jax.data import embeddings as embeddings_lib
from mmdiff_jax.data import fashion_mnist
from mmdiff_jax.data import tfds_sets

FASHION_MNIST_SETS = (
    "fashion_mnist",
    "fashion_mnist_masked",
    "fashion_mnist_scenes",
    "fashion_mnist_embedding",
    "fashion_mnist_lowres",
    "fashion_mnist_multitask",
    "fashion_mnist_scenes_masked",
)
KNOWN_DATASETS = FASHION_MNIST_SETS + tuple(tfds_sets.TFDS_SETS)
_FASHION_OPTIONS = {
    "fashion_mnist": {"image_size": 32},
    "fashion_mnist_masked": {"image_size": 32, "mask_kind": "patch", "mask_ratio": 0.5, "patch_size": 4},
    "fashion_mnist_scenes": {
        "image_size": 64,
        "min_objects": 2,
        "max_objects": 4,
        "foreground_threshold": 10,
    },
    "fashion_mnist_embedding": {"image_size": 32, "embedding_path": None},
    "fashion_mnist_lowres": {"image_size": 32, "factor": 4},
    "fashion_mnist_multitask": {
        "image_size": 32,
        "mask_kind": "patch",
        "mask_ratio": 0.5,
        "patch_size": 4,
        "embedding_path": None,
    },
    "fashion_mnist_scenes_masked": {
        "image_size": 64,
        "min_objects": 2,
        "max_objects": 4,
        "foreground_threshold": 10,
        "mask_kind": "patch",
        "mask_ratio": 0.5,
        "patch_size": 4,
    },
}
# Options every Fashion-MNIST set takes: the IDX directory, an in-memory
# stand-in for the split ({"image": [N, 28, 28, 1] uint8, "label": [N]}, for
# tests and tiny runs), and a transform seed separate from the shuffle seed.
_COMMON_FASHION_OPTIONS = {"idx_dir": None, "arrays": None, "transform_seed": None}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Per-example fields of a named set: key -> (shape, dtype); class counts."""

    features: Mapping[str, tuple[tuple[int, ...], np.dtype]]
    num_classes: Mapping[str, int]


def check_name(name: str) -> None:
    if name not in KNOWN_DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; known: {', '.join(KNOWN_DATASETS)}")


def resolve_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    check_name(name)
    if name in FASHION_MNIST_SETS:
        defaults = {**_FASHION_OPTIONS[name], **_COMMON_FASHION_OPTIONS}
    else:
        defaults = {"image_size": tfds_sets.TFDS_SETS[name].default_image_size}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"Unknown options {unknown} for {name!r}; it takes {sorted(defaults)}")
    return {**defaults, **options}


def dataset_spec(name: str, **options) -> DatasetSpec:
    """Shapes/dtypes of one example of `name` (batches add a leading B)."""
    options = resolve_options(name, options)
    size = options["image_size"]
    image_f32 = np.dtype(np.float32)
    int32 = np.dtype(np.int32)
    if name in FASHION_MNIST_SETS:
        image = ((size, size, 1), image_f32)
        if name == "fashion_mnist":
            return DatasetSpec({"image": image, "label": ((), int32)}, {"label": fashion_mnist.NUM_CLASSES})
        if name == "fashion_mnist_masked":
            return DatasetSpec({"image": image, "masked_image": image, "mask": image}, {})
        if name == "fashion_mnist_lowres":
            return DatasetSpec({"image": image, "low_resolution": image}, {})
        if name in ("fashion_mnist_scenes", "fashion_mnist_scenes_masked"):
            masked = {"masked_image": image, "mask": image} if name == "fashion_mnist_scenes_masked" else {}
            return DatasetSpec(
                {"image": image, "segmentation": ((size, size), int32), **masked},
                {"segmentation": derived.SEGMENTATION_NUM_CLASSES},
            )
        dim = embeddings_lib.DEFAULT_EMBEDDING_DIM
        if options["embedding_path"] is not None:
            with np.load(options["embedding_path"]) as table:
                dim = int(table["train"].shape[1])
        embedding = {"embedding": ((dim,), image_f32)}
        if name == "fashion_mnist_embedding":
            return DatasetSpec({"image": image, **embedding}, {})
        return DatasetSpec(
            {"image": image, "masked_image": image, "mask": image, "label": ((), int32), **embedding},
            {"label": fashion_mnist.NUM_CLASSES},
        )
    tfds_set = tfds_sets.TFDS_SETS[name]
    features = {"image": ((size, size, 3), image_f32)}
    num_classes = {}
    if tfds_set.num_classes:
        features["label"] = ((), int32)
        num_classes["label"] = tfds_set.num_classes
    if tfds_set.segmentation_classes:
        features["segmentation"] = ((size, size), int32)
        num_classes["segmentation"] = tfds_set.segmentation_classes
    return DatasetSpec(features, num_classes)
