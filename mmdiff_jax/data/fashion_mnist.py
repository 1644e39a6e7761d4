"""Offline Fashion-MNIST as a TFDS builder (no TensorFlow), from Debian's IDX files.

Source files: Debian's `dataset-fashion-mnist` package installs
`{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz` under
`/usr/share/datasets/fashion-mnist` (install with `INSTALL_COMMAND`). Another
directory with the same four files (gzipped or not) can be given as `idx_dir`
or through `$MMDIFF_FASHION_MNIST_DIR`.

The builder `FashionMnistDebian` (TFDS name `fashion_mnist_debian`, distinct
from TFDS's own downloading `fashion_mnist`) writes `array_record` files with
`tfds.features.Tensor` / `ClassLabel` features, which `tfds.data_source` reads
without TensorFlow. Records keep the IDX order (`disable_shuffling`), so
example i of a split is image i of its IDX file: embeddings and other side
data align by that index.

  image: [28, 28, 1] uint8 in [0, 255]
  label: []          int64 in [0, 10)  (T-shirt/top ... Ankle boot)

Where it goes: `data_dir` (default: TFDS's own, `$TFDS_DATA_DIR` or
`~/tensorflow_datasets`) / `fashion_mnist_debian/1.0.0`. Preparing the 70k
examples takes about 10 s on 2 CPU cores; it is done once and reused. With
several processes, prepare once beforehand (`prepare_fashion_mnist()`), since
TFDS does not lock the directory.
"""

from __future__ import annotations

import functools
import gzip
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"
IDX_DIR_ENV = "MMDIFF_FASHION_MNIST_DIR"
INSTALL_COMMAND = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
SPLIT_PREFIXES = {"train": "train", "test": "t10k"}
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (28, 28, 1)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def idx_dir_or_default(idx_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """`idx_dir`, else `$MMDIFF_FASHION_MNIST_DIR`, else Debian's directory."""
    return pathlib.Path(idx_dir or os.environ.get(IDX_DIR_ENV) or DEFAULT_IDX_DIR)


def _idx_file(idx_dir: pathlib.Path, stem: str) -> pathlib.Path | None:
    for candidate in (idx_dir / f"{stem}.gz", idx_dir / stem):
        if candidate.is_file():
            return candidate
    return None


def idx_files(idx_dir: str | os.PathLike | None = None) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
    """split -> (images file, labels file); a clear error if any is missing."""
    directory = idx_dir_or_default(idx_dir)
    found, missing = {}, []
    for split, prefix in SPLIT_PREFIXES.items():
        pair = []
        for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
            path = _idx_file(directory, stem)
            if path is None:
                missing.append(f"{stem}[.gz]")
            pair.append(path)
        found[split] = tuple(pair)
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files missing in {directory}: {', '.join(missing)}."
            f" Install Debian's package with `{INSTALL_COMMAND}`, or point "
            f"`idx_dir` / ${IDX_DIR_ENV} at a directory holding them."
        )
    return found


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (optionally gzipped) into an array of its shape/dtype."""
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic {data[:4]!r})")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(dims))
    if len(data) != 4 + 4 * ndim + count * dtype.itemsize:
        raise ValueError(f"{path}: size does not match its header dims {dims}")
    return np.frombuffer(data, dtype, count, offset=4 + 4 * ndim).reshape(dims)


class FashionMnistDebian(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST from local IDX files; the files' directory is `manual_dir`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Fashion-MNIST from Debian's IDX files."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"`{INSTALL_COMMAND}` installs the IDX files under {DEFAULT_IDX_DIR}."

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST (Xiao et al. 2017) from local IDX files.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                }
            ),
            supervised_keys=("image", "label"),
            # Keep the IDX order, so that example i is image i of the IDX file.
            disable_shuffling=True,
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager):
        files = idx_files(dl_manager.manual_dir)
        return {split: self._generate_examples(*pair) for split, pair in files.items()}

    def _generate_examples(self, images_path, labels_path):
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE[:2]:
            raise ValueError(f"{images_path}: images of shape {images.shape}, expected [N, 28, 28]")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images")
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": image[..., None], "label": int(label)}


def prepare_fashion_mnist(
    data_dir: str | os.PathLike | None = None, idx_dir: str | os.PathLike | None = None
) -> FashionMnistDebian:
    """Returns the builder, preparing the dataset first if it is not prepared.

    Args:
      data_dir: TFDS data directory; `None` is TFDS's default.
      idx_dir: directory of the IDX files; see `idx_dir_or_default`.
    """
    builder = FashionMnistDebian(data_dir=None if data_dir is None else os.fspath(data_dir), file_format="array_record")
    if not builder.is_prepared():
        directory = idx_dir_or_default(idx_dir)
        idx_files(directory)  # fail early with the install command
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=directory))
    return builder


@functools.lru_cache(maxsize=8)
def _load_split(data_dir: str | None, idx_dir: str | None, split: str) -> dict[str, np.ndarray]:
    source = prepare_fashion_mnist(data_dir, idx_dir).as_data_source(split)
    images = np.empty((len(source),) + IMAGE_SHAPE, np.uint8)
    labels = np.empty((len(source),), np.int64)
    chunk = 4096  # batched reads: one array_record call per chunk, not per record
    for start in range(0, len(source), chunk):
        keys = list(range(start, min(start + chunk, len(source))))
        for offset, example in enumerate(source.__getitems__(keys)):
            images[start + offset] = example["image"]
            labels[start + offset] = example["label"]
    images.flags.writeable = False
    labels.flags.writeable = False
    return {"image": images, "label": labels}


def load_fashion_mnist(
    split: str, data_dir: str | os.PathLike | None = None, idx_dir: str | os.PathLike | None = None
) -> dict[str, np.ndarray]:
    """The whole split in memory, read once per process through `tfds.data_source`.

    Fashion-MNIST is 55 MB, so the pipelines keep it in memory: a record read
    costs ~0.2 ms through array_record one at a time, which would make the
    input pipeline the bottleneck, and the multi-object scenes need random
    access to other items anyway.

    Returns:
      {"image": [N, 28, 28, 1] uint8, "label": [N] int64}, read-only arrays.
    """
    if split not in SPLIT_PREFIXES:
        raise ValueError(f"Unknown split {split!r}; Fashion-MNIST has {sorted(SPLIT_PREFIXES)}")
    return _load_split(
        None if data_dir is None else os.fspath(data_dir),
        None if idx_dir is None else os.fspath(idx_dir),
        split,
    )
