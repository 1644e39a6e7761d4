"""Every benchmark, one after another, each in its own process; one JSON for the machine.

  .venv/bin/python bench/run_all.py            # train_step, vs_torch, sampling (each script's default run)
  .venv/bin/python bench/run_all.py --quick    # the same, shortened
  .venv/bin/python bench/run_all.py --only train_step,vs_torch,sampling,input_pipeline
  .venv/bin/python bench/run_all.py --vs_torch_args="--pairs matched,project"   # extra flags per benchmark

Writes bench/results/<hostname>.json: per benchmark the command, exit status, wall time and the JSON the
benchmark wrote (its own bench/results/<name>_<hostname>.json stays too). A benchmark whose script is
absent (bench/sampling.py comes with the sampling work) or whose requirement is missing (PyTorch for
vs_torch) is recorded as skipped with the reason. This script never starts JAX itself, so on a GPU every
benchmark gets the whole device.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import shlex
import socket
import subprocess
import sys
import time

BENCH = pathlib.Path(__file__).resolve().parent
RESULTS = BENCH / "results"

# name -> (script, full-run flags, quick-run flags). Each script writes bench/results/<name>_<host>.json.
BENCHMARKS = {
    "train_step": ("train_step.py", [], ["--quick"]),
    "vs_torch": ("vs_torch.py", [], ["--quick"]),
    "sampling": (
        "sampling.py",
        [],
        ["--configs", "tiny", "default", "--batch_size", "16", "--repeats", "1", "--max_seconds", "60"],
    ),
    "input_pipeline": ("input_pipeline.py", [], ["--num_batches", "10"]),
}


def skip_reason(name: str) -> str | None:
    script = BENCH / BENCHMARKS[name][0]
    if not script.exists():
        return f"{script.relative_to(BENCH.parent)} does not exist (yet)"
    if name == "vs_torch" and importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed (benchmark-only extra: pip install torch==2.13.0)"
    return None


def run(name: str, extra: list[str], quick: bool, timeout: float) -> dict:
    script, full, short = BENCHMARKS[name]
    reason = skip_reason(name)
    if reason:
        print(f"[run_all] {name}: skipped, {reason}", flush=True)
        return {"skipped": reason}
    command = [sys.executable, str(BENCH / script)] + (short if quick else full) + extra
    result_path = RESULTS / f"{name}_{socket.gethostname()}.json"
    before = result_path.stat().st_mtime if result_path.exists() else None
    print(f"[run_all] {name}: {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    try:
        completed = subprocess.run(command, cwd=BENCH.parent, timeout=timeout)
        status = completed.returncode
    except subprocess.TimeoutExpired:
        status = "timeout"
    record = {"command": shlex.join(command), "status": status, "wall_s": time.perf_counter() - start}
    fresh = result_path.exists() and result_path.stat().st_mtime != before
    if fresh:
        record["result_file"] = str(result_path.relative_to(BENCH.parent))
        record["result"] = json.loads(result_path.read_text())
    else:
        record["error"] = f"{result_path.name} was not written by this run"
    print(f"[run_all] {name}: status {status}, {record['wall_s']:.0f} s", flush=True)
    return record


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="each benchmark's short setting")
    parser.add_argument(
        "--only", default="train_step,vs_torch,sampling", help=f"comma-separated subset of {list(BENCHMARKS)}"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark")
    for name in BENCHMARKS:
        parser.add_argument(f"--{name}_args", default="", help=f"extra flags for {BENCHMARKS[name][0]}")
    parser.add_argument("--out", default="", help="default bench/results/<hostname>.json")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; known: {list(BENCHMARKS)}")

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load_before = list(os.getloadavg())
    benchmarks = {
        name: run(name, shlex.split(getattr(args, f"{name}_args")), args.quick, args.timeout) for name in names
    }
    payload = {
        "machine": socket.gethostname(),
        "started_utc": started,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "quick": args.quick,
        "benchmarks": benchmarks,
    }
    path = pathlib.Path(args.out) if args.out else RESULTS / f"{socket.gethostname()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"[run_all] wrote {path}")
    summary = [f"{name}: {record.get('skipped') or record.get('status')}" for name, record in benchmarks.items()]
    print("[run_all] " + "; ".join(summary))
    return payload


if __name__ == "__main__":
    main()
