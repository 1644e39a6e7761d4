"""The derived multi-modal sets: shapes, dtypes, ranges, mask ratios, scene masks."""

import numpy as np
import pytest

from mmdiff_jax import data
from mmdiff_jax.data import derived
from tests.test_data_fixtures import item_intensity, synthetic_arrays  # noqa: F401


def first_batch(name, arrays, batch_size=32, **options):
    iterator = data.make_dataset(name, "train", batch_size=batch_size, seed=3, arrays=arrays, **options)
    return next(iterator)


@pytest.mark.parametrize(
    "name,options",
    [
        ("fashion_mnist", {}),
        ("fashion_mnist", {"image_size": 28}),
        ("fashion_mnist_masked", {"mask_kind": "patch"}),
        ("fashion_mnist_masked", {"mask_kind": "pixel", "image_size": 28}),
        ("fashion_mnist_scenes", {}),
        ("fashion_mnist_scenes_masked", {"image_size": 48, "mask_ratio": (0.1, 0.6)}),
        ("fashion_mnist_lowres", {"image_size": 28}),
    ],
)
def test_batches_match_spec(name, options, synthetic_arrays):  # noqa: F811
    batch = first_batch(name, synthetic_arrays, **options)
    spec = data.dataset_spec(name, **options)
    assert set(batch) == set(spec.features)
    for key, (shape, dtype) in spec.features.items():
        assert batch[key].shape == (32,) + shape, key
        assert batch[key].dtype == dtype, key
    image = batch["image"]
    assert image.min() == -1.0 and image.max() <= 1.0
    for key, num_classes in spec.num_classes.items():
        assert batch[key].min() >= 0 and batch[key].max() < num_classes


def test_image_is_padded_with_black_and_scaled(synthetic_arrays):  # noqa: F811
    dataset = data.make_map_dataset("fashion_mnist", "train", arrays=synthetic_arrays)
    example = dataset[5]
    raw = synthetic_arrays["image"][5]
    assert example["image"].shape == (32, 32, 1)
    np.testing.assert_allclose(example["image"][2:30, 2:30], raw / 127.5 - 1, atol=1e-6)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.all(example["image"][border] == -1.0)
    assert example["label"] == synthetic_arrays["label"][5]


@pytest.mark.parametrize("mask_kind", ["patch", "pixel"])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.75])
def test_masks_cover_requested_ratio(mask_kind, ratio, synthetic_arrays):  # noqa: F811
    batch = first_batch("fashion_mnist_masked", synthetic_arrays, batch_size=64, mask_kind=mask_kind, mask_ratio=ratio)
    mask = batch["mask"]
    assert set(np.unique(mask)) == {0.0, 1.0}
    hidden = 1 - mask.mean(axis=(1, 2, 3))  # per example
    assert np.all(np.abs(hidden - ratio) <= 0.02), hidden
    np.testing.assert_array_equal(batch["masked_image"], batch["image"] * mask)
    assert np.all(batch["masked_image"][mask == 0] == 0)  # mid-grey
    # Random per example: no two masks in the batch are equal.
    flat = mask.reshape(len(mask), -1)
    assert len({row.tobytes() for row in flat}) == len(mask)
    if mask_kind == "patch":  # constant on each 4x4 patch of the grid
        blocks = mask[..., 0].reshape(64, 8, 4, 8, 4)
        assert np.all(blocks.min(axis=(2, 4)) == blocks.max(axis=(2, 4)))


def test_mask_ratio_range_sampled_per_example(synthetic_arrays):  # noqa: F811
    batch = first_batch(
        "fashion_mnist_masked", synthetic_arrays, batch_size=64, mask_kind="pixel", mask_ratio=(0.2, 0.6)
    )
    hidden = 1 - batch["mask"].mean(axis=(1, 2, 3))
    assert hidden.min() >= 0.2 - 1e-3 and hidden.max() <= 0.6 + 1e-3
    assert hidden.std() > 0.05  # really varies


@pytest.mark.parametrize("bad", [0.05, 0.8, (0.05, 0.5), (0.6, 0.4)])
def test_mask_ratio_outside_range_is_rejected(bad, synthetic_arrays):  # noqa: F811
    with pytest.raises(ValueError, match="mask_ratio"):
        data.make_dataset(
            "fashion_mnist_masked", "train", batch_size=4, seed=0, arrays=synthetic_arrays, mask_ratio=bad
        )


def test_compose_scene_occlusion_by_hand():
    items = np.zeros((3, 28, 28, 1), np.uint8)
    items[0, 4:20, 4:20] = 100  # class 2, at (0, 0)
    items[1, 0:10, 0:10] = 200  # class 7, at (10, 10): over item 0
    items[2, 0:5, 0:5] = 5  # below the threshold: transparent
    image, segmentation = derived.compose_scene(
        items, np.array([2, 7, 4]), np.array([[0, 0], [10, 10], [30, 30]]), size=64, foreground_threshold=10
    )
    expected = np.zeros((64, 64), np.int32)
    expected[4:20, 4:20] = 3
    expected[10:20, 10:20] = 8  # the later item occludes the earlier one
    np.testing.assert_array_equal(segmentation, expected)
    np.testing.assert_array_equal(image[..., 0], np.select([expected == 3, expected == 8], [100, 200], 0))


def test_scene_segmentation_agrees_with_pixels(synthetic_arrays):  # noqa: F811
    batch = first_batch("fashion_mnist_scenes", synthetic_arrays, batch_size=64)
    image = np.rint((batch["image"][..., 0] + 1) * 127.5).astype(int)
    segmentation = batch["segmentation"]
    background = segmentation == 0
    assert np.all(image[background] == 0)
    # Every drawn pixel has exactly the intensity of the class its mask names.
    np.testing.assert_array_equal(image[~background], item_intensity(segmentation[~background] - 1))
    objects = [len(np.unique(s)) - 1 for s in segmentation]
    assert min(objects) >= 1 and max(objects) <= 4
    assert np.mean(objects) > 1.5  # 2-4 items, rarely fully occluded
    assert (~background).mean() > 0.05


def test_scene_object_count_options(synthetic_arrays):  # noqa: F811
    batch = first_batch(
        "fashion_mnist_scenes", synthetic_arrays, batch_size=64, min_objects=1, max_objects=1, image_size=40
    )
    assert batch["image"].shape == (64, 40, 40, 1)
    assert all(len(np.unique(s)) == 2 for s in batch["segmentation"])
    with pytest.raises(ValueError, match="min_objects"):
        first_batch("fashion_mnist_scenes", synthetic_arrays, min_objects=3, max_objects=2)


def test_low_resolution_is_the_block_means_repeated(synthetic_arrays):  # noqa: F811
    batch = first_batch("fashion_mnist_lowres", synthetic_arrays, image_size=28, factor=4)
    image, source = batch["image"], batch["low_resolution"]
    blocks = image.reshape(-1, 7, 4, 7, 4, 1).mean(axis=(2, 4))
    np.testing.assert_allclose(source[:, ::4, ::4], blocks, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(source, np.repeat(np.repeat(source[:, ::4, ::4], 4, axis=1), 4, axis=2))
    assert np.abs(source - image).mean() > 0.01  # detail is lost
    with pytest.raises(ValueError, match="factor 3 must"):
        derived.LowResolution(28, 3)


def test_multitask_set_joins_the_masked_label_and_embedding_sets(synthetic_arrays, tmp_path):  # noqa: F811
    rng = np.random.default_rng(0)
    num = len(synthetic_arrays["label"])
    table = {"train": rng.standard_normal((num, 5)).astype(np.float32), "test": np.zeros((1, 5), np.float32)}
    np.savez(tmp_path / "embeddings.npz", **table)
    options = dict(arrays=synthetic_arrays, seed=3, image_size=28, mask_ratio=(0.1, 0.6))
    multitask = data.make_map_dataset(
        "fashion_mnist_multitask", "train", embedding_path=str(tmp_path / "embeddings.npz"), **options
    )
    masked = data.make_map_dataset("fashion_mnist_masked", "train", **options)
    spec = data.dataset_spec("fashion_mnist_multitask", image_size=28, embedding_path=str(tmp_path / "embeddings.npz"))
    for index in (0, 7, num - 1):
        example, reference = multitask[index], masked[index]
        assert set(example) == set(spec.features) == {"image", "masked_image", "mask", "label", "embedding"}
        for key in ("image", "masked_image", "mask"):  # the same seeded mask as the masked set's
            np.testing.assert_array_equal(example[key], reference[key])
        assert example["label"] == synthetic_arrays["label"][index] and example["label"].dtype == np.int32
        np.testing.assert_array_equal(example["embedding"], table["train"][index])
    with pytest.raises(ValueError, match="needs an `embedding_path`"):
        data.make_map_dataset("fashion_mnist_multitask", "train", arrays=synthetic_arrays)


def test_masked_scenes_are_the_scenes_set_with_a_mask_of_each_scene(synthetic_arrays):  # noqa: F811
    options = dict(arrays=synthetic_arrays, seed=3, image_size=48, min_objects=2, max_objects=3)
    scenes = data.make_map_dataset("fashion_mnist_scenes", "train", **options)
    masked = data.make_map_dataset("fashion_mnist_scenes_masked", "train", mask_ratio=0.25, patch_size=4, **options)
    for index in (0, 5, len(synthetic_arrays["label"]) - 1):
        example, reference = masked[index], scenes[index]
        for key in ("image", "segmentation"):  # the same seeded layout as the scenes set's
            np.testing.assert_array_equal(example[key], reference[key])
        mask = example["mask"]
        assert mask.shape == (48, 48, 1) and set(np.unique(mask)) <= {0.0, 1.0}
        assert abs((1.0 - mask.mean()) - 0.25) <= 0.02
        np.testing.assert_array_equal(example["masked_image"], example["image"] * mask)
    assert not np.array_equal(masked[0]["mask"], masked[1]["mask"])  # a fresh mask per scene
