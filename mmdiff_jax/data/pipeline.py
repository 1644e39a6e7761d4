"""Input pipelines on grain: one entry point, `make_dataset`, for every source and transforms.

Pipeline (flax's `examples/gemma/input_pipeline_grain.py` pattern, plus a
checkpointable iterator state as in maxtext's `grain_utility.py`):

  source -> check (BadExampleError naming the index) -> transforms (one random
  map seeded per (transform seed, index), see `transforms`) -> shuffle (seed, reshuffled every epoch) ->
  repeat (num_epochs) -> batch -> shard (this process's rows of every global
  batch) -> prefetch (threads; optionally worker processes) -> iterator

The iterator is a `DataIterator` around a `grain.DatasetIterator`: `get_state()`
returns a small JSON-serialisable dict and `set_state(state)` on an iterator
built with the same arguments resumes exactly at the next batch. Batches are dicts of numpy
arrays (images NHWC; float32 in [-1, 1] after value_range()); put them on the mesh with
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
from typing import Any

import grain
from grain._src.python.ipc import shared_memory_array
import jax
from absl import flags
import numpy as np

from mmdiff_jax.data import checks
from mmdiff_jax.data import sources
from mmdiff_jax.data import transforms as transforms_lib
from mmdiff_jax.data.spec import DatasetSpec


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


@dataclasses.dataclass(frozen=True)
class _Check:
    """map_with_index transform: raises BadExampleError for a bad raw example; keeps the spec's fields only (a
    TFDS record's text ids and boxes go), class ids as int32."""

    spec: checks.ExampleSpec
    num_examples: int

    def __call__(self, index: int, example: dict[str, Any]) -> dict[str, Any]:
        checks.check_example(example, index % self.num_examples, self.spec)
        return {
            key: np.int32(example[key]) if key in self.spec.num_classes and np.ndim(example[key]) == 0 else example[key]
            for key in self.spec.shapes
        }


def _with_index(index: int, example: dict[str, Any]) -> dict[str, Any]:
    return {**example, "_index": index}


def as_source(source, data_dir: str | os.PathLike | None = None):
    """A source object from `config.data.source`'s string (`sources.parse_source`), or the object itself."""
    return sources.parse_source(source, data_dir) if isinstance(source, str) else source


def dataset_spec(
    source, split: str = "train", transforms: str = "", data_dir: str | os.PathLike | None = None
) -> DatasetSpec:
    """What the batches of `source` + `transforms` hold, per example (batches add a leading B), known
    without decoding an example: the model is built and checked against it before anything compiles.
    ValueError (naming the config key) when the source does not exist or a transform does not apply."""
    source = as_source(source, data_dir)
    return transforms_lib.output_spec(transforms_lib.parse_transforms(transforms), source.spec(split))


def make_map_dataset(
    source,
    split: str,
    *,
    transforms: str = "",
    transform_seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> grain.MapDataset:
    """The whole split as a random-access grain MapDataset of single transformed examples.

    Element i is example i of the split, checked and transformed with the epoch-0 draw of its seeded
    randomness; its fields are `dataset_spec(source, split, transforms)`. Not sharded, shuffled or batched:
    `make_dataset` adds those.
    """
    source = as_source(source, data_dir)
    ops = transforms_lib.parse_transforms(transforms)
    raw_spec = source.spec(split)
    transforms_lib.output_spec(ops, raw_spec)
    records = source.open(split)
    spec = checks.ExampleSpec(
        source.check_name(split), {key: shape for key, (shape, _) in raw_spec.features.items()}, raw_spec.num_classes
    )
    items = grain.MapDataset.source(records).map_with_index(_Check(spec, len(records)))
    chain = transforms_lib.bind(ops, transforms_lib.Context(split, source, items))
    return items.map_with_index(_with_index).random_map(chain, seed=transform_seed)


def make_dataset(
    source,
    split: str,
    *,
    batch_size: int,
    seed: int,
    transforms: str = "",
    transform_seed: int | None = None,
    data_dir: str | os.PathLike | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
    num_threads: int = 2,
    prefetch_batches: int = 4,
    worker_count: int = 0,
) -> DataIterator:
    """A checkpointable iterator over batches of `source` + `transforms`.

    Args:
      source: a `config.data.source` string, e.g. "fashion_mnist()", "folder('/data/x', labels=True)"
        (`sources.py`), or a source object (`sources.InMemory`).
      split: a split of the source ("train", "test", "train[:90%]", ...).
      batch_size: examples per batch on this process.
      seed: shuffle seed, and the transform seed unless `transform_seed` given.
      transforms: a `config.data.transforms` string (`transforms.py`); "" yields the raw examples.
      transform_seed: seed of the transforms' randomness (masks, scene layouts); None: `seed`.
      data_dir: TFDS data directory of tfds() and fashion_mnist() sources (None: `$TFDS_DATA_DIR` or
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

    Returns:
      A `DataIterator` (a closable grain iterator) of dicts of numpy arrays with a leading batch
      dimension; supports `get_state()` / `set_state()`; `close()` (or a `with`
      block) releases its threads and workers (else done at exit).
    """
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    dataset = make_map_dataset(
        source,
        split,
        transforms=transforms,
        transform_seed=seed if transform_seed is None else transform_seed,
        data_dir=data_dir,
    )
    if shuffle:
        dataset = dataset.shuffle(seed=seed % 2**32)
    dataset = dataset.repeat(num_epochs).batch(batch_size, drop_remainder=drop_remainder)
    if shard_count > 1:  # block shard_index of every global batch of shard_count blocks
        whole = len(dataset) // shard_count * shard_count
        if whole == 0:
            raise ValueError(
                f"{split} gives {len(dataset)} batches of {batch_size}, fewer than one global batch of "
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
