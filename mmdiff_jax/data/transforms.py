"""Per-example transforms (`config.data.transforms`): a source's raw examples -> the model's fields.

A pipe of calls, applied left to right (`calls.py` parses it), e.g. masked pretraining on Fashion-MNIST:

  "pad(32)|value_range(-1, 1)|masked_image(kind='patch', ratio=(0.1, 0.6), patch_size=4)"

  resize(size, key='image', method='box')   center-crop to a square, then resize to [size, size] with PIL
                                            ('box' area-averages, 'nearest' for label maps, 'bilinear',
                                            'bicubic', 'lanczos'); uint8 in and out
  pad(size, key='image')                    zero-pad to [size, size], content centred (black, -1 after
                                            value_range)
  value_range(low=-1, high=1, key='image')  uint8 [0, 255] -> float32 [low, high]
  masked_image(kind='patch', ratio=0.5, patch_size=4, key='image')
                                            adds masked_image = image * mask and mask [S, S, 1] float32
                                            (1 kept, 0 hidden: mid-grey in [-1, 1]); kind 'patch' hides
                                            round(ratio P) of the P grid patches (MAE), 'pixel' round(ratio
                                            S^2) pixels, 'box' one square of side round(sqrt(ratio) S);
                                            ratio a number or a (low, high) range drawn per example, within
                                            [0.1, 0.75]
  low_resolution(factor, key='image')       adds low_resolution: the factor x factor block means repeated
                                            back to [S, S, C] (the image-transition source)
  embedding(path=None)                      adds embedding [D]: row i of the [N, D] table `path[split]` (an
                                            .npz, one array per split, row i for example i as the source
                                            reads them); None: the project's default CNN embeddings, for the
                                            fashion_mnist() source (`embeddings.py`)
  segmentation(field, mapping)              the label map `field` ([H, W] or [H, W, 1] integers) -> segmentation
                                            [H, W] int32 through `mapping` {value: class}; a value not in it is
                                            a bad example (e.g. oxford_iiit_pet's trimap: {1: 1, 2: 0, 3: 2})
  scenes(size=64, min_objects=2, max_objects=4, foreground_threshold=10)
                                            first, on a source of small labelled items: scene i pastes item i
                                            and 1-3 random items of the split on a black [size, size] canvas
                                            (`scenes.py`); image [size, size, C] uint8 and segmentation
                                            [size, size] int32 (0 background, label c -> c + 1); no label
  keep(*keys)                               drop every other field

The whole pipe runs as one grain random map, seeded per (transform seed, example index, epoch): example i of
epoch e is a pure function of those, every process computes the same one, and each epoch draws fresh masks and
scene layouts. Each op states the spec of its output (`output_spec`), so a pipe that needs a field the source
lacks, or that leaves sizes varying, is refused before any data is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from mmdiff_jax.data import calls
from mmdiff_jax.data import checks
from mmdiff_jax.data import embeddings as embeddings_lib
from mmdiff_jax.data import scenes as scenes_lib
from mmdiff_jax.data.spec import DatasetSpec, class_field, float_field, uint8_image

KEY = "config.data.transforms"
MASK_RATIO_RANGE = (0.1, 0.75)
MASK_KINDS = ("patch", "pixel", "box")
_RESAMPLE = {
    "box": Image.BOX,
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
}

Example = dict[str, Any]
BoundOp = Callable[[Example, np.random.Generator, int], Example]  # (example, rng, index) -> example


@dataclasses.dataclass(frozen=True)
class Context:
    """What an op may read besides its example: the split, the source, the split's checked raw examples."""

    split: str
    source: Any
    items: Any  # random access to the checked raw examples (a grain MapDataset)


class TransformError(ValueError):
    """A transform cannot apply to the data it is given (raised before any data is read)."""


def _field(spec: DatasetSpec, op, key: str, rank: int | None = None, dtype=None) -> tuple:
    if key not in spec.features:
        raise TransformError(
            f"{KEY}: {calls.render(op)} needs the field {key!r}, which the data does not have at that point "
            f"(it has {sorted(spec.features)})"
        )
    shape, have = spec.features[key]
    if rank is not None and len(shape) != rank:
        raise TransformError(f"{KEY}: {calls.render(op)} needs {key!r} of rank {rank}, it has shape {shape}")
    if dtype is not None and have != np.dtype(dtype):
        hint = " (put value_range() before it)" if have == np.uint8 else ""
        raise TransformError(f"{KEY}: {calls.render(op)} needs {key!r} as {np.dtype(dtype)}, it is {have}{hint}")
    return shape


def _fixed_square(spec, op, key) -> int:
    shape = _field(spec, op, key, rank=3)
    if shape[0] is None or shape[0] != shape[1]:
        raise TransformError(
            f"{KEY}: {calls.render(op)} needs a square image of one size, {key!r} has shape {shape} (put "
            "resize(S) or pad(S) before it)"
        )
    return shape[0]


class _Op:
    """An op: a frozen dataclass of its call's arguments; `output_spec` and `bind` (the module docstring)."""

    name: ClassVar[str]

    def output_spec(self, spec: DatasetSpec) -> DatasetSpec:
        raise NotImplementedError

    def bind(self, context: Context) -> BoundOp:  # pylint: disable=unused-argument
        return lambda example, rng, index: self.apply(example, rng)

    def apply(self, example: Example, rng: np.random.Generator) -> Example:
        raise NotImplementedError


def center_crop_resize(array: np.ndarray, size: int, resample) -> np.ndarray:
    """[H, W, C] uint8 -> the centred square crop resized to [size, size, C]."""
    height, width = array.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    array = array[top : top + side, left : left + side]
    if side == size:
        return array
    channels = array.shape[2]
    resized = np.asarray(Image.fromarray(array[..., 0] if channels == 1 else array).resize((size, size), resample))
    return resized.reshape(size, size, channels)


@dataclasses.dataclass(frozen=True)
class Resize(_Op):
    name: ClassVar[str] = "resize"
    size: int
    key: str = "image"
    method: str = "box"

    def output_spec(self, spec):
        if self.method not in _RESAMPLE:
            raise TransformError(f"{KEY}: {calls.render(self)}: method must be one of {', '.join(_RESAMPLE)}")
        channels = _field(spec, self, self.key, rank=3, dtype=np.uint8)[2]
        return spec.replace({self.key: uint8_image((self.size, self.size, channels))})

    def apply(self, example, rng):
        resized = center_crop_resize(np.asarray(example[self.key]), self.size, _RESAMPLE[self.method])
        return {**example, self.key: resized}


def pad_to(image: np.ndarray, size: int) -> np.ndarray:
    """Zero-pads an [H, W, C] image to [size, size, C], content centred."""
    height, width = image.shape[:2]
    if size == height == width:
        return image
    top, left = (size - height) // 2, (size - width) // 2
    out = np.zeros((size, size) + image.shape[2:], image.dtype)
    out[top : top + height, left : left + width] = image
    return out


@dataclasses.dataclass(frozen=True)
class Pad(_Op):
    name: ClassVar[str] = "pad"
    size: int
    key: str = "image"

    def output_spec(self, spec):
        height, width, channels = _field(spec, self, self.key, rank=3)
        if height is None or width is None:
            raise TransformError(f"{KEY}: {calls.render(self)}: {self.key!r} sizes vary; resize(S) it instead")
        if self.size < max(height, width):
            raise TransformError(f"{KEY}: {calls.render(self)} is smaller than {self.key!r} ({height}x{width})")
        return spec.replace({self.key: (((self.size, self.size, channels)), spec.features[self.key][1])})

    def apply(self, example, rng):
        return {**example, self.key: pad_to(np.asarray(example[self.key]), self.size)}


@dataclasses.dataclass(frozen=True)
class ValueRange(_Op):
    name: ClassVar[str] = "value_range"
    low: float = -1.0
    high: float = 1.0
    key: str = "image"

    def output_spec(self, spec):
        shape = _field(spec, self, self.key, dtype=np.uint8)
        return spec.replace({self.key: float_field(shape)})

    def apply(self, example, rng):
        scale, low = np.float32((self.high - self.low) / 255), np.float32(self.low)
        return {**example, self.key: np.asarray(example[self.key]).astype(np.float32) * scale + low}


def check_mask_ratio(ratio) -> None:
    """Mask ratios (fraction of hidden pixels) lie in [0.1, 0.75]: a number or a (low, high) range."""
    low, high = (ratio, ratio) if np.isscalar(ratio) else ratio
    if not MASK_RATIO_RANGE[0] <= low <= high <= MASK_RATIO_RANGE[1]:
        raise TransformError(
            f"{KEY}: mask ratio {ratio} must be a number or a (low, high) range within {MASK_RATIO_RANGE}"
        )


def pixel_mask(rng: np.random.Generator, size: int, ratio: float) -> np.ndarray:
    """[size, size, 1] float32, exactly round(ratio * size^2) pixels hidden (0)."""
    num_pixels = size * size
    hidden = rng.choice(num_pixels, round(ratio * num_pixels), replace=False)
    mask = np.ones(num_pixels, np.float32)
    mask[hidden] = 0
    return mask.reshape(size, size, 1)


def patch_mask(rng: np.random.Generator, size: int, ratio: float, patch_size: int) -> np.ndarray:
    """[size, size, 1] float32 hiding round(ratio * P) of the P = (size / patch_size)^2 grid patches (MAE's
    masking), so the hidden fraction is exact up to 1 / (2P)."""
    grid = size // patch_size
    patches = np.ones(grid * grid, np.float32)
    patches[rng.choice(grid * grid, round(ratio * grid * grid), replace=False)] = 0
    patches = np.broadcast_to(patches.reshape(grid, 1, grid, 1), (grid, patch_size, grid, patch_size))
    return patches.reshape(size, size, 1)


def box_mask(rng: np.random.Generator, size: int, ratio: float) -> np.ndarray:
    """[size, size, 1] float32 hiding one square of side round(sqrt(ratio) * size) at a uniform position."""
    side = round(np.sqrt(ratio) * size)
    top, left = rng.integers(0, size - side + 1, 2)
    mask = np.ones((size, size, 1), np.float32)
    mask[top : top + side, left : left + side] = 0
    return mask


@dataclasses.dataclass(frozen=True)
class MaskedImage(_Op):
    name: ClassVar[str] = "masked_image"
    kind: str = "patch"
    ratio: float | tuple[float, float] = 0.5
    patch_size: int = 4
    key: str = "image"

    def output_spec(self, spec):
        if self.kind not in MASK_KINDS:
            raise TransformError(f"{KEY}: {calls.render(self)}: kind must be one of {', '.join(MASK_KINDS)}")
        check_mask_ratio(self.ratio)
        size = _fixed_square(spec, self, self.key)
        _field(spec, self, self.key, dtype=np.float32)
        if self.kind == "patch" and size % self.patch_size:
            raise TransformError(f"{KEY}: {calls.render(self)}: patch_size must divide the image size {size}")
        shape = spec.features[self.key][0]
        return spec.replace({"masked_image": float_field(shape), "mask": float_field((size, size, 1))})

    def apply(self, example, rng):
        image = example[self.key]
        ratio = self.ratio if np.isscalar(self.ratio) else rng.uniform(*self.ratio)
        size = image.shape[0]
        if self.kind == "patch":
            mask = patch_mask(rng, size, ratio, self.patch_size)
        elif self.kind == "pixel":
            mask = pixel_mask(rng, size, ratio)
        else:
            mask = box_mask(rng, size, ratio)
        return {**example, "masked_image": image * mask, "mask": mask}


def low_resolution(image: np.ndarray, factor: int) -> np.ndarray:
    """[S, S, C] -> the mean over each factor x factor block, repeated back to [S, S, C]; factor divides S."""
    size, channels = image.shape[0], image.shape[-1]
    blocks = image.reshape(size // factor, factor, size // factor, factor, channels).mean(axis=(1, 3))
    return np.repeat(np.repeat(blocks, factor, axis=0), factor, axis=1).astype(image.dtype)


@dataclasses.dataclass(frozen=True)
class LowResolution(_Op):
    name: ClassVar[str] = "low_resolution"
    factor: int = 4
    key: str = "image"

    def output_spec(self, spec):
        size = _fixed_square(spec, self, self.key)
        shape = _field(spec, self, self.key, dtype=np.float32)
        if self.factor < 1 or size % self.factor:
            raise TransformError(f"{KEY}: {calls.render(self)}: factor must be >= 1 and divide {size}")
        return spec.replace({"low_resolution": float_field(shape)})

    def apply(self, example, rng):
        return {**example, "low_resolution": low_resolution(example[self.key], self.factor)}


@dataclasses.dataclass(frozen=True)
class Embedding(_Op):
    name: ClassVar[str] = "embedding"
    path: str | None = None

    def output_spec(self, spec):
        dim = embeddings_lib.DEFAULT_EMBEDDING_DIM
        if self.path is not None:
            dim = embeddings_lib.embedding_dim(self.path)
        return spec.replace({"embedding": float_field((dim,))})

    def bind(self, context):
        path = self.path
        if path is None:
            if context.source.name != "fashion_mnist":
                raise TransformError(
                    f"{KEY}: embedding() without a path uses the project's Fashion-MNIST embeddings; the source "
                    f"is {context.source.name}(...): give embedding(path) an .npz of one [N, D] table per split"
                )
            path = embeddings_lib.ensure_default_embeddings(context.source.data_dir, context.source.idx_dir)
        table = embeddings_lib.load_embeddings(path, context.split, len(context.items))
        return lambda example, rng, index: {**example, "embedding": table[index % len(table)]}


@dataclasses.dataclass(frozen=True)
class Segmentation(_Op):
    name: ClassVar[str] = "segmentation"
    field: str
    mapping: Mapping[int, int]

    def __hash__(self) -> int:
        return hash((self.field, tuple(sorted(self.mapping.items()))))

    def output_spec(self, spec):
        shape = _field(spec, self, self.field)
        if len(shape) == 3 and shape[2] == 1:
            shape = shape[:2]
        if len(shape) != 2:
            raise TransformError(f"{KEY}: {calls.render(self)}: {self.field!r} has shape {shape}, not [H, W(, 1)]")
        classes = {"segmentation": max(self.mapping.values()) + 1}
        return spec.replace({"segmentation": class_field(shape)}, classes, drop=(self.field,))

    def bind(self, context):
        values = np.array(sorted(self.mapping), np.int64)
        classes = np.array([self.mapping[v] for v in values], np.int32)
        where = context.source.check_name(context.split)

        def apply(example, rng, index):
            label_map = np.asarray(example[self.field])
            label_map = label_map[..., 0] if label_map.ndim == 3 else label_map
            position = np.clip(np.searchsorted(values, label_map), 0, len(values) - 1)
            outside = values[position] != label_map
            if outside.any():
                raise checks.BadExampleError(
                    f"{where} example {index}: {self.field!r} has value {label_map[outside].flat[0]}, expected "
                    f"one of {tuple(int(v) for v in values)}"
                )
            rest = {key: value for key, value in example.items() if key != self.field}
            return {**rest, "segmentation": classes[position]}

        return apply


@dataclasses.dataclass(frozen=True)
class Scenes(_Op):
    name: ClassVar[str] = "scenes"
    size: int = 64
    min_objects: int = 2
    max_objects: int = 4
    foreground_threshold: int = 10

    def output_spec(self, spec):
        if not 1 <= self.min_objects <= self.max_objects:
            raise TransformError(f"{KEY}: {calls.render(self)}: need 1 <= min_objects <= max_objects")
        height, width, channels = _field(spec, self, "image", rank=3, dtype=np.uint8)
        _field(spec, self, "label")
        if height is None or self.size < max(height, width):
            raise TransformError(f"{KEY}: {calls.render(self)} cannot hold items of shape {(height, width)}")
        return spec.replace(
            {"image": uint8_image((self.size, self.size, channels)), "segmentation": class_field((self.size,) * 2)},
            {"segmentation": spec.num_classes["label"] + 1},
            drop=("label",),
        )

    def bind(self, context):
        scene = scenes_lib.Scene(
            context.items, self.size, self.min_objects, self.max_objects, self.foreground_threshold
        )
        return lambda example, rng, index: scene(example, rng)


@dataclasses.dataclass(frozen=True, init=False)
class Keep(_Op):
    name: ClassVar[str] = "keep"
    keys: tuple[str, ...] = dataclasses.field(metadata={"varargs": True})

    def __init__(self, *keys: str):
        object.__setattr__(self, "keys", tuple(keys))

    def output_spec(self, spec):
        for key in self.keys:
            _field(spec, self, key)
        return spec.replace(drop=tuple(key for key in spec.features if key not in self.keys))

    def apply(self, example, rng):
        return {key: example[key] for key in self.keys}


OPS = {
    cls.name: cls
    for cls in (Resize, Pad, ValueRange, MaskedImage, LowResolution, Embedding, Segmentation, Scenes, Keep)
}


def parse_transforms(text: str) -> tuple[_Op, ...]:
    """`config.data.transforms` -> its ops, in order; ValueError naming the key for a bad string."""
    ops = calls.parse_pipe(text, OPS, KEY)
    for position, op in enumerate(ops):
        if isinstance(op, Scenes) and position:
            raise TransformError(f"{KEY}: scenes(...) must come first (it composes raw source items)")
    return ops


def output_spec(ops: tuple[_Op, ...], spec: DatasetSpec) -> DatasetSpec:
    """The spec after `ops`, which must leave no size varying (a batch stacks its examples)."""
    for op in ops:
        spec = op.output_spec(spec)
    for key, (shape, _) in spec.features.items():
        if None in shape:
            raise TransformError(
                f"{KEY}: {key!r} has per-example shape {shape} with sizes that vary between examples; add "
                f"resize(S, key={key!r})"
            )
    return spec


def bind(ops: tuple[_Op, ...], context: Context) -> Callable[[Example, np.random.Generator], Example]:
    """The whole pipe as one grain random map: (example with its '_index', rng) -> example."""
    bound = [op.bind(context) for op in ops]

    def apply(example, rng):
        example = dict(example)
        index = example.pop("_index")
        for op in bound:
            example = op(example, rng, index)
        return example

    return apply


def find(text: str, name: str):
    """The first op called `name` in a transforms string, or None (experiments read its arguments)."""
    return next((op for op in parse_transforms(text) if op.name == name), None)


def with_args(text: str, name: str, **changes) -> str:
    """The transforms string with the arguments of every op called `name` changed, e.g.
    `with_args(t, "masked_image", ratio=0.25)`; ValueError if there is none."""
    ops = parse_transforms(text)
    if not any(op.name == name for op in ops):
        raise TransformError(f"{KEY} {text!r} has no {name}(...) op")
    return "|".join(calls.render(dataclasses.replace(op, **changes) if op.name == name else op) for op in ops)
