"""The trainer's config sections (data, optim, train, sample, mesh, distributed), their checks, the data.

`base_config()` is the trainer's schema: every key it reads, with defaults; a task adds its own sections
(`mmdiff_jax.tasks.base_config()`: model, diffusion, loss) and config files start from that (see
configs/default.py). `validate_config` rejects keys it does not know in these sections (typos in a config
file; typos in `--config.x=y` overrides already fail in ml_collections) and semantic errors (a mesh that does
not divide the devices, a batch that does not split over them, a bad schedule) with a message naming the
key, before anything is compiled. Top-level sections no schema has are free (experiments keep their own
settings there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections

from mmdiff_jax import data as data_lib
from mmdiff_jax.training import mesh as mesh_lib
from mmdiff_jax.training import state as state_lib

# Sections whose sub-keys are free-form (checked by the code that reads them).
_FREE_KEYS = ("model.modalities",)


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with defaults (the task's sections come from the task's schema)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # JAX PRNG implementation of every key the trainer draws (init, steps, evaluation, samples):
    # 'threefry2x32' (JAX's default) or 'rbg' (other random streams; XLA:CPU compiles the initialisers ~4x
    # faster, which the tiny test presets use; its bits may change with the sharding, so keep threefry
    # where runs on different meshes must agree).
    config.prng_impl = "threefry2x32"
    config.data = dict(
        # Where examples come from and what the model reads of them (mmdiff_jax/data/sources.py, transforms.py).
        source="fashion_mnist()",
        transforms="pad(32)|value_range(-1, 1)|masked_image()",
        split="train",
        eval_split="test",
        batch_size=128,
        eval_batch_size=128,  # global (all processes) batch sizes
        data_dir="",  # TFDS data_dir of tfds() and fashion_mnist() sources ('' = TFDS default)
        num_threads=2,
        prefetch_batches=4,
        worker_count=0,
    )
    config.optim = dict(
        learning_rate=2e-4,
        end_learning_rate=0.0,
        warmup_steps=1000,
        schedule="cosine",  # cosine | linear | constant (after linear warmup)
        decay_steps=0,  # 0: train.steps
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        grad_clip_norm=1.0,  # 0: no clipping
        ema_decay=0.9999,
        grad_accumulation_steps=1,  # micro-batches per step (the batch is split, not multiplied)
    )
    config.train = dict(
        steps=100_000,
        log_every=100,  # scalars to TensorBoard + metrics.jsonl; also where NaN/inf is noticed
        eval_every=5000,
        eval_batches=8,
        checkpoint_every=5000,
        checkpoint_steps=(),  # further steps to save at (e.g. a comparison's matched budgets); the last one always
        keep_checkpoints=3,
        best_metric="eval/loss",
        best_mode="min",  # also keep the best checkpoint by this eval metric
        async_checkpointing=True,
        progress_bar=True,
        log_batch_checksum=False,  # log the sum of each batch's primary images (shows which data was seen)
        transfer_guard="disallow",  # jax.transfer_guard around the step: no silent host<->device copies
    )
    config.sample = dict(
        every=5000,  # 0: never; also at the last step
        kinds=("one_step_x0",),  # read by the task (mmdiff_jax.tasks.sample_grids.SAMPLE_KINDS)
        num_images=8,
        noise_levels=(0.25, 0.5, 0.75),  # t / T for the one-step predictions
        sampler=dict(num_steps=50, eta=0.0),  # the DDIM kinds' sampler, spelled as experiment.sampler
    )
    config.mesh = dict(
        shape=(-1, 1),  # (data, fsdp); one entry may be -1
        fsdp_min_size=2**14,  # arrays with fewer elements stay replicated
    )
    config.distributed = dict(
        initialize="auto",  # auto | always | never (see mesh.initialize_distributed)
        coordinator_address="",  # 'host:port'; '' = from the environment
        num_processes=0,
        process_id=-1,  # 0 / -1 = from the environment
    )
    return config


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, (Mapping, ml_collections.ConfigDict)) and path not in _FREE_KEYS:
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def check_known_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict | None = None) -> None:
    """ValueError listing the keys of `schema`'s sections (default: the trainer's, `base_config()`) that the
    schema does not have, and those it has that `config` lacks."""
    known = _flatten(base_config() if schema is None else schema)
    sections = {path.split(".")[0] for path in known}
    unknown = sorted(
        path
        for path in _flatten(config)
        if path.split(".")[0] in sections
        and path not in known
        and not any(path.startswith(free + ".") for free in _FREE_KEYS)
    )
    missing = sorted(
        path for path in known if path not in _flatten(config) and not any(path.startswith(free) for free in _FREE_KEYS)
    )
    if unknown or missing:
        raise ValueError(
            f"config keys unknown to the trainer or task: {unknown}; missing: {missing} "
            f"(start config files from mmdiff_jax.tasks.base_config())"
        )


def data_source(config: ml_collections.ConfigDict):
    """`config.data.source` as a source object (ValueError naming the key for a bad one)."""
    return data_lib.as_source(config.data.source, config.data.data_dir or None)


def data_spec(config: ml_collections.ConfigDict, split: str | None = None) -> data_lib.DatasetSpec:
    """What a batch of `split` (default `config.data.split`) holds per example, known before reading data."""
    return data_lib.dataset_spec(data_source(config), split or config.data.split, config.data.transforms)


def make_train_iterator(config: ml_collections.ConfigDict):
    """This process's shuffled, repeating training batches (a grain iterator with get/set_state)."""
    data = config.data
    return data_lib.make_dataset(
        data_source(config),
        data.split,
        transforms=data.transforms,
        batch_size=data.batch_size // jax.process_count(),
        seed=config.seed,
        num_threads=data.num_threads,
        prefetch_batches=data.prefetch_batches,
        worker_count=data.worker_count,
    )


def make_eval_iterator(
    config: ml_collections.ConfigDict,
    whole_batches: bool = False,
    *,
    split: str | None = None,
    transforms: str | None = None,
    transform_seed: int | None = None,
):
    """This process's evaluation batches: the first ones of `split` (default `config.data.eval_split`),
    unshuffled, the same every time. `whole_batches`: every process reads the whole global batches (the
    experiments' evaluation, which places them on the mesh itself); else its own rows of each. `transforms`,
    `transform_seed`: instead of the config's (the experiments fix a mask ratio and a seed)."""
    data = config.data
    shards = 1 if whole_batches else jax.process_count()
    return data_lib.make_dataset(
        data_source(config),
        split or data.eval_split,
        transforms=data.transforms if transforms is None else transforms,
        transform_seed=transform_seed,
        batch_size=data.eval_batch_size // shards,
        shard_index=0 if whole_batches else None,
        shard_count=shards,
        seed=config.seed,
        shuffle=False,
        num_epochs=1,
        num_threads=data.num_threads,
        prefetch_batches=data.prefetch_batches,
    )


class ConfigError(ValueError):
    """A config the trainer cannot use; the message names the key (the command line reports it in one line)."""


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
    """Around config checks: a ValueError, or a FileNotFoundError of a configured path (a data source that
    does not exist), raised inside becomes a ConfigError (same message)."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error


PRNG_IMPLS = ("threefry2x32", "rbg")


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """The trainer's checks (its sections; a task checks its own when it is built), none of which compiles.
    Run after `jax.distributed.initialize`. Raises ConfigError (a ValueError) naming the key."""
    with config_errors():
        _validate_config(config, num_devices)


def _validate_config(config: ml_collections.ConfigDict, num_devices: int | None) -> None:
    check_known_keys(config)
    state_lib.learning_rate_schedule(config.optim, config.train.steps)
    mesh = mesh_lib.make_mesh(config.mesh.shape, jax.devices()[:num_devices] if num_devices else None)
    accumulation = config.optim.grad_accumulation_steps
    if accumulation < 1:
        raise ValueError(f"config.optim.grad_accumulation_steps must be >= 1, got {accumulation}")
    mesh_lib.check_batch_size("config.data.batch_size", config.data.batch_size, mesh, accumulation)
    mesh_lib.check_batch_size("config.data.eval_batch_size", config.data.eval_batch_size, mesh)
    train = config.train
    for key in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        if train[key] < (1 if key in ("steps", "log_every", "keep_checkpoints") else 0):
            raise ValueError(f"config.train.{key} must be positive, got {train[key]}")
    extra = [step for step in train.checkpoint_steps if not (isinstance(step, int) and 1 <= step <= train.steps)]
    if extra:
        raise ValueError(f"config.train.checkpoint_steps must be steps in 1..train.steps = {train.steps}, got {extra}")
    if train.best_mode not in ("min", "max"):
        raise ValueError(f"config.train.best_mode must be 'min' or 'max', got {train.best_mode!r}")
    if config.prng_impl not in PRNG_IMPLS:
        raise ValueError(f"config.prng_impl must be one of {PRNG_IMPLS}, got {config.prng_impl!r}")
    if train.transfer_guard not in ("allow", "log", "disallow", "log_explicit", "disallow_explicit"):
        raise ValueError(f"config.train.transfer_guard: unknown level {train.transfer_guard!r}")


def signature_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """'key: checkpoint X, config Y' for every differing leaf of two signatures. A key one side lacks reads
    '<not recorded: the default>': signatures leave keys added later out at their defaults, so that older
    checkpoints restore (`tasks.mt_diffusion.model_signature`)."""
    flat_saved, flat_current = _flatten_all(saved), _flatten_all(current)
    missing = object()

    def shown(flat: Mapping[str, Any], key: str) -> str:
        return repr(flat[key]) if key in flat else "<not recorded: the default>"

    return [
        f"{key}: checkpoint {shown(flat_saved, key)}, config {shown(flat_current, key)}"
        for key in sorted(set(flat_saved) | set(flat_current))
        if flat_saved.get(key, missing) != flat_current.get(key, missing)
    ]


def _flatten_all(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten_all(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
