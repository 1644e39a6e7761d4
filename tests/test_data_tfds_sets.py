"""Real TFDS sets by name through tfds.data_source (mocked: nothing is downloaded)."""

import numpy as np
import pytest
from tensorflow_datasets.testing import mocking

from mmdiff_jax import data


def test_unprepared_set_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        data.make_dataset("cifar10", "train", batch_size=4, seed=0, data_dir=tmp_path)
    message = str(error.value)
    assert "tfds build cifar10 --file_format=array_record" in message
    assert str(tmp_path) in message


def test_cifar10_through_data_source(tmp_path):
    with mocking.mock_data(num_examples=20, policy=mocking.MockPolicy.USE_CODE):
        iterator = data.make_dataset("cifar10", "train", batch_size=8, seed=0, data_dir=tmp_path)
        batch = next(iterator)
        state = iterator.get_state()
        following = next(iterator)
        iterator.set_state(state)
        np.testing.assert_array_equal(next(iterator)["image"], following["image"])
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (8, 32, 32, 3)
    assert batch["image"].dtype == np.float32
    assert -1 <= batch["image"].min() and batch["image"].max() <= 1
    assert batch["image"].std() > 0.1  # random mock pixels, not a constant
    assert batch["label"].dtype == np.int32
    assert 0 <= batch["label"].min() and batch["label"].max() < 10


def fake_pets(num_examples):
    """Pets with a known trimap: left half pet (1), right half background (2),
    a border (3) column between; images are 48 x 96 (cropped to the middle)."""
    examples = []
    for i in range(num_examples):
        image = np.full((48, 96, 3), 10 * i, np.uint8)
        trimap = np.full((48, 96, 1), 2, np.uint8)
        trimap[:, :46] = 1
        trimap[:, 46:50] = 3
        examples.append(
            {
                "image": image,
                "label": i % 37,
                "species": i % 2,
                "segmentation_mask": trimap,
                "file_name": f"{i}.jpg",
                "head_bbox": np.zeros(4, np.float32),
            }
        )
    return examples


def test_oxford_iiit_pet_segmentation(tmp_path):
    pets = fake_pets(6)
    with mocking.mock_data(policy=mocking.MockPolicy.USE_CODE, as_data_source_fn=lambda *a, **k: pets):
        batch = next(
            data.make_dataset(
                "oxford_iiit_pet",
                "train",
                batch_size=6,
                seed=0,
                data_dir=tmp_path,
                shuffle=False,
                image_size=24,
            )
        )
    assert batch["image"].shape == (6, 24, 24, 3)
    np.testing.assert_allclose(batch["image"][:, 0, 0, 0], np.arange(6) * 10 / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(batch["label"], np.arange(6))
    segmentation = batch["segmentation"]
    assert segmentation.shape == (6, 24, 24) and segmentation.dtype == np.int32
    # Center crop keeps columns 24..71: pet on columns 24..45 -> 0..21 of 48.
    assert np.all(segmentation[:, :, :10] == 1)  # pet
    assert np.all(segmentation[:, :, 13:] == 0)  # background
    assert set(np.unique(segmentation)) == {0, 1, 2}  # the border survives


def test_bad_trimap_value_is_reported(tmp_path):
    pets = fake_pets(4)
    pets[2]["segmentation_mask"][0, 0, 0] = 7
    with mocking.mock_data(policy=mocking.MockPolicy.USE_CODE, as_data_source_fn=lambda *a, **k: pets):
        iterator = data.make_dataset("oxford_iiit_pet", "train", batch_size=4, seed=0, data_dir=tmp_path)
        with pytest.raises(
            data.BadExampleError, match="oxford_iiit_pet/train example 2: 'segmentation_mask' has value 7"
        ):
            next(iterator)


def test_real_set_specs():
    spec = data.dataset_spec("imagenet2012")
    assert spec.features["image"][0] == (64, 64, 3)
    assert spec.num_classes == {"label": 1000}
    assert set(data.dataset_spec("downsampled_imagenet/64x64").features) == {"image"}
    pets = data.dataset_spec("oxford_iiit_pet", image_size=128)
    assert pets.features["segmentation"][0] == (128, 128)
    assert pets.num_classes == {"label": 37, "segmentation": 3}
