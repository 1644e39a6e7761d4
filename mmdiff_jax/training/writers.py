"""Run outputs: scalars to TensorBoard (tensorboardX) and `metrics.jsonl`, PNG image grids, a loss plot,
and a tqdm progress bar. Only process 0 writes (the others get disabled writers).

Workdir layout: `tensorboard/` (event files), `metrics.jsonl` (one {"step": s, name: value, ...} object
per line; a resumed run appends, so a step may appear twice: the later line wins), `samples/<name>_<step>.png`,
`loss.png`.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image


def image_grid(images: np.ndarray, padding: int = 1) -> np.ndarray:
    """Images in [-1, 1], [N, H, W, C] (one row) or [R, N, H, W, C] (R rows) -> uint8 grid [H', W', C]
    (C = 1 is returned as [H', W'] grey); white padding between images."""
    images = np.asarray(images, np.float32)
    if images.ndim == 4:
        images = images[None]
    rows, columns, height, width, channels = images.shape
    pixels = np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    grid = np.full(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels), 255, np.uint8
    )
    for row in range(rows):
        for column in range(columns):
            top, left = padding + row * (height + padding), padding + column * (width + padding)
            grid[top : top + height, left : left + width] = pixels[row, column]
    return grid[..., 0] if channels == 1 else grid


def write_png(path: str | pathlib.Path, grid: np.ndarray) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_series(
    series: Mapping[str, Mapping[int, float]],
    *,
    xlabel: str = "step",
    ylabel: str = "loss",
    log_y: bool | None = None,
    title: str = "",
) -> np.ndarray:
    """Line plot of named series (label -> {x: y}) as an RGB image [H, W, 3] uint8; `log_y` None: a log axis
    when every value is positive and they span more than a factor of 10."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [value for points in series.values() for value in points.values()]
    if log_y is None:
        log_y = bool(values) and min(values) > 0 and max(values) > 10 * min(values)
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        if points:
            xs = sorted(points)
            axes.plot(xs, [points[x] for x in xs], label=label, marker="." if len(xs) < 50 else None)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    if log_y:
        axes.set_yscale("log")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return image


def plot_losses(
    jsonl_path: str | pathlib.Path, png_path: str | pathlib.Path, keys: Sequence[str] = ("loss", "eval/loss")
) -> bool:
    """Loss curves from metrics.jsonl (later lines win for a repeated step) to a PNG; False if no data."""
    series: dict[str, dict[int, float]] = {key: {} for key in keys}
    for record in read_jsonl(jsonl_path):
        for key in keys:
            if key in record:
                series[key][int(record["step"])] = float(record[key])
    if not any(series.values()):
        return False
    values = [value for points in series.values() for value in points.values()]
    write_png(png_path, plot_series(series, log_y=all(value > 0 for value in values)))
    return True


class MetricWriter:
    """Scalars to TensorBoard + JSONL, image grids to PNG + TensorBoard; a no-op when not `enabled`."""

    def __init__(self, workdir: str | pathlib.Path, enabled: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.enabled = enabled
        self._tensorboard = None
        self._jsonl = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.workdir.mkdir(parents=True, exist_ok=True)
            self._tensorboard = SummaryWriter(logdir=str(self.workdir / "tensorboard"))
            self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        scalars = {name: float(value) for name, value in scalars.items()}
        for name, value in scalars.items():
            self._tensorboard.add_scalar(name, value, step)
        record = {"step": int(step), "time": time.time()}
        record.update({name: (value if math.isfinite(value) else str(value)) for name, value in scalars.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def write_image(self, step: int, name: str, grid: np.ndarray) -> pathlib.Path | None:
        """Writes samples/<name>_<step>.png and the TensorBoard image `samples/<name>`."""
        if not self.enabled:
            return None
        path = self.workdir / "samples" / f"{name.replace('/', '_')}_{int(step):08d}.png"
        write_png(path, grid)
        self._tensorboard.add_image(
            f"samples/{name}", grid if grid.ndim == 3 else grid[..., None], step, dataformats="HWC"
        )
        return path

    def flush(self) -> None:
        if self.enabled:
            self._tensorboard.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()
            self._jsonl.close()
            self.enabled = False


class Progress:
    """tqdm bar over training steps showing loss and steps/s (the rate of the last interval)."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, smoothing=0.1)
        self._last_step, self._last_time = initial, time.perf_counter()

    def update(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def rate(self, step: int) -> float:
        """Steps per second since the previous call (the loop calls it at log intervals)."""
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        return rate

    def show(self, **values: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix({name: f"{value:.4g}" for name, value in values.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
