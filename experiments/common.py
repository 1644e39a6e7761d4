"""Shared machinery of every experiment: train configs through the one training path, load the EMA params,
evaluate, and write `metrics.json`, `report.md` and PNG sample grids.

An experiment is configs/<name>.py (a `get_config(preset)` with presets '', 'tiny', 'full' and a `preset`
key) plus experiments/<name>.py, which adds only its metrics and baselines:

    from experiments import baselines, common

    def run(config, run: common.Run) -> None:
        mt = run.train("mt_diffusion", config)                     # train_and_evaluate; resumes, or restores
        ddpm = run.train("plain_ddpm", baselines.plain_ddpm_config(config))      # a finished model
        classifier = common.metrics_classifier(config)
        sample = sampling.make_sample_fn(mt.model, mt.schedule, **common.sampler_options(config.experiment.sampler))
        with run.phase("unconditional samples"):
            images = common.map_batches(lambda i, rng: sample(mt.params, rng, batch_size=128).image,
                                        range(4), seed=1, desc="samples")
        run.report.metrics["unconditional"] = common.evaluate_metrics(["fid"], [{"image": ref, "sample": images}],
                                                                      classifier)
        run.report.table("Unconditional samples", ["model", "FID-proxy"], [["MT-Diffusion", 12.3]])
        run.report.image("samples", common.labelled_grid([("MT-Diffusion", images[:10])]), publish=True)

    if __name__ == "__main__":
        common.main("<name>", run)

API:
  main(name, run_fn)                     the CLI (absl): --config (default configs/<name>.py; `:tiny` /
                                         `:full`, or --config.preset=full), --config.x=y overrides,
                                         --workdir (default workdirs/<name>), --results_dir (copy for git)
  run_experiment(name, run_fn, config, workdir, results_dir=None) -> Run     the same, no flags (tests)
  Run        .config, .workdir, .report, .phase(name) (times a block), .train(name, config, train_fn, loss)
  Trained    name, model, schedule (None for non-diffusion baselines), params (EMA), config, workdir,
             num_params, steps, train_seconds, resumed_from (checkpoint step found before training, or None),
             loss (its training loss in words)
  train_model(name, config, workdir, objective=None, model=None, schedule=None, hooks=()) -> Trained
                                        `train_and_evaluate` (MT-Diffusion, or a baseline's Objective)
                                        + its final EMA params
  MetricCurve(path, steps, metric_fn)    a training hook: metric_fn(ema_params) at `steps`, kept in path
                                        (resumable); curve_steps(total, num_points) spaces the steps
  Report     .metrics (nested dict -> metrics.json), .text(md), .table(title, columns, rows, notes),
             .image(name, grid, caption, publish)
  eval_batches(config, num_examples, batch_size, split=None, **data_options)   first examples, numpy batches
  map_batches(fn, batches, seed, desc)   fn(batch, rng) -> arrays, over batches, concatenated (numpy)
  sampler_options(section)               config sampler section -> `sampling.make_sample_fn` kwargs
  metrics_classifier(config)             the Fashion-MNIST CNN of the feature metrics (cached)
  reference_features(config, num_reference, classifier)   space -> features of the reference images, for
                                         each of config.experiment.feature_spaces ('fmnist_cnn', 'inception_v3')
  evaluate_metrics(specs, batches, classifier, reference_features=None)   config evaluator specs -> dict
  labelled_grid(rows), tint_hidden(images, mask), overlay_classes(images, class_map, num_classes)

Workdir (default workdirs/<name>, git-ignored): one directory per trained model (train_and_evaluate's
layout: checkpoints/, tensorboard/, metrics.jsonl, samples/, loss.png, config.json), the experiment's
config.json, grids/<name>.png, metrics.json and report.md. `--results_dir` copies report.md,
metrics.json and the published grids (never checkpoints or logs). Running again in the same workdir
resumes every model from its latest checkpoint; finished models are only restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import pathlib
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mmdiff_jax import metrics as metrics_lib
from mmdiff_jax.data import embeddings
from mmdiff_jax.metrics import features as features_lib
from mmdiff_jax.metrics.distribution import compute_features
from mmdiff_jax.training import Objective, config_io, train_and_evaluate
from mmdiff_jax.training.state import count_params

REPO = pathlib.Path(__file__).resolve().parents[1]
FEATURE_EVALUATORS = ("fid", "precision_recall", "feature_distribution")


# ------------------------------------------------------------------------------------------------------------ training
@dataclasses.dataclass
class Trained:
    """A trained model, ready to evaluate: `params` are the EMA params of the last step."""

    name: str
    model: Any  # MTDiffusion, or the baseline's Flax module
    schedule: Any  # DiffusionSchedule; None for models that are not diffusion models
    params: Any
    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    num_params: int
    steps: int
    train_seconds: float
    resumed_from: int | None = None  # the checkpoint step found in workdir before this run (None: fresh)
    loss: str = ""  # its training loss in words (set by `Run.train`, shown in the report)

    def final_metrics(self) -> dict[str, float]:
        """The last logged value of every scalar in workdir/metrics.jsonl (loss, eval/loss, ...)."""
        values: dict[str, float] = {}
        path = self.workdir / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.exists() else ():
            values.update({k: v for k, v in json.loads(line).items() if isinstance(v, (int, float))})
        return values


def latest_checkpoint_step(workdir: pathlib.Path) -> int | None:
    """The largest finished step directory in workdir/checkpoints, or None."""
    directory = pathlib.Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []
    return max(steps, default=None)


def train_model(name: str, config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                objective: Objective | None = None, model: Any = None, schedule: Any = None,
                hooks: Sequence[Callable] = ()) -> Trained:
    """`train_and_evaluate(config, workdir, objective=objective, hooks=hooks)` (resuming, or only restoring a
    finished run), then its EMA params. Without an objective: the config's MT-Diffusion model and schedule; with
    one, `model` is the network its params belong to (and `schedule` its diffusion schedule, if it is a diffusion
    model)."""
    workdir = pathlib.Path(workdir)
    resumed_from = latest_checkpoint_step(workdir)
    start = time.perf_counter()
    state = train_and_evaluate(config, workdir, objective=objective, hooks=hooks)
    seconds = time.perf_counter() - start
    if objective is None:
        model = config_io.build_model(config)
        schedule = config_io.build_schedule(config, model)
    return Trained(name, model, schedule, state.ema_params, config, workdir, count_params(state.params),
                   int(jax.device_get(state.step)), seconds, resumed_from)


def curve_steps(total_steps: int, num_points: int) -> list[int]:
    """`num_points` evenly spaced training steps of 1..total_steps, the last one total_steps."""
    return sorted({max(1, round(total_steps * (index + 1) / num_points)) for index in range(num_points)})


class MetricCurve:
    """A metric of the EMA params against training steps: a `train_and_evaluate` hook that calls
    metric_fn(ema_params) -> float at `steps` and keeps the points in `path` (JSON, step -> value), so a resumed
    or restored run keeps those measured before it stopped. `points`: step -> value."""

    def __init__(self, path: str | pathlib.Path, steps: Iterable[int], metric_fn: Callable[[Any], float]):
        self.path, self.steps, self.metric_fn = pathlib.Path(path), set(steps), metric_fn
        saved = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.points: dict[int, float] = {int(step): value for step, value in saved.items()}

    def __call__(self, step: int, state: Any, metrics: Any) -> None:
        del metrics
        if step in self.steps:
            self.points[step] = float(self.metric_fn(state.ema_params))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({str(k): v for k, v in sorted(self.points.items())}, indent=1) + "\n")


def diffusion_loss(config: ml_collections.ConfigDict) -> str:
    """The training loss of `config`'s MT-Diffusion model in words ("eps-MSE" for plain DDPM, N = 0)."""
    if not config.model.modalities:
        return "eps-MSE"
    recovered = [m.name for m in config_io.build_modalities(config) if m.loss in ("categorical", "gaussian")]
    return "eps-MSE + aggregation MSE" + (f" + NLL of {', '.join(recovered)}" if recovered else "")


# --------------------------------------------------------------------------------------------- data, sampling, metrics
def copy_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """An unlocked deep copy (field references resolved)."""
    return ml_collections.ConfigDict(config.to_dict())


def eval_batches(config: ml_collections.ConfigDict, num_examples: int, batch_size: int, split: str | None = None,
                 **data_options) -> list[dict[str, np.ndarray]]:
    """The first `num_examples` examples of `split` (default `config.data.eval_split`), unshuffled, as numpy
    batches of `batch_size` (a divisor of num_examples); `data_options` override `config.data.options`
    (e.g. a fixed `mask_ratio`, a `transform_seed`)."""
    if num_examples % batch_size:
        raise ValueError(f"num_examples {num_examples} is not a multiple of the batch size {batch_size}")
    config = copy_config(config)
    config.data.eval_split = split or config.data.eval_split
    config.data.options = {**config.data.options.to_dict(), **data_options}
    config.data.eval_batch_size = batch_size
    iterator = config_io.make_eval_iterator(config)
    batches = [next(iterator, None) for _ in range(num_examples // batch_size)]
    if batches[-1] is None:
        raise ValueError(f"split {config.data.eval_split!r} has fewer than {num_examples} examples")
    return batches


def map_batches(fn: Callable[[Any, jax.Array], Any], batches: Iterable[Any], seed: int,
                desc: str | None = None) -> Any:
    """fn(batch, rng_i) for each batch (rng_i = fold_in(key(seed), i)), outputs concatenated along axis 0
    as numpy (any pytree of arrays). `desc` shows a progress bar."""
    batches = list(batches)
    key = jax.random.key(seed)
    progress = None
    if desc:
        from tqdm import tqdm
        progress = tqdm(total=len(batches), desc=desc, unit="batch", dynamic_ncols=True)
    outputs = []
    for index, batch in enumerate(batches):
        outputs.append(jax.device_get(fn(batch, jax.random.fold_in(key, index))))
        if progress is not None:
            progress.update()
    if progress is not None:
        progress.close()
    return jax.tree.map(lambda *parts: np.concatenate([np.asarray(p) for p in parts]), *outputs)


def sampler_options(section: Mapping[str, Any]) -> dict[str, Any]:
    """A config sampler section {method ('ddpm' | 'ddim' | 'dpm_solver++'), num_steps, eta, variant, spacing}
    -> keyword arguments of `mmdiff_jax.sampling.make_sample_fn` / `sample_chain` (num_steps dropped for
    'ddpm', which runs all T steps)."""
    options = dict(section)
    if options.get("method") == "ddpm":
        options.pop("num_steps", None)
        options.pop("eta", None)
    return options


def describe_sampler(section: Mapping[str, Any]) -> str:
    """A config sampler section in words (method, steps and the options it uses)."""
    if section["method"] == "ddpm":
        return "DDPM (all T steps)"
    if section["method"] == "dpm_solver++":
        return (f"DPM-Solver++ ({section.get('variant', '2M')}), {section['num_steps']} steps, "
                f"{section.get('spacing', 'time_uniform').replace('_', '-')} spacing")
    return f"DDIM, {section['num_steps']} steps, eta = {section['eta']:g}"


def metrics_classifier(config: ml_collections.ConfigDict) -> features_lib.Classifier:
    """The Fashion-MNIST CNN of the feature metrics (`config.experiment.classifier`: steps, seed).

    On the real data it is `features.train_classifier` (trained once, cached beside the prepared data; the
    default 600 steps / seed 0 are the shared default classifier); with `config.data.arrays_path` (tests,
    stand-in data) it is trained on those arrays, uncached.
    """
    spec = config.experiment.classifier
    if config.data.arrays_path:
        with np.load(config.data.arrays_path) as arrays:
            images, labels = arrays["train_image"], arrays["train_label"]
        model, params = embeddings.train_embedding_encoder(images, labels, steps=spec.steps, seed=spec.seed)
        return features_lib.Classifier(model, params, {"steps": spec.steps, "seed": spec.seed,
                                                       "data": config.data.arrays_path})
    return features_lib.train_classifier(config.data.data_dir or None, config.data.options.get("idx_dir"),
                                         steps=spec.steps, seed=spec.seed)


def _evaluator_spec(spec: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        spec = dict(spec)
        return spec.pop("name"), spec
    name, kwargs = spec
    return name, dict(kwargs)


def feature_fn(space: str, classifier: features_lib.Classifier) -> features_lib.FeatureFn:
    """The feature network of a feature space: 'fmnist_cnn' (`classifier`), or a registered one such as
    'inception_v3' (its weights from $MMDIFF_INCEPTION_WEIGHTS or the default path; loaded once)."""
    return classifier.features if space == "fmnist_cnn" else _feature_network(space)


@functools.lru_cache(maxsize=None)
def _feature_network(space: str) -> features_lib.FeatureFn:
    return features_lib.get_feature_fn(space)


def reference_features(config: ml_collections.ConfigDict, num_reference: int,
                       classifier: features_lib.Classifier) -> dict[str, np.ndarray]:
    """space -> features [num_reference, D] of the first eval images, for each of
    `config.experiment.feature_spaces` (the FID / precision / recall reference set)."""
    batches = eval_batches(config, num_reference, min(num_reference, 1000))
    images = np.concatenate([b[config.model.primary] for b in batches])
    return {space: compute_features(feature_fn(space, classifier), images)
            for space in config.experiment.feature_spaces}


def evaluate_metrics(specs: Sequence[Any], batches: Iterable[Mapping[str, Any]],
                     classifier: features_lib.Classifier,
                     reference_features: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
    """`mmdiff_jax.metrics` evaluators from config specs ("name", (name, kwargs) or {"name": ...}) over
    `batches`. perceptual_fmnist_cnn gets `classifier`; a feature evaluator (fid / precision_recall /
    feature_distribution) runs in the feature space its spec names (`features`), or else once per feature
    space of `reference_features` (from `reference_features()`; default: 'fmnist_cnn' alone), against the
    reference features of that space when there are some ('fmnist_cnn' is `classifier`'s features)."""
    references = dict(reference_features or {"fmnist_cnn": None})
    evaluators = []
    for spec in specs:
        name, kwargs = _evaluator_spec(spec)
        if name == "perceptual_fmnist_cnn":
            kwargs.setdefault("classifier", classifier)
        if name in FEATURE_EVALUATORS and not callable(kwargs.get("features")):
            named = kwargs.pop("features", None)
            spaces = references if named is None else {named: references.get(named)}
            evaluators += [metrics_lib.make_evaluator(name, **kwargs, features=feature_fn(space, classifier),
                                                      feature_name=space, reference_features=reference)
                           for space, reference in spaces.items()]
        else:
            evaluators.append(metrics_lib.make_evaluator(name, **kwargs))
    return metrics_lib.evaluate(evaluators, batches)


# ------------------------------------------------------------------------------------------------------------ pictures
_PALETTE = np.array([(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                     (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)],
                    np.float32) / 127.5 - 1.0


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
    canvas = Image.new("RGB", (label_w + columns * (cell_w + padding) + padding, len(rows) * row_h + padding),
                       "white")
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


# -------------------------------------------------------------------------------------------------------------- report
def _format(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                   notes: Sequence[str] = (), digits: int = 3) -> str:
    """A markdown table (floats with `digits` decimals) under an optional '## title', notes as a list below."""
    lines = [f"## {title}", ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join(" --- " for _ in columns) + "|")
    lines += ["| " + " | ".join(_format(v, digits) for v in row) + " |" for row in rows]
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines)


class Report:
    """Numbers (`metrics`, nested dicts -> metrics.json) and a markdown report built in order."""

    def __init__(self, title: str, workdir: pathlib.Path):
        self.title, self.workdir = title, workdir
        self.metrics: dict[str, Any] = {}
        self.sections: list[str] = []
        self.images: dict[str, dict[str, Any]] = {}

    def text(self, markdown: str) -> None:
        self.sections.append(markdown.strip())

    def table(self, title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]],
              notes: Sequence[str] = (), digits: int = 3) -> str:
        """Adds `markdown_table(...)` to the report and returns it."""
        markdown = markdown_table(title, columns, rows, notes, digits)
        self.sections.append(markdown)
        return markdown

    def feature_space_tables(self, title: str, results: Mapping[str, Mapping[str, float]],
                             spaces: Sequence[str]) -> None:
        """One FID / precision / recall table per feature space other than 'fmnist_cnn' (e.g. 'inception_v3',
        asked for in config.experiment.feature_spaces); rows: row label -> that row's metrics."""
        for space in spaces:
            if space != "fmnist_cnn":
                self.table(f"{title}, {space} features", ["samples", "FID ↓", "precision ↑", "recall ↑"],
                           [[label] + [metrics.get(f"{m}_{space}") for m in ("fid", "precision", "recall")]
                            for label, metrics in results.items()])

    def image(self, name: str, grid: np.ndarray, caption: str = "", publish: bool = False) -> pathlib.Path:
        """Writes grids/<name>.png; published ones are shown in report.md ('## Sample grids', after the sections)
        and copied by --results_dir, the others listed by path."""
        path = self.workdir / "grids" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(grid, np.uint8)).save(path, optimize=True)
        self.images[name] = {"path": str(path.relative_to(self.workdir)), "caption": caption, "publish": publish}
        return path

    def write(self, header: Sequence[str], footer: Sequence[str]) -> None:
        """report.md: title, header, the sections in order, '## Sample grids' (published images shown, the
        others listed by path), footer; and metrics.json."""
        grids = [f"![{name}]({image['path']})\n\n{image['caption']}".strip()
                 for name, image in self.images.items() if image["publish"]]
        unpublished = [f"- `{image['path']}`: {image['caption']}" for image in self.images.values()
                       if not image["publish"]]
        if unpublished:
            grids.append("Further grids in the workdir:\n\n" + "\n".join(unpublished))
        if grids:
            grids.insert(0, "## Sample grids")
        markdown = "\n\n".join([f"# {self.title}", *header, *self.sections, *grids, *footer]) + "\n"
        (self.workdir / "report.md").write_text(markdown)
        (self.workdir / "metrics.json").write_text(json.dumps(self.metrics, indent=1, sort_keys=False,
                                                              default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# ------------------------------------------------------------------------------------------------------------- the run
def hardware() -> dict[str, Any]:
    """CPU model, cores, memory, JAX backend and devices of this process."""
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                            "jax": jax.__version__, "backend": jax.default_backend(),
                            "devices": [str(d.device_kind) for d in jax.devices()]}
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


def _git_commit() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    return ""


class _LoadMonitor:
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
        return {"start": self.samples[0], "end": self.samples[-1], "mean": float(np.mean(self.samples)),
                "max": float(np.max(self.samples))}


def load_sentence(load: Mapping[str, float], cores: int) -> str:
    """The report's line on machine load: whether other jobs shared the cores (the run alone loads about
    `cores`: XLA runs one thread per core; the 1-minute average lags, so the mean decides)."""
    shared = load["mean"] > cores + 0.5
    verdict = ("other jobs shared the cores, so an idle machine runs faster" if shared
               else "about what this run alone puts on the cores")
    return (f"Machine load (1-min load average, sampled every 10 s, this run included): mean {load['mean']:.1f}, "
            f"max {load['max']:.1f}, at start {load['start']:.1f}: {verdict}.")


class Run:
    """One invocation of an experiment: its config, workdir, report, timings and trained models."""

    def __init__(self, name: str, config: ml_collections.ConfigDict, workdir: str | pathlib.Path, command: str):
        self.name, self.config, self.command = name, config, command
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
        self.report = Report(name, self.workdir)
        self.timings: dict[str, float] = {}
        self.trained: dict[str, Trained] = {}
        self._start, self._monitor = time.perf_counter(), _LoadMonitor()

    @contextlib.contextmanager
    def phase(self, name: str):
        """Times the block as `name` (wall seconds, in the report and metrics.json)."""
        print(f"[{self.name}] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        print(f"[{self.name}] {name}: {self.timings[name]:.0f} s", file=sys.stderr, flush=True)

    def train(self, name: str, config: ml_collections.ConfigDict,
              train_fn: Callable[[str, ml_collections.ConfigDict, pathlib.Path], Trained] = train_model,
              loss: str | None = None) -> Trained:
        """train_fn(name, config, workdir / name) (default: `train_model`), timed and recorded; `loss` names
        its training loss in the report (default: `diffusion_loss(config)`, for MT-Diffusion / plain DDPM)."""
        with self.phase(f"train {name}"):
            trained = train_fn(name, config, self.workdir / name)
        self.trained[name] = trained
        trained.loss = loss or diffusion_loss(config)
        return trained

    def _training_table(self) -> list[str]:
        rows, records = [], {}
        for name, trained in self.trained.items():
            final = trained.final_metrics()
            records[name] = {"loss": trained.loss, "num_params": trained.num_params, "steps": trained.steps,
                             "batch_size": trained.config.data.batch_size, "train_seconds": trained.train_seconds,
                             "resumed_from": trained.resumed_from, "final": final}
            note = "" if trained.resumed_from is None else f" (resumed at {trained.resumed_from})"
            rows.append([name, f"{trained.num_params:,}", trained.steps, trained.config.data.batch_size,
                         trained.loss, final.get("loss", float("nan")),
                         f"{trained.train_seconds / 60:.1f}{note}"])
        self.report.metrics["training"] = records
        if not rows:
            return []
        return [markdown_table("Training (same backbone, steps, batch, optimizer and EMA for every model)",
                             ["model", "parameters", "steps", "batch", "training loss", "final train loss",
                              "wall time (min)"], rows,
                             notes=["Final losses differ in kind from row to row: compare them within a row only."])]

    def finish(self, results_dir: str | pathlib.Path | None = None) -> None:
        """Writes report.md and metrics.json (with timings, load, hardware, command); copies them and the
        published grids to `results_dir` if given."""
        wall = time.perf_counter() - self._start
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        cpu = sum(u.ru_utime + u.ru_stime for u in usage)
        load = self._monitor.stop()
        info = hardware()
        run_info = {"command": self.command, "preset": self.config.get("preset", ""), "wall_seconds": wall,
                    "cpu_seconds": cpu, "phases_seconds": self.timings, "load_average_1min": load,
                    "hardware": info, "git_commit": _git_commit(),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        training = self._training_table()
        self.report.metrics = {"run": run_info, **self.report.metrics}
        phases = ", ".join(f"{name} {seconds / 60:.1f}" for name, seconds in self.timings.items())
        cores = info.get("usable_cores", info["cpu_count"])
        header = [
            f"Command: `{self.command}`",
            f"Wall time: **{wall / 60:.1f} min** on {cores} {info['backend'].upper()} core(s) "
            f"({info.get('cpu', 'unknown CPU')}, {info.get('memory_gib', '?')} GiB); process CPU time "
            f"{cpu / 60:.1f} min. Phases (min): {phases}.",
            load_sentence(load, cores),
        ]
        footer = training + [f"Config preset `{run_info['preset'] or 'default'}`; full config in the workdir's "
                             f"`config.json`. git {run_info['git_commit']}, JAX {info['jax']}, Python "
                             f"{info['python']}, {run_info['date']}."]
        self.report.write(header, footer)
        print(f"[{self.name}] wrote {self.workdir / 'report.md'} and metrics.json ({wall / 60:.1f} min)",
              file=sys.stderr, flush=True)
        if results_dir:
            results = pathlib.Path(results_dir)
            (results / "grids").mkdir(parents=True, exist_ok=True)
            for name in ("report.md", "metrics.json"):
                shutil.copyfile(self.workdir / name, results / name)
            for image in self.report.images.values():
                if image["publish"]:
                    shutil.copyfile(self.workdir / image["path"], results / image["path"])


def run_experiment(name: str, run_fn: Callable[[ml_collections.ConfigDict, Run], None],
                   config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                   results_dir: str | pathlib.Path | None = None, command: str | None = None) -> Run:
    """Runs `run_fn(config, run)` in `workdir` and writes its report (the CLI without flags)."""
    run = Run(name, config, workdir, command or f"run_experiment({name!r}, preset={config.get('preset', '')!r})")
    run_fn(config, run)
    run.finish(results_dir)
    return run


# ------------------------------------------------------------------------------------------------------------- the CLI
def _load_get_config(path: str) -> Callable[[str], ml_collections.ConfigDict]:
    spec = importlib.util.spec_from_file_location("_experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config


def _set_path(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        config = config[part]
    config[leaf] = value


def resolve_preset(config_flag) -> ml_collections.ConfigDict:
    """The parsed --config; when --config.preset names another preset than the file's `:arg`, the config is
    rebuilt with get_config(preset) and the other --config.x=y overrides are applied to it again."""
    from ml_collections import config_flags

    config = config_flag.value
    path, _, built_with = config_flags.get_config_filename(config_flag).partition(":")
    if "preset" not in config or config.preset == built_with:
        return config
    rebuilt = _load_get_config(path)(config.preset)
    for key, value in config_flags.get_override_values(config_flag).items():
        if key != "preset":
            _set_path(rebuilt, key, value)
    return rebuilt


def main(name: str, run_fn: Callable[[ml_collections.ConfigDict, Run], None],
         default_config: str | None = None) -> None:
    """`python -m experiments.<name> [--config=...[:preset]] [--config.x=y] [--workdir=...] [--results_dir=...]`."""
    from absl import app, flags
    from ml_collections import config_flags

    from mmdiff_jax.training import cli

    with cli.defining_flags():  # a default config file is parsed, with the --config.x=y overrides, right here
        config_flag = config_flags.DEFINE_config_file(
            "config", str(default_config or REPO / "configs" / f"{name}.py"),
            "Experiment config (a get_config(preset) module; ':tiny' / ':full' or --config.preset=... pick a "
            "preset).", lock_config=True)
    workdir = flags.DEFINE_string("workdir", f"workdirs/{name}", "Run directory: models, logs, grids, report.")
    results_dir = flags.DEFINE_string("results_dir", "", "Also copy report.md, metrics.json and the published "
                                      "grids here (e.g. results/<name>).")

    def run_main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        cli.check_directory_flag("workdir", workdir.value)
        if results_dir.value:
            cli.check_directory_flag("results_dir", results_dir.value)
        config = resolve_preset(flags.FLAGS[config_flag.name])
        command = shlex.join(["python", "-m", f"experiments.{name}", *sys.argv[1:]])
        run_experiment(name, run_fn, config, workdir.value, results_dir.value or None, command)

    cli.run(run_main)  # flag mistakes: one line naming the flag (MMDIFF_DEBUG=1: the traceback)
