"""Shared fixtures of the data tests (imported by the test_data_* modules).

`real_data_dir` prepares the real Fashion-MNIST from Debian's IDX files once per
test session in a temporary TFDS data_dir (about 10 s), or skips when the
files are not installed. `synthetic_arrays` builds small in-memory stand-ins
whose pixels encode their index and class, so tests can tell which example
ended where.
"""

import gzip
import pathlib

import numpy as np
import pytest

from mmdiff_jax.data import fashion_mnist

REAL_IDX_DIR = pathlib.Path(fashion_mnist.DEFAULT_IDX_DIR)
HAVE_REAL_FILES = all(
    (REAL_IDX_DIR / f"{prefix}-{kind}-ubyte.gz").is_file()
    for prefix in ("train", "t10k")
    for kind in ("images-idx3", "labels-idx1")
)
requires_real_files = pytest.mark.skipif(
    not HAVE_REAL_FILES,
    reason=f"Debian's Fashion-MNIST IDX files are not in {REAL_IDX_DIR} (install: {fashion_mnist.INSTALL_COMMAND})",
)


def write_idx(path: pathlib.Path, array: np.ndarray, gzipped: bool = True):
    """Writes a uint8 array as an IDX file (magic 0x0000 08 ndim, big-endian dims)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    payload = header + np.ascontiguousarray(array, np.uint8).tobytes()
    if gzipped:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def item_intensity(label):
    """Foreground value of a synthetic item of class `label` (all > 10)."""
    return 40 + 20 * np.asarray(label)


def make_synthetic_arrays(num_examples: int, seed: int = 0) -> dict:
    """{"image": [N, 28, 28, 1] uint8, "label": [N]}.

    Example i has label i % 10 and is a filled rectangle of value
    item_intensity(label) on black, so a pixel's value names its class.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(num_examples) % 10
    images = np.zeros((num_examples, 28, 28, 1), np.uint8)
    for i, label in enumerate(labels):
        top, left = rng.integers(0, 10, 2)
        height, width = rng.integers(8, 18, 2)
        images[i, top : top + height, left : left + width] = item_intensity(label)
    return {"image": images, "label": labels}


def with_index_pixels(arrays: dict) -> dict:
    """Copy whose pixel (0, 0) holds the example index (< 256 examples)."""
    images = arrays["image"].copy()
    images[:, 0, 0, 0] = np.arange(len(images))
    return {"image": images, "label": arrays["label"]}


def index_of(images: np.ndarray, image_size: int = 28) -> np.ndarray:
    """Recovers example indices from float images [B, S, S, 1] in [-1, 1]."""
    offset = (image_size - 28) // 2
    return np.rint((images[:, offset, offset, 0] + 1) * 127.5).astype(int)


_PREPARED = {}  # this module is imported once: prepare once per process


@pytest.fixture(scope="session")
def real_data_dir(tmp_path_factory):
    if not HAVE_REAL_FILES:
        pytest.skip(f"Debian's Fashion-MNIST IDX files are not in {REAL_IDX_DIR}")
    if "real" not in _PREPARED:
        data_dir = tmp_path_factory.mktemp("tfds_real")
        fashion_mnist.prepare_fashion_mnist(data_dir)
        _PREPARED["real"] = data_dir
    return _PREPARED["real"]


def write_synthetic_idx(directory: pathlib.Path, train: int, test: int):
    """Synthetic IDX files (train gzipped, test raw) of make_synthetic_arrays."""
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, count, gzipped in (("train", train, True), ("t10k", test, False)):
        arrays = make_synthetic_arrays(count, seed=count)
        suffix = ".gz" if gzipped else ""
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", arrays["image"][..., 0], gzipped)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", arrays["label"], gzipped)
    return directory


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
    """(data_dir, idx_dir) of a prepared synthetic set: 300 train / 60 test."""
    if "synthetic" not in _PREPARED:
        root = tmp_path_factory.mktemp("tfds_synthetic")
        idx_dir = write_synthetic_idx(root / "idx", 300, 60)
        fashion_mnist.prepare_fashion_mnist(root / "tfds", idx_dir)
        _PREPARED["synthetic"] = (root / "tfds", idx_dir)
    return _PREPARED["synthetic"]


@pytest.fixture(scope="session")
def synthetic_arrays():
    return make_synthetic_arrays(200)
