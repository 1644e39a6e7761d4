"""Input-pipeline throughput (examples/s) of the configs' transforms on Fashion-MNIST at batch 128.

  .venv/bin/python bench/input_pipeline.py [--data_dir DIR] [--num_batches 40]

Prints a table and writes `bench/results/input_pipeline_<hostname>.json`.
Compare each pipeline number with the training step's examples/s: the
pipeline must be faster. The real MT-Diffusion training step is timed by the
training benchmark; until it exists, this script times a STAND-IN, a jitted
forward + backward + SGD update of a 3-layer conv net (32/64/64 channels,
3x3) on a [128, S, S, 1] batch, clearly labelled as such in the output. The
real U-Net step is heavier, so the stand-in is an upper bound on the step's
examples/s (a pessimistic comparison for the pipeline).

Prepares Fashion-MNIST in `--data_dir` (TFDS default if omitted) if needed,
and trains the default embedding encoder there once if absent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import socket
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# Run from a checkout without installing: the repository root goes first.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from mmdiff_jax import data  # noqa: E402

PIPELINES = (  # config.data.transforms on the fashion_mnist() source
    "pad(32)|value_range()",
    "pad(32)|value_range()|masked_image(kind='patch', ratio=0.5)",
    "pad(32)|value_range()|masked_image(kind='pixel', ratio=0.5)",
    "scenes(64)|value_range()",
    "pad(32)|value_range()|embedding()",
)


def pipeline_throughput(transforms, args) -> float:
    iterator = data.make_dataset(
        "fashion_mnist()",
        "train",
        transforms=transforms,
        batch_size=args.batch_size,
        seed=0,
        data_dir=args.data_dir,
        num_threads=args.num_threads,
    )
    for _ in range(args.warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(args.num_batches):
        next(iterator)
    return args.num_batches * args.batch_size / (time.perf_counter() - start)


def stand_in_train_step_throughput(image_size: int, args) -> float:
    """examples/s of a small conv net's jitted SGD step: a STAND-IN."""
    key = jax.random.key(0)
    shapes = [(3, 3, 1, 32), (3, 3, 32, 64), (3, 3, 64, 64), (3, 3, 64, 1)]
    params = [jax.random.normal(k, s) * 0.05 for k, s in zip(jax.random.split(key, len(shapes)), shapes)]

    def loss_fn(params, images):
        hidden = images
        for i, kernel in enumerate(params):
            hidden = jax.lax.conv_general_dilated(
                hidden, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            if i < len(params) - 1:
                hidden = jax.nn.gelu(hidden)
        return jnp.mean((hidden - images) ** 2)

    @jax.jit
    def step(params, images):
        grads = jax.grad(loss_fn)(params, images)
        return [p - 1e-3 * g for p, g in zip(params, grads)]

    images = jnp.asarray(
        np.random.default_rng(0).uniform(-1, 1, (args.batch_size, image_size, image_size, 1)), jnp.float32
    )
    params = jax.block_until_ready(step(params, images))  # compile
    steps = max(3, args.num_batches // 8)
    start = time.perf_counter()
    for _ in range(steps):
        params = step(params, images)
    jax.block_until_ready(params)
    return steps * args.batch_size / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_batches", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--num_threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    data.prepare_fashion_mnist(args.data_dir)
    data.ensure_default_embeddings(args.data_dir)
    rows = []
    for transforms in PIPELINES:
        size = data.dataset_spec("fashion_mnist()", "train", transforms, args.data_dir).features["image"][0][0]
        rows.append(
            {
                "dataset": f"fashion_mnist() | {transforms}",
                "image_size": int(size),
                "examples_per_s": round(pipeline_throughput(transforms, args), 1),
            }
        )
    stand_in = {
        str(size): round(stand_in_train_step_throughput(size, args), 1)
        for size in sorted({row["image_size"] for row in rows})
    }

    print(
        f"batch {args.batch_size}, {args.num_batches} batches, "
        f"{args.num_threads} threads, {os.cpu_count()} CPUs, "
        f"{jax.devices()[0].platform}"
    )
    print(f"{'dataset':<52} {'pipeline ex/s':>14} {'stand-in step ex/s':>19}")
    for row in rows:
        print(f"{row['dataset']:<52} {row['examples_per_s']:>14.0f} {stand_in[str(row['image_size'])]:>19.0f}")
    print("stand-in step: jitted fwd+bwd+SGD of a 3-layer conv net, NOT the MT-Diffusion step")

    result = {
        "host": socket.gethostname(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "platform": jax.devices()[0].platform,
        "batch_size": args.batch_size,
        "num_batches": args.num_batches,
        "num_threads": args.num_threads,
        "pipelines": rows,
        "stand_in_train_step_examples_per_s_by_image_size": stand_in,
        "stand_in_train_step_description": (
            "STAND-IN, not the MT-Diffusion model: jitted forward+backward+SGD "
            "of conv 32/64/64/1 (3x3, GELU) on [batch, S, S, 1]"
        ),
        "mt_diffusion_train_step_examples_per_s": ("TODO: from the training benchmark (not measured here)"),
    }
    out = pathlib.Path(
        args.out or pathlib.Path(__file__).parent / "results" / f"input_pipeline_{socket.gethostname()}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
