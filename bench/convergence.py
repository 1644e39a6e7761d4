"""Time to quality of the training recipes (prediction target, loss weighting by t, learned variance) on the
masked_pretrain model.

  .venv/bin/python bench/convergence.py [--steps 800] [--points 4] [--recipes eps v ... v_zero_snr]
      [--num_samples 128] [--workdir workdirs/convergence]

Every recipe trains the masked_pretrain CPU default's MT-Diffusion model (configs/masked_pretrain.py: U-Net,
data, optimizer, EMA, seed) for the same `--steps` (the learning-rate schedule decays over them), so at equal
steps the recipes have had the same training wall time on this machine (measured and reported: the loss is
a few element-wise operations of the same forward and backward pass). At `--points` evenly spaced steps it
measures, on the EMA parameters, with the config's sampler (DPM-Solver++ 2M, 15 steps):
  FID-proxy     `--num_samples` joint samples (nothing observed) against the config's reference test images,
                Fashion-MNIST CNN features; the same prior noise for every recipe and point
  PSNR hidden   restoration of the config's curve batch (mask ratio 0.5, 96 test images, guidance 2), the
                masked image observed, no re-imposition (`experiments.restoration.restoration_metric`)
Recipes: 'eps' (the library default: eps target, uniform t), 'v' (v target), 'eps_min_snr' / 'v_min_snr' (the same
with min-SNR-5 weighting), 'v_learned' (v target, ADM's learned variance and hybrid loss; docs/design.md section 3d),
'v_importance' (v target, t drawn by ADM's loss-second-moment resampler, `mmdiff_jax.resample`), 'v_zero_snr' (v
target, the linear schedule rescaled to zero terminal SNR, `schedules.rescale_zero_terminal_snr`).
The sampler reads no variance, so for 'v_learned' the measurements show what the hybrid loss does to the mean. Training time: wall seconds since the recipe's start
(its compilation included), the measurements excluded; warmup is capped at half of --steps.
Prints a table, writes bench/results/convergence_<host>.json and .png (both metrics against training
minutes). Runs resume from their checkpoints in --workdir (measured points are kept). Recipes not in
--recipes keep their rows from an existing JSON of this host (its `runs` lists the environment and
arguments of every run the rows come from), so one recipe can be added without re-running the others.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import common as bench_common  # noqa: E402
from configs.masked_pretrain import get_config  # noqa: E402
from experiments import evaluation, restoration, trainer  # noqa: E402
from mmdiff_jax import sampling, tasks  # noqa: E402
from mmdiff_jax.training import train_and_evaluate, writers  # noqa: E402

RECIPES = {  # name -> (model.prediction, loss.time_weighting, model.learn_variance, loss.time_sampling,
    #                   diffusion.zero_terminal_snr)
    "eps": ("eps", "uniform", False, "uniform", False),
    "v": ("v", "uniform", False, "uniform", False),
    "eps_min_snr": ("eps", "min_snr", False, "uniform", False),
    "v_min_snr": ("v", "min_snr", False, "uniform", False),
    "v_learned": ("v", "uniform", True, "uniform", False),
    "v_importance": ("v", "uniform", False, "importance", False),
    "v_zero_snr": ("v", "uniform", False, "uniform", True),
}
LABELS = {
    "eps": "eps, uniform t",
    "v": "v, uniform t",
    "eps_min_snr": "eps, min-SNR-5",
    "v_min_snr": "v, min-SNR-5",
    "v_learned": "v, learned variance (hybrid loss)",
    "v_importance": "v, importance-sampled t",
    "v_zero_snr": "v, zero terminal SNR",
}


class Points:
    """A training hook: at `steps`, the training seconds so far (measurements excluded) and every metric of
    `metric_fns` on the EMA params, kept in `path` (JSON, step -> values) so a resumed run keeps them."""

    def __init__(self, path: pathlib.Path, steps, metric_fns):
        self.path, self.steps, self.metric_fns = path, set(steps), metric_fns
        self.points = {int(k): v for k, v in json.loads(path.read_text()).items()} if path.exists() else {}
        self.start, self.measuring = time.perf_counter(), 0.0
        self.offset = max((p["train_seconds"] for p in self.points.values()), default=0.0)

    def __call__(self, step, state, metrics) -> None:
        del metrics
        if step not in self.steps:
            return
        jax.block_until_ready(state.ema_params)
        begin = time.perf_counter()
        values = {"train_seconds": self.offset + begin - self.start - self.measuring}
        values.update({name: float(fn(state.ema_params)) for name, fn in self.metric_fns.items()})
        self.measuring += time.perf_counter() - begin
        self.points[step] = values
        print(f"  step {step}: {values}", flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({str(k): v for k, v in sorted(self.points.items())}, indent=1) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--num_samples", type=int, default=128)
    parser.add_argument("--workdir", default="workdirs/convergence")
    args = parser.parse_args(argv)

    base = get_config("")
    base.train.update(steps=args.steps, eval_every=0, checkpoint_every=args.steps, progress_bar=False)
    base.optim.warmup_steps = min(base.optim.warmup_steps, args.steps // 2)
    base.sample.every = 0
    classifier = evaluation.metrics_classifier(base)
    section = base.experiment.unconditional
    reference = evaluation.reference_features(base, section.num_reference, classifier)
    curve = base.experiment.curve
    curve_batch = restoration.curve_batch(base)
    steps = trainer.curve_steps(args.steps, args.points)
    sample_key = jax.random.key(base.experiment.seed)

    results = {}
    for name in args.recipes:
        config = trainer.copy_config(base)
        prediction, weighting, learn_variance, sampling_of_t, zero_terminal_snr = RECIPES[name]
        config.model.update(prediction=prediction, learn_variance=learn_variance)
        config.loss.update(time_weighting=weighting, time_sampling=sampling_of_t)
        config.diffusion.zero_terminal_snr = zero_terminal_snr
        task = tasks.make_mt_diffusion_task(config)
        sample = sampling.make_sample_fn(
            task.model, task.schedule, **evaluation.sampler_options(config.experiment.sampler)
        )

        def fid(params, sample=sample):
            images = sample(params, sample_key, batch_size=args.num_samples).image
            return evaluation.evaluate_metrics(
                section.metrics, [{"sample": np.asarray(images)}], classifier, reference_features=reference
            )["fid_fmnist_cnn"]

        metric_fns = {"fid_proxy": fid, "psnr_hidden": restoration.restoration_metric(task, config, curve_batch)}
        workdir = pathlib.Path(args.workdir) / name
        points = Points(workdir / "points.json", steps, metric_fns)
        print(f"[convergence] {name} ({LABELS[name]})", flush=True)
        train_and_evaluate(config, workdir, task, hooks=[points])
        results[name] = points.points

    run = dict(environment=bench_common.environment(), args=vars(args))
    rows = [
        dict(recipe=name, step=step, train_minutes=values["train_seconds"] / 60, **{k: values[k] for k in metric_fns})
        for name, points in results.items()
        for step, values in sorted(points.items())
    ]
    path = bench_common.results_path("convergence")
    earlier = json.loads(path.read_text()) if path.exists() else {}
    kept = [row for row in earlier.get("rows", []) if row["recipe"] not in results and row["recipe"] in RECIPES]
    runs = []  # the environment and arguments of every run the rows come from
    if kept:  # the recipes not re-run keep their rows
        runs = earlier.get("runs") or [{"environment": earlier["environment"], "args": earlier["args"]}]
        run["kept"] = sorted({row["recipe"] for row in kept})
        print(f"[convergence] kept from {path}: {run['kept']}")
    rows = kept + rows
    print(bench_common.table(rows, ["recipe", "step", "train_minutes", "fid_proxy", "psnr_hidden"]))
    bench_common.write_json(path, dict(runs=[*runs, run], rows=rows))
    recipes = list(dict.fromkeys(row["recipe"] for row in rows))
    panels = [
        writers.plot_series(
            {
                LABELS[name]: {round(row["train_minutes"], 2): row[key] for row in rows if row["recipe"] == name}
                for name in recipes
            },
            xlabel="training minutes (measurements excluded)",
            ylabel=label,
            log_y=False,
            title=title,
        )
        for key, label, title in (
            ("fid_proxy", "FID-proxy (lower is better)", f"joint samples ({args.num_samples})"),
            ("psnr_hidden", "PSNR hidden (dB)", f"restoration, mask ratio {curve.mask_ratio:g}, guidance"),
        )
    ]
    writers.write_png(path.with_suffix(".png"), np.concatenate(panels, axis=1))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
