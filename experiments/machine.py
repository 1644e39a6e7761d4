"""The machine a run ran on, for its report: hardware, the git commit, the load while it ran."""

from __future__ import annotations

import contextlib
import os
import pathlib
import platform
import subprocess
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def hardware() -> dict[str, Any]:
    """CPU model, cores, memory, JAX backend and devices of this process."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d.device_kind) for d in jax.devices()],
    }
    with contextlib.suppress(OSError):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, StopIteration):
        text = pathlib.Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    with contextlib.suppress(OSError, StopIteration):
        text = pathlib.Path("/proc/meminfo").read_text()
        kib = int(next(line.split()[1] for line in text.splitlines() if line.startswith("MemTotal")))
        info["memory_gib"] = round(kib / 2**20, 1)
    return info


def git_commit() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    return ""


class LoadMonitor:
    """Samples the 1-minute load average every `interval` s in a daemon thread (other users' work shows)."""

    def __init__(self, interval: float = 10.0):
        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval):
        while not self._stop.wait(interval):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self.samples.append(os.getloadavg()[0])
        return {
            "start": self.samples[0],
            "end": self.samples[-1],
            "mean": float(np.mean(self.samples)),
            "max": float(np.max(self.samples)),
        }


def load_sentence(load: Mapping[str, float], cores: int) -> str:
    """The report's line on machine load: whether other jobs shared the cores (the run alone loads about
    `cores`: XLA runs one thread per core; the 1-minute average lags, so the mean decides)."""
    shared = load["mean"] > cores + 0.5
    verdict = (
        "other jobs shared the cores, so an idle machine runs faster"
        if shared
        else "about what this run alone puts on the cores"
    )
    return (
        f"Machine load (1-min load average, sampled every 10 s, this run included): mean {load['mean']:.1f}, "
        f"max {load['max']:.1f}, at start {load['start']:.1f}: {verdict}."
    )
