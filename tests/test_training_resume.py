"""Exact resume, preemption, NaN guard and mismatch refusal of `train_and_evaluate`, on the tiny config.

The reference is one straight 20-step run; the others must end with the same params, EMA and optimizer
state, having seen the same batches (the per-step batch checksums in metrics.jsonl, which come from the
real grain iterator restored from the checkpoint).
"""

import copy
import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mmdiff_jax import tasks
from mmdiff_jax.training import CheckpointMismatchError, NonFiniteLossError, Task, config_io, writers
from mmdiff_jax.training import train_and_evaluate as train_task
from mmdiff_jax.training import checkpoint as checkpoint_lib
from tests import training_helpers as helpers

# The DDIM sample grids need the sampling layer (mmdiff_jax.sampling); the one-step preview does not.
HAVE_SAMPLERS = importlib.util.find_spec("mmdiff_jax.sampling") is not None
SAMPLE_GRIDS = ["one_step_x0_t50"] + (["ddim_given_masked_image", "ddim_joint"] if HAVE_SAMPLERS else [])


def train_and_evaluate(config, workdir, **kwargs):
    """The config's MT-Diffusion task through `training.train_and_evaluate`."""
    return train_task(config, workdir, tasks.make_mt_diffusion_task(config), **kwargs)


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    return helpers.write_arrays(tmp_path_factory.mktemp("data") / "arrays.npz")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, arrays):
    """20 steps in one go (eval and sample grids at 10 and 20, checkpoints every 5, keep 2 + best); run once
    per session, by whichever xdist worker needs it first (read-only for the tests)."""
    root = helpers.shared_dir(tmp_path_factory, "training_straight_run")
    workdir = root / "run"
    with helpers.file_lock(root / "lock"):
        if not (root / "done").exists():
            shutil.rmtree(workdir, ignore_errors=True)
            config = helpers.tiny_config(arrays, checkpoint_every=5)
            if HAVE_SAMPLERS:
                config.sample.kinds = ("one_step_x0", "ddim_conditional", "ddim_joint")
            train_and_evaluate(config, workdir)
            (root / "done").touch()
    return workdir


def assert_same_state(workdir, reference, step=20):
    ours, theirs = helpers.read_state(workdir, step), helpers.read_state(reference, step)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=1e-6, err_msg=name)


def test_straight_run_writes_logs_samples_and_checkpoints(straight_run):
    records = writers.read_jsonl(straight_run / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 21))
    assert {r["step"] for r in records if "eval/loss" in r} == {10, 20}
    assert all(np.isfinite(r["loss"]) and "steps_per_second" in r for r in records if "loss" in r)
    assert sorted(p.name for p in (straight_run / "samples").glob("*.png")) == sorted(
        f"{name}_{step:08d}.png" for name in SAMPLE_GRIDS for step in (10, 20)
    )
    assert (straight_run / "loss.png").stat().st_size > 0
    assert list((straight_run / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((straight_run / "config.json").read_text())["train"]["steps"] == 20
    # keep the last 2 (15, 20) plus the best by eval/loss among the evaluated ones (10, 20)
    steps = sorted(int(p.name) for p in (straight_run / "checkpoints").iterdir() if p.name.isdigit())
    eval_losses = {r["step"]: r["eval/loss"] for r in records if "eval/loss" in r}
    best = min(eval_losses, key=eval_losses.get)
    assert steps == sorted({15, 20, best})


def test_stop_and_resume_equals_straight_run(tmp_path, arrays, straight_run):
    config = helpers.tiny_config(arrays, checkpoint_every=5)
    first_half = copy.deepcopy(config)
    first_half.train.steps = 10
    state = train_and_evaluate(first_half, tmp_path)
    assert int(state.step) == 10
    state = train_and_evaluate(config, tmp_path)
    assert int(state.step) == 20
    assert_same_state(tmp_path, straight_run)
    assert helpers.checksums(tmp_path) == helpers.checksums(straight_run)
    assert len(helpers.checksums(tmp_path)) == 20
    assert (tmp_path / "config.1.json").exists()  # the 10-step launch's config, kept


def test_sigterm_saves_and_resume_equals_straight_run(tmp_path, arrays, straight_run):
    # The children compute on as many devices as this process, which made `straight_run` (the mesh, and so the
    # numerics, follow the device count), whatever XLA_FLAGS the caller set.
    env = helpers.child_env(devices=jax.device_count())
    command = [sys.executable, helpers.__file__, "train", str(tmp_path), str(arrays), "--pause-at", "10"]
    child = subprocess.Popen(
        command, env=env, cwd=helpers.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 400
        while not (tmp_path / "paused_at_10").exists():
            assert child.poll() is None, child.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the child never reached step 10"
            time.sleep(0.1)
        child.send_signal(signal.SIGTERM)
        stdout, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, stderr[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1]) == {"final_step": 10, "preempted": True}
    assert checkpoint_lib.Checkpointer(tmp_path / "checkpoints", signature={}, save_every=5, keep=2).latest_step() == 10

    resumed = helpers.run_child(["train", str(tmp_path), str(arrays)], env, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["final_step"] == 20
    assert_same_state(tmp_path, straight_run)
    assert helpers.checksums(tmp_path) == helpers.checksums(straight_run)


class _NanAt:
    """Wraps a data iterator; batch number `index` (1-based) gets a NaN pixel. Checkpointable like the inner one."""

    def __init__(self, iterator, index):
        self.iterator, self.index, self.count = iterator, index, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self.iterator))
        self.count += 1
        if self.count == self.index:
            batch["image"] = batch["image"].copy()
            batch["image"][0, 0, 0, 0] = np.nan
        return batch

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)


def test_nan_batch_stops_run_and_last_checkpoint_restores(tmp_path, arrays):
    config = helpers.tiny_config(arrays, checkpoint_every=5, log_every=4, eval_every=0)
    config.sample.every = 0
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf at step 7\b.*stops at step 8") as error:
        train_and_evaluate(
            config, tmp_path, train_iterator_fn=lambda c: _NanAt(config_io.make_train_iterator(c), index=7)
        )
    assert "step 5" in str(error.value)
    checkpoints = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert checkpoints == [5]
    saved = helpers.read_state(tmp_path, 5)
    assert all(np.all(np.isfinite(value)) for value in saved.values())
    # A relaunch on clean data restores step 5 and carries on.
    config.train.steps = 6
    state = train_and_evaluate(config, tmp_path)
    assert int(state.step) == 6 and int(state.first_nonfinite_step) == -1


def test_a_checkpoint_under_a_constant_learning_rate_is_the_shorter_run(tmp_path, arrays):
    """experiments.multitask reads a comparator's checkpoint at step k as its k-step run (`trainer.at_checkpoint`):
    with a constant learning rate after the warmup and a fixed EMA decay, the two are the same state."""
    from experiments import trainer

    runs = {}
    for steps in (6, 12):
        config = helpers.tiny_config(arrays, steps=steps, checkpoint_every=6, keep_checkpoints=2, eval_every=0)
        config.sample.every = 0
        # 2 warmup steps, then constant (a decaying schedule would span train.steps, and this test fail).
        config.optim.update(schedule="constant", decay_steps=0, warmup_steps=2)
        task = tasks.make_mt_diffusion_task(config)
        runs[steps] = trainer.train_model(f"run{steps}", config, tmp_path / f"run{steps}", task)
    early = trainer.at_checkpoint(runs[12], 6)
    assert early.steps == 6 and early.name == "run12@6"
    for ours, theirs in zip(*(jax.tree.leaves(r.params) for r in (early, runs[6]))):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert any(not np.array_equal(a, b) for a, b in zip(*(jax.tree.leaves(r.params) for r in (early, runs[12]))))
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 4"):
        trainer.at_checkpoint(runs[12], 4)


def test_checkpoint_of_other_model_is_refused(tmp_path, arrays, straight_run):
    workdir = tmp_path / "run"
    shutil.copytree(straight_run, workdir)
    config = helpers.tiny_config(arrays)
    config.model.unet.base_channels = 16
    with pytest.raises(CheckpointMismatchError) as error:
        train_and_evaluate(config, workdir)
    message = str(error.value)
    assert "model.unet.base_channels: checkpoint 8, config 16" in message
    assert "params/backbone/Conv_0/kernel: checkpoint (3, 3, 1, 8) float32, model (3, 3, 1, 16) float32" in message
    assert helpers.read_state(workdir, 20).keys() == helpers.read_state(straight_run, 20).keys()


def _pixel_task(features: int = 4):
    """A baseline-style network (a 2-layer conv net predicting the image from the masked image), its pixel MSE."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    model = nn.Sequential([nn.Conv(features, (3, 3)), nn.relu, nn.Conv(1, (3, 3))])

    def loss_fn(params, batch, rng, train=True):
        del rng, train
        mse = jnp.mean((model.apply({"params": params}, batch["masked_image"]) - batch["image"]) ** 2)
        return mse, {"pixel_mse": mse}

    return Task(
        name="pixel_net",
        init_params=lambda rng: model.init(rng, jnp.zeros((1, 32, 32, 1)))["params"],
        loss_fn=loss_fn,
        signature={"pixel_net": {"features": features}},
    ), jax


def test_other_task_trains_resumes_and_is_refused_by_another(tmp_path, arrays):
    """A network and loss other than MT-Diffusion's go through the same path: logs, eval with its loss, no sample
    grids, exact resume, and a checkpoint of a different signature is refused."""
    task, jax = _pixel_task()
    config = helpers.tiny_config(arrays, steps=6, checkpoint_every=3, eval_every=3)
    straight = train_task(config, tmp_path / "straight", task)
    records = writers.read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert [r["step"] for r in records if "pixel_mse" in r] == list(range(1, 7))
    assert {r["step"] for r in records if "eval/pixel_mse" in r} == {3, 6}
    assert not (tmp_path / "straight" / "samples").exists()
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]

    half = copy.deepcopy(config)
    half.train.steps = 3
    train_task(half, tmp_path / "resumed", task)
    resumed = train_task(config, tmp_path / "resumed", task)
    assert int(resumed.step) == 6
    for ours, theirs in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params), strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=0, atol=1e-6)
    assert helpers.checksums(tmp_path / "resumed") == helpers.checksums(tmp_path / "straight")

    other, _ = _pixel_task(features=8)
    with pytest.raises(CheckpointMismatchError, match="pixel_net.features: checkpoint 4, config 8"):
        train_task(config, tmp_path / "straight", other)


def test_an_experiment_stops_at_a_preemption_and_the_rerun_resumes(tmp_path, arrays):
    """`experiments.trainer.train_model`: a SIGTERM while training saves and raises Preempted (the experiment
    stops, exit 0, before evaluating a half-trained model); the same call again resumes and finishes."""
    import os

    from experiments import trainer

    task, _ = _pixel_task()
    config = helpers.tiny_config(arrays, steps=4, checkpoint_every=100, eval_every=0)

    def preempt(step, state, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(trainer.Preempted, match="pixel: preempted \\(SIGTERM\\) at step 2 of 4"):
        trainer.train_model("pixel", config, tmp_path / "run", task, hooks=[preempt])
    assert trainer.latest_checkpoint_step(tmp_path / "run") == 2
    trained = trainer.train_model("pixel", config, tmp_path / "run", task)
    assert (trained.steps, trained.resumed_from) == (4, 2)


def test_preemption_sync_numbers_keep_growing_over_the_runs_of_a_process(tmp_path, monkeypatch):
    """JAX's preemption sync manager agrees on one number past the highest asked and answers True there only;
    the runs of one process (an experiment's models, each from step 1) ask it with numbers that keep growing,
    so a notice after one model finished is met at the next model's first step."""
    from jax.experimental import multihost_utils

    asked = []
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda n: asked.append(n) or n == 4)
    monkeypatch.setattr(checkpoint_lib._ProcessCheckpointManager, "_passed", 0)  # as in a fresh process

    def checkpointer(name):
        return checkpoint_lib.Checkpointer(tmp_path / name, signature={}, save_every=0, keep=1)

    first = checkpointer("first")
    assert [first.reached_preemption(step) for step in (1, 2, 3)] == [False] * 3
    first.close()
    second = checkpointer("second")  # the notice came after the first run: JAX agreed on 3 + 1
    assert second.reached_preemption(1)
    second.close()
    assert asked == [1, 2, 3, 4]
