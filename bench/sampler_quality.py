"""Sample quality against model evaluations: DDIM and DPM-Solver++ on the trained masked_pretrain model.

  .venv/bin/python bench/sampler_quality.py --workdir workdirs/masked_pretrain \
      [--steps 5 10 15 20 25 50 100] [--samplers ddim 2M] [--num_samples 256] [--num_restore 96]

Needs the masked_pretrain CPU default's trained MT-Diffusion model in --workdir (`python -m
experiments.masked_pretrain --workdir ...`; its mt_diffusion/ run is restored, never trained further).
For every sampler and number of solver steps K (K model calls, plus the one prior-refinement call every
sampler makes: K + 1 evaluations):
  FID-proxy     joint samples (nothing observed), `--num_samples` with the same prior noise for every row,
                against the masked_pretrain config's reference set of test images (Fashion-MNIST CNN features)
  PSNR hidden   restoration at mask ratio `--mask_ratio` (the masked image observed, no re-imposition, no
                guidance), `--num_restore` test images, the same masks for every row
Then the samplers' overhead: the wall time of one compiled sampler call at K = `--overhead_steps`, batch
`--batch_size`, over (K + 1) x the time of one compiled forward pass (`MTDiffusion.predict`) at that batch
(medians of `--repeats` calls after a warm-up; compilation excluded).
Samplers: 'ddim' (eta = 0) and DPM-Solver++ variants '2M', '3M', '2S' (time-uniform steps, the same steps
as DDIM; '2S' makes a second call on every step but the last, counted in its evaluations).
Prints a table, writes bench/results/sampler_quality_<host>.json and .png (both panels in one picture);
`--overhead_only` measures the overhead alone (sampler_overhead_<host>.json).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import common as bench_common  # noqa: E402
from configs.masked_pretrain import get_config  # noqa: E402
from experiments import evaluation, trainer  # noqa: E402
from mmdiff_jax import sampling, tasks  # noqa: E402
from mmdiff_jax.sampling import dpm_solver  # noqa: E402
from mmdiff_jax.modalities import MASK_KEY  # noqa: E402
from mmdiff_jax.training import writers  # noqa: E402

LABELS = {"ddim": "DDIM (eta = 0)", "2M": "DPM-Solver++ 2M", "3M": "DPM-Solver++ 3M", "2S": "DPM-Solver++ 2S"}


def sampler_options(name: str, steps: int) -> dict:
    if name == "ddim":
        return dict(method="ddim", num_steps=steps, eta=0.0)
    return dict(method="dpm_solver++", num_steps=steps, variant=name)


def evaluations(name: str, steps: int, schedule) -> int:
    """Model calls of one sample: the prior refinement, then the solver's (`dpm_solver.model_calls`; DDIM: one
    per step)."""
    return 1 + (steps if name == "ddim" else dpm_solver.model_calls(schedule, steps, name))


def median_seconds(function, repeats: int) -> float:
    jax.block_until_ready(function())  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="workdirs/masked_pretrain")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 15, 20, 25, 50, 100])
    parser.add_argument("--samplers", nargs="+", default=["ddim", "2M"], choices=sorted(LABELS))
    parser.add_argument("--num_samples", type=int, default=256)
    parser.add_argument("--num_restore", type=int, default=96)
    parser.add_argument("--mask_ratio", type=float, default=0.25)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--overhead_steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--overhead_only",
        action="store_true",
        help="only the overhead ratio (bench/results/sampler_overhead_<host>.json)",
    )
    args = parser.parse_args(argv)
    if args.num_samples % args.batch_size:
        raise SystemExit(f"--num_samples {args.num_samples} must be a multiple of --batch_size {args.batch_size}")

    config = get_config("")
    run_dir = pathlib.Path(args.workdir) / "mt_diffusion"
    if trainer.latest_checkpoint_step(run_dir) != config.train.steps:
        raise SystemExit(
            f"{run_dir} holds no finished masked_pretrain model ({config.train.steps} steps); run "
            f"python -m experiments.masked_pretrain --workdir {args.workdir} first"
        )
    task = tasks.make_mt_diffusion_task(config)
    trained = trainer.train_model("mt_diffusion", config, run_dir, task)  # restores the finished run
    model, schedule, params = trained.model, trained.schedule, trained.params
    classifier = evaluation.metrics_classifier(config)
    section = config.experiment.unconditional
    reference = evaluation.reference_features(config, section.num_reference, classifier)
    restoration = config.experiment.restoration
    masked = tasks.modality_name(config, "masked_image")
    restore_batches = evaluation.eval_batches(
        config, args.num_restore, args.num_restore, mask_ratio=args.mask_ratio, transform_seed=args.seed
    )
    truth = np.concatenate([b[config.model.primary] for b in restore_batches])
    mask = np.concatenate([b[MASK_KEY] for b in restore_batches])
    num_batches = args.num_samples // args.batch_size

    rows = []
    for name in [] if args.overhead_only else args.samplers:
        for steps in args.steps:
            options = sampler_options(name, steps)
            sample = sampling.make_sample_fn(model, schedule, **options)
            restore = sampling.make_restore_fn(model, schedule, masked, repaint=False, **options)
            start = time.perf_counter()
            joint = evaluation.map_batches(
                lambda index, rng: sample(params, rng, batch_size=args.batch_size).image,
                range(num_batches),
                seed=args.seed,
            )
            restored = evaluation.map_batches(
                lambda b, rng: restore(params, b[masked], b[MASK_KEY], rng).image, restore_batches, seed=args.seed
            )
            seconds = time.perf_counter() - start
            restored = mask * truth + (1.0 - mask) * restored
            fid = evaluation.evaluate_metrics(
                section.metrics, [{"sample": joint}], classifier, reference_features=reference
            )["fid_fmnist_cnn"]
            psnr = evaluation.evaluate_metrics(
                restoration.metrics, [{"image": truth, "sample": restored, "mask": mask}], classifier
            )["psnr_masked"]
            rows.append(
                dict(
                    sampler=name,
                    steps=steps,
                    evaluations=evaluations(name, steps, schedule),
                    fid_proxy=fid,
                    psnr_hidden=psnr,
                    seconds_with_compile=seconds,
                )
            )
            print(rows[-1], flush=True)

    # Overhead: a compiled sampler call over (evaluations x one compiled forward pass), same batch.
    rng = jax.random.key(0)
    z = jax.random.normal(rng, (args.batch_size,) + model.z_shape)
    t = jnp.full((args.batch_size,), 500, jnp.int32)
    forward = jax.jit(lambda params, z, t: model.apply({"params": params}, z, t, {}, method=model.predict).prediction)
    forward_s = median_seconds(lambda: forward(params, z, t), args.repeats)
    overhead = []
    for name in args.samplers:
        sample = sampling.make_sample_fn(model, schedule, **sampler_options(name, args.overhead_steps))
        calls = evaluations(name, args.overhead_steps, schedule)
        sample_s = median_seconds(
            lambda sample=sample: sample(params, rng, batch_size=args.batch_size).z_0, args.repeats
        )
        overhead.append(
            dict(
                sampler=name,
                steps=args.overhead_steps,
                evaluations=calls,
                sample_seconds=sample_s,
                forward_seconds=forward_s,
                ratio=sample_s / (calls * forward_s),
            )
        )
        print(overhead[-1], flush=True)

    print(
        bench_common.table(overhead, ["sampler", "steps", "evaluations", "sample_seconds", "forward_seconds", "ratio"])
    )
    if args.overhead_only:
        path = bench_common.write_json(
            bench_common.results_path("sampler_overhead"),
            dict(environment=bench_common.environment(), args=vars(args), overhead=overhead),
        )
        print(f"wrote {path}")
        return
    print(bench_common.table(rows, ["sampler", "steps", "evaluations", "fid_proxy", "psnr_hidden"]))
    panels = [
        writers.plot_series(
            {
                LABELS[name]: {row["evaluations"]: row[key] for row in rows if row["sampler"] == name}
                for name in args.samplers
            },
            xlabel="model evaluations",
            ylabel=label,
            log_y=False,
            title=title,
        )
        for key, label, title in (
            ("fid_proxy", "FID-proxy", f"joint samples ({args.num_samples})"),
            ("psnr_hidden", "PSNR hidden (dB)", f"restoration, mask ratio {args.mask_ratio:g} ({args.num_restore})"),
        )
    ]
    path = bench_common.results_path("sampler_quality")
    writers.write_png(path.with_suffix(".png"), np.concatenate(panels, axis=1))
    bench_common.write_json(
        path,
        dict(
            environment=bench_common.environment(),
            workdir=str(args.workdir),
            model_steps=trained.steps,
            args=vars(args),
            results=rows,
            overhead=overhead,
        ),
    )
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
