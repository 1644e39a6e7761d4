"""Bad-data validation: every example is checked before it is transformed.

A check failure raises `BadExampleError` naming the dataset, the split and the
example index (the index in the source split, so the record can be found and
fixed), e.g.

  BadExampleError: fashion_mnist_debian/train example 1234: 'label' is 12,
  outside [0, 10)

The checks are cheap (a shape compare, `np.isfinite` on float fields, a range
check on integer class ids) and run inside the grain pipeline, per example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np


class BadExampleError(ValueError):
    """An example has the wrong shape, a non-finite value or an out-of-range id."""


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
    """What a raw source example must look like.

    Attributes:
      source: name used in error messages, e.g. "fashion_mnist_debian/train".
      shapes: field -> expected shape; `None` in a dimension means any size.
      num_classes: integer field -> number of classes; values must lie in
        [0, num_classes).
      allowed_values: integer field -> the set of values it may take (e.g. the
        1/2/3 trimap of oxford_iiit_pet).
    """

    source: str
    shapes: Mapping[str, tuple[int | None, ...]]
    num_classes: Mapping[str, int] = dataclasses.field(default_factory=dict)
    allowed_values: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


def _shape_matches(shape: tuple[int, ...], expected: tuple[int | None, ...]):
    return len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))


def check_example(example: Mapping[str, Any], index: int, spec: ExampleSpec) -> None:
    """Raises `BadExampleError` if `example` (number `index`) violates `spec`."""
    where = f"{spec.source} example {index}"
    for key, expected in spec.shapes.items():
        if key not in example:
            raise BadExampleError(f"{where}: field {key!r} is missing (has {sorted(example)})")
        value = np.asarray(example[key])
        if not _shape_matches(value.shape, expected):
            shown = tuple("*" if e is None else e for e in expected)
            raise BadExampleError(f"{where}: {key!r} has shape {value.shape}, expected {shown}")
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise BadExampleError(f"{where}: {key!r} contains {int(np.sum(~np.isfinite(value)))} NaN/Inf values")
    for key, num_classes in spec.num_classes.items():
        value = np.asarray(example[key])
        if value.dtype.kind not in "iu":
            raise BadExampleError(f"{where}: {key!r} has dtype {value.dtype}, expected an integer class id")
        if value.ndim == 0:  # the common case, without array reductions
            low = high = int(value)
        elif value.size:
            low, high = int(value.min()), int(value.max())
        else:
            continue
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise BadExampleError(f"{where}: {key!r} is {bad}, outside [0, {num_classes})")
    for key, allowed in spec.allowed_values.items():
        value = np.asarray(example[key])
        outside = ~np.isin(value, allowed)
        if outside.any():
            raise BadExampleError(
                f"{where}: {key!r} has value {value[outside].flat[0]}, expected one of {tuple(allowed)}"
            )


def check_embeddings(embeddings: np.ndarray, source: str, num_examples: int) -> None:
    """Checks a whole [N, D] embedding table once, naming the first bad row."""
    if embeddings.ndim != 2:
        raise BadExampleError(f"{source}: embeddings have shape {embeddings.shape}, expected [N, D]")
    if embeddings.shape[0] != num_examples:
        raise BadExampleError(
            f"{source}: {embeddings.shape[0]} embeddings for {num_examples} "
            "examples; they must be aligned by index, one row per example"
        )
    finite = np.isfinite(embeddings).all(axis=1)
    if not finite.all():
        raise BadExampleError(f"{source} example {int(np.argmin(finite))}: embedding contains NaN/Inf values")
