"""The derived sets on the real Fashion-MNIST (skipped without Debian's files)."""

import numpy as np
import pytest

from mmdiff_jax import data
from tests.test_data_fixtures import real_data_dir, requires_real_files  # noqa: F401

pytestmark = requires_real_files


def test_test_split_one_epoch(real_data_dir):  # noqa: F811
    iterator = data.make_dataset("fashion_mnist", "test", batch_size=500, seed=0, data_dir=real_data_dir, num_epochs=1)
    labels, count = np.zeros(10, int), 0
    for batch in iterator:
        assert batch["image"].shape == (500, 32, 32, 1)
        assert batch["image"].dtype == np.float32
        assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
        labels += np.bincount(batch["label"], minlength=10)
        count += 1
    assert count == 20
    np.testing.assert_array_equal(labels, [1000] * 10)


@pytest.mark.parametrize("mask_kind", ["patch", "pixel"])
def test_masked_real(real_data_dir, mask_kind):  # noqa: F811
    batch = next(
        data.make_dataset(
            "fashion_mnist_masked",
            "train",
            batch_size=128,
            seed=0,
            data_dir=real_data_dir,
            mask_kind=mask_kind,
            mask_ratio=0.4,
        )
    )
    assert batch["masked_image"].shape == batch["mask"].shape == (128, 32, 32, 1)
    assert np.all(np.abs(1 - batch["mask"].mean((1, 2, 3)) - 0.4) <= 0.02)
    np.testing.assert_array_equal(batch["masked_image"], batch["image"] * batch["mask"])


def test_scenes_real(real_data_dir):  # noqa: F811
    batch = next(data.make_dataset("fashion_mnist_scenes", "train", batch_size=128, seed=0, data_dir=real_data_dir))
    image, segmentation = batch["image"][..., 0], batch["segmentation"]
    assert image.shape == segmentation.shape == (128, 64, 64)
    assert segmentation.dtype == np.int32
    assert segmentation.min() == 0 and segmentation.max() <= 10
    pixels = np.rint((image + 1) * 127.5)
    assert np.all(pixels[segmentation == 0] == 0)  # background is black
    assert np.all(pixels[segmentation > 0] > 10)  # drawn item pixels
    objects = np.array([len(np.unique(s)) - 1 for s in segmentation])
    assert objects.max() <= 4 and objects.mean() > 1.8
