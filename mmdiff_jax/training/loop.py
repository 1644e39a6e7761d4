"""`train_and_evaluate(config, workdir, task)`: the one training path (init or resume, step, log, evaluate,
sample, checkpoint), the same program on one CPU, eight devices or many hosts.

Workdir: `config.json` (the resolved config of the latest launch; an earlier, different one is kept as
`config.<n>.json`), `checkpoints/<step>/`, `metrics.jsonl`, `tensorboard/`, `samples/*.png`, `loss.png`.

Guards (big_vision's pattern): `jax.transfer_guard` around the step; a NaN/inf loss or gradient norm is
recorded inside the step (the update is skipped) and noticed at the next log or checkpoint, where the run
stops with `NonFiniteLossError` naming the first bad step; no checkpoint is written after it, so the last
one holds finite params. SIGTERM (preemption) finishes the current step, saves and returns normally; in a
multi-process run JAX's preemption sync manager picks the step at which all processes save.

What is trained is a `Task` (`training.task`; built by `mmdiff_jax.tasks`: MT-Diffusion, plain DDPM, the
baselines): the same optimizer, EMA, sharding, checkpoints, logs, evaluation and progress bar for every one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np

from mmdiff_jax.training import checkpoint as checkpoint_lib
from mmdiff_jax.training import config_io, writers
from mmdiff_jax.training import mesh as mesh_lib
from mmdiff_jax.training import state as state_lib
from mmdiff_jax.training import steps as steps_lib
from mmdiff_jax.training.state import TrainState
from mmdiff_jax.training.task import Task

Hook = Callable[[int, TrainState, dict], None]
_EVAL_SEED_OFFSET, _SAMPLE_SEED_OFFSET = 1_000_003, 2_000_003
_preemption = threading.Event()


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN or infinite."""


def preemption_requested() -> bool:
    """True once this process got SIGTERM during `train_and_evaluate` (single-process runs)."""
    return _preemption.is_set()


@contextlib.contextmanager
def _sigterm_saves(enabled: bool):
    """SIGTERM sets the preemption flag instead of killing the process (restored on exit)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    _preemption.clear()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: _preemption.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def save_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """workdir/config.json; a previous, different config.json is kept as config.<n>.json."""
    workdir.mkdir(parents=True, exist_ok=True)
    text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
    path = workdir / "config.json"
    if path.exists() and path.read_text() != text:
        index = 1
        while (workdir / f"config.{index}.json").exists():
            index += 1
        path.rename(workdir / f"config.{index}.json")
    path.write_text(text)


def _first_nonfinite_step(state: TrainState) -> int:
    return int(jax.device_get(state.first_nonfinite_step))


class _Run:
    """State of one call of `train_and_evaluate` (kept off the module so runs do not share anything)."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: pathlib.Path,
        task: Task,
        train_iterator_fn: Callable[[ml_collections.ConfigDict], Iterator] | None,
    ):
        self.config, self.workdir, self.task = config, workdir, task
        self.multi_process = mesh_lib.initialize_distributed(config.distributed)
        config_io.validate_config(config)
        self.chief = jax.process_index() == 0
        if self.chief:
            save_config(config, workdir)
        self.mesh = mesh_lib.make_mesh(config.mesh.shape)
        self.optimizer, self.learning_rate_fn = state_lib.make_optimizer(config.optim, config.train.steps)
        self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
        self.train_iterator = (train_iterator_fn or config_io.make_train_iterator)(config)
        self.checkpointer = checkpoint_lib.Checkpointer(
            workdir / "checkpoints",
            signature=json.loads(json.dumps(task.signature)),
            save_every=config.train.checkpoint_every,
            save_steps=config.train.checkpoint_steps,
            keep=config.train.keep_checkpoints,
            best_metric=config.train.best_metric,
            best_mode=config.train.best_mode,
            async_save=config.train.async_checkpointing,
        )
        self.writer = writers.MetricWriter(workdir, enabled=self.chief)
        self._eval_batches: list[dict[str, jax.Array]] | None = None

    def key(self, seed: int) -> jax.Array:
        return jax.random.key(seed, impl=self.config.prng_impl)

    def initial_state(self) -> tuple[TrainState, TrainState]:
        rng = self.key(self.config.seed)
        init_params, fsdp_min_size = self.task.init_params, self.config.mesh.fsdp_min_size
        init_loss_state = self.task.init_loss_state
        abstract, shardings = state_lib.train_state_shardings(
            init_params, self.optimizer, self.mesh, rng, fsdp_min_size=fsdp_min_size, init_loss_state=init_loss_state
        )
        latest = self.checkpointer.latest_step()
        if latest is not None:
            logging.info("Resuming from %s/%d", self.checkpointer.directory, latest)
            state = self.checkpointer.restore(abstract, self.train_iterator, latest)
        else:
            state, shardings = state_lib.create_train_state(
                init_params,
                self.optimizer,
                self.mesh,
                rng,
                fsdp_min_size=fsdp_min_size,
                shardings=shardings,
                init_loss_state=init_loss_state,
            )
        return state, shardings

    def eval_batches(self) -> list[dict[str, jax.Array]]:
        """The evaluation batches (global arrays), read once and reused: the same examples every time."""
        if self._eval_batches is None:
            with config_io.make_eval_iterator(self.config) as iterator:
                self._eval_batches = [
                    mesh_lib.global_batch(batch, self.batch_sharding)
                    for _, batch in zip(range(self.config.train.eval_batches), iterator, strict=False)
                ]
            if not self._eval_batches:
                raise ValueError(
                    f"eval split {self.config.data.eval_split!r} gave no batch of {self.config.data.eval_batch_size}"
                )
        return self._eval_batches

    def evaluate(self, eval_step: Callable, state: TrainState) -> dict[str, float]:
        totals = None
        base = self.key(self.config.seed + _EVAL_SEED_OFFSET)
        for index, batch in enumerate(self.eval_batches()):
            metrics = eval_step(state, batch, jax.random.fold_in(base, index))
            totals = metrics if totals is None else jax.tree.map(lambda a, b: a + b, totals, metrics)
        count = len(self.eval_batches())
        return {f"eval/{name}": float(value) / count for name, value in jax.device_get(totals).items()}

    def draw_samples(self, sample_fns: dict[str, Callable], state: TrainState, step: int) -> None:
        rng = self.key(self.config.seed + _SAMPLE_SEED_OFFSET)
        for draw in sample_fns.values():
            for name, images in jax.device_get(draw(state.ema_params, self.eval_batches()[0], rng)).items():
                self.writer.write_image(step, name, writers.image_grid(np.asarray(images)))

    def nonfinite_error(self, bad_step: int, step: int, metrics: dict | None = None) -> NonFiniteLossError:
        self.checkpointer.wait_until_finished()
        latest = self.checkpointer.latest_step()
        seen = ""
        if metrics is not None:
            seen = f" (at step {step}: loss={metrics.get('loss')}, grad_norm={metrics.get('grad_norm')})"
        where = (
            f"the last checkpoint, step {latest} in {self.checkpointer.directory}, holds finite params"
            if latest is not None
            else "no checkpoint was written"
        )
        return NonFiniteLossError(
            f"loss or gradient norm became NaN/inf at step {bad_step}{seen}; that update was skipped and the run "
            f"stops at step {step} without saving; {where}. Check batch number {bad_step} of the run's data "
            f"stream, the learning rate, or the compute dtype."
        )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    task: Task,
    *,
    hooks: Sequence[Hook] = (),
    train_iterator_fn: Callable[[ml_collections.ConfigDict], Iterator] | None = None,
) -> TrainState:
    """Trains `task` with `config`'s trainer sections in `workdir`, resuming from its latest checkpoint.

    A multi-process run calls `mesh.initialize_distributed(config.distributed)` before building the task
    (the first JAX computation must come after it): `python -m mmdiff_jax.train` and the experiments do.

    Args:
      config: a ConfigDict with the trainer's sections (`config_io.base_config()`) and the task's.
      workdir: the run directory (created).
      task: what is trained (`mmdiff_jax.tasks`, e.g. `make_mt_diffusion_task(config)`).
      hooks: called after every step as hook(step, state, metrics) (device values: fetching syncs).
      train_iterator_fn: config -> this process's training batch iterator (numpy dicts with
        get_state/set_state); default `config_io.make_train_iterator`.
    Returns:
      The final train state (after `train.steps` steps, or at the step where SIGTERM stopped the run).
    Raises:
      NonFiniteLossError: the loss or gradient norm became NaN/inf (names the step).
      checkpoint.CheckpointMismatchError: the workdir's checkpoint belongs to a different model.
      config_io.ConfigError: an invalid config (before anything is compiled).
    """
    run = _Run(config, pathlib.Path(workdir), task, train_iterator_fn)
    train, total = config.train, config.train.steps
    progress = None
    try:
        state, shardings = run.initial_state()
        step = int(jax.device_get(state.step))
        logging.info(
            "Model: %d parameters; mesh %s; %d processes; step %d of %d",
            state_lib.count_params(state.params),
            dict(run.mesh.shape),
            jax.process_count(),
            step,
            total,
        )
        train_step = steps_lib.jit_train_step(
            run.mesh,
            shardings,
            loss_fn=task.loss_fn,
            optimizer=run.optimizer,
            learning_rate_fn=run.learning_rate_fn,
            ema_decay=config.optim.ema_decay,
            accumulation_steps=config.optim.grad_accumulation_steps,
            checksum_key=config.model.primary if train.log_batch_checksum else None,
            prng_impl=config.prng_impl,
        )
        eval_step = steps_lib.jit_eval_step(run.mesh, shardings, task.loss_fn)
        sample_fns = {}
        if config.sample.every > 0 and task.make_sample_fns is not None:
            sample_fns = task.make_sample_fns(run.mesh)
        progress = writers.Progress(total, step, enabled=run.chief and train.progress_bar)
        with _sigterm_saves(not run.multi_process):
            while step < total:
                batch = mesh_lib.global_batch(next(run.train_iterator), run.batch_sharding)
                with jax.transfer_guard(train.transfer_guard):
                    state, metrics = train_step(state, batch)
                step += 1
                for hook in hooks:
                    hook(step, state, metrics)
                progress.update(step)
                preempted = preemption_requested() or run.checkpointer.reached_preemption(step)
                final = step == total
                last = final or preempted  # log and save; a preempted run skips evaluation and samples

                if step % train.log_every == 0 or last:
                    values = jax.device_get(metrics)
                    bad = _first_nonfinite_step(state)
                    if bad >= 0:
                        raise run.nonfinite_error(bad, step, values)
                    values["steps_per_second"] = progress.rate(step)
                    progress.show(loss=values["loss"], steps_per_s=values["steps_per_second"])
                    run.writer.write_scalars(step, values)

                eval_metrics = None
                if train.eval_every and (step % train.eval_every == 0 or final):
                    eval_metrics = run.evaluate(eval_step, state)
                    run.writer.write_scalars(step, eval_metrics)
                if sample_fns and (step % config.sample.every == 0 or final):
                    run.draw_samples(sample_fns, state, step)

                due = train.checkpoint_every and step % train.checkpoint_every == 0
                if last or due or step in train.checkpoint_steps:
                    bad = _first_nonfinite_step(state)
                    if bad >= 0:
                        raise run.nonfinite_error(bad, step)
                    run.checkpointer.save(step, state, run.train_iterator, metrics=eval_metrics, force=last)
                if preempted:
                    logging.warning(
                        "Preempted (SIGTERM): saved step %d in %s; exiting.", step, run.checkpointer.directory
                    )
                    break
        run.checkpointer.wait_until_finished()
        if run.chief:
            writers.plot_losses(run.workdir / "metrics.jsonl", run.workdir / "loss.png")
        return state
    finally:
        if progress is not None:
            progress.close()
        run.checkpointer.wait_until_finished()
        run.checkpointer.close()
        run.writer.close()
        if hasattr(run.train_iterator, "close"):  # its prefetch threads and workers (a data.DataIterator)
            run.train_iterator.close()


def wait_for_preemption(timeout: float) -> bool:
    """Blocks until SIGTERM arrives or `timeout` seconds pass (for hooks in tests and tools)."""
    deadline = time.monotonic() + timeout
    while not preemption_requested() and time.monotonic() < deadline:
        time.sleep(0.02)
    return preemption_requested()
