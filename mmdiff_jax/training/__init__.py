"""Training: sharded Optax loop over a device mesh, Orbax checkpoints with exact resume, logging.

  from mmdiff_jax import tasks
  from mmdiff_jax.training import train_and_evaluate
  state = train_and_evaluate(config, workdir, tasks.make_mt_diffusion_task(config))  # configs/default.py

This package imports no model code: what it trains comes in as a `Task` (init, loss, checkpoint signature,
sample grids), built by `mmdiff_jax.tasks`. Modules: `task` (Task), `config_io` (the trainer's config
sections, their checks, the data iterators), `mesh` (the only place sharding is set up), `state`
(TrainState, optimizer, sharded init), `steps` (train_step, eval_step), `checkpoint` (Orbax manager),
`writers` (TensorBoard, JSONL, PNG, progress), `loop` (train_and_evaluate), `cli` (the entry points'
one-line flag errors).
"""

from mmdiff_jax.training.checkpoint import Checkpointer, CheckpointMismatchError
from mmdiff_jax.training.config_io import ConfigError, base_config, validate_config
from mmdiff_jax.training.loop import NonFiniteLossError, preemption_requested, train_and_evaluate
from mmdiff_jax.training.mesh import initialize_distributed, make_mesh
from mmdiff_jax.training.state import TrainState, create_train_state, make_optimizer
from mmdiff_jax.training.steps import eval_step, train_step
from mmdiff_jax.training.task import Task

__all__ = [
    "CheckpointMismatchError",
    "Checkpointer",
    "ConfigError",
    "base_config",
    "validate_config",
    "NonFiniteLossError",
    "preemption_requested",
    "train_and_evaluate",
    "initialize_distributed",
    "make_mesh",
    "Task",
    "TrainState",
    "create_train_state",
    "make_optimizer",
    "eval_step",
    "train_step",
]
