"""config.data.source: image folders, array files and TFDS sets (mocked: nothing is downloaded), and the one
clear error each kind of bad input gives."""

import numpy as np
import pytest
from PIL import Image
from tensorflow_datasets.testing import mocking

from mmdiff_jax import data


def write_folder(root, classes=("cat", "dog"), per_class=6, size=(12, 10), mode="RGB", split=None):
    """PNGs under root[/split]/<class>/; pixel (0, 0) of image i holds i, the rest the class index * 50."""
    base = root / split if split else root
    images, labels = [], []
    for label, name in enumerate(classes):
        (base / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            channels = 3 if mode == "RGB" else 1
            array = np.full((size[1], size[0], channels), 50 * label, np.uint8)
            array[0, 0] = len(images)
            Image.fromarray(array if channels == 3 else array[..., 0], mode).save(base / name / f"{i:03d}.png")
            images.append(array)
            labels.append(label)
    return np.stack(images), np.array(labels)


def test_folder_with_classes_and_splits(tmp_path):
    images, labels = write_folder(tmp_path, split="train")
    write_folder(tmp_path, classes=("cat", "dog"), per_class=2, split="test")
    source = f"folder({str(tmp_path)!r}, labels=True)"
    spec = data.dataset_spec(source, "train", "value_range()")
    assert spec.features == {"image": ((10, 12, 3), np.dtype(np.float32)), "label": ((), np.dtype(np.int32))}
    assert spec.num_classes == {"label": 2}
    batch = next(data.make_dataset(source, "train", batch_size=12, seed=0, shuffle=False, num_epochs=1))
    np.testing.assert_array_equal(batch["image"], images)  # sorted paths: class by class
    np.testing.assert_array_equal(batch["label"], labels)
    assert len(data.make_map_dataset(source, "test")) == 4
    assert len(data.make_map_dataset(source, "train[:50%]")) == 6
    np.testing.assert_array_equal(data.make_map_dataset(source, "train[-2:]")[1]["image"], images[-1])


def test_folder_without_split_folders_is_the_train_split_read_recursively(tmp_path):
    write_folder(tmp_path / "a", classes=("x",), per_class=3, mode="L")
    write_folder(tmp_path / "b" / "c", classes=("y",), per_class=2, mode="L")
    source = f"folder({str(tmp_path)!r})"
    examples = data.make_map_dataset(source, "train")
    assert len(examples) == 5 and set(examples[0]) == {"image"}
    assert examples[0]["image"].shape == (10, 12, 1)
    with pytest.raises(ValueError, match="has no split 'test'"):
        data.dataset_spec(source, "test")


def test_folder_of_mixed_sizes_needs_a_resize(tmp_path):
    write_folder(tmp_path, classes=("a",), size=(16, 16))
    write_folder(tmp_path, classes=("b",), size=(20, 12))
    source = f"folder({str(tmp_path)!r}, labels=True)"
    assert data.as_source(source).spec("train").features["image"][0] == (None, None, 3)  # the raw examples'
    with pytest.raises(
        ValueError, match=r"config.data.transforms: 'image' has per-example shape \(None, None, 3\).*resize"
    ):
        data.dataset_spec(source, "train", "value_range()")
    batch = next(data.make_dataset(source, "train", transforms="resize(8)|value_range()", batch_size=12, seed=0))
    assert batch["image"].shape == (12, 8, 8, 3)


@pytest.mark.parametrize(
    "prepare,message",
    [
        (lambda root: None, "config.data.source folder.*no such folder"),
        (lambda root: root.mkdir(), "config.data.source folder.*no image files"),
        (
            lambda root: (write_folder(root, classes=("a",)), write_folder(root, classes=("b",), mode="L")),
            r"mixes image modes: .*a/000.png is RGB, .*b/000.png is L",
        ),
        (
            lambda root: Image.new("RGBA", (4, 4)).save((root.mkdir(), root / "x.png")[1]),
            "has image mode RGBA; convert the folder to greyscale",
        ),
        (
            lambda root: (root.mkdir(), (root / "x.png").write_bytes(b"not a png")),
            "x.png is not a readable image",
        ),
    ],
)
def test_bad_folders_are_refused_naming_the_config_key(tmp_path, prepare, message):
    root = tmp_path / "images"
    prepare(root)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        data.dataset_spec(f"folder({str(root)!r})", "train")


def test_rgb_arrays_npz_with_splits_and_npy(tmp_path):
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (20, 8, 8, 3), np.uint8), rng.integers(0, 256, (4, 8, 8, 3), np.uint8)
    np.savez(
        tmp_path / "x.npz",
        train_image=train,
        train_label=np.arange(20) % 3,
        test_image=test,
        test_label=np.arange(4) % 3,
    )
    source = f"arrays({str(tmp_path / 'x.npz')!r})"
    assert data.dataset_spec(source, "test").num_classes == {"label": 3}
    batch = next(data.make_dataset(source, "test", transforms="value_range()", batch_size=4, seed=0, shuffle=False))
    np.testing.assert_allclose(batch["image"], train[:0].astype(np.float32).sum() + test / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(batch["label"], np.arange(4) % 3)
    np.save(tmp_path / "x.npy", train)
    assert set(data.make_map_dataset(f"arrays({str(tmp_path / 'x.npy')!r})", "train")[0]) == {"image"}
    assert data.dataset_spec(f"arrays({str(tmp_path / 'x.npz')!r}, num_classes=5)").num_classes == {"label": 5}


@pytest.mark.parametrize(
    "arrays,message",
    [
        ({"image": np.zeros((4, 8, 8), np.uint8)}, r"shape \(4, 8, 8\) and dtype uint8; expected \[N, H, W, C\] uint8"),
        ({"image": np.zeros((4, 8, 8, 1), np.float32)}, "dtype float32; expected"),
        ({"image": np.zeros((4, 8, 8, 1), np.uint8), "label": np.zeros(3, int)}, r"labels have shape \(3,\)"),
        ({"pictures": np.zeros((4, 8, 8, 1), np.uint8)}, r"holds \['pictures'\]"),
    ],
)
def test_bad_array_files_are_refused_naming_the_config_key(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=f"config.data.source arrays.*{message}"):
        data.dataset_spec(f"arrays({str(tmp_path / 'bad.npz')!r})")
    with pytest.raises(FileNotFoundError, match="config.data.source arrays.*no such file"):
        data.dataset_spec(f"arrays({str(tmp_path / 'missing.npz')!r})")


def test_unprepared_tfds_set_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        data.make_dataset("tfds('cifar10')", "train", batch_size=4, seed=0, data_dir=tmp_path)
    message = str(error.value)
    assert "config.data.source tfds('cifar10')" in message
    assert "tfds build cifar10 --file_format=array_record" in message
    assert str(tmp_path) in message


def test_cifar10_through_data_source(tmp_path):
    with mocking.mock_data(num_examples=20, policy=mocking.MockPolicy.USE_CODE):
        spec = data.dataset_spec("tfds('cifar10')", "train", "value_range()", data_dir=tmp_path)
        iterator = data.make_dataset(
            "tfds('cifar10')", "train", transforms="value_range()", batch_size=8, seed=0, data_dir=tmp_path
        )
        batch = next(iterator)
        state = iterator.get_state()
        following = next(iterator)
        iterator.set_state(state)
        np.testing.assert_array_equal(next(iterator)["image"], following["image"])
    assert set(batch) == set(spec.features) == {"image", "label"} and spec.num_classes == {"label": 10}
    assert batch["image"].shape == (8, 32, 32, 3)
    assert batch["image"].dtype == np.float32
    assert -1 <= batch["image"].min() and batch["image"].max() <= 1
    assert batch["image"].std() > 0.1  # random mock pixels, not a constant
    assert batch["label"].dtype == np.int32
    assert 0 <= batch["label"].min() and batch["label"].max() < 10


PETS = (
    "resize(24)|resize(24, key='segmentation_mask', method='nearest')|value_range()"
    "|segmentation('segmentation_mask', {1: 1, 2: 0, 3: 2})|keep('image', 'label', 'segmentation')"
)


def fake_pets(num_examples):
    """Pets with a known trimap: left half pet (1), right half background (2), a border (3) column between;
    images are 48 x 96 (cropped to the middle)."""
    examples = []
    for i in range(num_examples):
        trimap = np.full((48, 96, 1), 2, np.uint8)
        trimap[:, :46] = 1
        trimap[:, 46:50] = 3
        examples.append(
            {
                "image": np.full((48, 96, 3), 10 * i, np.uint8),
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
        source = "tfds('oxford_iiit_pet')"
        assert data.as_source(source, tmp_path).spec("train").features["image"][0] == (None, None, 3)
        spec = data.dataset_spec(source, "train", PETS, data_dir=tmp_path)
        batch = next(
            data.make_dataset(source, "train", transforms=PETS, batch_size=6, seed=0, data_dir=tmp_path, shuffle=False)
        )
    assert spec.num_classes == {"label": 37, "segmentation": 3}
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
    pets[2]["segmentation_mask"][24:26, 40:42] = 7  # inside the centre crop, where the resize samples
    with mocking.mock_data(policy=mocking.MockPolicy.USE_CODE, as_data_source_fn=lambda *a, **k: pets):
        iterator = data.make_dataset(
            "tfds('oxford_iiit_pet')", "train", transforms=PETS, batch_size=4, seed=0, data_dir=tmp_path
        )
        with pytest.raises(
            data.BadExampleError, match="oxford_iiit_pet/train example 2: 'segmentation_mask' has value 7"
        ):
            next(iterator)
