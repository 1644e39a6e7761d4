"""Shared pieces of the training tests: a tiny config on in-memory Fashion-MNIST stand-ins, the persistent
compilation cache, checkpoint reading, and subprocess plumbing (children get their own XLA_FLAGS).

Run as a script it is the child process of the subprocess tests:
  python tests/training_helpers.py train WORKDIR ARRAYS [--steps N] [--pause-at S]   (SIGTERM test)
  python tests/training_helpers.py sharding ARRAYS                                   (8 fake devices)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
# XLA's backend optimisations off and its classic elementwise fusion emitters instead of the MLIR ones: the
# tiny U-Net's train step (image_transition's) compiled in 5.9 s instead of 10.7 s at optimisation level 0
# alone. The whole suite runs so (tests/conftest.py), children too.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def write_arrays(path: pathlib.Path, num_train: int = 64, num_test: int = 16) -> pathlib.Path:
    """An .npz of Fashion-MNIST-shaped stand-ins (`arrays_source`): rectangles whose value names the class."""
    rng = np.random.default_rng(0)

    def split(count):
        images = np.zeros((count, 28, 28, 1), np.uint8)
        labels = np.arange(count) % 10
        for i, label in enumerate(labels):
            top, left = rng.integers(0, 12, 2)
            height, width = rng.integers(8, 16, 2)
            images[i, top : top + height, left : left + width] = 40 + 20 * label
        return images, labels

    (train_image, train_label), (test_image, test_label) = split(num_train), split(num_test)
    np.savez(path, train_image=train_image, train_label=train_label, test_image=test_image, test_label=test_label)
    return path


def arrays_source(path: str | os.PathLike) -> str:
    """The config.data.source of an array file."""
    return f"arrays({str(path)!r})"


def source_flag(path: str | os.PathLike) -> str:
    """The command-line flag that trains on an array file instead of Fashion-MNIST."""
    return f"--config.data.source={arrays_source(path)}"


def tiny_config(arrays_path: str | os.PathLike, **train_overrides):
    """configs/default.py:tiny on the stand-in arrays, logging every step's batch checksum."""
    sys.path.insert(0, str(REPO))
    from configs.default import get_config

    config = get_config("tiny")
    config.data.source = arrays_source(arrays_path)
    config.train.log_batch_checksum = True
    config.train.log_every = 1
    config.train.progress_bar = False
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


def run_experiment_cli(
    name: str, cwd: pathlib.Path, *overrides: str, devices: int = 1, processes: int = 1, config: str | None = None
) -> list[str]:
    """`python -m experiments.<name> --config=configs/<config or name>.py:tiny <overrides> --workdir=run
    --results_dir=results` in `cwd` (relative dirs, as the README's command): `processes` child processes
    (`launch`) with `devices` fake CPU devices each. Fails the test on a non-zero exit; returns their output."""
    module = [f"experiments.{name}", f"--config={REPO / 'configs' / (config or name)}.py:tiny", *overrides]
    return finish(launch(module + ["--workdir=run", "--results_dir=results"], cwd, processes, devices), cwd, 600)


def launch(module_args: list[str], cwd: pathlib.Path, processes: int = 1, devices: int = 1) -> list[subprocess.Popen]:
    """`python -m <module_args>` as `processes` child processes (`child_env(devices)`); several are one
    jax.distributed run over a coordinator on 127.0.0.1 (gloo CPU collectives). Each one's stdout and stderr go
    to cwd/process_<i>.log."""
    flags = []
    if processes > 1:
        flags = [
            "--config.distributed.initialize=always",
            f"--config.distributed.coordinator_address=127.0.0.1:{free_port()}",
            f"--config.distributed.num_processes={processes}",
        ]
    children = []
    for index in range(processes):
        extra = [f"--config.distributed.process_id={index}"] if processes > 1 else []
        with open(pathlib.Path(cwd) / f"process_{index}.log", "w") as log:
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", *module_args, *flags, *extra],
                    cwd=cwd,
                    env=child_env(devices),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return children


def finish(children: list[subprocess.Popen], cwd: pathlib.Path, timeout: float) -> list[str]:
    """Waits for `launch(..., cwd)`'s children (killing them all after `timeout` s); fails unless each exits 0;
    returns their logs."""
    deadline = time.monotonic() + timeout
    try:
        for child in children:
            child.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    logs = [(pathlib.Path(cwd) / f"process_{index}.log").read_text() for index in range(len(children))]
    for child, log in zip(children, logs, strict=True):
        assert child.returncode == 0, log[-4000:]
    return logs


def shared_dir(tmp_path_factory, name: str) -> pathlib.Path:
    """A directory shared by all pytest-xdist workers of this session (the parent of their base temps)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(path: pathlib.Path):
    """An exclusive lock across processes (for work done once per session, whichever worker comes first)."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def child_env(devices: int = 1) -> dict[str, str]:
    """Environment of a child process: `devices` fake CPU devices, the session's compilation cache
    (tests/conftest.py) and XLA's backend optimisations off as in this process (`FAST_COMPILE`), so its
    numerics match this process's."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
    )
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_state(workdir: str | os.PathLike, step: int) -> dict[str, np.ndarray]:
    """The saved TrainState of `step` as {path: numpy array} (`experiments.trainer.saved_state`)."""
    import jax

    from experiments.trainer import saved_state

    leaves = jax.tree_util.tree_flatten_with_path(saved_state(workdir, step))[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def checksums(workdir: str | os.PathLike) -> dict[int, float]:
    """step -> batch_checksum from metrics.jsonl (a resumed run's later lines win)."""
    from mmdiff_jax.training.writers import read_jsonl

    return {
        record["step"]: record["batch_checksum"]
        for record in read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")
        if "batch_checksum" in record
    }


def run_child(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, __file__, *args],
        check=False,
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ----------------------------------------------------------------------------------------------- children


def _train_child(args) -> None:
    from mmdiff_jax import tasks
    from mmdiff_jax.training import loop, mesh

    config = tiny_config(args.arrays, steps=args.steps)
    hooks = []
    if args.pause_at:

        def pause(step, state, metrics):
            if step == args.pause_at:
                (pathlib.Path(args.workdir) / f"paused_at_{step}").touch()
                if not loop.wait_for_preemption(timeout=300):
                    raise TimeoutError("no SIGTERM arrived")

        hooks.append(pause)
    mesh.initialize_distributed(config.distributed)  # before the task's first JAX computation
    state = loop.train_and_evaluate(config, args.workdir, tasks.make_mt_diffusion_task(config), hooks=hooks)
    print(json.dumps({"final_step": int(state.step), "preempted": loop.preemption_requested()}))


def _sharding_child(args) -> None:
    """One train step of the tiny model on 1 device, 8-way data parallel and 2 x 4 data + fsdp."""
    import jax

    from mmdiff_jax import tasks
    from mmdiff_jax.training import config_io
    from mmdiff_jax.training import mesh as mesh_lib
    from mmdiff_jax.training import state as state_lib
    from mmdiff_jax.training import steps as steps_lib

    config = tiny_config(args.arrays)
    config.data.batch_size = 16
    task = tasks.make_mt_diffusion_task(config)
    loss_fn, init_params = task.loss_fn, task.init_params
    optimizer, learning_rate_fn = state_lib.make_optimizer(config.optim, config.train.steps)
    local_batch = next(config_io.make_train_iterator(config))
    results = {"devices": jax.device_count(), "seconds": {}}
    reference = None
    initial = None
    for name, shape, devices in (
        ("single", (1, 1), jax.devices()[:1]),
        ("data", (8, 1), None),
        ("data_fsdp", (2, 4), None),
    ):
        start = time.perf_counter()
        mesh = mesh_lib.make_mesh(shape, devices)
        if initial is None:  # initialised once, then laid out on each mesh
            initial, shardings = state_lib.create_train_state(
                init_params, optimizer, mesh, jax.random.key(0), fsdp_min_size=256
            )
            initial = jax.device_get(initial)
        _, shardings = state_lib.train_state_shardings(
            init_params, optimizer, mesh, jax.random.key(0), fsdp_min_size=256
        )
        state = jax.device_put(initial, shardings)
        step = steps_lib.jit_train_step(
            mesh, shardings, loss_fn=loss_fn, optimizer=optimizer, learning_rate_fn=learning_rate_fn, ema_decay=0.9
        )
        batch = mesh_lib.global_batch(local_batch, mesh_lib.batch_sharding(mesh))
        new_state, metrics = step(state, batch)
        leaves = {
            jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path((new_state.params, new_state.opt_state))[0]
        }
        values = {key: np.asarray(jax.device_get(leaf)) for key, leaf in leaves.items()}
        sharded = {
            key: [list(leaf.sharding.spec), list(leaf.addressable_shards[0].data.shape), list(leaf.shape)]
            for key, leaf in leaves.items()
            if leaf.ndim
        }
        entry = {
            "loss": float(metrics["loss"]),
            "grad_norm": float(metrics["grad_norm"]),
            "sharding": sharded,
            "batch_shard_shape": list(batch[config.model.primary].addressable_shards[0].data.shape),
        }
        if reference is None:
            reference = values
        else:
            entry["max_param_difference"] = max(float(np.max(np.abs(values[k] - reference[k]))) for k in values)
            entry["max_param_scale"] = max(float(np.max(np.abs(reference[k]))) for k in values)
        results[name] = entry
        results["seconds"][name] = time.perf_counter() - start
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train")
    train.add_argument("workdir")
    train.add_argument("arrays")
    train.add_argument("--steps", type=int, default=20)
    train.add_argument("--pause-at", type=int, default=0)
    sharding = commands.add_parser("sharding")
    sharding.add_argument("arrays")
    arguments = parser.parse_args()
    if arguments.command == "train":
        _train_child(arguments)
    else:
        _sharding_child(arguments)
