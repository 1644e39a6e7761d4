"""The JAX training steps the benchmarks time: the project's (`project_trainer`) and a minimal one that the
PyTorch port mirrors (`minimal_trainer`), each wrapped in a `JaxTrainer` (compile, then timed blocks as in
`common`'s timing rule).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import common
import jax
import jax.numpy as jnp
import numpy as np

from mmdiff_jax.models.mt_diffusion import MTDiffusion
from mmdiff_jax.training.state import count_params

# The JAX training steps that are timed.

PROJECT_STEP = (
    "mmdiff_jax.training.steps.jit_train_step: grad clip 1.0 -> AdamW -> EMA, non-finite guard; "
    "state donated, jit, fixed device-resident batch"
)
MINIMAL_STEP = (
    "jax.jit(value_and_grad(objective.make_loss_fn)) + optax.adamw (constant lr, weight decay on "
    "rank >= 2), params and optimizer state donated, fixed device-resident batch"
)


class JaxTrainer:
    """A jit-ed step (state, batch) -> (state, metrics) with its carried state: compile, then run blocks."""

    def __init__(self, step: Callable, state: Any, batch: Any, description: str, num_params: int):
        self.step, self.state, self.batch = step, state, batch
        self.description, self.num_params = description, num_params
        self.compiled, self.metrics = None, None

    def compile(self) -> float:
        """Seconds spent tracing, lowering and compiling (the timed steps never compile)."""
        seconds, self.compiled = common.time_call(lambda: self.step.lower(self.state, self.batch).compile())
        return seconds

    def flops(self) -> float | None:
        return common.cost_flops(self.compiled)

    def run(self, steps: int) -> None:
        """Dispatches `steps` steps (the donated state threads through, nothing is read back), then one sync.

        The dispatch loop runs under `jax.transfer_guard('disallow')`: a host <-> device copy in it raises.
        """
        state, metrics = self.state, None
        with jax.transfer_guard("disallow"):
            for _ in range(steps):
                state, metrics = self.compiled(state, self.batch)
        jax.block_until_ready((state, metrics))
        self.state, self.metrics = state, metrics

    def loss(self) -> float:
        return float(self.metrics["loss"])


def project_trainer(model: MTDiffusion, schedule: Any, batch: dict[str, np.ndarray], seed: int = 0) -> JaxTrainer:
    """The project's train step (`mmdiff_jax.training`) with `base_config()`'s optimizer settings."""
    from mmdiff_jax.objective import make_loss_fn
    from mmdiff_jax.training import base_config, create_train_state, make_mesh, make_optimizer
    from mmdiff_jax.training import mesh as mesh_lib
    from mmdiff_jax.tasks.mt_diffusion import params_init_fn
    from mmdiff_jax.training.steps import jit_train_step

    optim = base_config().optim
    optimizer, learning_rate = make_optimizer(optim, total_steps=100_000)
    mesh = make_mesh((-1, 1))
    state, shardings = create_train_state(params_init_fn(model), optimizer, mesh, jax.random.key(seed))
    step = jit_train_step(
        mesh,
        shardings,
        loss_fn=make_loss_fn(model, schedule),
        optimizer=optimizer,
        learning_rate_fn=learning_rate,
        ema_decay=optim.ema_decay,
    )
    batch = jax.device_put(batch, mesh_lib.batch_sharding(mesh))
    return JaxTrainer(step, state, batch, PROJECT_STEP, count_params(state.params))


def adamw(learning_rate: float = 2e-4, weight_decay: float = 0.0):
    """optax AdamW with base_config()'s betas / eps, decaying weights of rank >= 2 only (as the project)."""
    import optax

    from mmdiff_jax.training.state import decay_mask

    return optax.adamw(
        learning_rate,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=weight_decay,
        mask=decay_mask,
    )


def minimal_trainer(
    model: MTDiffusion,
    schedule: Any,
    batch: dict[str, np.ndarray],
    params: Any = None,
    seed: int = 0,
    learning_rate: float = 2e-4,
    weight_decay: float = 0.0,
) -> JaxTrainer:
    """value_and_grad of the MT-Diffusion loss + AdamW, nothing else: the step the PyTorch port mirrors."""
    import optax

    from mmdiff_jax.objective import make_loss_fn
    from mmdiff_jax.tasks.mt_diffusion import params_init_fn

    loss_fn = make_loss_fn(model, schedule)
    optimizer = adamw(learning_rate, weight_decay)
    init_key, train_key = jax.random.split(jax.random.key(seed))
    if params is None:
        params = jax.jit(params_init_fn(model))(init_key)
    state = (params, optimizer.init(params), jnp.zeros((), jnp.int32), jax.random.key_data(train_key))

    def step(state, batch):
        params, opt_state, step_index, rng = state
        key = jax.random.fold_in(jax.random.wrap_key_data(rng), step_index)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, step_index + 1, rng), metrics

    return JaxTrainer(jax.jit(step, donate_argnums=0), state, jax.device_put(batch), MINIMAL_STEP, count_params(params))
