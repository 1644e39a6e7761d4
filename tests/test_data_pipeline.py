"""grain pipelines: seeds, sharding, epochs, exact resume, bad data, names."""

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
REPO = pathlib.Path(__file__).resolve().parents[1]


def batches(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("name", ["fashion_mnist_masked", "fashion_mnist_scenes"])
def test_identical_seeds_identical_batches(name):
    make = lambda seed: data.make_dataset(name, "train", batch_size=16, seed=seed, arrays=ARRAYS)
    assert_same_batches(batches(make(7), 3), batches(make(7), 3))
    other = batches(make(8), 1)[0]
    assert not np.array_equal(other["image"], batches(make(7), 1)[0]["image"])


def test_transform_seed_is_separate_from_shuffle_seed():
    make = lambda **kw: next(
        data.make_dataset(
            "fashion_mnist_masked",
            "train",
            batch_size=16,
            seed=1,
            shuffle=False,
            arrays=ARRAYS,
            image_size=28,
            **kw,
        )
    )
    same_order = make(transform_seed=5)
    np.testing.assert_array_equal(index_of(same_order["image"]), np.arange(16))
    assert not np.array_equal(same_order["mask"], make()["mask"])


@pytest.mark.parametrize(
    "name,options",
    [
        ("fashion_mnist", {}),
        ("fashion_mnist_masked", {"mask_kind": "pixel"}),
        ("fashion_mnist_scenes", {}),
    ],
)
def test_restored_iterator_yields_the_batches_that_followed(name, options):
    make = lambda: data.make_dataset(
        name, "train", batch_size=8, seed=2, arrays=ARRAYS, num_threads=2, prefetch_batches=3, **options
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
    iterator = data.make_dataset(
        "fashion_mnist", "train", batch_size=32, seed=0, arrays=ARRAYS, image_size=28, num_epochs=2
    )
    seen = [index_of(batch["image"]) for batch in iterator]
    assert len(seen) == 6
    first, second = np.concatenate(seen[:3]), np.concatenate(seen[3:])
    assert sorted(first) == list(range(96)) == sorted(second)
    assert not np.array_equal(first, second)  # a new order each epoch
    assert not np.array_equal(first, np.arange(96))  # shuffled at all


def test_masks_are_redrawn_each_epoch_but_fixed_per_seed():
    iterator = data.make_dataset(
        "fashion_mnist_masked", "train", batch_size=96, seed=0, shuffle=False, arrays=ARRAYS, num_epochs=2
    )
    epoch0, epoch1 = next(iterator), next(iterator)
    np.testing.assert_array_equal(epoch0["image"], epoch1["image"])
    assert not np.array_equal(epoch0["mask"], epoch1["mask"])
    map_dataset = data.make_map_dataset("fashion_mnist_masked", "train", seed=0, arrays=ARRAYS)
    np.testing.assert_array_equal(map_dataset[10]["mask"], epoch0["mask"][10])


@pytest.mark.parametrize("num_epochs", [1, None])
def test_processes_read_their_rows_of_the_one_process_batches(num_epochs):
    """Two processes' batches, concatenated in process order, are the batches one process reads at the
    global batch size (shuffled, across epochs), each process decoding only its own rows."""
    arrays = {key: value[:95] for key, value in ARRAYS.items()}  # 95 examples: 2 global batches of 2 x 20 a epoch
    options = dict(seed=3, arrays=arrays, image_size=28, num_epochs=num_epochs)
    single = data.make_dataset("fashion_mnist", "train", batch_size=40, shard_index=0, shard_count=1, **options)
    shards = [
        data.make_dataset("fashion_mnist", "train", batch_size=20, shard_index=index, shard_count=2, **options)
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
    iterator = data.make_dataset("fashion_mnist", "train", batch_size=96, seed=0, arrays=ARRAYS, num_epochs=1)
    assert len(next(iterator)["label"]) == 96  # one process: the whole split
    with pytest.raises(ValueError, match="shard_index 2"):
        data.make_dataset("fashion_mnist", "train", batch_size=4, seed=0, arrays=ARRAYS, shard_index=2, shard_count=2)


def test_last_partial_batch_is_kept_on_request():
    iterator = data.make_dataset(
        "fashion_mnist",
        "test",
        batch_size=40,
        seed=0,
        arrays=ARRAYS,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
    )
    assert [len(b["label"]) for b in iterator] == [40, 40, 16]


def corrupted(index, key, value):
    arrays = {"image": list(ARRAYS["image"].copy()), "label": ARRAYS["label"].copy()}
    arrays[key][index] = value
    return arrays


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
    iterator = data.make_dataset("fashion_mnist", "train", batch_size=32, seed=0, arrays=arrays, num_epochs=1)
    with pytest.raises(data.BadExampleError, match=message):
        batches(iterator, 3)


def test_bad_embeddings_raise(tmp_path):
    table = np.zeros((96, 8), np.float32)
    table[17, 3] = np.nan
    np.savez(tmp_path / "nan.npz", train=table)
    np.savez(tmp_path / "short.npz", train=table[:90])
    make = lambda path: data.make_dataset(
        "fashion_mnist_embedding", "train", batch_size=8, seed=0, arrays=ARRAYS, embedding_path=path
    )
    with pytest.raises(data.BadExampleError, match="example 17: embedding"):
        make(tmp_path / "nan.npz")
    with pytest.raises(data.BadExampleError, match="90 embeddings for 96"):
        make(tmp_path / "short.npz")
    with pytest.raises(KeyError, match="no 'test' array"):
        data.make_dataset(
            "fashion_mnist_embedding",
            "test",
            batch_size=8,
            seed=0,
            arrays=ARRAYS,
            embedding_path=tmp_path / "nan.npz",
        )


def test_user_embeddings_are_aligned_by_index(tmp_path):
    table = np.random.default_rng(0).normal(size=(96, 12)).astype(np.float32)
    np.savez(tmp_path / "user.npz", train=table)
    iterator = data.make_dataset(
        "fashion_mnist_embedding",
        "train",
        batch_size=16,
        seed=0,
        arrays=ARRAYS,
        image_size=28,
        embedding_path=tmp_path / "user.npz",
    )
    for batch in batches(iterator, 8):  # crosses an epoch boundary
        np.testing.assert_array_equal(batch["embedding"], table[index_of(batch["image"])])
    spec = data.dataset_spec("fashion_mnist_embedding", embedding_path=tmp_path / "user.npz")
    assert spec.features["embedding"] == ((12,), np.dtype(np.float32))


def test_unknown_names_and_options():
    with pytest.raises(ValueError) as error:
        data.make_dataset("mnist", "train", batch_size=4, seed=0)
    for known in (
        "fashion_mnist_masked",
        "fashion_mnist_scenes",
        "fashion_mnist_embedding",
        "cifar10",
        "oxford_iiit_pet",
    ):
        assert known in str(error.value)
    with pytest.raises(ValueError, match="Unknown options \\['mask_ratoi'\\]"):
        data.make_dataset("fashion_mnist_masked", "train", batch_size=4, seed=0, arrays=ARRAYS, mask_ratoi=0.3)


EXIT_SCRIPT = """
import sys
from absl import flags
import numpy as np
from mmdiff_jax import data

arrays = {"image": np.zeros((64, 28, 28, 1), np.uint8), "label": np.arange(64) % 10}
if __name__ == "__main__":
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    kept = [data.make_dataset(name, "train", batch_size=8, seed=0, arrays=arrays, worker_count=workers)
            for name in ("fashion_mnist_masked", "fashion_mnist") for workers in (0, 1)]
    batch_sums = [float(next(iterator)["image"].sum()) for iterator in kept]  # prefetching, batches alive
    with data.make_dataset("fashion_mnist", "test", batch_size=8, seed=0, arrays=arrays, worker_count=1) as it:
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
