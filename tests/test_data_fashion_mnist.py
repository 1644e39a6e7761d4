"""The Fashion-MNIST TFDS builder: synthetic IDX fixtures, and the real Debian files."""

import sys

import numpy as np
import pytest

from mmdiff_jax.data import fashion_mnist
from tests.test_data_fixtures import (
    make_synthetic_arrays,
    real_data_dir,  # noqa: F401
    requires_real_files,
    REAL_IDX_DIR,
    write_synthetic_idx,
)


@pytest.fixture
def idx_dir(tmp_path):
    """Synthetic IDX files: 13 train / 7 test examples, train gzipped, test raw."""
    return write_synthetic_idx(tmp_path / "idx", 13, 7)


def test_read_idx_round_trip_and_bad_magic(idx_dir, tmp_path):
    images = fashion_mnist.read_idx(idx_dir / "train-images-idx3-ubyte.gz")
    expected = make_synthetic_arrays(13, seed=13)["image"][..., 0]
    assert images.shape == (13, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, expected)
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x12\x34\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX file"):
        fashion_mnist.read_idx(bad)
    truncated = tmp_path / "truncated-idx"
    truncated.write_bytes((idx_dir / "t10k-labels-idx1-ubyte").read_bytes()[:-2])
    with pytest.raises(ValueError, match="size does not match"):
        fashion_mnist.read_idx(truncated)


def test_builder_prepares_synthetic_files_in_idx_order(idx_dir, tmp_path):
    builder = fashion_mnist.prepare_fashion_mnist(tmp_path / "tfds", idx_dir)
    assert builder.is_prepared()
    assert builder.info.splits["train"].num_examples == 13
    assert builder.info.splits["test"].num_examples == 7
    for split, count in (("train", 13), ("test", 7)):
        expected = make_synthetic_arrays(count, seed=count)
        source = builder.as_data_source(split)
        for i in range(count):  # example i is record i of the IDX file
            np.testing.assert_array_equal(source[i]["image"], expected["image"][i])
            assert source[i]["image"].dtype == np.uint8
            assert int(source[i]["label"]) == expected["label"][i]
    loaded = fashion_mnist.load_fashion_mnist("train", tmp_path / "tfds", idx_dir)
    np.testing.assert_array_equal(loaded["image"], make_synthetic_arrays(13, seed=13)["image"])
    assert "tensorflow" not in sys.modules


def test_missing_files_error_names_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        fashion_mnist.prepare_fashion_mnist(tmp_path / "tfds", tmp_path / "none")
    message = str(error.value)
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "train-images-idx3-ubyte" in message and str(tmp_path / "none") in message


def test_unknown_split(tmp_path, idx_dir):
    with pytest.raises(ValueError, match="Unknown split 'validation'"):
        fashion_mnist.load_fashion_mnist("validation", tmp_path, idx_dir)


@requires_real_files
def test_real_fashion_mnist(real_data_dir):  # noqa: F811
    builder = fashion_mnist.prepare_fashion_mnist(real_data_dir)
    assert builder.info.splits["train"].num_examples == 60000
    assert builder.info.splits["test"].num_examples == 10000
    for split, count, prefix in (("train", 60000, "train"), ("test", 10000, "t10k")):
        arrays = fashion_mnist.load_fashion_mnist(split, real_data_dir)
        assert arrays["image"].shape == (count, 28, 28, 1)
        assert arrays["image"].dtype == np.uint8
        labels = arrays["label"]
        assert labels.min() == 0 and labels.max() == 9
        # Fashion-MNIST is balanced: 6000 / 1000 examples per class.
        np.testing.assert_array_equal(np.bincount(labels), [count // 10] * 10)
        np.testing.assert_array_equal(labels, fashion_mnist.read_idx(REAL_IDX_DIR / f"{prefix}-labels-idx1-ubyte.gz"))
    assert "tensorflow" not in sys.modules
