"""Sampling throughput (samples/s) of DDPM-1000 and DDIM-50 at batch 64, tiny and default U-Nets.

  .venv/bin/python bench/sampling.py [--configs tiny default] [--batch_size 64] [--max_seconds 900]

Model: the primary 32x32x1 image plus a 10-class label (table encoder, 'bump' weights, MLP head),
linear betas, T = 1000; joint generation (nothing observed), so every step runs the U-Net and all heads.
Times exclude compilation (compiled ahead of time, timed separately); each call is ended by
`block_until_ready`. A first call under a minute is a warm-up followed by `--repeats` timed calls (the
table gives the median); a longer first call is itself the measurement. Parameters are random (values do
not change the cost). A sampler whose projected run (from the DDIM-50 per-step time) exceeds
`--max_seconds` is measured on a shorter chain of the same kind -- DDPM on a T' = `--short_steps`
schedule -- and its time for 1000 steps is EXTRAPOLATED from the measured steps/s; such rows say so.
Prints a table and writes `bench/results/sampling_<hostname>.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import socket
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
from mmdiff_jax.modalities import Modality, modality_schedule  # noqa: E402
from mmdiff_jax.models.mt_diffusion import MTDiffusion, init_variables  # noqa: E402
from mmdiff_jax.models.unet import unet_preset  # noqa: E402
from mmdiff_jax.sampling import make_sample_fn  # noqa: E402

Z_SHAPE = (32, 32, 1)
NUM_DIFFUSION_STEPS = 1000


def build(preset: str, num_steps: int = NUM_DIFFUSION_STEPS):
    label = Modality("label", "label", (), num_classes=10, weight_schedule=("bump", 1.0))
    model = MTDiffusion(unet_preset(preset), (label,), Z_SHAPE)
    return model, modality_schedule("linear", num_steps, model.modalities)


def random_params(model: MTDiffusion, seed: int = 0):
    """Parameters of the right shapes without compiling `init` (slow on CPU): weights ~ N(0, 1/fan_in)."""
    shapes = jax.eval_shape(lambda rng: init_variables(model, rng), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        values = rng.standard_normal(leaf.shape)
        if len(leaf.shape) >= 2:
            values = values / np.sqrt(np.prod(leaf.shape[:-1]))
        elif "scale" in jax.tree_util.keystr(path):
            values = 1.0 + 0.1 * values
        else:
            values = 0.1 * values
        return jnp.asarray(values, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def measure(model, schedule, params, method, num_steps, batch_size, repeats, warmup_limit_s=60.0):
    """Compile time and the per-call times of one sampler (seconds).

    The first call (already compiled) is timed: if it took under `warmup_limit_s` it counts as the warm-up
    and `repeats` further calls are timed, else it is the measurement (a warm-up would cost as much).
    """
    sample = make_sample_fn(model, schedule, method=method, num_steps=num_steps)
    rng = jax.random.key(0)
    start = time.perf_counter()
    compiled = sample.lower(params, rng, batch_size=batch_size).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, rng))
    first = time.perf_counter() - start
    if first >= warmup_limit_s:
        return compile_s, [first]
    times = []
    for repeat in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, jax.random.key(repeat + 1)))
        times.append(time.perf_counter() - start)
    return compile_s, times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "default"])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--max_seconds",
        type=float,
        default=900.0,
        help="longest single timed DDPM-1000 call before falling back to extrapolation",
    )
    parser.add_argument(
        "--short_steps", type=int, default=25, help="T' of the shorter DDPM chain (linear betas need T' > 20)"
    )
    args = parser.parse_args(argv)

    rows = []
    for preset in args.configs:
        model, schedule = build(preset)
        params = random_params(model)
        num_params = int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)))
        # DDIM-50 (+ 1 prior refinement call: 51 network evaluations).
        compile_s, times = measure(model, schedule, params, "ddim", 50, args.batch_size, args.repeats)
        seconds = statistics.median(times)
        rows.append(
            dict(
                config=preset,
                params=num_params,
                sampler="DDIM-50",
                steps=50,
                measured_steps=50,
                compile_s=compile_s,
                seconds=seconds,
                times=times,
                samples_per_s=args.batch_size / seconds,
                steps_per_s=50 / seconds,
                extrapolated=False,
            )
        )
        projected = seconds / 51 * (NUM_DIFFUSION_STEPS + 1)
        if projected <= args.max_seconds:
            compile_s, times = measure(model, schedule, params, "ddpm", None, args.batch_size, args.repeats)
            measured_steps, seconds = NUM_DIFFUSION_STEPS, statistics.median(times)
            steps_per_s = NUM_DIFFUSION_STEPS / seconds
            extrapolated = False
        else:
            short_model, short_schedule = build(preset, args.short_steps)
            compile_s, times = measure(short_model, short_schedule, params, "ddpm", None, args.batch_size, 1)
            measured_steps = args.short_steps
            # Per-step time from the short chain (its 1 prior call spread over the steps as in the full one).
            seconds = statistics.median(times) / (args.short_steps + 1) * (NUM_DIFFUSION_STEPS + 1)
            steps_per_s = args.short_steps / statistics.median(times)
            extrapolated = True
        rows.append(
            dict(
                config=preset,
                params=num_params,
                sampler="DDPM-1000",
                steps=NUM_DIFFUSION_STEPS,
                measured_steps=measured_steps,
                compile_s=compile_s,
                seconds=seconds,
                times=times,
                samples_per_s=args.batch_size / seconds,
                steps_per_s=steps_per_s,
                extrapolated=extrapolated,
            )
        )
        print(json.dumps(rows[-2:], default=float), flush=True)

    header = (
        f"{'config':8} {'params':>9} {'sampler':10} {'batch':>5} {'compile s':>9} {'s/batch':>9} "
        f"{'samples/s':>9} {'steps/s':>8}  note"
    )
    print(header)
    for row in rows:
        note = (
            f"EXTRAPOLATED to 1000 steps from a measured DDPM-{row['measured_steps']} run"
            if row["extrapolated"]
            else "measured"
        )
        print(
            f"{row['config']:8} {row['params']:>9} {row['sampler']:10} {args.batch_size:>5} "
            f"{row['compile_s']:>9.1f} {row['seconds']:>9.2f} {row['samples_per_s']:>9.3f} "
            f"{row['steps_per_s']:>8.2f}  {note}"
        )

    host = socket.gethostname()
    payload = dict(
        host=host,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        python=platform.python_version(),
        jax=jax.__version__,
        backend=jax.default_backend(),
        devices=[str(d) for d in jax.devices()],
        cpu_count=os.cpu_count(),
        load_average=list(os.getloadavg()),
        batch_size=args.batch_size,
        z_shape=Z_SHAPE,
        modalities="image 32x32x1 (primary) + label (10 classes, bump), joint generation",
        timing="compile excluded (AOT); median of timed calls after a warm-up call (calls under 60 s), "
        "else the single first call; block_until_ready",
        results=rows,
    )
    path = REPO / "bench" / "results" / f"sampling_{host}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
