"""One optimisation step and one evaluation step, pure and jit-able; `jit_train_step` / `jit_eval_step`
compile them for a mesh (state donated, NamedSharding in and out).

train_step, for the loss L(params, batch, rng) of `objective.make_loss_fn`:
  rng_s = fold_in(state.rng, s)                      (s = state.step: a resumed run draws the same numbers)
  g = grad L(params, batch, rng_s)                   (or the mean over k micro-batches, rng fold_in(rng_s, j))
  params <- AdamW(clip(g)),  ema <- decay * ema + (1 - decay) * params
A task with a loss state (`Task.init_loss_state`) gets `state.loss_state` as L's `loss_state=` and the
state L returns is kept, like the params.
A step whose loss or gradient norm is not finite changes nothing but `step` and records itself in
`first_nonfinite_step` (no host sync here: the loop reads that flag when it logs or checkpoints).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from mmdiff_jax.training import mesh as mesh_lib
from mmdiff_jax.training.state import TrainState

Array = jax.Array
Batch = Mapping[str, Array]
LossFn = Callable[..., tuple[Array, dict[str, Array]]]


def split_microbatches(batch: Batch, accumulation_steps: int, batch_shards: int) -> dict[str, Array]:
    """[B, ...] -> [k, B / k, ...]. Micro-batch j takes rows j*m .. (j+1)*m - 1 of every device's block of
    B / batch_shards rows (m = B / (batch_shards k)), so it stays spread over all devices and no example moves.
    """

    def split(x):
        rows = x.shape[0] // (batch_shards * accumulation_steps)
        x = x.reshape((batch_shards, accumulation_steps, rows) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1).reshape((accumulation_steps, batch_shards * rows) + x.shape[3:])

    return {key: split(value) for key, value in batch.items()}


def _call_loss(loss_fn: LossFn, params: Any, batch: Batch, rng: Array, loss_state: Any, **kwargs) -> tuple:
    """(loss, (metrics, new loss state)) of `loss_fn`, for a task with a loss state (`Task.init_loss_state`,
    passed as `loss_state=`) and without one (None in, None out)."""
    if loss_state is None:
        loss, metrics = loss_fn(params, batch, rng, **kwargs)
        return loss, (metrics, None)
    return loss_fn(params, batch, rng, loss_state=loss_state, **kwargs)


def _gradients(
    loss_fn: LossFn,
    params: Any,
    batch: Batch,
    rng: Array,
    accumulation_steps: int,
    batch_shards: int,
    loss_state: Any = None,
) -> tuple[Array, dict[str, Array], Any, Any]:
    """(loss, metrics, grads, loss_state), averaged over micro-batches when accumulating; a loss state
    (`Task.init_loss_state`) passes through the micro-batches in order."""

    def gradients(micro_batch, key, loss_state):
        call = lambda p: _call_loss(loss_fn, p, micro_batch, key, loss_state)  # noqa: E731
        (loss, (metrics, loss_state)), grads = jax.value_and_grad(call, has_aux=True)(params)
        return (loss, metrics, grads), loss_state

    if accumulation_steps == 1:
        (loss, metrics, grads), loss_state = gradients(batch, rng, loss_state)
        return loss, metrics, grads, loss_state

    def accumulate(carry, inputs):
        totals, loss_state = carry
        index, micro_batch = inputs
        values, loss_state = gradients(micro_batch, jax.random.fold_in(rng, index), loss_state)
        return (jax.tree.map(jnp.add, totals, values), loss_state), None

    micro_batches = split_microbatches(batch, accumulation_steps, batch_shards)
    shapes = jax.eval_shape(gradients, jax.tree.map(lambda x: x[0], micro_batches), rng, loss_state)[0]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (totals, loss_state), _ = jax.lax.scan(
        accumulate, (zeros, loss_state), (jnp.arange(accumulation_steps), micro_batches)
    )
    return (*jax.tree.map(lambda total: total / accumulation_steps, totals), loss_state)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    learning_rate_fn: optax.Schedule,
    ema_decay: float,
    accumulation_steps: int = 1,
    batch_shards: int = 1,
    checksum_key: str | None = None,
    prng_impl: str = "threefry2x32",
) -> tuple[TrainState, dict[str, Array]]:
    """One update. Returns the new state and scalar metrics: the loss terms of `loss_fn`, 'grad_norm'
    (before clipping), 'learning_rate' (used for this update), 'finite' (1 / 0) and, with `checksum_key`,
    'batch_checksum' (sum of batch[checksum_key]: identifies the data a step saw). `prng_impl` names the
    implementation of the key whose data `state.rng` holds (config.prng_impl)."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=prng_impl), state.step)
    loss, metrics, grads, loss_state = _gradients(
        loss_fn, state.params, batch, rng, accumulation_steps, batch_shards, state.loss_state
    )
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = optax.incremental_update(params, state.ema_params, 1.0 - ema_decay)

    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    first_bad = jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step + 1, state.first_nonfinite_step)
    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_finite(params, state.params),
        ema_params=keep_if_finite(ema_params, state.ema_params),
        opt_state=keep_if_finite(opt_state, state.opt_state),
        first_nonfinite_step=first_bad,
        loss_state=keep_if_finite(loss_state, state.loss_state),
    )
    metrics = dict(
        metrics,
        loss=loss,
        grad_norm=grad_norm,
        learning_rate=learning_rate_fn(state.step),
        finite=finite.astype(jnp.float32),
    )
    if checksum_key is not None:
        metrics["batch_checksum"] = jnp.sum(jnp.asarray(batch[checksum_key], jnp.float32))
    return new_state, metrics


def eval_step(state: TrainState, batch: Batch, rng: Array, *, loss_fn: LossFn) -> dict[str, Array]:
    """The loss terms on `batch` with the EMA params (names as in `loss_fn`) and with the raw params
    ('raw/<name>'), both with the same t and noise (`rng`), in eval mode (no dropout)."""
    metrics, raw = (  # a loss state gives the same t distribution as training; it is not updated here
        _call_loss(loss_fn, params, batch, rng, state.loss_state, train=False)[1][0]
        for params in (state.ema_params, state.params)
    )
    return dict(metrics, **{f"raw/{name}": value for name, value in raw.items()})


def jit_train_step(mesh: Mesh, state_shardings: TrainState, **step_kwargs) -> Callable:
    """train_step compiled for `mesh`: (state, global batch) -> (state, metrics); the state is donated."""
    step = functools.partial(train_step, batch_shards=mesh_lib.batch_shards(mesh), **step_kwargs)
    return jax.jit(
        step,
        in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh)),
        out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
        donate_argnums=0,
    )


def jit_eval_step(mesh: Mesh, state_shardings: TrainState, loss_fn: LossFn) -> Callable:
    """eval_step compiled for `mesh`: (state, global batch, rng) -> replicated metrics."""
    return jax.jit(
        functools.partial(eval_step, loss_fn=loss_fn),
        in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)),
        out_shardings=mesh_lib.replicated(mesh),
    )
