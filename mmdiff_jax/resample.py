"""Importance sampling of the step t for the training loss (ADM's `LossSecondMomentResampler`; no Flax).

The loss is an expectation over t ~ U{1..T}. Drawing t from p(t) instead and weighting each example by
1 / (T p(t)) keeps it unbiased, E_p[L_t / (T p(t))] = (1/T) sum_t L_t, and with p(t) proportional to
sqrt(E[L_t^2]) it has the least variance (Nichol & Dhariwal 2021, section 3.3; docs/design.md section 3d):

  p(t) = (1 - u) sqrt(mean_k h_t[k]^2) / sum_s sqrt(mean_k h_s[k]^2) + u / T,     u = UNIFORM_PROB

where h_t holds the last K = HISTORY_PER_TERM per-example losses seen at step t. Until every t has K of them,
p is uniform (and every weight 1). The history is state the loss carries from step to step:

  history = init_history(T)
  probabilities = step_probabilities(history)            # [T], entry t - 1 for step t
  t, weights = sample_steps(rng, probabilities, B)       # [B] steps in 1..T, [B] weights 1 / (T p(t))
  loss = mean(weights * per_example_loss)
  history = update_history(history, t, stop_gradient(per_example_loss))

Shapes: history.losses [T, K] float32, history.counts [T] int32. All functions are pure and jit-able.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

TIME_SAMPLINGS = ("uniform", "importance")  # config loss.time_sampling
HISTORY_PER_TERM = 10  # ADM's history_per_term
UNIFORM_PROB = 0.001  # ADM's uniform_prob


class LossHistory(NamedTuple):
    """The last `K` per-example losses seen at each step t = 1..T (row t - 1), oldest first."""

    losses: Array  # [T, K] float32
    counts: Array  # [T] int32, how many of row t's K slots are filled (0..K)


def init_history(num_steps: int, history_per_term: int = HISTORY_PER_TERM) -> LossHistory:
    """An empty history for T = `num_steps` steps: p is uniform until it is full."""
    if num_steps < 1 or history_per_term < 1:
        raise ValueError(f"num_steps and history_per_term must be >= 1, got {num_steps}, {history_per_term}")
    return LossHistory(jnp.zeros((num_steps, history_per_term), jnp.float32), jnp.zeros((num_steps,), jnp.int32))


def step_probabilities(history: LossHistory, uniform_prob: float = UNIFORM_PROB) -> Array:
    """p(t) [T]: uniform until every step has K losses, then sqrt of the losses' second moment mixed with
    `uniform_prob` of the uniform distribution (ADM's `LossSecondMomentResampler.weights`)."""
    num_steps, capacity = history.losses.shape
    second_moment = jnp.sqrt(jnp.mean(jnp.square(history.losses), axis=-1))
    learned = second_moment / jnp.maximum(jnp.sum(second_moment), jnp.finfo(jnp.float32).tiny)
    learned = learned * (1.0 - uniform_prob) + uniform_prob / num_steps
    return jnp.where(jnp.all(history.counts == capacity), learned, jnp.full((num_steps,), 1.0 / num_steps))


def sample_steps(rng: Array, probabilities: Array, batch_size: int) -> tuple[Array, Array]:
    """t [B] int32 in 1..T drawn from `probabilities` [T] (entry t - 1 for step t), and the importance weights
    1 / (T p(t)) [B] float32 that keep the loss an unbiased estimate of its uniform-t expectation."""
    num_steps = probabilities.shape[0]
    index = jax.random.choice(rng, num_steps, (batch_size,), p=probabilities)
    return (index + 1).astype(jnp.int32), 1.0 / (num_steps * probabilities[index])


def update_history(history: LossHistory, t: Array, losses: Array) -> LossHistory:
    """Adds `losses` [B] seen at steps `t` [B] in batch order (ADM's `update_with_all_losses`): a row with K
    losses drops its oldest. Several examples at one step are added one after the other."""
    t = jnp.asarray(t, jnp.int32)
    losses = jnp.asarray(losses, jnp.float32)
    if t.shape != losses.shape or t.ndim != 1:
        raise ValueError(f"t and losses must both be [B], got {t.shape} and {losses.shape}")
    capacity = history.losses.shape[1]

    def add(state, example):
        rows, counts = state
        step, loss = example
        row, count = rows[step - 1], counts[step - 1]
        full = jnp.concatenate([row[1:], loss[None]])  # drop the oldest
        filling = row.at[jnp.minimum(count, capacity - 1)].set(loss)
        rows = rows.at[step - 1].set(jnp.where(count == capacity, full, filling))
        return (rows, counts.at[step - 1].set(jnp.minimum(count + 1, capacity))), None

    (rows, counts), _ = jax.lax.scan(add, (history.losses, history.counts), (t, losses))
    return LossHistory(rows, counts)
