"""Training-step benchmark of the tiny, default and ADM-64 configs (image + class label, T = 1000).

  .venv/bin/python bench/train_step.py                 # CPU: tiny, default; GPU: tiny, default, adm64
  .venv/bin/python bench/train_step.py --quick         # tiny and default, fewer repeats
  .venv/bin/python bench/train_step.py --configs adm64 # CPU: batch 1, 2 single-step repeats (~6 min)
  .venv/bin/python bench/train_step.py --configs default --batch_size 32 --repeats 10
  .venv/bin/python bench/train_step.py --dtype bfloat16 --configs adm64   # on a GPU: bf16 compute, MFU

Times the project's train step (`mmdiff_jax.training.steps.jit_train_step`: clip -> AdamW -> EMA, state
donated) on a fixed device-resident batch, or with `--step minimal` the bare value_and_grad + AdamW step.
Per config, in a fresh process (so the memory peak is that config's): compile time (lower + compile, the
timed steps never compile), the first execution, steady-state seconds per step over `--repeats` blocks of
`--steps` steps (each block dispatches its steps with no host sync, then waits once; min / median / max),
images/s, FLOPs per step from XLA's cost analysis of the compiled step, the achieved FLOP/s and its
fraction of a matmul peak measured in the same process on the same device (a jit-ed [N, N] @ [N, N] in
the compute dtype), the process's peak resident memory (ru_maxrss: the whole process, including
compilation), and the device's peak memory on a GPU.

Prints a table; writes bench/results/train_step_<hostname>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402
import trainers  # noqa: E402

from mmdiff_jax.models.unet import REMAT_POLICIES  # noqa: E402

# Children get the environment as it was; this parent process only asks JAX which backend it has, and on
# a GPU must not preallocate the memory its children need.
CHILD_ENVIRONMENT = dict(os.environ)

COLUMNS = (
    "config",
    "params",
    "batch",
    "dtype",
    "compile_s",
    "step_s_min",
    "step_s_median",
    "step_s_max",
    "images_per_s",
    "gflops_per_step",
    "achieved_gflops_per_s",
    "matmul_peak_gflops_per_s",
    "fraction_of_peak",
    "host_peak_mib",
    "device_peak_mib",
)


def bench_one(name: str, args: argparse.Namespace) -> dict:
    """Compile and time one config in this process."""
    batch_size = args.batch_size or common.default_batch_size(name)
    cpu_adm = name == "adm64" and common.backend() == "cpu"
    steps, repeats = (args.steps, args.repeats) if not cpu_adm else (1, min(args.repeats, 2))
    model, schedule = common.build_model(name, args.dtype, remat=args.remat)
    batch = common.make_batch(name, batch_size)
    make = trainers.project_trainer if args.step == "project" else trainers.minimal_trainer
    trainer = make(model, schedule, batch)
    compile_s = trainer.compile()
    flops = trainer.flops()
    first_step_s, _ = common.time_call(lambda: trainer.run(1))
    if args.warmup_steps and not cpu_adm:
        trainer.run(args.warmup_steps)
    seconds = common.time_blocks(trainer.run, steps, repeats)
    loss = trainer.loss()  # read back after the timed blocks only
    peak = common.matmul_peak(args.matmul_size or (2048 if common.backend() == "cpu" else 8192), args.dtype)
    stats = common.summarize(seconds)
    achieved = flops / stats["median"] if flops else None
    device_memory = common.device_memory_mb()
    return {
        "config": name,
        "params": trainer.num_params,
        "batch": batch_size,
        "dtype": args.dtype,
        "remat": args.remat,
        "image_shape": list(common.BENCH_CONFIGS[name]["z_shape"]),
        "step": trainer.description,
        "compile_s": compile_s,
        "first_step_s": first_step_s,
        "steps_per_block": steps,
        "step_s": stats,
        "step_s_min": stats["min"],
        "step_s_median": stats["median"],
        "step_s_max": stats["max"],
        "images_per_s": batch_size / stats["median"],
        "images_per_s_range": [batch_size / stats["max"], batch_size / stats["min"]],
        "flops_per_step": flops,
        "gflops_per_step": flops / 1e9 if flops else None,
        "achieved_gflops_per_s": achieved / 1e9 if achieved else None,
        "matmul_peak": peak,
        "matmul_peak_gflops_per_s": peak["flops_per_s"] / 1e9,
        "fraction_of_peak": achieved / peak["flops_per_s"] if achieved else None,
        "host_peak_mib": common.peak_host_memory_mb(),
        "device_memory_mib": device_memory,
        "device_peak_mib": (device_memory or {}).get("peak_bytes_in_use"),
        "final_loss": loss,
        "load_average_after": common.load_average(),
    }


def run_child(name: str, args: argparse.Namespace) -> dict:
    """bench_one in a fresh interpreter (its own memory peak and XLA caches)."""
    with tempfile.TemporaryDirectory() as directory:
        out = pathlib.Path(directory) / "row.json"
        command = [
            sys.executable,
            __file__,
            "--_child",
            name,
            "--_child_out",
            str(out),
            "--dtype",
            args.dtype,
            "--step",
            args.step,
            "--steps",
            str(args.steps),
            "--repeats",
            str(args.repeats),
            "--warmup_steps",
            str(args.warmup_steps),
            "--matmul_size",
            str(args.matmul_size),
            "--batch_size",
            str(args.batch_size),
            f"--remat={args.remat}",
        ]
        completed = subprocess.run(command, timeout=args.timeout, env=CHILD_ENVIRONMENT)
        if completed.returncode or not out.exists():
            return {"config": name, "error": f"child exited with status {completed.returncode}"}
        return json.loads(out.read_text())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs",
        default="",
        help="comma-separated of tiny,default,adm64; default: tiny,default "
        "on CPU (adm64 compiles for minutes there), all three elsewhere",
    )
    parser.add_argument("--quick", action="store_true", help="tiny and default, 3 repeats of 2 steps")
    parser.add_argument("--batch_size", type=int, default=0, help="0: per config and backend (see common.py)")
    parser.add_argument("--dtype", default="float32", choices=sorted(common.DTYPES))
    parser.add_argument("--step", default="project", choices=("project", "minimal"))
    parser.add_argument(
        "--remat",
        default="",
        choices=sorted(REMAT_POLICIES),
        help="UNetConfig.remat: '' (off) or a jax.checkpoint policy around every block",
    )
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks")
    parser.add_argument("--warmup_steps", type=int, default=1, help="after the first execution")
    parser.add_argument("--matmul_size", type=int, default=0, help="0: 2048 on CPU, 8192 on GPU")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per config")
    parser.add_argument("--out", default="", help="JSON path; default bench/results/train_step_<host>.json")
    parser.add_argument("--_child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--_child_out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._child:
        common.write_json(args._child_out, bench_one(args._child, args))
        return {}
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # read when the backend starts (below), not at import
    if args.quick:
        args.configs, args.steps, args.repeats = args.configs or "tiny,default", 2, 3
    args.configs = args.configs or ("tiny,default" if common.backend() == "cpu" else "tiny,default,adm64")
    names = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = sorted(set(names) - set(common.BENCH_CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {sorted(common.BENCH_CONFIGS)}")

    environment = common.environment()
    rows = []
    for name in names:
        print(f"[train_step] {name} ...", flush=True)
        rows.append(run_child(name, args))
        print(common.table(rows[-1:], COLUMNS) if "error" not in rows[-1] else rows[-1], flush=True)
    payload = {
        "benchmark": "train_step",
        "environment": environment,
        "load_average_after": common.load_average(),
        "settings": {key: value for key, value in vars(args).items() if not key.startswith("_")},
        "notes": [
            "step_s: seconds per step, min/median/max over repeats of blocks of steps_per_block steps, "
            "dispatched without host sync, one block_until_ready per block; compile excluded",
            "flops_per_step: XLA cost analysis of the compiled step (forward, backward, optimizer)",
            "fraction_of_peak: achieved FLOP/s (median step) / best matmul FLOP/s in the same process",
            "host_peak_mib: ru_maxrss of the config's own process (includes compilation)",
        ],
        "rows": rows,
    }
    print("\n" + common.table([row for row in rows if "error" not in row], COLUMNS))
    path = common.write_json(args.out or common.results_path("train_step"), payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
