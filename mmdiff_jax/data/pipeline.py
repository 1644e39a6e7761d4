"""Input pipelines on grain: one entry point, `make_dataset`, for every named set.

Pipeline (flax's `examples/gemma/input_pipeline_grain.py` pattern, plus a
checkpointable iterator state as in maxtext's `grain_utility.py`):

  source -> check (BadExampleError naming the index) -> transform (seeded per
  (seed, index), see `derived`) -> shuffle (seed, reshuffled every epoch) ->
  repeat (num_epochs) -> batch -> shard (this process's rows of every global
  batch) -> prefetch (threads; optionally worker processes) -> iterator

The iterator is a `DataIterator` around a `grain.DatasetIterator`: `get_state()`
returns a small JSON-serialisable dict and `set_state(state)` on an iterator
built with the same arguments resumes exactly at the next batch. Batches are dicts of numpy
arrays, images NHWC float32 in [-1, 1]; put them on the mesh with
`jax.make_array_from_process_local_data`.

Closing: an iterator holds prefetch threads (and, with `worker_count`, worker
processes and shared memory). Close it when done (`close()`, or `with
make_dataset(...) as it:`); whatever is still open at interpreter exit is
closed by `close_iterators` (registered with atexit) while the modules grain's
finalizers need are still there. Left to grain's `__del__` during interpreter
teardown, open iterators printed errors after a normal run ("OSError: handle is
closed", "'NoneType' object has no attribute 'Empty'", leaked shared memory).

Sharding: every process shuffles the whole split alike; the global batch (of
`shard_count` x `batch_size` examples) is cut into `shard_count` consecutive
blocks of rows and process `shard_index` reads block number `shard_index`
(defaults `jax.process_count()`, `jax.process_index()`), decoding only its own
examples. So the global batch, which `mesh.global_batch` assembles in process
order, is the same whatever the number of processes: a run on 2 processes sees
the batches of a run on one (docs/design.md, "Scale-out"). With a finite
`num_epochs` the batches are cut to whole global batches.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import grain
from grain._src.python.ipc import shared_memory_array
import jax
from absl import flags
import numpy as np

from mmdiff_jax.data import catalog
from mmdiff_jax.data import checks
from mmdiff_jax.data import derived
from mmdiff_jax.data import embeddings as embeddings_lib
from mmdiff_jax.data import fashion_mnist
from mmdiff_jax.data import tfds_sets


class DataIterator:
    """The iterator `make_dataset` returns: a grain `DatasetIterator` that can be closed for good.

    `next()`, `get_state()`, `set_state(state)` as grain's; `close()` (or leaving a `with` block) stops its
    threads and worker processes and drops the grain iterator, so that nothing of it is left for interpreter
    teardown, even while this object is still referenced. Using it after `close()` raises ValueError.
    """

    def __init__(self, iterator: grain.DatasetIterator):
        self._iterator = iterator
        _OPEN_ITERATORS.add(self)

    def _open(self) -> grain.DatasetIterator:
        if self._iterator is None:
            raise ValueError("this data iterator is closed")
        return self._iterator

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._open())

    def get_state(self) -> dict[str, Any]:
        return self._open().get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._open().set_state(state)

    def close(self) -> None:
        """Stops prefetching and releases the grain iterator; idempotent."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None:
            iterator.close()

    def __enter__(self) -> DataIterator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# Iterators `make_dataset` returned that are still referenced somewhere (weak references).
_OPEN_ITERATORS: weakref.WeakSet[DataIterator] = weakref.WeakSet()


def close_iterators() -> None:
    """Closes every `DataIterator` still alive, then grain's shared-memory release pool (started along with
    worker processes; its pending releases are finished). Idempotent; registered to run at exit."""
    for iterator in list(_OPEN_ITERATORS):
        iterator.close()
    release_pool = shared_memory_array.SharedMemoryArray._del_thread_pool  # pylint: disable=protected-access
    if release_pool is not None:
        release_pool.close()
        release_pool.join()
        shared_memory_array.SharedMemoryArray._del_thread_pool = None  # pylint: disable=protected-access


atexit.register(close_iterators)


class ArraySource:
    """Random-access source over a dict of equal-length sequences (arrays)."""

    def __init__(self, arrays: Mapping[str, Sequence[Any]]):
        lengths = {key: len(value) for key, value in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"fields have different lengths: {lengths}")
        self._arrays = dict(arrays)
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {key: value[index] for key, value in self._arrays.items()}


@dataclasses.dataclass(frozen=True)
class _Check:
    """map_with_index transform: raises BadExampleError for a bad example."""

    spec: checks.ExampleSpec
    num_examples: int

    def __call__(self, index: int, example: dict[str, Any]) -> dict[str, Any]:
        checks.check_example(example, index % self.num_examples, self.spec)
        return example


def _fashion_map_dataset(name, split, seed, data_dir, options):
    arrays = options["arrays"]
    if arrays is None:
        arrays = fashion_mnist.load_fashion_mnist(split, data_dir, options["idx_dir"])
    source = ArraySource(arrays)
    spec = checks.ExampleSpec(
        f"fashion_mnist_debian/{split}",
        {"image": fashion_mnist.IMAGE_SHAPE, "label": ()},
        {"label": fashion_mnist.NUM_CLASSES},
    )
    items = grain.MapDataset.source(source).map_with_index(_Check(spec, len(source)))
    size = options["image_size"]
    transform_seed = seed if options["transform_seed"] is None else options["transform_seed"]
    if name == "fashion_mnist":
        return items.map(derived.ImageLabel(size))
    if name == "fashion_mnist_lowres":
        return items.map(derived.LowResolution(size, options["factor"]))
    masked = lambda: derived.MaskedImage(size, options["mask_kind"], options["mask_ratio"], options["patch_size"])  # noqa: E731
    if name == "fashion_mnist_masked":
        return items.random_map(masked(), seed=transform_seed)
    if name in ("fashion_mnist_scenes", "fashion_mnist_scenes_masked"):
        scene = derived.Scene(
            items, size, options["min_objects"], options["max_objects"], options["foreground_threshold"]
        )
        if name == "fashion_mnist_scenes_masked":
            scene = derived.MaskedScene(scene, masked())
        return items.random_map(scene, seed=transform_seed)
    path = options["embedding_path"]
    if path is None:
        if options["arrays"] is not None:
            raise ValueError(f"{name} with `arrays` needs an `embedding_path`")
        path = embeddings_lib.ensure_default_embeddings(data_dir, options["idx_dir"])
    table = embeddings_lib.load_embeddings(path, split, len(source))
    if name == "fashion_mnist_embedding":
        return items.map_with_index(derived.ImageEmbedding(table, size))
    return items.map_with_index(derived.EmbeddingRow(table)).random_map(
        derived.MultiTask(masked()), seed=transform_seed
    )


def make_map_dataset(
    name: str, split: str, *, seed: int = 0, data_dir: str | os.PathLike | None = None, **options
) -> grain.MapDataset:
    """The whole split as a random-access grain MapDataset of single examples.

    Element i is example i of the split, transformed with the epoch-0 draw of
    its seeded randomness; fields are as in `catalog.dataset_spec(name, **options)`.
    Not sharded, shuffled or batched: `make_dataset` adds those.
    """
    options = catalog.resolve_options(name, options)
    if name in catalog.FASHION_MNIST_SETS:
        return _fashion_map_dataset(name, split, seed, data_dir, options)
    source = tfds_sets.open_tfds_source(name, split, data_dir)
    return (
        grain.MapDataset.source(source)
        .map_with_index(_Check(tfds_sets.example_spec(name, split), len(source)))
        .map(tfds_sets.StandardizeTfdsExample(name, options["image_size"]))
    )


def make_dataset(
    name: str,
    split: str,
    *,
    batch_size: int,
    seed: int,
    data_dir: str | os.PathLike | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
    num_threads: int = 2,
    prefetch_batches: int = 4,
    worker_count: int = 0,
    **options,
) -> DataIterator:
    """A checkpointable iterator over batches of the named set.

    Args:
      name: one of `catalog.KNOWN_DATASETS`.
      split: "train" / "test" for Fashion-MNIST sets; any TFDS split otherwise.
      batch_size: examples per batch on this process.
      seed: shuffle seed, and the transform seed unless `transform_seed` given.
      data_dir: TFDS data directory (None: `$TFDS_DATA_DIR` or
        `~/tensorflow_datasets`).
      shuffle: shuffle the split (alike on every process), differently every
        epoch.
      num_epochs: None repeats forever (batches may straddle epochs).
      shard_index, shard_count: this process's block of each global batch of
        `shard_count` blocks (module docstring); default
        `jax.process_index()` / `jax.process_count()`.
      drop_remainder: drop the final short batch (finite `num_epochs` only).
      num_threads, prefetch_batches: grain ReadOptions (batches computed
        ahead in threads).
      worker_count: > 0 adds grain's multiprocess prefetch with that many
        worker processes (needs absl flags parsed; same batches, same
        checkpointable state).
      **options: per-set options, see `catalog.dataset_spec` / the module docstrings;
        e.g. `image_size`, `mask_kind`, `mask_ratio`, `embedding_path`.

    Returns:
      A `DataIterator` (a closable grain iterator) of dicts of numpy arrays with a leading batch
      dimension; supports `get_state()` / `set_state()`; `close()` (or a `with`
      block) releases its threads and workers (else done at exit).
    """
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    dataset = make_map_dataset(name, split, seed=seed, data_dir=data_dir, **options)
    if shuffle:
        dataset = dataset.shuffle(seed=seed % 2**32)
    dataset = dataset.repeat(num_epochs).batch(batch_size, drop_remainder=drop_remainder)
    if shard_count > 1:  # block shard_index of every global batch of shard_count blocks
        whole = len(dataset) // shard_count * shard_count
        if whole == 0:
            raise ValueError(
                f"{name}/{split} gives {len(dataset)} batches of {batch_size}, fewer than one global batch of "
                f"{shard_count} x {batch_size}"
            )
        dataset = dataset[:whole][shard_index::shard_count]
    iter_dataset = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
    )
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():
            raise RuntimeError(
                "worker_count > 0 uses grain's multiprocess prefetch, which reads "
                "absl flags: run under absl.app.run, or call "
                "absl.flags.FLAGS.mark_as_parsed() first"
            )
        iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return DataIterator(iter(iter_dataset))
