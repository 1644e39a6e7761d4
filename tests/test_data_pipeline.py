"""grain pipelines: seeds, sharding, epochs, exact resume, bad data, bad config strings."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mmdiff_jax import data
from tests.test_data_fixtures import index_of, make_synthetic_arrays, with_index_pixels

ARRAYS = with_index_pixels(make_synthetic_arrays(96))
SOURCE = data.InMemory({"train": ARRAYS, "test": ARRAYS})
# The transforms of the named sets the configs use (configs/*.py).
IMAGE = "pad(32)|value_range(-1, 1)"
IMAGE_28 = "value_range(-1, 1)"
MASKED = "pad(32)|value_range(-1, 1)|masked_image()"
SCENES = "scenes(64)|value_range(-1, 1)"
REPO = pathlib.Path(__file__).resolve().parents[1]


def batches(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("transforms", [MASKED, SCENES])
def test_identical_seeds_identical_batches(transforms):
    make = lambda seed: data.make_dataset(SOURCE, "train", transforms=transforms, batch_size=16, seed=seed)
    assert_same_batches(batches(make(7), 3), batches(make(7), 3))
    other = batches(make(8), 1)[0]
    assert not np.array_equal(other["image"], batches(make(7), 1)[0]["image"])


def test_transform_seed_is_separate_from_shuffle_seed():
    make = lambda **kw: next(
        data.make_dataset(
            SOURCE,
            "train",
            transforms="value_range()|masked_image()",
            batch_size=16,
            seed=1,
            shuffle=False,
            **kw,
        )
    )
    same_order = make(transform_seed=5)
    np.testing.assert_array_equal(index_of(same_order["image"]), np.arange(16))
    assert not np.array_equal(same_order["mask"], make()["mask"])


@pytest.mark.parametrize("transforms", [IMAGE, "pad(32)|value_range(-1, 1)|masked_image(kind='pixel')", SCENES])
def test_restored_iterator_yields_the_batches_that_followed(transforms):
    make = lambda: data.make_dataset(
        SOURCE, "train", transforms=transforms, batch_size=8, seed=2, num_threads=2, prefetch_batches=3
    )
    iterator = make()
    batches(iterator, 15)  # past the 12-batch epoch: state spans epochs
    state = json.loads(json.dumps(iterator.get_state()))
    expected = batches(iterator, 5)
    restored = make()
    next(restored)  # a fresh iterator that has moved on elsewhere
    restored.set_state(state)
    assert_same_batches(batches(restored, 5), expected)


def test_epochs_cover_every_example_once_and_reshuffle():
    iterator = data.make_dataset(SOURCE, "train", transforms=IMAGE_28, batch_size=32, seed=0, num_epochs=2)
    seen = [index_of(batch["image"]) for batch in iterator]
    assert len(seen) == 6
    first, second = np.concatenate(seen[:3]), np.concatenate(seen[3:])
    assert sorted(first) == list(range(96)) == sorted(second)
    assert not np.array_equal(first, second)  # a new order each epoch
    assert not np.array_equal(first, np.arange(96))  # shuffled at all


def test_masks_are_redrawn_each_epoch_but_fixed_per_seed():
    iterator = data.make_dataset(SOURCE, "train", transforms=MASKED, batch_size=96, seed=0, shuffle=False, num_epochs=2)
    epoch0, epoch1 = next(iterator), next(iterator)
    np.testing.assert_array_equal(epoch0["image"], epoch1["image"])
    assert not np.array_equal(epoch0["mask"], epoch1["mask"])
    map_dataset = data.make_map_dataset(SOURCE, "train", transforms=MASKED, transform_seed=0)
    np.testing.assert_array_equal(map_dataset[10]["mask"], epoch0["mask"][10])


@pytest.mark.parametrize("num_epochs", [1, None])
def test_processes_read_their_rows_of_the_one_process_batches(num_epochs):
    """Two processes' batches, concatenated in process order, are the batches one process reads at the
    global batch size (shuffled, across epochs), each process decoding only its own rows."""
    # 95 examples: 2 global batches of 2 x 20 a epoch
    options = dict(seed=3, transforms=IMAGE_28, num_epochs=num_epochs)
    single = data.make_dataset(SOURCE, "train[:95]", batch_size=40, shard_index=0, shard_count=1, **options)
    shards = [
        data.make_dataset(SOURCE, "train[:95]", batch_size=20, shard_index=index, shard_count=2, **options)
        for index in range(2)
    ]
    count = 0
    for whole, *parts in zip(single, *shards, range(5)):
        parts = parts[:2]
        np.testing.assert_array_equal(np.concatenate([part["image"] for part in parts]), whole["image"])
        if num_epochs == 1:  # (repeating, a batch may straddle two epochs and hold an example twice)
            assert not set(index_of(parts[0]["image"])) & set(index_of(parts[1]["image"]))
        count += 1
    assert count == (2 if num_epochs == 1 else 5)
    if num_epochs == 1:  # whole global batches only, on every process
        assert all(next(iterator, None) is None for iterator in shards)


def test_default_shard_is_this_process():
    iterator = data.make_dataset(SOURCE, "train", batch_size=96, seed=0, num_epochs=1)
    assert len(next(iterator)["label"]) == 96  # one process: the whole split
    with pytest.raises(ValueError, match="shard_index 2"):
        data.make_dataset(SOURCE, "train", batch_size=4, seed=0, shard_index=2, shard_count=2)


def test_last_partial_batch_is_kept_on_request():
    iterator = data.make_dataset(
        SOURCE,
        "test",
        batch_size=40,
        seed=0,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
    )
    assert [len(b["label"]) for b in iterator] == [40, 40, 16]


def corrupted(index, key, value):
    arrays = {"image": list(ARRAYS["image"].copy()), "label": ARRAYS["label"].copy()}
    arrays[key][index] = value
    return data.InMemory({"train": arrays}, num_classes=10)


@pytest.mark.parametrize(
    "arrays,message",
    [
        (corrupted(5, "label", 12), r"example 5: 'label' is 12, outside \[0, 10\)"),
        (corrupted(9, "label", -1), r"example 9: 'label' is -1"),
        (
            corrupted(7, "image", np.zeros((28, 27, 1), np.uint8)),
            r"example 7: 'image' has shape \(28, 27, 1\), expected \(28, 28, 1\)",
        ),
        (
            corrupted(3, "image", np.full((28, 28, 1), np.nan, np.float32)),
            r"example 3: 'image' contains 784 NaN/Inf",
        ),
    ],
)
def test_bad_data_raises_naming_the_example(arrays, message):
    iterator = data.make_dataset(arrays, "train", transforms=IMAGE, batch_size=32, seed=0, num_epochs=1)
    with pytest.raises(data.BadExampleError, match=message):
        batches(iterator, 3)


def test_bad_embeddings_raise(tmp_path):
    table = np.zeros((96, 8), np.float32)
    table[17, 3] = np.nan
    np.savez(tmp_path / "nan.npz", train=table)
    np.savez(tmp_path / "short.npz", train=table[:90])
    make = lambda path, split="train": data.make_dataset(
        SOURCE, split, transforms=f"value_range()|embedding({str(path)!r})", batch_size=8, seed=0
    )
    with pytest.raises(data.BadExampleError, match="example 17: embedding"):
        make(tmp_path / "nan.npz")
    with pytest.raises(data.BadExampleError, match="90 embeddings for 96"):
        make(tmp_path / "short.npz")
    with pytest.raises(KeyError, match="no 'test' array"):
        make(tmp_path / "nan.npz", "test")


def test_user_embeddings_are_aligned_by_index(tmp_path):
    table = np.random.default_rng(0).normal(size=(96, 12)).astype(np.float32)
    np.savez(tmp_path / "user.npz", train=table)
    transforms = f"value_range()|embedding({str(tmp_path / 'user.npz')!r})"
    iterator = data.make_dataset(SOURCE, "train", transforms=transforms, batch_size=16, seed=0)
    for batch in batches(iterator, 8):  # crosses an epoch boundary
        np.testing.assert_array_equal(batch["embedding"], table[index_of(batch["image"])])
    spec = data.dataset_spec(SOURCE, "train", transforms)
    assert spec.features["embedding"] == ((12,), np.dtype(np.float32))


def test_unknown_sources_ops_and_arguments():
    with pytest.raises(
        ValueError,
        match="config.data.source 'mnist\\(\\)': unknown 'mnist'; known: arrays, fashion_mnist, folder, tfds",
    ):
        data.make_dataset("mnist()", "train", batch_size=4, seed=0)
    with pytest.raises(ValueError, match="config.data.transforms .*unknown 'blur'; known: embedding, keep"):
        data.make_dataset(SOURCE, "train", transforms="value_range()|blur(3)", batch_size=4, seed=0)
    with pytest.raises(ValueError, match="masked_image\\(kind, ratio, patch_size, key\\).*'ratoi'"):
        data.make_dataset(SOURCE, "train", transforms="value_range()|masked_image(ratoi=0.3)", batch_size=4, seed=0)
    with pytest.raises(ValueError, match="arguments must be literals, got 'open\\(\\)'"):
        data.make_dataset(SOURCE, "train", transforms="resize(open())", batch_size=4, seed=0)
    with pytest.raises(ValueError, match="does not parse"):
        data.make_dataset(SOURCE, "train", transforms="resize(32", batch_size=4, seed=0)
    with pytest.raises(ValueError, match="has no split 'validation'; it has test, train"):
        data.make_dataset(SOURCE, "validation", batch_size=4, seed=0)


EXIT_SCRIPT = """
import sys
from absl import flags
import numpy as np
from mmdiff_jax import data

arrays = {"image": np.zeros((64, 28, 28, 1), np.uint8), "label": np.arange(64) % 10}
source = data.InMemory({"train": arrays, "test": arrays})
if __name__ == "__main__":
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    kept = [data.make_dataset(source, "train", transforms=t, batch_size=8, seed=0, worker_count=workers)
            for t in ("value_range()|masked_image()", "value_range()") for workers in (0, 1)]
    batch_sums = [float(next(iterator)["image"].sum()) for iterator in kept]  # prefetching, batches alive
    with data.make_dataset(source, "test", batch_size=8, seed=0, worker_count=1) as it:
        next(it)
    try:
        next(it)
    except ValueError as error:
        print(error)
    print("exiting with", len(kept), "open iterators")
"""


def test_open_iterators_exit_quietly(tmp_path):
    """Iterators (threads and worker processes) still open at interpreter exit, as a script leaves them: nothing
    on stderr. grain's own finalizers, run during teardown, printed errors ('OSError: handle is closed',
    "'NoneType' object has no attribute 'Empty'", leaked shared memory)."""
    script = tmp_path / "script.py"
    script.write_text(EXIT_SCRIPT)
    child = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.splitlines() == ["this data iterator is closed", "exiting with 4 open iterators"]
    assert child.stderr == ""
