"""Orbax checkpoints of a run: train state, data-iterator position and the model config, in one step dir.

`<workdir>/checkpoints/<step>/` holds three items:
  state         the TrainState's fields (params, EMA, optimizer state, step, RNG; the loss state if the
                task has one), sharded arrays (`StandardSave`; restored straight into the target shardings)
  data          one JSON file per process with its data iterator's `get_state()` (maxtext's pattern)
  model_config  the `model` and `diffusion` config sections the state was trained with
Saves are async (Orbax commits atomically: a step directory appears only when complete); the manager
keeps the last `keep` checkpoints plus the best one by an eval metric. Restoring first compares the
saved model config and every array's shape with the current ones and refuses, naming each mismatch
(`CheckpointMismatchError`), rather than starting from scratch or loading into the wrong shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from mmdiff_jax.training import config_io


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by a different model than the one being restored into."""


class DataIteratorHandler(ocp.CheckpointHandler):
    """The data iterator position, `iterator.get_state()` as one JSON file per process.

    Like grain's own `grain.checkpoint.CheckpointHandler`, but duck-typed: any object with JSON-able
    `get_state()` / `set_state()` (e.g. a wrapper around a grain iterator) can be checkpointed.
    """

    def _path(self, directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: DataIteratorSave) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._path(directory).write_text(json.dumps(args.state, indent=1))

    def restore(self, directory: epath.Path, args: DataIteratorRestore | None = None) -> Any:
        path = self._path(directory)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: the checkpoint was written by a different number of "
                f"processes ({sorted(p.name for p in directory.iterdir())})"
            )
        state = json.loads(path.read_text())
        if args is not None and args.iterator is not None:
            args.iterator.set_state(state)
        return state

    def structure(self, directory: epath.Path) -> Any:
        return None

    def metadata(self, directory: epath.Path) -> Any:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    state: Any  # the iterator's get_state(), taken when `save` is called (not when the async write runs)


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    iterator: Any = None  # set_state() is called on it


def _path_name(path: tuple[Any, ...]) -> str:
    parts = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {_path_name(path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in leaves if hasattr(leaf, "shape")}


def shape_differences(saved: Any, target: Any) -> list[str]:
    """'name: checkpoint (shape) dtype, model (shape) dtype' for each array that differs or exists in one only."""
    saved_shapes, target_shapes = _shapes(saved), _shapes(target)
    differences = []
    for name in sorted(set(saved_shapes) | set(target_shapes)):
        old, new = saved_shapes.get(name), target_shapes.get(name)
        if old is None:
            differences.append(f"{name}: not in the checkpoint (model {new[0]} {new[1]})")
        elif new is None:
            differences.append(f"{name}: not in the model (checkpoint {old[0]} {old[1]})")
        elif old[0] != new[0] or old[1] != new[1]:
            differences.append(f"{name}: checkpoint {old[0]} {old[1]}, model {new[0]} {new[1]}")
    return differences


def _as_saved(state: Any) -> Any:
    """A state as it is saved: a TrainState (any dataclass) as its fields by name, leaving out those that are
    None (a task without a loss state: its checkpoints keep the layout they had before `loss_state` existed,
    and restore from it); any other pytree as it is."""
    if not dataclasses.is_dataclass(state):
        return state
    values = {field.name: getattr(state, field.name) for field in dataclasses.fields(state)}
    return {name: value for name, value in values.items() if value is not None}


def _from_saved(abstract_state: Any, restored: Any) -> Any:
    """The inverse of `_as_saved` for a state shaped like `abstract_state` (fields left out take their defaults)."""
    return type(abstract_state)(**restored) if dataclasses.is_dataclass(abstract_state) else restored


class _ProcessCheckpointManager(ocp.CheckpointManager):
    """Orbax's CheckpointManager, asking JAX's preemption sync manager with numbers that keep growing over all
    the runs of this process: the run's step plus the highest number any earlier run asked.

    After a preemption notice JAX agrees on the number after the highest one any process has passed and answers
    True at that number only. An experiment trains several models in one process, each from step 1: with their
    own steps, a notice that came after one model finished would be matched only by a later model that gets past
    the first one's last step. Every process trains the same runs in the same order, so the numbers agree.
    """

    _passed = 0  # the highest number asked in this process, by any run

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._offset = _ProcessCheckpointManager._passed

    def reached_preemption(self, step: int) -> bool:
        number = self._offset + step
        _ProcessCheckpointManager._passed = max(_ProcessCheckpointManager._passed, number)
        return super().reached_preemption(number)


class Checkpointer:
    """CheckpointManager for one run. Every method is called by every process (Orbax syncs them)."""

    def __init__(
        self,
        directory: str | epath.PathLike,
        *,
        signature: Mapping[str, Any],
        save_every: int,
        keep: int,
        save_steps: Sequence[int] = (),
        best_metric: str = "",
        best_mode: str = "min",
        async_save: bool = True,
    ):
        # Orbax refuses relative paths (and would fail only at the first save): resolve local ones here.
        self.directory = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
        self.signature = dict(signature)
        self.best_metric = best_metric
        best_fn = (lambda metrics: metrics[best_metric]) if best_metric else None
        policies = [checkpoint_managers.LatestN(n=keep)]
        if best_fn is not None:
            policies.append(
                checkpoint_managers.BestN(
                    get_metric_fn=best_fn, reverse=best_mode == "min", n=1, keep_checkpoints_without_metrics=False
                )
            )
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every if save_every > 0 else 2**62,
            save_on_steps=frozenset(save_steps),
            best_fn=best_fn,
            best_mode=best_mode,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = _ProcessCheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": DataIteratorHandler(),
                "model_config": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: Any,
        *,
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Starts an async save at `step` when due (every `save_every` steps, or one of `save_steps`) or `force`;
        False if skipped.

        `metrics` (eval metrics, floats) rank it for the best-checkpoint policy when they hold `best_metric`.
        """
        if step in self.manager.all_steps():
            return False
        if metrics is not None and self.best_metric not in metrics:
            metrics = None
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_as_saved(state)),
            data=DataIteratorSave(data_iterator.get_state()),
            model_config=ocp.args.JsonSave(self.signature),
        )
        return self.manager.save(step, args=args, metrics=dict(metrics) if metrics else None, force=force)

    def check_compatible(self, step: int, abstract_state: Any) -> None:
        """CheckpointMismatchError naming each differing config key and array, if any."""
        saved = self.manager.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
        config_diffs = config_io.signature_differences(saved["model_config"], self.signature)
        shape_diffs = shape_differences(self.manager.item_metadata(step)["state"], _as_saved(abstract_state))
        if config_diffs or shape_diffs:
            lines = [
                f"checkpoint {self.directory / str(step)} was written by a different model; refusing to "
                f"restore it (use a new workdir, or the config it was trained with)."
            ]
            if config_diffs:
                lines.append("config differences (model / diffusion sections):")
                lines += [f"  {line}" for line in config_diffs]
            if shape_diffs:
                lines.append(f"array differences ({len(shape_diffs)}):")
                lines += [f"  {line}" for line in shape_diffs[:50]]
                if len(shape_diffs) > 50:
                    lines.append(f"  ... and {len(shape_diffs) - 50} more")
            raise CheckpointMismatchError("\n".join(lines))

    def restore(self, abstract_state: Any, data_iterator: Any = None, step: int | None = None) -> Any:
        """The state at `step` (default: latest) in the shardings of `abstract_state` (ShapeDtypeStructs);
        sets `data_iterator` to the saved position. Checks compatibility first."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        self.check_compatible(step, abstract_state)
        items = {"state": ocp.args.StandardRestore(_as_saved(abstract_state))}
        if data_iterator is not None:
            items["data"] = DataIteratorRestore(data_iterator)
        return _from_saved(abstract_state, self.manager.restore(step, args=ocp.args.Composite(**items))["state"])

    def reached_preemption(self, step: int) -> bool:
        """Multi-process runs: True at the step where all processes agreed to save after a preemption notice
        (JAX's preemption sync manager, asked with numbers that grow over all runs of the process:
        `_ProcessCheckpointManager`); False in single-process runs."""
        return self.manager.reached_preemption(step)

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
