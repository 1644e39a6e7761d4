"""`Task`: what `train_and_evaluate` trains, the trainer's one way in (this package imports no model code).

A task is built once from a config by the library (`mmdiff_jax.tasks`: MT-Diffusion, with plain DDPM as its
N = 0 case, and the experiments' baselines) and passed on: the trainer optimises `loss_fn` from
`init_params`, refuses a checkpoint saved under another `signature` and draws the grids of
`make_sample_fns`; callers sample and evaluate `model` with `schedule`.

  task = tasks.make_mt_diffusion_task(config)
  state = train_and_evaluate(config, workdir, task)
  samples = sampling.make_sample_fn(task.model, task.schedule)(state.ema_params, rng, observed)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from jax.sharding import Mesh

# draw(params, batch, rng) -> {grid name: images [R, N, H, W, C] in [-1, 1]} (jit-compiled, replicated output)
DrawFn = Callable[[Any, Mapping[str, Any], Any], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Task:
    """A network, its loss and what the trainer needs to know about it.

    name: a short name ('mt_diffusion', 'reconstruction', ...).
    init_params: rng -> the parameter tree (pure: traced by jax.eval_shape and jit).
    loss_fn: (params, batch, rng, train: bool) -> (loss [], {name: scalar []}), jit-able with `train` static.
    signature: JSON-able description of the model; a checkpoint saved under a different one is refused.
    model: the Flax module the params belong to (for the caller's sampling and evaluation).
    schedule: its `schedules.DiffusionSchedule`; None for networks that are not diffusion models.
    make_sample_fns: mesh -> {kind: DrawFn}, the grids drawn every `sample.every` steps (None: none).
    loss_description: the training loss in words (reports).
    init_loss_state: () -> state the loss carries from step to step (e.g. `resample.LossHistory`), kept in
      `TrainState.loss_state` and checkpointed with it; with one, `loss_fn` takes it as `loss_state=` and
      returns (loss, (metrics, new loss_state)). None (the default): no such state.
    """

    name: str
    init_params: Callable[[Any], Any]
    loss_fn: Callable[..., Any]
    signature: Mapping[str, Any]
    model: Any = None
    schedule: Any = None
    make_sample_fns: Callable[[Mesh], Mapping[str, DrawFn]] | None = None
    loss_description: str = ""
    init_loss_state: Callable[[], Any] | None = None
