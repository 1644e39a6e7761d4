"""The transforms of config.data.transforms: shapes, dtypes, ranges, mask ratios, scenes, specs, errors."""

import numpy as np
import pytest

from mmdiff_jax import data
from mmdiff_jax.data import calls, scenes, transforms
from tests.test_data_fixtures import item_intensity, synthetic_arrays  # noqa: F401


@pytest.fixture(scope="module")
def source(synthetic_arrays):  # noqa: F811
    return data.InMemory({"train": synthetic_arrays}, num_classes=10)


def first_batch(source, pipe, batch_size=32):
    return next(data.make_dataset(source, "train", transforms=pipe, batch_size=batch_size, seed=3))


@pytest.mark.parametrize(
    "pipe",
    [
        "pad(32)|value_range(-1, 1)",
        "value_range(-1, 1)",
        "pad(32)|value_range()|masked_image(kind='patch')",
        "value_range()|masked_image(kind='pixel')|keep('image', 'masked_image', 'mask')",
        "value_range()|masked_image(kind='box', ratio=0.25)",
        "scenes(64)|value_range()",
        "scenes(48)|value_range()|masked_image(ratio=(0.1, 0.6))",
        "value_range()|low_resolution(4)",
        "resize(16)|value_range(0, 1)",
    ],
)
def test_batches_match_spec(pipe, source):
    batch = first_batch(source, pipe)
    spec = data.dataset_spec(source, "train", pipe)
    assert set(batch) == set(spec.features)
    for key, (shape, dtype) in spec.features.items():
        assert batch[key].shape == (32,) + shape, key
        assert batch[key].dtype == dtype, key
    low = 0.0 if "value_range(0, 1)" in pipe else -1.0
    assert batch["image"].min() == low and batch["image"].max() <= 1.0
    for key, num_classes in spec.num_classes.items():
        assert batch[key].min() >= 0 and batch[key].max() < num_classes


def test_image_is_padded_with_black_and_scaled(source, synthetic_arrays):  # noqa: F811
    example = data.make_map_dataset(source, "train", transforms="pad(32)|value_range(-1, 1)")[5]
    raw = synthetic_arrays["image"][5]
    assert example["image"].shape == (32, 32, 1)
    np.testing.assert_allclose(example["image"][2:30, 2:30], raw / 127.5 - 1, atol=1e-6)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.all(example["image"][border] == -1.0)
    assert example["label"] == synthetic_arrays["label"][5] and example["label"].dtype == np.int32


@pytest.mark.parametrize("kind", ["patch", "pixel", "box"])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.75])
def test_masks_cover_requested_ratio(kind, ratio, source):
    batch = first_batch(source, f"pad(32)|value_range()|masked_image(kind={kind!r}, ratio={ratio})", 64)
    mask = batch["mask"]
    assert set(np.unique(mask)) == {0.0, 1.0}
    hidden = 1 - mask.mean(axis=(1, 2, 3))  # per example
    tolerance = 0.02 if kind != "box" else 1 / 32 + 0.01  # a box side is a whole number of pixels
    assert np.all(np.abs(hidden - ratio) <= tolerance), hidden
    np.testing.assert_array_equal(batch["masked_image"], batch["image"] * mask)
    assert np.all(batch["masked_image"][mask == 0] == 0)  # mid-grey
    # Random per example: no two masks in the batch are equal (a box has only (33 - side)^2 places: half of
    # those that 64 draws can reach are reached).
    distinct = len({row.tobytes() for row in mask.reshape(len(mask), -1)})
    places = (33 - round(np.sqrt(ratio) * 32)) ** 2
    assert distinct == len(mask) if kind != "box" else distinct >= min(len(mask), places) // 2
    if kind == "patch":  # constant on each 4x4 patch of the grid
        blocks = mask[..., 0].reshape(64, 8, 4, 8, 4)
        assert np.all(blocks.min(axis=(2, 4)) == blocks.max(axis=(2, 4)))
    if kind == "box":  # one square: the hidden pixels' bounding box is exactly filled
        for hidden_pixels in mask[..., 0] == 0:
            rows, cols = np.nonzero(hidden_pixels)
            assert hidden_pixels[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
            assert rows.max() - rows.min() == cols.max() - cols.min()


def test_mask_ratio_range_sampled_per_example(source):
    batch = first_batch(source, "pad(32)|value_range()|masked_image(kind='pixel', ratio=(0.2, 0.6))", 64)
    hidden = 1 - batch["mask"].mean(axis=(1, 2, 3))
    assert hidden.min() >= 0.2 - 1e-3 and hidden.max() <= 0.6 + 1e-3
    assert hidden.std() > 0.05  # really varies


@pytest.mark.parametrize("bad", [0.05, 0.8, (0.05, 0.5), (0.6, 0.4)])
def test_mask_ratio_outside_range_is_rejected(bad, source):
    with pytest.raises(ValueError, match="config.data.transforms: mask ratio"):
        data.dataset_spec(source, "train", f"value_range()|masked_image(ratio={bad!r})")


@pytest.mark.parametrize(
    "pipe,message",
    [
        ("masked_image()", r"needs 'image' as float32, it is uint8 \(put value_range\(\) before it\)"),
        ("value_range()|segmentation('trimap', {1: 0})", r"needs the field 'trimap'.*has \['image', 'label'\]"),
        ("value_range()|masked_image(patch_size=5)", "patch_size must divide the image size 28"),
        ("value_range()|low_resolution(3)", "factor must be >= 1 and divide 28"),
        ("pad(20)", r"pad\(size=20\) is smaller than 'image' \(28x28\)"),
        ("value_range()|scenes(64)", "scenes.*must come first"),
        ("keep('image', 'mask')", r"keep\('image', 'mask'\) needs the field 'mask'"),
    ],
)
def test_a_transform_that_does_not_apply_is_refused_from_the_spec(pipe, message, source):
    with pytest.raises(data.TransformError, match=message):
        data.dataset_spec(source, "train", pipe)


def test_compose_scene_occlusion_by_hand():
    items = np.zeros((3, 28, 28, 1), np.uint8)
    items[0, 4:20, 4:20] = 100  # class 2, at (0, 0)
    items[1, 0:10, 0:10] = 200  # class 7, at (10, 10): over item 0
    items[2, 0:5, 0:5] = 5  # below the threshold: transparent
    image, segmentation = scenes.compose_scene(
        items, np.array([2, 7, 4]), np.array([[0, 0], [10, 10], [30, 30]]), size=64, foreground_threshold=10
    )
    expected = np.zeros((64, 64), np.int32)
    expected[4:20, 4:20] = 3
    expected[10:20, 10:20] = 8  # the later item occludes the earlier one
    np.testing.assert_array_equal(segmentation, expected)
    np.testing.assert_array_equal(image[..., 0], np.select([expected == 3, expected == 8], [100, 200], 0))


def test_scene_segmentation_agrees_with_pixels(source):
    batch = first_batch(source, "scenes(64)|value_range()", 64)
    image = np.rint((batch["image"][..., 0] + 1) * 127.5).astype(int)
    segmentation = batch["segmentation"]
    assert "label" not in batch
    background = segmentation == 0
    assert np.all(image[background] == 0)
    # Every drawn pixel has exactly the intensity of the class its mask names.
    np.testing.assert_array_equal(image[~background], item_intensity(segmentation[~background] - 1))
    objects = [len(np.unique(s)) - 1 for s in segmentation]
    assert min(objects) >= 1 and max(objects) <= 4
    assert np.mean(objects) > 1.5  # 2-4 items, rarely fully occluded
    assert (~background).mean() > 0.05
    assert data.dataset_spec(source, "train", "scenes(64)").num_classes == {"segmentation": 11}


def test_scene_object_count_options(source):
    batch = first_batch(source, "scenes(40, min_objects=1, max_objects=1)|value_range()", 64)
    assert batch["image"].shape == (64, 40, 40, 1)
    assert all(len(np.unique(s)) == 2 for s in batch["segmentation"])
    with pytest.raises(ValueError, match="min_objects"):
        data.dataset_spec(source, "train", "scenes(64, min_objects=3, max_objects=2)")


def test_low_resolution_is_the_block_means_repeated(source):
    batch = first_batch(source, "value_range()|low_resolution(4)")
    image, low = batch["image"], batch["low_resolution"]
    blocks = image.reshape(-1, 7, 4, 7, 4, 1).mean(axis=(2, 4))
    np.testing.assert_allclose(low[:, ::4, ::4], blocks, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(low, np.repeat(np.repeat(low[:, ::4, ::4], 4, axis=1), 4, axis=2))
    assert np.abs(low - image).mean() > 0.01  # detail is lost


def test_one_random_map_runs_the_pipe_so_draws_do_not_depend_on_later_ops(source, tmp_path, synthetic_arrays):  # noqa: F811
    """The multitask pipe (an embedding row, then a mask) gives the masked pipe's masks; the scenes + mask pipe
    gives the scenes pipe's layouts with a fresh mask per scene (the rng is drawn in op order)."""
    num = len(synthetic_arrays["label"])
    table = np.random.default_rng(0).standard_normal((num, 5)).astype(np.float32)
    np.savez(tmp_path / "embeddings.npz", train=table)
    masked_pipe = "value_range()|masked_image(ratio=(0.1, 0.6))"
    multitask = data.make_map_dataset(
        source,
        "train",
        transforms=f"value_range()|embedding({str(tmp_path / 'embeddings.npz')!r})|masked_image(ratio=(0.1, 0.6))",
        transform_seed=3,
    )
    masked = data.make_map_dataset(source, "train", transforms=masked_pipe, transform_seed=3)
    for index in (0, 7, num - 1):
        for key in ("image", "masked_image", "mask", "label"):
            np.testing.assert_array_equal(multitask[index][key], masked[index][key])
        np.testing.assert_array_equal(multitask[index]["embedding"], table[index])
    layouts = data.make_map_dataset(source, "train", transforms="scenes(48, max_objects=3)", transform_seed=3)
    masked_scenes = data.make_map_dataset(
        source,
        "train",
        transforms="scenes(48, max_objects=3)|value_range()|masked_image(ratio=0.25)",
        transform_seed=3,
    )
    for index in (0, 5, num - 1):
        np.testing.assert_array_equal(masked_scenes[index]["segmentation"], layouts[index]["segmentation"])
        mask = masked_scenes[index]["mask"]
        assert abs((1.0 - mask.mean()) - 0.25) <= 0.02
    assert not np.array_equal(masked_scenes[0]["mask"], masked_scenes[1]["mask"])


def test_segmentation_maps_values_and_reports_one_outside_the_mapping():
    trimap = np.full((6, 8, 8, 1), 2, np.uint8)
    trimap[:, :, :3] = 1
    trimap[:, :, 3] = 3
    trimap[4, 0, 0, 0] = 7
    source = data.InMemory({"train": {"image": np.zeros((6, 8, 8, 3), np.uint8), "trimap": trimap}})
    pipe = "value_range()|segmentation('trimap', {1: 1, 2: 0, 3: 2})"
    spec = data.dataset_spec(source, "train", pipe)
    assert spec.features["segmentation"] == ((8, 8), np.dtype(np.int32)) and "trimap" not in spec.features
    assert spec.num_classes == {"segmentation": 3}
    examples = data.make_map_dataset(source, "train", transforms=pipe)
    np.testing.assert_array_equal(examples[0]["segmentation"][0], [1, 1, 1, 2, 0, 0, 0, 0])
    with pytest.raises(data.BadExampleError, match="in_memory/train example 4: 'trimap' has value 7, expected one of"):
        examples[4]


def test_with_args_changes_one_op_and_the_string_parses_back():
    pipe = "pad(32)|value_range(-1, 1)|masked_image(kind='patch', ratio=(0.1, 0.6))|keep('image', 'mask')"
    changed = transforms.with_args(pipe, "masked_image", ratio=0.25)
    assert changed == "pad(size=32)|value_range()|masked_image(ratio=0.25)|keep('image', 'mask')"
    ops = transforms.parse_transforms(changed)
    assert ops[2] == transforms.MaskedImage(ratio=0.25) and ops[3].keys == ("image", "mask")
    assert [calls.render(op) for op in ops] == changed.split("|")
    with pytest.raises(ValueError, match="has no low_resolution"):
        transforms.with_args(pipe, "low_resolution", factor=2)
