"""Training for the experiments: a task (`mmdiff_jax.tasks`) through the one training path,
`train_and_evaluate`, and back its EMA params.

  train_model(name, config, workdir, task, hooks=()) -> Trained   (Preempted: a SIGTERM stopped it, saved)
  Trained          name, task (.model, .schedule: None for non-diffusion baselines), params (EMA), config,
                   workdir, num_params, steps, train_seconds, resumed_from (checkpoint step found before, or None)
  MetricCurve(path, steps, metric_fn, settings)   a training hook: metric_fn(ema_params) at `steps`, kept
                   in path with its settings (resumable); curve_steps(total, num_points) spaces the steps
  at_checkpoint(trained, step) -> Trained   the same model at an earlier checkpoint it kept
  saved_state(workdir, step)   the TrainState of a checkpoint as arrays on one device
  copy_config(config)   an unlocked copy, to derive a baseline's config
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from mmdiff_jax.training import Task, train_and_evaluate
from mmdiff_jax.training.state import count_params


@dataclasses.dataclass
class Trained:
    """A trained model, ready to evaluate: `params` are the EMA params of the last step."""

    name: str
    task: Task
    params: Any
    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    num_params: int
    steps: int
    train_seconds: float
    resumed_from: int | None = None  # the checkpoint step found in workdir before this run (None: fresh)

    @property
    def model(self) -> Any:
        """The network the params belong to (MTDiffusion, or a baseline's Flax module)."""
        return self.task.model

    @property
    def schedule(self) -> Any:
        """Its DiffusionSchedule; None for models that are not diffusion models."""
        return self.task.schedule

    def final_metrics(self) -> dict[str, float]:
        """The last logged value of every scalar in workdir/metrics.jsonl (loss, eval/loss, ...)."""
        values: dict[str, float] = {}
        path = self.workdir / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.exists() else ():
            values.update({k: v for k, v in json.loads(line).items() if isinstance(v, (int, float))})
        return values


def latest_checkpoint_step(workdir: pathlib.Path) -> int | None:
    """The largest finalized checkpoint step in workdir/checkpoints (Orbax's listing), or None."""
    directory = pathlib.Path(workdir) / "checkpoints"
    return max(ocp.utils.checkpoint_steps(directory), default=None) if directory.is_dir() else None


class Preempted(RuntimeError):
    """Training stopped early at a SIGTERM (preemption) and saved its checkpoint: the experiment stops too, and
    the same command resumes it."""


def train_model(
    name: str,
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    task: Task,
    *,
    hooks: Sequence[Callable] = (),
) -> Trained:
    """`train_and_evaluate(config, workdir, task, hooks=hooks)` (resuming, or only restoring a finished run),
    then its EMA params. Raises `Preempted` when a SIGTERM stopped the training before `train.steps` (its
    checkpoint saved)."""
    workdir = pathlib.Path(workdir)
    resumed_from = latest_checkpoint_step(workdir)
    start = time.perf_counter()
    state = train_and_evaluate(config, workdir, task, hooks=hooks)
    seconds = time.perf_counter() - start
    step = int(jax.device_get(state.step))
    if step < config.train.steps:
        raise Preempted(f"{name}: preempted (SIGTERM) at step {step} of {config.train.steps}, checkpoint saved")
    return Trained(
        name,
        task,
        state.ema_params,
        config,
        workdir,
        count_params(state.params),
        step,
        seconds,
        resumed_from,
    )


def saved_state(
    workdir: str | pathlib.Path, step: int, sharding: jax.sharding.Sharding | None = None
) -> dict[str, Any]:
    """The TrainState saved at `step` in workdir/checkpoints as a tree of arrays with `sharding` (default: on
    this process's first device), whatever the mesh and process count that wrote it. FileNotFoundError naming
    the directory if absent."""
    path = (pathlib.Path(workdir) / "checkpoints" / str(step) / "state").resolve()  # Orbax reads absolute paths
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at step {step} ({path})")
    checkpointer = ocp.StandardCheckpointer()
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda meta: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=sharding),
        checkpointer.metadata(path).item_metadata.tree,
    )
    return checkpointer.restore(path, target)


def at_checkpoint(trained: Trained, step: int) -> Trained:
    """`trained` as it was at `step`: the EMA params of its checkpoint there (its config must have kept it:
    train.checkpoint_every or checkpoint_steps, keep_checkpoints). FileNotFoundError naming the directory if it is not
    there."""
    mesh = jax.tree.leaves(trained.params)[0].sharding.mesh  # read onto the trained params' mesh, all processes
    params = saved_state(trained.workdir, step, NamedSharding(mesh, PartitionSpec()))["ema_params"]
    params = jax.tree.map(lambda new, now: jax.device_put(new, now.sharding), params, trained.params)  # as trained
    return dataclasses.replace(trained, name=f"{trained.name}@{step}", params=params, steps=step)


def curve_steps(total_steps: int, num_points: int) -> list[int]:
    """`num_points` evenly spaced training steps of 1..total_steps, the last one total_steps."""
    return sorted({max(1, round(total_steps * (index + 1) / num_points)) for index in range(num_points)})


class MetricCurve:
    """A metric of the EMA params against training steps: a `train_and_evaluate` hook that calls
    metric_fn(ema_params) -> float at `steps` and keeps the points in `path` (JSON: the `settings` it was
    measured with, step -> value), so a resumed or restored run keeps those measured before it stopped. Points
    saved with other settings (another sampler, say) are dropped with a warning, never reported as this
    run's. `points`: step -> value."""

    def __init__(
        self,
        path: str | pathlib.Path,
        steps: Iterable[int],
        metric_fn: Callable[[Any], float],
        settings: Mapping[str, Any] | None = None,
    ):
        self.path, self.steps, self.metric_fn = pathlib.Path(path), set(steps), metric_fn
        self.settings = json.loads(json.dumps(dict(settings or {})))  # JSON-normalised, as saved
        saved = json.loads(self.path.read_text()) if self.path.exists() else {"settings": self.settings, "points": {}}
        if saved.get("settings") != self.settings:
            logging.warning(
                "%s: its points were measured with other settings (%s, now %s); they are dropped, and a model "
                "restored without training has no curve",
                self.path,
                saved.get("settings", "not recorded"),
                self.settings,
            )
            saved = {"points": {}}
        self.points: dict[int, float] = {int(step): value for step, value in saved["points"].items()}

    def __call__(self, step: int, state: Any, metrics: Any) -> None:
        del metrics
        if step in self.steps:
            self.points[step] = float(self.metric_fn(state.ema_params))
            if jax.process_index():  # one process writes (each measured the same)
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            points = {str(k): v for k, v in sorted(self.points.items())}
            self.path.write_text(json.dumps({"settings": self.settings, "points": points}, indent=1) + "\n")


def copy_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """An unlocked deep copy (field references resolved)."""
    return ml_collections.ConfigDict(config.to_dict())
