"""Training: sharded Optax loop over a device mesh, Orbax checkpoints with exact resume, logging.

  from mmdiff_jax.training import train_and_evaluate
  state = train_and_evaluate(config, workdir)   # config: configs/default.py's get_config()
  state = train_and_evaluate(config, workdir, objective=Objective(init_params, loss_fn, signature))  # another net

Modules: `config_io` (config schema, building model / schedule / loss / data, validation), `mesh`
(the only place sharding is set up), `state` (TrainState, optimizer, sharded init), `steps` (train_step,
eval_step), `checkpoint` (Orbax manager), `writers` (TensorBoard, JSONL, PNG, progress), `samples`
(pluggable sample grids), `loop` (train_and_evaluate), `cli` (the entry points' one-line flag errors).
"""

from mmdiff_jax.training.checkpoint import Checkpointer, CheckpointMismatchError
from mmdiff_jax.training.config_io import ConfigError, base_config, build_model, validate_config
from mmdiff_jax.training.loop import NonFiniteLossError, Objective, preemption_requested, train_and_evaluate
from mmdiff_jax.training.mesh import initialize_distributed, make_mesh
from mmdiff_jax.training.samples import SAMPLE_KINDS, register_sample_kind
from mmdiff_jax.training.state import TrainState, create_train_state, make_optimizer
from mmdiff_jax.training.steps import eval_step, train_step

__all__ = [
    "CheckpointMismatchError",
    "Checkpointer",
    "ConfigError",
    "base_config",
    "build_model",
    "validate_config",
    "NonFiniteLossError",
    "Objective",
    "preemption_requested",
    "train_and_evaluate",
    "initialize_distributed",
    "make_mesh",
    "SAMPLE_KINDS",
    "register_sample_kind",
    "TrainState",
    "create_train_state",
    "make_optimizer",
    "eval_step",
    "train_step",
]
