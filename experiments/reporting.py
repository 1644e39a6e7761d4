"""What a report holds: markdown tables, PNG grids of images, report.md and metrics.json.

Report     .metrics (nested dict -> metrics.json), .text(md), .table(title, columns, rows, notes),
           .image(name, grid, caption, publish), .write(header, footer)
markdown_table(title, columns, rows, notes, digits)
labelled_grid(rows), tint_hidden(images, mask), overlay_classes(images, class_map), to_rgb(images)
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont


_PALETTE = (
    np.array(
        [
            (31, 119, 180),
            (255, 127, 14),
            (44, 160, 44),
            (214, 39, 40),
            (148, 103, 189),
            (140, 86, 75),
            (227, 119, 194),
            (127, 127, 127),
            (188, 189, 34),
            (23, 190, 207),
        ],
        np.float32,
    )
    / 127.5
    - 1.0
)


def to_rgb(images: np.ndarray) -> np.ndarray:
    """[N, H, W, 1 or 3] in [-1, 1] -> [N, H, W, 3]."""
    images = np.asarray(images, np.float32)
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def tint_hidden(images: np.ndarray, mask: np.ndarray, color=(-1.0, -0.25, 0.75)) -> np.ndarray:
    """Masked inputs for display: RGB [N, H, W, 3], hidden pixels (mask 0) painted `color` (default blue)."""
    mask = np.asarray(mask, np.float32)[..., :1]
    return to_rgb(images) * mask + np.asarray(color, np.float32) * (1.0 - mask)


def overlay_classes(images: np.ndarray, class_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Segmentation masks drawn on images: class c > 0 blended in palette colour c - 1; 0 (background) clear."""
    rgb = to_rgb(images)
    class_map = np.asarray(class_map)
    colours = _PALETTE[(np.maximum(class_map, 1) - 1) % len(_PALETTE)]
    weight = alpha * (class_map > 0)[..., None]
    return rgb * (1.0 - weight) + colours * weight


def labelled_grid(rows: Sequence[tuple], scale: int = 2, padding: int = 2) -> np.ndarray:
    """A grid with one labelled row per entry, uint8 RGB [H', W', 3].

    rows: (label, images [N, H, W, C] in [-1, 1]) or (label, images, captions: N strings drawn under the
    images, e.g. generated class names). Rows may have different N; images are upscaled `scale` x.
    """
    font = ImageFont.load_default()
    rows = [tuple(row) + (None,) * (3 - len(row)) for row in rows]
    height, width = np.asarray(rows[0][1]).shape[1:3]
    cell_h, cell_w = height * scale, width * scale
    caption_h = 12 if any(row[2] is not None for row in rows) else 0
    label_w = 8 + max(int(font.getlength(str(row[0]))) for row in rows)
    columns = max(len(row[1]) for row in rows)
    row_h = cell_h + caption_h + padding
    canvas = Image.new("RGB", (label_w + columns * (cell_w + padding) + padding, len(rows) * row_h + padding), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images, captions) in enumerate(rows):
        top = padding + r * row_h
        draw.text((4, top + cell_h // 2 - 5), str(label), fill="black", font=font)
        pixels = np.round((np.clip(to_rgb(images), -1, 1) + 1) * 127.5).astype(np.uint8)
        for c, image in enumerate(pixels):
            left = label_w + padding + c * (cell_w + padding)
            canvas.paste(Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST), (left, top))
            if captions is not None:
                draw.text((left, top + cell_h), str(captions[c])[: max(cell_w // 6, 3)], fill="black", font=font)
    return np.asarray(canvas)


def _format(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(
    title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]], notes: Sequence[str] = (), digits: int = 3
) -> str:
    """A markdown table (floats with `digits` decimals) under an optional '## title', notes as a list below."""
    lines = [f"## {title}", ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join(" --- " for _ in columns) + "|")
    lines += ["| " + " | ".join(_format(v, digits) for v in row) + " |" for row in rows]
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines)


class Report:
    """Numbers (`metrics`, nested dicts -> metrics.json) and a markdown report built in order. `write_files`
    False (every process of a multi-process run but the first) builds the same report and writes nothing."""

    def __init__(self, title: str, workdir: pathlib.Path, write_files: bool = True):
        self.title, self.workdir, self.write_files = title, workdir, write_files
        self.metrics: dict[str, Any] = {}
        self.sections: list[str] = []
        self.images: dict[str, dict[str, Any]] = {}

    def text(self, markdown: str) -> None:
        self.sections.append(markdown.strip())

    def table(
        self,
        title: str | None,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        notes: Sequence[str] = (),
        digits: int = 3,
    ) -> str:
        """Adds `markdown_table(...)` to the report and returns it."""
        markdown = markdown_table(title, columns, rows, notes, digits)
        self.sections.append(markdown)
        return markdown

    def feature_space_tables(
        self, title: str, results: Mapping[str, Mapping[str, float]], spaces: Sequence[str]
    ) -> None:
        """One FID / precision / recall table per feature space other than 'fmnist_cnn' (e.g. 'inception_v3',
        asked for in config.experiment.feature_spaces); rows: row label -> that row's metrics."""
        for space in spaces:
            if space != "fmnist_cnn":
                self.table(
                    f"{title}, {space} features",
                    ["samples", "FID ↓", "precision ↑", "recall ↑"],
                    [
                        [label] + [metrics.get(f"{m}_{space}") for m in ("fid", "precision", "recall")]
                        for label, metrics in results.items()
                    ],
                )

    def image(self, name: str, grid: np.ndarray, caption: str = "", publish: bool = False) -> pathlib.Path:
        """Writes grids/<name>.png; published ones are shown in report.md ('## Sample grids', after the sections)
        and copied by --results_dir, the others listed by path."""
        path = self.workdir / "grids" / f"{name}.png"
        if self.write_files:
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(grid, np.uint8)).save(path, optimize=True)
        self.images[name] = {"path": str(path.relative_to(self.workdir)), "caption": caption, "publish": publish}
        return path

    def write(self, header: Sequence[str], footer: Sequence[str]) -> None:
        """report.md: title, header, the sections in order, '## Sample grids' (published images shown, the
        others listed by path), footer; and metrics.json."""
        grids = [
            f"![{name}]({image['path']})\n\n{image['caption']}".strip()
            for name, image in self.images.items()
            if image["publish"]
        ]
        unpublished = [
            f"- `{image['path']}`: {image['caption']}" for image in self.images.values() if not image["publish"]
        ]
        if unpublished:
            grids.append("Further grids in the workdir:\n\n" + "\n".join(unpublished))
        if grids:
            grids.insert(0, "## Sample grids")
        markdown = "\n\n".join([f"# {self.title}", *header, *self.sections, *grids, *footer]) + "\n"
        if not self.write_files:
            return
        (self.workdir / "report.md").write_text(markdown)
        (self.workdir / "metrics.json").write_text(
            json.dumps(self.metrics, indent=1, sort_keys=False, default=_json_default) + "\n"
        )


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
