"""The experiment section of a config, checked before anything trains (`common.run_experiment`).

An experiment would otherwise fail after its training, at its first sample or metric. Checked here, for every
experiment: the sampler section against the model's schedule; every evaluator spec (any `metrics` entry) is
registered; every feature space is known; a section's `num_samples` / `num_images` split into its `batch_size`;
the curve has points and samples. An experiment adds its own checks (`common.main(name, run, check=...)`).
Each failure is a `config_io.ConfigError` naming the key (the command line reports it in one line).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from experiments.evaluation import SAMPLER_KEYS, sampler_options
from mmdiff_jax import metrics as metrics_lib
from mmdiff_jax import sampling
from mmdiff_jax.metrics import features as features_lib
from mmdiff_jax.training.config_io import ConfigError, config_errors

Check = Callable[[ml_collections.ConfigDict], None]


def check_sampler(section: Mapping[str, Any], schedule: Any) -> None:
    """A config sampler section against the model's schedule."""
    unknown = sorted(set(section) - set(SAMPLER_KEYS))
    if unknown:
        raise ConfigError(f"config.experiment.sampler: unknown keys {unknown}; known: {list(SAMPLER_KEYS)}")
    options = sampler_options(section)
    try:
        sampling.check_sampler(
            schedule,
            options.get("method", "ddim"),
            options.get("num_steps"),
            options.get("variant", "2M"),
            options.get("spacing", "time_uniform"),
        )
    except ValueError as error:
        raise ConfigError(f"config.experiment.sampler: {error}") from error


def _sections(section: Mapping[str, Any], path: str):
    """(path, sub-section) for `section` and every section below it."""
    yield path, section
    for key, value in section.items():
        if isinstance(value, (Mapping, ml_collections.ConfigDict)):
            yield from _sections(value, f"{path}.{key}")


def check_experiment_section(config: ml_collections.ConfigDict, schedule: Any, check: Check | None = None) -> None:
    """The module docstring's checks of `config.experiment`, then `check(config)` (the experiment's own)."""
    experiment = config.get("experiment")
    if experiment is None:
        return
    if "sampler" in experiment:
        check_sampler(experiment.sampler, schedule)
    unknown_spaces = sorted(set(experiment.get("feature_spaces", ())) - set(features_lib.feature_networks()))
    if unknown_spaces:
        raise ConfigError(
            f"config.experiment.feature_spaces: unknown {unknown_spaces}; known: {features_lib.feature_networks()}"
        )
    for path, section in _sections(experiment, "config.experiment"):
        if "metrics" in section:
            try:
                metrics_lib.check_specs(section["metrics"])
            except KeyError as error:
                raise ConfigError(f"{path}.metrics: {error.args[0]}") from error
        for key in ("num_samples", "num_images"):
            if key in section and "batch_size" in section and section[key] % section["batch_size"]:
                raise ConfigError(
                    f"{path}.{key} = {section[key]} is not a multiple of {path}.batch_size = {section['batch_size']}"
                )
    curve = experiment.get("curve")
    if curve is not None and (curve.num_points < 1 or curve.num_samples < 1):
        raise ConfigError(
            f"config.experiment.curve: num_points ({curve.num_points}) and num_samples ({curve.num_samples}) "
            "must be >= 1"
        )
    if check is not None:
        with config_errors():
            check(config)
