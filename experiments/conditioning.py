"""The conditioned model against its aggregation-only ablation, shared by the experiments (issue 14).

  train_with_curve(run, config, metric, make_metric) -> (models, curves)
      trains 'mt_diffusion' (`run.task`: its modalities conditioned) and, with
      `experiment.aggregation_only_ablation`, 'aggregation_only' (every condition 'none') at the same budget,
      each measuring a conditional metric on its EMA params while training (`experiment.curve`)
  curve_sampler(task, config, observed) -> fn(params) -> Samples
      the samples a curve's metric reads, at the curve's guidance scale
  sample_sweep(run, models, sampler, name, given, cfg_scales, seed=, task=) -> (conditional, joint)
      every model's samples with modality `name` observed at each guidance scale, and its joint samples
  guidance_key(name, scale), guidance_scales(trained, scales), cfg_options(scale)
      one classifier-free guidance sweep: result keys, the scales a model takes, the sampler's arguments
  report_curve(run, curves, ...)
      the curve's table and PNG in the report

docs/design.md section 3b says why the aggregation alone cannot condition the denoiser.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from experiments import baselines, common, evaluation, trainer
from mmdiff_jax import sampling, tasks
from mmdiff_jax.training import Task, writers

MODEL_LABELS = {"mt_diffusion": "MT-Diffusion", "aggregation_only": "ablation: aggregation-only"}


def train_with_curve(
    run: common.Run,
    config: ml_collections.ConfigDict,
    metric: str,
    make_metric: Callable[[Task, ml_collections.ConfigDict], Callable[[Any], float]],
) -> tuple[dict[str, trainer.Trained], dict[str, dict[int, float]]]:
    """Trains the conditioned model (`run.task`, the config's) and (with `experiment.aggregation_only_ablation`)
    its aggregation-only ablation, same budget and seed. make_metric(task, model_config) -> fn(ema_params) ->
    float is measured at `experiment.curve.num_points` evenly spaced steps (`trainer.MetricCurve`, kept in
    workdir/<model>/<metric>_curve.json with the curve and sampler sections, so a resumed run keeps its earlier
    points, and a run with other settings does not report them).

    Returns (name -> Trained, name -> {step: value}) for 'mt_diffusion' and, if trained, 'aggregation_only'.
    """
    configs = {"mt_diffusion": (config, run.task)}
    if config.experiment.aggregation_only_ablation:
        ablation = baselines.aggregation_only_config(config)
        configs["aggregation_only"] = (ablation, tasks.make_mt_diffusion_task(ablation))
    models, curves = {}, {}
    steps = trainer.curve_steps(config.train.steps, config.experiment.curve.num_points)
    for name, (model_config, task) in configs.items():
        path = run.workdir / name / f"{metric}_curve.json"
        settings = {"metric": metric, **{key: model_config.experiment[key].to_dict() for key in ("curve", "sampler")}}
        curve = trainer.MetricCurve(path, steps, make_metric(task, model_config), settings)
        models[name] = run.train(name, model_config, task, hooks=[curve])
        curves[name] = curve.points
    return models, curves


def curve_sampler(
    task: Task, config: ml_collections.ConfigDict, observed: Mapping[str, Any]
) -> Callable[[Any], sampling.Samples]:
    """fn(params) -> `sampling.Samples` of the MT-Diffusion `task` with `observed` (name -> values [B, ...]):
    the experiment's sampler, prior noise from key(experiment.seed), classifier-free guidance at
    `experiment.curve.cfg_scale` if the model's denoiser sees a modality (a curve's metric reads these)."""
    sample = sampling.make_sample_fn(task.model, task.schedule, **evaluation.sampler_options(config.experiment.sampler))
    options = cfg_options(config.experiment.curve.cfg_scale if task.model.conditioned_modalities else None)
    key = jax.random.key(config.experiment.seed)
    return lambda params: sample(params, key, dict(observed), **options)


def sample_sweep(
    run: common.Run,
    models: Mapping[str, trainer.Trained],
    sampler: Mapping[str, Any],
    name: str,
    given: Sequence[Any],
    cfg_scales: Sequence[float],
    *,
    seed: int,
    task: str,
) -> tuple[dict[str, np.ndarray], dict[str, sampling.Samples]]:
    """For every model, with the sampler section `sampler`: samples with modality `name` observed, one batch per
    entry of `given` (its values [B, ...]), at each guidance scale (`guidance_scales`), and as many joint samples
    (nothing observed); batch i draws its prior noise from fold_in(key(seed), i) in every row. Each row is
    timed as a phase of `run` ('<task>: <key>', 'joint samples: <model>').

    Returns (guidance_key -> images [sum B, *z_shape], model name -> joint `sampling.Samples`), numpy.
    """
    conditional, joint = {}, {}
    for model_name, trained in models.items():
        sample = sampling.make_sample_fn(
            trained.model, trained.schedule, **evaluation.sampler_options(sampler, run.mesh)
        )
        for scale in guidance_scales(trained, cfg_scales):
            key = guidance_key(model_name, scale)
            with run.phase(f"{task}: {key}"):
                conditional[key] = evaluation.map_batches(
                    lambda values, rng, scale=scale: (
                        sample(trained.params, rng, {name: values}, **cfg_options(scale)).image
                    ),
                    given,
                    seed=seed,
                    desc=f"{key} {task}",
                    mesh=run.mesh,
                )
        with run.phase(f"joint samples: {model_name}"):
            joint[model_name] = evaluation.map_batches(
                lambda values, rng: sample(trained.params, rng, batch_size=len(values)),
                given,
                seed=seed,
                desc=f"{model_name} joint",
                mesh=run.mesh,
            )
    return conditional, joint


def guidance_key(name: str, scale: float) -> str:
    """The results key of model `name` sampled at classifier-free guidance scale `scale` (1: `name` itself, the
    conditional sampler)."""
    return name if scale == 1.0 else f"{name}_cfg{scale:g}"


def guidance_scales(trained: trainer.Trained, scales: Sequence[float]) -> tuple[float, ...]:
    """`scales` for a model whose denoiser sees a modality; (1.0,) for the aggregation-only one (no guidance)."""
    return tuple(scales) if trained.model.conditioned_modalities else (1.0,)


def cfg_options(scale: float | None) -> dict[str, float]:
    """The sampler's keyword arguments for guidance scale `scale` (None or 1: the conditional sampler, one
    pass; otherwise the joint form eps(none) + s (eps(observed) - eps(none)))."""
    return {} if scale in (None, 1.0) else {"cfg_scales": float(scale)}


def curve_label(name: str, cfg_scale: float) -> str:
    """The curve's legend entry: the conditioned model at its guidance scale, or the ablation."""
    return f"{MODEL_LABELS[name]}, guidance s = {cfg_scale:g}" if name == "mt_diffusion" else MODEL_LABELS[name]


def report_curve(
    run: common.Run, curves: Mapping[str, Mapping[int, float]], metric: str, what: str, section: Mapping[str, Any]
) -> None:
    """A table (model x step) and a PNG (`<metric>_curve`) of `what` (e.g. 'label -> image agreement')
    against training steps; `section` is `experiment.curve` (num_samples, cfg_scale)."""
    curves = {name: points for name, points in curves.items() if points}  # none: measured with other settings
    if not curves:
        return
    steps = sorted({step for points in curves.values() for step in points})
    labelled = {curve_label(name, section["cfg_scale"]): points for name, points in curves.items()}
    run.report.table(
        f"{what[0].upper()}{what[1:]} against training steps ({section['num_samples']} samples each, "
        "measured on the EMA parameters while training)",
        ["model"] + [f"step {s}" for s in steps],
        [[label] + [points.get(step, "—") for step in steps] for label, points in labelled.items()],
    )
    run.report.image(
        f"{metric}_curve",
        writers.plot_series(labelled, ylabel=what, log_y=False),
        f"{what[0].upper()}{what[1:]} against training steps, {section['num_samples']} samples per point.",
        publish=True,
    )
