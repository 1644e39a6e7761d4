"""Where examples come from (`config.data.source`): raw uint8 images and integer labels, by split.

  fashion_mnist(idx_dir=None)          the offline default: Debian's Fashion-MNIST IDX files, prepared as a
                                       TFDS set (`fashion_mnist.py`); image [28, 28, 1], label in [0, 10);
                                       splits train (60k) and test (10k)
  tfds(name)                           a TFDS set prepared in array_record format in `config.data.data_dir`,
                                       read through `tfds.data_source` (no TensorFlow): its Image features
                                       as uint8 [H, W, C] (None where sizes vary), its ClassLabel features
                                       as int32 with their class counts; any TFDS split string
  folder(path, labels=False)           image files (png, jpg, jpeg, bmp, gif, webp) found recursively; split
                                       S is the sub-folder `path/S` if there is one, else the whole folder is
                                       'train'; labels=True: one class per first-level sub-folder (sorted by
                                       name); greyscale (L) or RGB files, one mode per folder
  arrays(path, num_classes=None)       an .npz with `{split}_image` [N, H, W, C] uint8 (and `{split}_label`
                                       [N] integers), or `image` / `label` (split 'train'), or an .npy of
                                       images (split 'train'); num_classes default: largest label + 1

Folder and array splits take TFDS's slice syntax: 'train[:90%]', 'train[-64:]'. Every source states its
spec (`DatasetSpec`) without decoding an example, and every example is checked against it as it is read
(`checks.py`); labels come out as int32. `InMemory` is the same for arrays already in Python (tests, and
code that builds its data itself).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from mmdiff_jax.data import calls
from mmdiff_jax.data import fashion_mnist
from mmdiff_jax.data.spec import DatasetSpec, class_field, uint8_image

KEY = "config.data.source"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_MODE_CHANNELS = {"L": 1, "RGB": 3}


class ArraySource:
    """Random-access source over a dict of equal-length sequences (arrays)."""

    def __init__(self, arrays: Mapping[str, Sequence[Any]]):
        lengths = {key: len(value) for key, value in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"fields have different lengths: {lengths}")
        self._arrays = dict(arrays)
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {key: value[index] for key, value in self._arrays.items()}


_SLICE = re.compile(r"^(?P<split>[\w/-]+)\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\]$")


def split_slice(split: str, num_examples: int | Mapping[str, int]) -> tuple[str, slice]:
    """'train[10%:]' -> ('train', slice(start, stop)) in examples; a plain split -> the whole of it.

    `num_examples`: the size of each base split (a mapping), or of the one named."""

    match = _SLICE.match(split)
    if match is None:
        return split, slice(None)
    base = match["split"]
    size = num_examples[base] if isinstance(num_examples, Mapping) else num_examples

    def bound(text):
        if text is None:
            return None
        return round(int(text[:-1]) * size / 100) if text.endswith("%") else int(text)

    return base, slice(bound(match["start"]), bound(match["stop"]))


def _base_split(split: str) -> str:
    match = _SLICE.match(split)
    return split if match is None else match["split"]


class _Sliced:
    """Examples `window` of a random-access source."""

    def __init__(self, source, window: slice):
        self._source = source
        self._indices = range(len(source))[window]

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int):
        return self._source[self._indices[index]]


def _unknown_split(split: str, name: str, known) -> ValueError:
    return ValueError(f"{KEY}: {name} has no split {split!r}; it has {', '.join(sorted(known))}")


@dataclasses.dataclass(frozen=True)
class FashionMnist:
    """fashion_mnist(): the offline default (module docstring)."""

    name: ClassVar[str] = "fashion_mnist"
    idx_dir: str | None = None
    data_dir: str | None = None  # the TFDS data_dir it is prepared in (config.data.data_dir)

    def check_name(self, split: str) -> str:
        return f"fashion_mnist_debian/{split}"

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        """The split's {"image": [N, 28, 28, 1] uint8, "label": [N]} (read-only, read once per process)."""
        self.spec(split)
        arrays = fashion_mnist.load_fashion_mnist(_base_split(split), self.data_dir, self.idx_dir)
        _, window = split_slice(split, len(arrays["label"]))
        return {key: value[window] for key, value in arrays.items()}

    def spec(self, split: str) -> DatasetSpec:
        if _base_split(split) not in fashion_mnist.SPLIT_PREFIXES:
            raise _unknown_split(split, "fashion_mnist()", fashion_mnist.SPLIT_PREFIXES)
        return DatasetSpec(
            {"image": uint8_image(fashion_mnist.IMAGE_SHAPE), "label": class_field()},
            {"label": fashion_mnist.NUM_CLASSES},
        )

    def open(self, split: str):
        return ArraySource(self.arrays(split))


@dataclasses.dataclass(frozen=True)
class InMemory:
    """Arrays already in memory: {split: {"image": [N, H, W, C] uint8, "label": [N] int, ...}}.

    Not a config string (a config holds data, not arrays): for tests and code that builds its data itself.
    Fields other than image and label pass through unchecked but for their shape.
    """

    name: ClassVar[str] = "in_memory"
    splits: Mapping[str, Mapping[str, Any]]
    num_classes: int | None = None

    def check_name(self, split: str) -> str:
        return f"in_memory/{split}"

    def _split(self, split: str) -> dict[str, Any]:
        base = _base_split(split)
        if base not in self.splits:
            raise _unknown_split(split, "the in-memory arrays", self.splits)
        fields = self.splits[base]
        _, window = split_slice(split, len(fields["image"]))
        return {key: value[window] for key, value in fields.items()}

    def spec(self, split: str) -> DatasetSpec:
        fields = self._split(split)
        features, num_classes = {}, {}
        for key, value in fields.items():
            first = np.asarray(value[0])
            features[key] = (first.shape, np.dtype(np.int32) if key == "label" else first.dtype)
        if "image" in fields:
            features["image"] = uint8_image(np.asarray(fields["image"][0]).shape)
        if "label" in fields:
            num_classes["label"] = self.num_classes or _largest_label(self.splits) + 1
        return DatasetSpec(features, num_classes)

    def open(self, split: str):
        return ArraySource(self._split(split))


def _largest_label(splits: Mapping[str, Mapping[str, Any]]) -> int:
    return max(int(np.max(np.asarray(fields["label"]))) for fields in splits.values() if "label" in fields)


@dataclasses.dataclass(frozen=True)
class Arrays:
    """arrays(path, num_classes=None): an .npz / .npy file of images (module docstring)."""

    name: ClassVar[str] = "arrays"
    path: str
    num_classes: int | None = None

    def check_name(self, split: str) -> str:
        return f"{pathlib.Path(self.path).name}/{split}"

    def spec(self, split: str) -> DatasetSpec:
        return self._in_memory().spec(split)

    def open(self, split: str):
        return self._in_memory().open(split)

    def _in_memory(self) -> InMemory:
        return _load_arrays(self.path, self.num_classes)


@functools.lru_cache(maxsize=4)
def _load_arrays(path: str, num_classes: int | None) -> InMemory:
    where = f"{KEY} arrays({path!r})"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: no such file")
    if path.endswith(".npy"):
        splits = {"train": {"image": np.load(path, allow_pickle=False)}}
    else:
        with np.load(path, allow_pickle=False) as archive:
            files = {name: archive[name] for name in archive.files}
        if "image" in files:
            splits = {"train": {key: files[key] for key in ("image", "label") if key in files}}
        else:
            splits = {}
            for name, value in files.items():
                split, _, field = name.rpartition("_")
                if field in ("image", "label") and split:
                    splits.setdefault(split, {})[field] = value
        if not splits:
            raise ValueError(f"{where} holds {sorted(files)}; expected image (and label) or {{split}}_image arrays")
    for split, fields in splits.items():
        images = fields.get("image")
        if images is None:
            raise ValueError(f"{where}: split {split!r} has labels but no {split}_image array")
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(
                f"{where}: {split} images have shape {images.shape} and dtype {images.dtype}; expected "
                "[N, H, W, C] uint8 (add the channel axis to greyscale images: images[..., None])"
            )
        labels = fields.get("label")
        if labels is not None and (labels.shape != images.shape[:1] or labels.dtype.kind not in "iu"):
            raise ValueError(
                f"{where}: {split} labels have shape {labels.shape} and dtype {labels.dtype}; expected "
                f"[{len(images)}] integers, one per image"
            )
    return InMemory(splits, num_classes)


@dataclasses.dataclass(frozen=True)
class Folder:
    """folder(path, labels=False): image files under a folder (module docstring)."""

    name: ClassVar[str] = "folder"
    path: str
    labels: bool = False

    def check_name(self, split: str) -> str:
        return f"{self.path}/{split}"

    def spec(self, split: str) -> DatasetSpec:
        scan = _scan_folder(self.path, _base_split(split), self.labels)
        features = {"image": uint8_image(scan.shape)}
        if self.labels:
            return DatasetSpec({**features, "label": class_field()}, {"label": len(scan.classes)})
        return DatasetSpec(features)

    def open(self, split: str):
        scan = _scan_folder(self.path, _base_split(split), self.labels)
        _, window = split_slice(split, len(scan.files))
        return _Sliced(_FolderSource(scan), window)


@dataclasses.dataclass(frozen=True)
class _FolderScan:
    files: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    shape: tuple[int | None, ...]  # [H, W, C], None where the sizes vary


class _FolderSource:
    def __init__(self, scan: _FolderScan):
        self._scan = scan

    def __len__(self) -> int:
        return len(self._scan.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        with Image.open(self._scan.files[index]) as image:
            array = np.asarray(image)
        example = {"image": array[..., None] if array.ndim == 2 else array}
        if self._scan.classes:
            example["label"] = self._scan.labels[index]
        return example


@functools.lru_cache(maxsize=8)
def _scan_folder(path: str, split: str, labels: bool) -> _FolderScan:
    where = f"{KEY} folder({path!r})"
    root = pathlib.Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{where}: no such folder")
    if (root / split).is_dir():
        root = root / split
    elif split != "train":
        raise _unknown_split(split, f"folder {path!r}", ["train (the whole folder)"])
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"{where}: no image files ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    classes, label_of = (), ()
    if labels:
        outside = [p for p in files if p.parent == root]
        if outside:
            raise ValueError(f"{where} with labels=True: {outside[0]} is not in a class sub-folder of {root}")
        classes = tuple(sorted({p.relative_to(root).parts[0] for p in files}))
        label_of = tuple(classes.index(p.relative_to(root).parts[0]) for p in files)
    sizes, modes = {}, {}
    for file in files:
        try:
            with Image.open(file) as image:  # reads the header only
                sizes.setdefault(image.size, file)
                modes.setdefault(image.mode, file)
        except OSError as error:
            raise ValueError(f"{where}: {file} is not a readable image ({error})") from None
    unknown = sorted(set(modes) - set(_MODE_CHANNELS))
    if unknown:
        raise ValueError(
            f"{where}: {modes[unknown[0]]} has image mode {unknown[0]}; convert the folder to greyscale (L) or "
            "RGB files"
        )
    if len(modes) > 1:
        first, second = list(modes.items())[:2]
        raise ValueError(
            f"{where} mixes image modes: {first[1]} is {first[0]}, {second[1]} is {second[0]}; convert the "
            "folder to one of greyscale (L) or RGB"
        )
    ((width, height),) = sizes if len(sizes) == 1 else [(None, None)]
    shape = (height, width, _MODE_CHANNELS[next(iter(modes))])
    return _FolderScan(tuple(map(str, files)), label_of, classes, shape)


@dataclasses.dataclass(frozen=True)
class Tfds:
    """tfds(name): a prepared TFDS set (module docstring)."""

    name: ClassVar[str] = "tfds"
    dataset: str
    data_dir: str | None = None

    def check_name(self, split: str) -> str:
        return f"{self.dataset}/{split}"

    def spec(self, split: str) -> DatasetSpec:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

        self.open(split)  # fails here, before anything compiles, when the set is not prepared
        features, num_classes = {}, {}
        for key, feature in tfds.builder(self.dataset, data_dir=self.data_dir).info.features.items():
            if isinstance(feature, tfds.features.Image):
                features[key] = uint8_image(feature.shape)
            elif isinstance(feature, tfds.features.ClassLabel):
                features[key] = class_field()
                num_classes[key] = feature.num_classes
        return DatasetSpec(features, num_classes)

    def open(self, split: str):
        return _open_tfds(self.dataset, split, self.data_dir)


@functools.lru_cache(maxsize=8)
def _open_tfds(dataset: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    try:
        return tfds.data_source(dataset, split=split, download=False, data_dir=data_dir)
    except Exception as error:  # tfds raises KeyError, AssertionError, NotImplementedError, ... by version
        where = data_dir or "the default TFDS data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
        raise FileNotFoundError(
            f"{KEY} tfds({dataset!r}) split {split!r}: not prepared in array_record format in {where}. Prepare "
            f"it with `tfds build {dataset} --file_format=array_record --data_dir=DIR` (needs TensorFlow, so in "
            f"another environment) and set config.data.data_dir=DIR. TFDS said: {type(error).__name__}: {error}"
        ) from error


SOURCES = {cls.name: cls for cls in (FashionMnist, Tfds, Folder, Arrays)}


def parse_source(text: str, data_dir: str | os.PathLike | None = None):
    """`config.data.source` -> the source; `data_dir` (config.data.data_dir) goes to the TFDS-backed ones."""
    source = calls.parse_call(text, SOURCES, KEY)
    if data_dir and "data_dir" in {field.name for field in dataclasses.fields(source)}:
        source = dataclasses.replace(source, data_dir=os.fspath(data_dir))
    return source
