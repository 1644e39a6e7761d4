"""The run of an experiment and its CLI: the config, the workdir, timed phases, the trained models, the report.

An experiment is configs/<name>.py (a `get_config(preset)` with presets '', 'tiny', 'full': configs/presets.py)
plus experiments/<name>.py, which adds only its metrics and baselines. The shared machinery is split by job:

  common      Run, run_experiment, main (this module)
  trainer     train_model, Trained, MetricCurve: a task through `train_and_evaluate`, its EMA params
  evaluation  eval_batches, map_batches, the sampler section, the metrics' classifier and evaluators
  reporting   Report, markdown tables, labelled image grids
  checks      the experiment section, checked before anything trains
  machine     the hardware, git commit and load a run reports
  conditioning, baselines   the conditioned model against its ablations; the baselines' configs and samplers
  restoration the restoration methods masked_pretrain compares

    from experiments import common, evaluation, reporting
    from mmdiff_jax import sampling

    def run(config, run: common.Run) -> None:
        mt = run.train("mt_diffusion", config, run.task)  # the config's task; resumes, or restores
        classifier = evaluation.metrics_classifier(config)
        sample = sampling.make_sample_fn(mt.model, mt.schedule, **evaluation.sampler_options(config.experiment.sampler, run.mesh))
        with run.phase("unconditional samples"):
            images = evaluation.map_batches(lambda i, rng: sample(mt.params, rng, batch_size=128).image,
                                            range(4), seed=1, desc="samples", mesh=run.mesh)
        run.report.metrics["unconditional"] = evaluation.evaluate_metrics(
            ["fid"], [{"image": ref, "sample": images}], classifier)
        run.report.table("Unconditional samples", ["model", "FID-proxy"], [["MT-Diffusion", 12.3]])
        run.report.image("samples", reporting.labelled_grid([("MT-Diffusion", images[:10])]), publish=True)

    if __name__ == "__main__":
        common.main("<name>", run)

API:
  main(name, run_fn, check=None)         the CLI (absl): --config (default configs/<name>.py; a preset:
                                         configs/<name>.py:tiny or :full), --config.x=y overrides,
                                         --workdir (default workdirs/<name>), --results_dir (copy for git);
                                         a SIGTERM while training saves, stops and exits 0 (rerun resumes)
  run_experiment(name, run_fn, config, workdir, results_dir=None, command=None, check=None) -> Run
                                         the same, no flags (tests); the config is checked before
                                         anything trains (`checks`; `check`: the experiment's own)
  Run        .config, .task (the config's MT-Diffusion task, built once), .mesh (the trainer's, built once:
             pass it to `evaluation.map_batches`), .chief (process 0 writes the files), .workdir, .report,
             .phase(name) (times a block), .train(name, config, task, hooks)

Workdir (default workdirs/<name>, git-ignored): one directory per trained model (train_and_evaluate's
layout: checkpoints/, tensorboard/, metrics.jsonl, samples/, loss.png, config.json), the experiment's
config.json, grids/<name>.png, metrics.json and report.md. `--results_dir` copies report.md,
metrics.json and the published grids (never checkpoints or logs). Running again in the same workdir
resumes every model from its latest checkpoint; finished models are only restored.
"""

from __future__ import annotations

import contextlib
import pathlib
import resource
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence

import jax
import ml_collections

from experiments import machine
from experiments.checks import Check, check_experiment_section
from experiments.reporting import Report, markdown_table
from experiments.trainer import Preempted, Trained, train_model
from mmdiff_jax import tasks
from mmdiff_jax.training import Task, initialize_distributed
from mmdiff_jax.training.loop import save_config
from mmdiff_jax.training.mesh import make_mesh


class Run:
    """One invocation of an experiment: its config, workdir, report, timings and trained models."""

    def __init__(
        self, name: str, config: ml_collections.ConfigDict, task: Task, workdir: str | pathlib.Path, command: str
    ):
        self.name, self.config, self.task, self.command = name, config, task, command
        self.workdir = pathlib.Path(workdir)
        self.chief = jax.process_index() == 0  # the process that writes the experiment's files
        self.mesh = make_mesh(config.mesh.shape)  # the trainer's mesh: evaluation splits its batches over it
        if self.chief:
            save_config(config, self.workdir)
        self.report = Report(name, self.workdir, write_files=self.chief)
        self.timings: dict[str, float] = {}
        self.trained: dict[str, Trained] = {}
        self._start, self._monitor = time.perf_counter(), machine.LoadMonitor()

    @contextlib.contextmanager
    def phase(self, name: str):
        """Times the block as `name` (wall seconds, in the report and metrics.json)."""
        print(f"[{self.name}] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        print(f"[{self.name}] {name}: {self.timings[name]:.0f} s", file=sys.stderr, flush=True)

    def train(
        self, name: str, config: ml_collections.ConfigDict, task: Task, hooks: Sequence[Callable] = ()
    ) -> Trained:
        """`train_model(name, config, workdir / name, task, hooks)`, timed and recorded (the report's training
        table names its loss by `task.loss_description`)."""
        with self.phase(f"train {name}"):
            trained = train_model(name, config, self.workdir / name, task, hooks=hooks)
        self.trained[name] = trained
        return trained

    def _training_table(self) -> list[str]:
        rows, records = [], {}
        for name, trained in self.trained.items():
            final = trained.final_metrics()
            records[name] = {
                "loss": trained.task.loss_description,
                "num_params": trained.num_params,
                "steps": trained.steps,
                "batch_size": trained.config.data.batch_size,
                "train_seconds": trained.train_seconds,
                "resumed_from": trained.resumed_from,
                "final": final,
            }
            note = "" if trained.resumed_from is None else f" (resumed at {trained.resumed_from})"
            rows.append(
                [
                    name,
                    f"{trained.num_params:,}",
                    trained.steps,
                    trained.config.data.batch_size,
                    trained.task.loss_description,
                    final.get("loss", float("nan")),
                    f"{trained.train_seconds / 60:.1f}{note}",
                ]
            )
        self.report.metrics["training"] = records
        if not rows:
            return []
        return [
            markdown_table(
                "Training (same backbone, steps, batch, optimizer and EMA for every model)",
                ["model", "parameters", "steps", "batch", "training loss", "final train loss", "wall time (min)"],
                rows,
                notes=["Final losses differ in kind from row to row: compare them within a row only."],
            )
        ]

    def finish(self, results_dir: str | pathlib.Path | None = None) -> None:
        """Writes report.md and metrics.json (with timings, load, hardware, command); copies them and the
        published grids to `results_dir` if given."""
        wall = time.perf_counter() - self._start
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        cpu = sum(u.ru_utime + u.ru_stime for u in usage)
        load = self._monitor.stop()
        info = machine.hardware()
        run_info = {
            "command": self.command,
            "preset": self.config.get("preset", ""),
            "wall_seconds": wall,
            "cpu_seconds": cpu,
            "phases_seconds": self.timings,
            "load_average_1min": load,
            "hardware": info,
            "git_commit": machine.git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        training = self._training_table()
        self.report.metrics = {"run": run_info, **self.report.metrics}
        phases = ", ".join(f"{name} {seconds / 60:.1f}" for name, seconds in self.timings.items())
        cores = info.get("usable_cores", info["cpu_count"])
        header = [
            f"Command: `{self.command}`",
            f"Wall time: **{wall / 60:.1f} min** on {cores} {info['backend'].upper()} core(s) "
            f"({info.get('cpu', 'unknown CPU')}, {info.get('memory_gib', '?')} GiB); process CPU time "
            f"{cpu / 60:.1f} min. Phases (min): {phases}.",
            machine.load_sentence(load, cores),
        ]
        footer = training + [
            f"Config preset `{run_info['preset'] or 'default'}`; full config in the workdir's "
            f"`config.json`. git {run_info['git_commit']}, JAX {info['jax']}, Python "
            f"{info['python']}, {run_info['date']}."
        ]
        self.report.write(header, footer)
        if not self.chief:
            return
        print(
            f"[{self.name}] wrote {self.workdir / 'report.md'} and metrics.json ({wall / 60:.1f} min)",
            file=sys.stderr,
            flush=True,
        )
        if results_dir:
            results = pathlib.Path(results_dir)
            (results / "grids").mkdir(parents=True, exist_ok=True)
            for name in ("report.md", "metrics.json"):
                shutil.copyfile(self.workdir / name, results / name)
            for image in self.report.images.values():
                if image["publish"]:
                    shutil.copyfile(self.workdir / image["path"], results / image["path"])


def run_experiment(
    name: str,
    run_fn: Callable[[ml_collections.ConfigDict, Run], None],
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    results_dir: str | pathlib.Path | None = None,
    command: str | None = None,
    check: Check | None = None,
) -> Run:
    """Runs `run_fn(config, run)` in `workdir` and writes its report (the CLI without flags). The config's
    MT-Diffusion task (`run.task`) is built here, once, and the whole config checked before anything trains
    (the experiment section by `checks.check_experiment_section` and `check`; config_io.ConfigError naming
    the key)."""
    initialize_distributed(config.distributed)  # before the first JAX computation
    task = tasks.make_mt_diffusion_task(config)
    check_experiment_section(config, task.schedule, check)
    command = command or f"run_experiment({name!r}, preset={config.get('preset', '')!r})"
    run = Run(name, config, task, workdir, command)
    run_fn(config, run)
    run.finish(results_dir)
    return run


def main(
    name: str,
    run_fn: Callable[[ml_collections.ConfigDict, Run], None],
    default_config: str | None = None,
    check: Check | None = None,
) -> None:
    """`python -m experiments.<name> [--config=...[:preset]] [--config.x=y] [--workdir=...] [--results_dir=...]`."""
    from absl import app, flags
    from ml_collections import config_flags

    from mmdiff_jax.training import cli

    with cli.defining_flags():  # a default config file is parsed, with the --config.x=y overrides, right here
        config_flag = config_flags.DEFINE_config_file(
            "config",
            str(default_config or machine.REPO / "configs" / f"{name}.py"),
            "Experiment config (a get_config(preset) module; FILE:tiny / FILE:full pick a preset).",
            lock_config=True,
        )
    workdir = flags.DEFINE_string("workdir", f"workdirs/{name}", "Run directory: models, logs, grids, report.")
    results_dir = flags.DEFINE_string(
        "results_dir", "", "Also copy report.md, metrics.json and the published grids here (e.g. results/<name>)."
    )

    def run_main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        cli.check_directory_flag("workdir", workdir.value)
        if results_dir.value:
            cli.check_directory_flag("results_dir", results_dir.value)
        config = cli.config_value(flags.FLAGS[config_flag.name])
        command = shlex.join(["python", "-m", f"experiments.{name}", *sys.argv[1:]])
        try:
            run_experiment(name, run_fn, config, workdir.value, results_dir.value or None, command, check)
        except Preempted as stop:  # exit status 0, as `python -m mmdiff_jax.train` after a preemption
            print(f"[{name}] {stop}; the same command resumes the experiment.", file=sys.stderr, flush=True)

    cli.run(run_main)  # flag mistakes: one line naming the flag (MMDIFF_DEBUG=1: the traceback)
