"""Shared pieces of the benchmarks: the benchmarked model configs, timing, statistics, a matmul peak,
memory, XLA cost analysis, the environment record, tables and JSON.

Timing rule used everywhere: a *block* dispatches `steps` calls back to back with no host sync between
them, then waits once (`jax.block_until_ready`); the per-step time of a block is its wall time / steps.
A benchmark runs `repeats` blocks and reports min / median / max of the per-step times, so the spread shows
the noise (other processes on the machine, frequency changes). Compilation is timed separately
(`lower(...).compile()`), and at least one warm-up step runs before the first timed block.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import platform
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from mmdiff_jax.modalities import Modality, modality_schedule  # noqa: E402
from mmdiff_jax.models.mt_diffusion import MTDiffusion  # noqa: E402
from mmdiff_jax.models.unet import unet_preset  # noqa: E402
from mmdiff_jax.tasks.mt_diffusion import DTYPES  # noqa: E402

# The benchmarked setups: the primary image plus one class label (table encoder, 'bump' weights, MLP head
# on the bottleneck), T = 1000 linear betas. Batch sizes are per backend: CPU ones keep a step near a second.
BENCH_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(preset="tiny", z_shape=(32, 32, 1), num_classes=10, batch={"cpu": 32, "gpu": 256}),
    "default": dict(preset="default", z_shape=(32, 32, 1), num_classes=10, batch={"cpu": 16, "gpu": 256}),
    "adm64": dict(preset="adm64", z_shape=(64, 64, 3), num_classes=1000, batch={"cpu": 1, "gpu": 32}),
}
NUM_STEPS = 1000


def backend() -> str:
    return jax.default_backend()


def default_batch_size(name: str) -> int:
    return BENCH_CONFIGS[name]["batch"]["cpu" if backend() == "cpu" else "gpu"]


def build_model(name: str, dtype: str = "float32", **unet_overrides):
    """(MTDiffusion, DiffusionSchedule) of a benchmarked config: image + label."""
    spec = BENCH_CONFIGS[name]
    label = Modality(name="label", kind="label", num_classes=spec["num_classes"], weight_schedule=("bump", 1.0))
    model = MTDiffusion(
        unet=unet_preset(spec["preset"], **unet_overrides),
        modalities=(label,),
        z_shape=spec["z_shape"],
        dtype=DTYPES[dtype],
    )
    return model, modality_schedule("linear", NUM_STEPS, model.modalities)


def make_batch(name: str, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random images in [-1, 1] [B, H, W, C] float32 and labels [B] int32 (host arrays)."""
    spec = BENCH_CONFIGS[name]
    rng = np.random.default_rng(seed)
    return {
        "image": rng.uniform(-1, 1, (batch_size,) + spec["z_shape"]).astype(np.float32),
        "label": rng.integers(0, spec["num_classes"], batch_size).astype(np.int32),
    }


# Statistics and timing.


def summarize(values: Sequence[float]) -> dict[str, float]:
    values = [float(v) for v in values]
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def time_call(function: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def time_blocks(run_block: Callable[[int], None], steps: int, repeats: int) -> list[float]:
    """Per-step seconds of `repeats` blocks; run_block(steps) must dispatch `steps` steps and sync once."""
    return [time_call(lambda: run_block(steps))[0] / steps for _ in range(repeats)]


def matmul_peak(size: int = 2048, dtype: str = "float32", repeats: int = 5, inner: int = 4) -> dict[str, Any]:
    """FLOP/s of a jit-ed [size, size] @ [size, size] on the default device: the reference peak.

    Each sample runs `inner` matmuls back to back (one sync). 'flops_per_s' is the best sample (the
    least disturbed one); median and min are kept to show the noise.
    """
    keys = jax.random.split(jax.random.key(1))
    a, b = (jax.random.normal(key, (size, size), DTYPES[dtype]) for key in keys)
    matmul = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(matmul(a, b))

    def block(count):
        outputs = [matmul(a, b) for _ in range(count)]
        jax.block_until_ready(outputs)

    seconds = time_blocks(block, inner, repeats)
    flops = 2.0 * size**3
    return {
        "size": size,
        "dtype": dtype,
        "flops": flops,
        "seconds": summarize(seconds),
        "flops_per_s": flops / min(seconds),
        "flops_per_s_median": flops / statistics.median(seconds),
        "flops_per_s_min": flops / max(seconds),
    }


def cost_flops(compiled: Any) -> float | None:
    """FLOPs of a compiled computation from XLA's cost analysis (None if the backend gives none)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


# Memory.


def peak_host_memory_mb() -> float:
    """The process's peak resident set size so far (ru_maxrss; kB on Linux), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def device_memory_mb() -> dict[str, float] | None:
    """Peak and current bytes in use on the default device (GPU / TPU), in MiB; None on CPU."""
    stats = jax.devices()[0].memory_stats() if backend() != "cpu" else None
    if not stats:
        return None
    return {key: stats[key] / 2**20 for key in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit") if key in stats}


# Environment, tables, JSON.


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict[str, Any]:
    """What the numbers depend on: host, CPU, load, library versions, XLA / thread settings."""
    import flax
    import jaxlib
    import optax

    device = jax.devices()[0]
    return {
        "hostname": socket.gethostname(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": load_average(),
        "backend": backend(),
        "device": getattr(device, "device_kind", str(device)),
        "device_count": jax.device_count(),
        "versions": {
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "numpy": np.__version__,
        },
        "env": {
            key: os.environ.get(key)
            for key in ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "JAX_PLATFORMS")
            if os.environ.get(key)
        },
    }


def format_number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or math.isnan(value):
            return f"{value:g}"
        magnitude = abs(value)
        if magnitude >= 1e12 or magnitude < 1e-3:
            return f"{value:.3g}"
        return f"{value:.4g}" if magnitude < 1e4 else f"{value:,.0f}"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table (markdown pipes) of `columns` from `rows`."""
    cells = [[format_number(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)]
    render = lambda values: "| " + " | ".join(v.rjust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join(
        [render(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [render(line) for line in cells]
    )


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def results_path(stem: str) -> pathlib.Path:
    """bench/results/<stem>_<hostname>.json"""
    return RESULTS / f"{stem}_{socket.gethostname()}.json"
