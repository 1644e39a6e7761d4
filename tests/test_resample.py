"""Importance sampling of t (`resample`, ADM's LossSecondMomentResampler) and the loss state that carries it:
the math against a plain statement of ADM's, the MT-Diffusion loss that uses it, and the trainer's path for
any task's loss state (kept, checkpointed, resumed exactly, threaded through micro-batches)."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdiff_jax import resample, tasks
from mmdiff_jax.models.mt_diffusion import MTDiffusion, init_variables
from mmdiff_jax.modalities import modality_schedule
from mmdiff_jax.objective import make_loss_fn
from mmdiff_jax.training import Task, train_and_evaluate, writers
from tests import training_helpers as helpers
from tests.test_modalities import KEY, MICRO, Z_SHAPE, random_batch
from tests.test_objective import MODALITIES


class AdmResampler:
    """ADM's LossSecondMomentResampler (guided_diffusion/resample.py), restated in NumPy, one step per row."""

    def __init__(self, num_steps, history_per_term, uniform_prob):
        self.history = np.zeros((num_steps, history_per_term))
        self.count = np.zeros(num_steps, int)
        self.history_per_term, self.uniform_prob = history_per_term, uniform_prob

    def weights(self):
        if not np.all(self.count == self.history_per_term):
            return np.ones(len(self.count)) / len(self.count)
        weights = np.sqrt(np.mean(self.history**2, axis=-1))
        weights = weights / np.sum(weights) * (1 - self.uniform_prob)
        return weights + self.uniform_prob / len(weights)

    def update(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self.count[t] == self.history_per_term:
                self.history[t, :-1] = self.history[t, 1:]
                self.history[t, -1] = loss
            else:
                self.history[t, self.count[t]] = loss
                self.count[t] += 1


def test_the_history_and_probabilities_are_adms():
    rng = np.random.default_rng(0)
    num_steps, capacity = 6, 3
    reference = AdmResampler(num_steps, capacity, uniform_prob=0.01)
    history = resample.init_history(num_steps, capacity)
    update = jax.jit(resample.update_history)
    for batch in range(8):  # repeated steps within a batch; some rows overflow, the last rows fill late
        t = rng.integers(1, num_steps + 1 if batch > 2 else num_steps, size=7)
        losses = rng.gamma(2.0, size=7) * t
        reference.update(t - 1, losses)
        history = update(history, jnp.asarray(t), jnp.asarray(losses, jnp.float32))
        np.testing.assert_allclose(history.losses, reference.history, rtol=1e-6)
        np.testing.assert_array_equal(history.counts, reference.count)
        np.testing.assert_allclose(
            resample.step_probabilities(history, uniform_prob=0.01), reference.weights(), rtol=1e-5
        )
    assert np.all(reference.count == capacity)  # the loop reached the learned distribution
    assert not np.allclose(reference.weights(), 1 / num_steps)


def test_sampled_steps_follow_p_and_their_weights_unbias_the_loss():
    probabilities = jnp.asarray([0.05, 0.1, 0.6, 0.25])
    t, weights = resample.sample_steps(jax.random.key(1), probabilities, 200_000)
    assert t.dtype == jnp.int32 and int(t.min()) == 1 and int(t.max()) == 4
    frequencies = np.bincount(np.asarray(t), minlength=5)[1:] / t.size
    np.testing.assert_allclose(frequencies, probabilities, atol=0.005)
    np.testing.assert_allclose(weights, 1 / (4 * np.asarray(probabilities)[np.asarray(t) - 1]), rtol=1e-6)
    loss_at = np.asarray([4.0, 2.0, 1.0, 3.0])  # E_p[w L_t] = (1/T) sum_t L_t
    np.testing.assert_allclose(np.mean(np.asarray(weights) * loss_at[np.asarray(t) - 1]), loss_at.mean(), rtol=0.01)


def test_the_mt_diffusion_loss_samples_t_from_its_history():
    model = MTDiffusion(MICRO, MODALITIES, Z_SHAPE)
    schedule = modality_schedule("linear", 100, MODALITIES)
    params = jax.jit(lambda key: init_variables(model, key, 2))(KEY)["params"]
    batch = random_batch(MODALITIES, batch_size=4)
    loss_fn = jax.jit(make_loss_fn(model, schedule, {"time_sampling": "importance"}))

    empty = resample.init_history(100)
    loss, (metrics, history) = loss_fn(params, batch, KEY, loss_state=empty)
    assert int(history.counts.sum()) == 4  # one loss per example, at its step
    recorded = np.asarray(history.losses)[np.asarray(history.counts) > 0]
    np.testing.assert_allclose(loss, recorded[recorded != 0].mean(), rtol=1e-5)  # uniform p: weights 1
    assert metrics["loss"] == loss

    # A full history with all its mass at t = 7: every example is drawn there, weighted 1 / (T p(7)).
    losses = jnp.full((100, 10), 1e-6).at[6].set(1.0)
    full = resample.LossHistory(losses, jnp.full((100,), 10, jnp.int32))
    loss, (_, history) = loss_fn(params, batch, KEY, loss_state=full)
    p_7 = float(resample.step_probabilities(full)[6])
    assert p_7 > 0.99
    np.testing.assert_allclose(loss, np.asarray(history.losses)[6, -4:].mean() / (100 * p_7), rtol=1e-5)

    with pytest.raises(ValueError, match="loss_state"):
        make_loss_fn(model, schedule)(params, batch, KEY, loss_state=empty)
    with pytest.raises(ValueError, match="loss_state"):
        loss_fn(params, batch, KEY)
    with pytest.raises(ValueError, match="time_sampling"):
        make_loss_fn(model, schedule, {"time_sampling": "loss_aware"})


def test_the_task_keeps_a_history_and_says_so_in_its_signature():
    from configs.default import get_config

    config = get_config("tiny")
    uniform = tasks.make_mt_diffusion_task(config)
    config.loss.time_sampling = "importance"
    importance = tasks.make_mt_diffusion_task(config)
    assert uniform.init_loss_state is None and "loss" not in uniform.signature
    assert importance.signature["loss"] == {"time_sampling": "importance"}
    assert importance.init_loss_state().losses.shape == (config.diffusion.num_steps, resample.HISTORY_PER_TERM)
    assert importance.loss_description.endswith("; t importance-sampled")


def _counting_task():
    """A one-weight task whose loss state counts its calls and sums its losses (any task's loss state)."""

    def loss_fn(params, batch, rng, train=True, loss_state=None):
        del rng, train
        loss = jnp.mean((params["w"] * batch["masked_image"] - batch["image"]) ** 2)
        count, total = loss_state
        return loss, ({"pixel_mse": loss}, (count + 1, total + jax.lax.stop_gradient(loss)))

    return Task(
        name="counting",
        init_params=lambda rng: {"w": jnp.zeros(())},
        loss_fn=loss_fn,
        signature={"counting": {}},
        init_loss_state=lambda: (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)),
    )


def test_a_loss_state_is_kept_checkpointed_and_resumed(tmp_path):
    arrays = helpers.write_arrays(tmp_path / "arrays.npz", num_train=32, num_test=16)
    config = helpers.tiny_config(arrays, steps=6, checkpoint_every=3, eval_every=3)
    config.sample.every = 0
    task = _counting_task()
    straight = train_and_evaluate(config, tmp_path / "straight", task)
    count, total = straight.loss_state
    assert int(count) == 6  # eval steps read the state and leave it alone
    losses = [r["loss"] for r in writers.read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    np.testing.assert_allclose(float(total), sum(losses), rtol=1e-5)

    half = copy.deepcopy(config)
    half.train.steps = 3
    train_and_evaluate(half, tmp_path / "resumed", task)
    resumed = train_and_evaluate(config, tmp_path / "resumed", task)
    assert int(resumed.loss_state[0]) == 6 and float(resumed.loss_state[1]) == float(total)

    accumulating = copy.deepcopy(config)
    accumulating.train.steps = 2
    accumulating.optim.grad_accumulation_steps = 2
    assert int(train_and_evaluate(accumulating, tmp_path / "accumulating", task).loss_state[0]) == 4


def test_a_state_without_a_loss_state_is_saved_as_before_it_existed(tmp_path):
    """Checkpoints of tasks without a loss state have the layout they had before `TrainState.loss_state`
    existed (so those restore), and the state comes back whole."""
    from mmdiff_jax.training import TrainState
    from mmdiff_jax.training.checkpoint import Checkpointer

    class Position:  # a data iterator's position, as the checkpoint keeps it
        def get_state(self):
            return {"index": 0}

    state = TrainState(
        step=jnp.ones((), jnp.int32),
        params={"w": jnp.arange(3.0)},
        ema_params={"w": jnp.zeros(3)},
        opt_state=(),
        rng=jnp.zeros(2, jnp.uint32),
        first_nonfinite_step=jnp.full((), -1, jnp.int32),
    )
    checkpointer = Checkpointer(tmp_path / "checkpoints", signature={}, save_every=1, keep=1, async_save=False)
    checkpointer.save(1, state, Position())
    checkpointer.wait_until_finished()
    saved = checkpointer.manager.item_metadata(1)["state"]
    assert set(saved) == {"step", "params", "ema_params", "opt_state", "rng", "first_nonfinite_step"}
    restored = checkpointer.restore(jax.eval_shape(lambda: state), step=1)
    assert isinstance(restored, TrainState) and restored.loss_state is None
    np.testing.assert_array_equal(restored.params["w"], state.params["w"])
