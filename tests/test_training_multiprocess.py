"""Two processes on 127.0.0.1 (jax.distributed with a local coordinator, gloo CPU collectives, 2 devices
each) run the real CLI (with bf16 compute): SIGTERM to both mid-run saves one checkpoint at the step they agree
on (JAX's preemption sync manager) and both exit 0; a restart of both resumes from it."""

import json
import signal
import time

import numpy as np

from mmdiff_jax.training import writers
from tests import training_helpers as helpers


def train_flags(workdir, arrays, steps):
    return [
        "mmdiff_jax.train",
        f"--workdir={workdir}",
        f"--config={helpers.REPO}/configs/default.py:tiny",
        helpers.source_flag(arrays),
        f"--config.train.steps={steps}",
        "--config.train.checkpoint_every=1000",
        "--config.train.log_every=1",
        "--config.train.eval_every=4",
        "--config.sample.every=0",
        "--config.train.progress_bar=False",
        "--config.train.log_batch_checksum=True",
        "--config.model.dtype=bfloat16",
    ]


def wait_for_step(children, metrics, step, timeout=400):
    """Until the chief has logged `step` (fails if a child exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert all(child.poll() is None for child in children), "a process exited before the signal"
        if metrics.exists() and any(r.get("step", 0) >= step for r in writers.read_jsonl(metrics)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached in {timeout} s")


def test_sigterm_to_both_processes_saves_one_checkpoint_that_resumes(tmp_path):
    arrays = helpers.write_arrays(tmp_path / "arrays.npz")
    workdir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()

    children = helpers.launch(train_flags(workdir, arrays, steps=500), first, processes=2, devices=2)
    wait_for_step(children, workdir / "metrics.jsonl", 3)
    for child in children:
        child.send_signal(signal.SIGTERM)
    logs = helpers.finish(children, first, timeout=300)  # both exit 0
    assert all("2 processes" in log and "'data': 4" in log for log in logs), logs[0][-2000:]
    saved = [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 3 <= saved[0] < 500, saved  # one checkpoint, at the step both agreed on
    step = saved[0]
    assert all(f"Preempted (SIGTERM): saved step {step}" in log for log in logs), logs[0][-2000:]
    data_files = sorted(p.name for p in (checkpoints / str(step) / "data").glob("*.json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    positions = {name: json.loads((checkpoints / str(step) / "data" / name).read_text()) for name in data_files}

    logs = helpers.finish(helpers.launch(train_flags(workdir, arrays, step + 2), second, 2, 2), second, 300)
    assert all(f"Resuming from {checkpoints}/{step}" in log for log in logs), logs[0][-2000:]
    assert (checkpoints / str(step + 2)).is_dir()
    for name, position in positions.items():  # each process moved on from its own saved position
        assert json.loads((checkpoints / str(step + 2) / "data" / name).read_text()) != position
    records = writers.read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, step + 3))
    assert {r["step"] for r in records if "eval/loss" in r} == set(range(4, step + 3, 4)) | {step + 2}
    # bf16 compute, float32 params and optimizer state
    state = helpers.read_state(workdir, step + 2)
    assert all(value.dtype in (np.float32, np.int32, np.uint32) for value in state.values()), {
        name: value.dtype for name, value in state.items()
    }
