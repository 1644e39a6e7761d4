"""The configs' data on the real Fashion-MNIST (skipped without Debian's files)."""

import hashlib
import importlib
import json
import pathlib

import numpy as np
import pytest

from mmdiff_jax import data
from mmdiff_jax.data import transforms
from tests.test_data_fixtures import real_data_dir, requires_real_files  # noqa: F401

pytestmark = requires_real_files
NAMED_SETS = pathlib.Path(__file__).parent / "data" / "named_set_batches.json"


def digest(batch):
    hash_ = hashlib.sha256()
    for key in sorted(key for key in batch if key != "embedding"):
        array = np.ascontiguousarray(batch[key])
        for part in (key.encode(), str(array.dtype).encode(), str(array.shape).encode(), array.tobytes()):
            hash_.update(part)
    return hash_.hexdigest()


@pytest.mark.parametrize(
    "name",
    [
        "default",
        "masked_pretrain",
        "joint_image_label",
        "image_segmentation",
        "image_embedding",
        "image_transition",
        "multitask",
        "multitask_scenes",
    ],
)
def test_configs_read_the_batches_of_the_named_sets_they_replace(name, real_data_dir):  # noqa: F811
    """Each config's source + transforms gives, bit for bit, the batches its named set gave before the data
    redesign (hashes recorded with that code), so the committed reports' training and test data are unchanged.
    The embedding rows are those of the default table, by index."""
    expected = json.loads(NAMED_SETS.read_text())["hashes"]
    config = importlib.import_module(f"configs.{name}").get_config("")
    make = lambda split, pipe, **kw: data.make_dataset(
        config.data.source, split, transforms=pipe, batch_size=16, seed=0, data_dir=real_data_dir, **kw
    )
    train = make("train", config.data.transforms)
    assert [digest(next(train)) for _ in range(3)] == expected[f"{name}/train"]
    pipe = config.data.transforms
    if transforms.find(pipe, "masked_image"):
        pipe = transforms.with_args(pipe, "masked_image", ratio=0.25)
    test = make("test", pipe, shuffle=False, num_epochs=1, transform_seed=1)
    batches = [next(test) for _ in range(2)]
    assert [digest(batch) for batch in batches] == expected[f"{name}/test"]
    if transforms.find(pipe, "embedding"):
        table = data.load_embeddings(data.ensure_default_embeddings(real_data_dir), "test", 10000)
        np.testing.assert_array_equal(np.concatenate([batch["embedding"] for batch in batches]), table[:32])


def test_test_split_one_epoch(real_data_dir):  # noqa: F811
    iterator = data.make_dataset(
        "fashion_mnist()",
        "test",
        transforms="pad(32)|value_range()",
        batch_size=500,
        seed=0,
        data_dir=real_data_dir,
        num_epochs=1,
    )
    labels, count = np.zeros(10, int), 0
    for batch in iterator:
        assert batch["image"].shape == (500, 32, 32, 1)
        assert batch["image"].dtype == np.float32
        assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
        labels += np.bincount(batch["label"], minlength=10)
        count += 1
    assert count == 20
    np.testing.assert_array_equal(labels, [1000] * 10)


def test_scenes_real(real_data_dir):  # noqa: F811
    batch = next(
        data.make_dataset(
            "fashion_mnist()",
            "train",
            transforms="scenes(64)|value_range()",
            batch_size=128,
            seed=0,
            data_dir=real_data_dir,
        )
    )
    image, segmentation = batch["image"][..., 0], batch["segmentation"]
    assert image.shape == segmentation.shape == (128, 64, 64)
    assert segmentation.dtype == np.int32
    assert segmentation.min() == 0 and segmentation.max() <= 10
    pixels = np.rint((image + 1) * 127.5)
    assert np.all(pixels[segmentation == 0] == 0)  # background is black
    assert np.all(pixels[segmentation > 0] > 10)  # drawn item pixels
    objects = np.array([len(np.unique(s)) - 1 for s in segmentation])
    assert objects.max() <= 4 and objects.mean() > 1.8
