"""Training for the experiments: a config (MT-Diffusion, or a baseline's Objective) through the one training
path, `train_and_evaluate`, and back its EMA params.

  train_model(name, config, workdir, objective=None, model=None, schedule=None, hooks=()) -> Trained
  Trained          name, model, schedule (None for non-diffusion baselines), params (EMA), config, workdir,
                   num_params, steps, train_seconds, resumed_from (checkpoint step found before, or None), loss
  MetricCurve(path, steps, metric_fn)   a training hook: metric_fn(ema_params) at `steps`, kept in path
                   (resumable); curve_steps(total, num_points) spaces the steps
  diffusion_loss(config), copy_config(config), modality_name(config, kind)   config helpers
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import ml_collections

from mmdiff_jax.training import Objective, config_io, train_and_evaluate
from mmdiff_jax.training.state import count_params


@dataclasses.dataclass
class Trained:
    """A trained model, ready to evaluate: `params` are the EMA params of the last step."""

    name: str
    model: Any  # MTDiffusion, or the baseline's Flax module
    schedule: Any  # DiffusionSchedule; None for models that are not diffusion models
    params: Any
    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    num_params: int
    steps: int
    train_seconds: float
    resumed_from: int | None = None  # the checkpoint step found in workdir before this run (None: fresh)
    loss: str = ""  # its training loss in words (set by `Run.train`, shown in the report)

    def final_metrics(self) -> dict[str, float]:
        """The last logged value of every scalar in workdir/metrics.jsonl (loss, eval/loss, ...)."""
        values: dict[str, float] = {}
        path = self.workdir / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.exists() else ():
            values.update({k: v for k, v in json.loads(line).items() if isinstance(v, (int, float))})
        return values


def latest_checkpoint_step(workdir: pathlib.Path) -> int | None:
    """The largest finished step directory in workdir/checkpoints, or None."""
    directory = pathlib.Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []
    return max(steps, default=None)


def train_model(
    name: str,
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    objective: Objective | None = None,
    model: Any = None,
    schedule: Any = None,
    hooks: Sequence[Callable] = (),
) -> Trained:
    """`train_and_evaluate(config, workdir, objective=objective, hooks=hooks)` (resuming, or only restoring a
    finished run), then its EMA params. Without an objective: the config's MT-Diffusion model and schedule; with
    one, `model` is the network its params belong to (and `schedule` its diffusion schedule, if it is a diffusion
    model)."""
    workdir = pathlib.Path(workdir)
    resumed_from = latest_checkpoint_step(workdir)
    start = time.perf_counter()
    state = train_and_evaluate(config, workdir, objective=objective, hooks=hooks)
    seconds = time.perf_counter() - start
    if objective is None:
        model = config_io.build_model(config)
        schedule = config_io.build_schedule(config, model)
    return Trained(
        name,
        model,
        schedule,
        state.ema_params,
        config,
        workdir,
        count_params(state.params),
        int(jax.device_get(state.step)),
        seconds,
        resumed_from,
    )


def curve_steps(total_steps: int, num_points: int) -> list[int]:
    """`num_points` evenly spaced training steps of 1..total_steps, the last one total_steps."""
    return sorted({max(1, round(total_steps * (index + 1) / num_points)) for index in range(num_points)})


class MetricCurve:
    """A metric of the EMA params against training steps: a `train_and_evaluate` hook that calls
    metric_fn(ema_params) -> float at `steps` and keeps the points in `path` (JSON, step -> value), so a resumed
    or restored run keeps those measured before it stopped. `points`: step -> value."""

    def __init__(self, path: str | pathlib.Path, steps: Iterable[int], metric_fn: Callable[[Any], float]):
        self.path, self.steps, self.metric_fn = pathlib.Path(path), set(steps), metric_fn
        saved = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.points: dict[int, float] = {int(step): value for step, value in saved.items()}

    def __call__(self, step: int, state: Any, metrics: Any) -> None:
        del metrics
        if step in self.steps:
            self.points[step] = float(self.metric_fn(state.ema_params))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({str(k): v for k, v in sorted(self.points.items())}, indent=1) + "\n")


def diffusion_loss(config: ml_collections.ConfigDict) -> str:
    """The training loss of `config`'s MT-Diffusion model in words ("eps-MSE" for plain DDPM, N = 0)."""
    if not config.model.modalities:
        return "eps-MSE"
    recovered = [m.name for m in config_io.build_modalities(config) if m.loss in ("categorical", "gaussian")]
    return "eps-MSE + aggregation MSE" + (f" + NLL of {', '.join(recovered)}" if recovered else "")


def modality_name(config: ml_collections.ConfigDict, kind: str) -> str:
    """The name of the config's first modality of `kind` ('masked_image', 'label', 'segmentation', ...);
    ValueError if it has none."""
    for name, spec in config.model.modalities.items():
        if spec["kind"] == kind:
            return name
    raise ValueError(f"the config has no {kind} modality (modalities: {list(config.model.modalities)})")


def copy_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """An unlocked deep copy (field references resolved)."""
    return ml_collections.ConfigDict(config.to_dict())
