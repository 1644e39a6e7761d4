"""Two processes on 127.0.0.1 (jax.distributed with a local coordinator, gloo CPU collectives, 2 devices
each) run the real CLI (with bf16 compute): train a few steps, save with Orbax, then a restart of both
resumes from there."""

import json
import subprocess
import sys

import numpy as np

from mmdiff_jax.training import writers
from tests import training_helpers as helpers


def launch_pair(workdir, arrays, steps, timeout=400):
    port = helpers.free_port()
    env = helpers.child_env(devices=2)
    flags = [
        f"--workdir={workdir}",
        "--config=configs/default.py:tiny",
        f"--config.data.arrays_path={arrays}",
        f"--config.train.steps={steps}",
        "--config.train.checkpoint_every=2",
        "--config.train.log_every=1",
        "--config.train.eval_every=4",
        "--config.sample.every=0",
        "--config.train.progress_bar=False",
        "--config.train.log_batch_checksum=True",
        "--config.model.dtype=bfloat16",
        "--config.distributed.initialize=always",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2",
    ]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "mmdiff_jax.train", *flags, f"--config.distributed.process_id={index}"],
            env=env,
            cwd=helpers.REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-4000:]
    return [stderr for _, stderr in outputs]


def test_two_processes_train_save_and_resume(tmp_path):
    arrays = helpers.write_arrays(tmp_path / "arrays.npz")
    workdir = tmp_path / "run"

    logs = launch_pair(workdir, arrays, steps=4)
    assert all("2 processes" in log and "'data': 4" in log for log in logs), logs[0][-2000:]
    checkpoints = workdir / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [2, 4]
    data_files = sorted(p.name for p in (checkpoints / "4" / "data").glob("*.json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    positions = {name: json.loads((checkpoints / "4" / "data" / name).read_text()) for name in data_files}

    logs = launch_pair(workdir, arrays, steps=6)
    assert all(f"Resuming from {checkpoints}/4" in log for log in logs), logs[0][-2000:]
    assert 6 in [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()]
    for name, position in positions.items():  # each process moved on from its own saved position
        assert json.loads((checkpoints / "6" / "data" / name).read_text()) != position
    records = writers.read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert {r["step"] for r in records if "eval/loss" in r} == {4, 6}
    # bf16 compute, float32 params and optimizer state
    saved = helpers.read_state(workdir, 6)
    assert all(value.dtype in (np.float32, np.int32, np.uint32) for value in saved.values()), {
        name: value.dtype for name, value in saved.items()
    }
