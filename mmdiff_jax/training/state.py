"""The train state, the optimizer and sharded initialisation.

Optimizer (config `optim`): AdamW (decoupled weight decay on weights of rank >= 2 only; biases and norm
scales are not decayed) on a learning-rate schedule of linear warmup from 0 to `learning_rate` over
`warmup_steps`, then `schedule` = 'cosine' | 'linear' decay to `end_learning_rate` at `decay_steps`
(0: the run's `train.steps`), or 'constant'; gradients are clipped to global norm `grad_clip_norm`
(0: off) first. The EMA of the parameters, ema <- decay * ema + (1 - decay) * params after every update,
lives in the state, not in the optimizer, so evaluation and sampling can read it directly.

Params, EMA and optimizer state are float32 (bf16 compute is the model's `dtype`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from mmdiff_jax.training import mesh as mesh_lib

SCHEDULES = ("cosine", "linear", "constant")


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data iterator position.

    step: int32 [], updates done so far.
    params, ema_params: the model's parameter trees (float32).
    opt_state: the optax state of `make_optimizer`.
    rng: uint32 [2] raw key data; step s draws from fold_in(rng, s), so resuming needs no RNG bookkeeping.
    first_nonfinite_step: int32 [], the first step whose loss or gradient norm was NaN/inf (its update was
      skipped), -1 while every step was finite. Read on the host at log and checkpoint time only.
    loss_state: what the task's loss carries from step to step (`Task.init_loss_state`, e.g. the loss history
      of importance sampling of t), None for a loss without one (its checkpoints then leave the field out).
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    first_nonfinite_step: jax.Array
    loss_state: Any = None


def learning_rate_schedule(optim: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> learning_rate, then cosine / linear decay to end_learning_rate, or constant."""
    peak, end, warmup = optim["learning_rate"], optim["end_learning_rate"], optim["warmup_steps"]
    kind = optim["schedule"]
    decay_steps = optim["decay_steps"] or total_steps
    if kind not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {kind!r}")
    if kind == "constant":
        decay = optax.constant_schedule(peak)
    elif decay_steps <= warmup:
        raise ValueError(f"optim.decay_steps ({decay_steps}) must exceed optim.warmup_steps ({warmup})")
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps - warmup, alpha=end / peak if peak else 0.0)
    else:
        decay = optax.linear_schedule(peak, end, decay_steps - warmup)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
    """True for the leaves weight decay applies to: weights of rank >= 2 (not biases or norm scales)."""
    return jax.tree.map(lambda leaf: leaf.ndim >= 2, params)


def make_optimizer(optim: Mapping[str, Any], total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(clip -> AdamW) and its learning-rate schedule (for logging)."""
    learning_rate = learning_rate_schedule(optim, total_steps)
    adamw = optax.adamw(
        learning_rate,
        b1=optim["b1"],
        b2=optim["b2"],
        eps=optim["eps"],
        weight_decay=optim["weight_decay"],
        mask=decay_mask,
    )
    if optim["grad_clip_norm"] > 0:
        return optax.chain(optax.clip_by_global_norm(optim["grad_clip_norm"]), adamw), learning_rate
    return adamw, learning_rate


ParamsInit = Callable[[jax.Array], Any]  # rng -> the model's parameter tree (pure, so eval_shape and jit work)
LossStateInit = Callable[[], Any] | None  # () -> the loss's initial state (`Task.init_loss_state`), or None


def init_train_state(
    init_params: ParamsInit,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    init_loss_state: LossStateInit = None,
) -> TrainState:
    """A fresh state (pure: jit it with out_shardings to land sharded)."""
    init_rng, train_rng = jax.random.split(rng)
    params = init_params(init_rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(train_rng),
        first_nonfinite_step=jnp.full((), -1, jnp.int32),
        loss_state=None if init_loss_state is None else init_loss_state(),
    )


def train_state_shardings(
    init_params: ParamsInit,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rng: jax.Array,
    *,
    fsdp_min_size: int = 2**14,
    init_loss_state: LossStateInit = None,
) -> tuple[TrainState, TrainState]:
    """(abstract state, shardings): ShapeDtypeStructs carrying their target NamedShardings (the restore
    target for Orbax), and the NamedShardings alone (for jit in/out shardings). No arrays are created."""
    abstract = jax.eval_shape(lambda key: init_train_state(init_params, optimizer, key, init_loss_state), rng)
    shardings = mesh_lib.state_shardings(abstract, mesh, fsdp_min_size)
    abstract = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract, shardings
    )
    return abstract, shardings


def create_train_state(
    init_params: ParamsInit,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rng: jax.Array,
    *,
    fsdp_min_size: int = 2**14,
    shardings: TrainState | None = None,
    init_loss_state: LossStateInit = None,
) -> tuple[TrainState, TrainState]:
    """Initialises straight into sharded arrays; returns (state, a TrainState of its NamedShardings).

    `init_params`: rng -> params, `init_loss_state`: () -> the loss's state or None, e.g. a `Task`'s.
    `jax.eval_shape` gives the shapes, `mesh.state_shardings` the specs, and the jit-ed init writes each
    shard where it lives (no full copy on one device first). `shardings`: those of `train_state_shardings`
    for the same arguments, if the caller has them (the init is then traced once, not twice).
    """
    if shardings is None:
        _, shardings = train_state_shardings(
            init_params, optimizer, mesh, rng, fsdp_min_size=fsdp_min_size, init_loss_state=init_loss_state
        )
    state = jax.jit(
        lambda key: init_train_state(init_params, optimizer, key, init_loss_state), out_shardings=shardings
    )(rng)
    return state, shardings


def count_params(params: Any) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(params))
