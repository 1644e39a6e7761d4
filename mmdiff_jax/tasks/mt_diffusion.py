"""The MT-Diffusion task: the config's model, schedule and loss, built once (plain DDPM is its N = 0 case).

  config = tasks.base_config()                  # the trainer's sections + model, diffusion, loss
  task = tasks.make_mt_diffusion_task(config)   # checks the task's sections, builds everything once
  train_and_evaluate(config, workdir, task)

Config sections read here: `model` (the U-Net, z's shape, the primary batch key, the compute dtype and
`modalities`: name -> `modalities.Modality` fields), `diffusion` (noise schedule, T, weight normalisation),
`loss` (`objective.LossConfig`), `sample.kinds` (the grids, `sample_grids`) and the dataset's features
(`data`). Each modality's recovery weight is its `loss_weight`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections

from mmdiff_jax import objective, resample
from mmdiff_jax.modalities import MASK_KEY, Modality, modality_schedule
from mmdiff_jax.models.mt_diffusion import MTDiffusion, init_variables
from mmdiff_jax.models.unet import UNetConfig
from mmdiff_jax.tasks import sample_grids
from mmdiff_jax.training import config_io
from mmdiff_jax.training.task import Task

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# U-Net fields that change how the network computes, not its parameters: left out of checkpoint signatures.
COMPUTE_ONLY_UNET_FIELDS = ("remat",)


def task_sections() -> ml_collections.ConfigDict:
    """The sections this task adds to the trainer's schema, with defaults (a 6M-parameter U-Net, 32x32)."""
    config = ml_collections.ConfigDict()
    config.model = dict(
        unet=dataclasses.asdict(UNetConfig()),  # mmdiff_jax.models.unet.UNetConfig fields
        z_shape=(32, 32, 1),  # (H, W, C) of the primary modality x_0 = z_0
        primary="image",  # batch key of x_0
        dtype="float32",  # compute dtype of the network: float32 | bfloat16 (params stay float32)
        prediction="eps",  # what the U-Net predicts: eps | v | z_0 (mmdiff_jax.targets.PREDICTIONS)
        learn_variance=False,  # ADM's learned reverse variance, trained by the hybrid loss (loss.vlb_weight)
        modalities={},  # name (batch key) -> mmdiff_jax.modalities.Modality fields (kind, shape, ...)
    )
    config.diffusion = dict(
        noise_schedule="linear",
        num_steps=1000,
        modality_normalized=False,
        # rescale the noise schedule to abar_T = 0 (Lin et al. 2024): needs model.prediction v or z_0, and 'zero'
        # or 'bump' weights (mmdiff_jax.schedules.rescale_zero_terminal_snr)
        zero_terminal_snr=False,
    )
    config.loss = dict(  # objective.LossConfig; each recovery weight is its Modality.loss_weight
        eps_weight=1.0,
        aggregation_weight=1.0,
        time_weighting="uniform",  # uniform | min_snr (mmdiff_jax.targets.time_weight)
        min_snr_gamma=5.0,
        vlb_weight=0.001,  # lambda of ADM's hybrid loss L_simple + lambda L_vlb (model.learn_variance only)
        time_sampling="uniform",  # uniform | importance (ADM's loss-aware sampling of t, mmdiff_jax.resample)
    )
    return config


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer and this task read, with defaults: config files start from it."""
    config = config_io.base_config()
    config.update(task_sections())
    return config


def build_modalities(config: ml_collections.ConfigDict) -> tuple[Modality, ...]:
    """`config.model.modalities` (name -> Modality fields), in config order."""
    fields = {field.name for field in dataclasses.fields(Modality)} - {"name"}
    modalities = []
    for name, spec in config.model.modalities.items():
        spec = dict(spec)
        unknown = sorted(set(spec) - fields)
        if unknown:
            raise ValueError(f"config.model.modalities.{name}: unknown fields {unknown}; Modality has {sorted(fields)}")
        try:
            modalities.append(Modality(name=name, **spec))
        except (TypeError, ValueError) as error:
            raise ValueError(f"config.model.modalities.{name}: {error}") from error
    return tuple(modalities)


def modality_name(config: ml_collections.ConfigDict, kind: str) -> str:
    """The name of the config's first modality of `kind` ('masked_image', 'label', 'segmentation', ...);
    ValueError if it has none."""
    for name, spec in config.model.modalities.items():
        if spec["kind"] == kind:
            return name
    raise ValueError(f"the config has no {kind} modality (modalities: {list(config.model.modalities)})")


def unet_config(config: ml_collections.ConfigDict, **overrides: Any) -> UNetConfig:
    """`config.model.unet` as a UNetConfig (fields in `overrides` replaced); ValueError for unknown fields."""
    fields = {field.name for field in dataclasses.fields(UNetConfig)}
    unknown = sorted(set(config.model.unet) - fields)
    if unknown:
        raise ValueError(f"config.model.unet: unknown fields {unknown}; UNetConfig has {sorted(fields)}")
    return UNetConfig(**{**dict(config.model.unet), **overrides})


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
    """The network's compute dtype, `config.model.dtype`."""
    if config.model.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {config.model.dtype!r}")
    return DTYPES[config.model.dtype]


def build_model(config: ml_collections.ConfigDict) -> MTDiffusion:
    """The MTDiffusion network of `config.model` (all its build-time checks run here)."""
    return MTDiffusion(
        unet=unet_config(config),
        modalities=build_modalities(config),
        z_shape=tuple(config.model.z_shape),
        primary=config.model.primary,
        dtype=compute_dtype(config),
        prediction=config.model.prediction,
        learn_variance=bool(config.model.learn_variance),
    )


def build_schedule(config: ml_collections.ConfigDict, modalities: tuple[Modality, ...]):
    """The `DiffusionSchedule` of `config.diffusion` with one weight row per modality."""
    diffusion = config.diffusion
    return modality_schedule(
        diffusion.noise_schedule,
        diffusion.num_steps,
        modalities,
        modality_normalized=diffusion.modality_normalized,
        zero_terminal_snr=diffusion.zero_terminal_snr,
    )


def check_data_fits_model(config: ml_collections.ConfigDict, model: MTDiffusion) -> None:
    """ValueError when the data (config.data.source + transforms) lacks a field the model reads, gives it
    another shape, or cannot be opened; from the spec, before any data is read or anything compiles."""
    spec = config_io.data_spec(config)
    data = f"config.data.source {config.data.source} with config.data.transforms {config.data.transforms}"
    needed = {model.primary: (tuple(model.z_shape), "the primary modality (config.model.primary)")}
    for m in model.modalities:
        needed[m.name] = (m.shape, f"modality {m.name!r}")
        if m.kind == "masked_image":
            needed[MASK_KEY] = (m.shape[:2] + (1,), f"the mask of masked image {m.name!r}")
    for key, (shape, what) in needed.items():
        if key not in spec.features:
            raise ValueError(
                f"{what} reads the field {key!r}, which {data} does not give (it gives {sorted(spec.features)})"
            )
        if tuple(spec.features[key][0]) != tuple(shape):
            raise ValueError(
                f"{what}: {data} gives {key!r} per-example shape {tuple(spec.features[key][0])}, the model expects "
                f"{tuple(shape)}"
            )


def unet_signature(unet: Mapping[str, Any]) -> dict[str, Any]:
    """A config's U-Net section without its compute-only fields (a checkpoint restores under any remat)."""
    return {key: value for key, value in dict(unet).items() if key not in COMPUTE_ONLY_UNET_FIELDS}


# Keys added after checkpoints existed, per config section, with the default that reproduces the older behaviour:
# a signature leaves them out at it, so checkpoints saved before they existed restore.
KEYS_ADDED_LATER = {
    "model": {"prediction": "eps", "learn_variance": False},
    "diffusion": {"zero_terminal_snr": False},
}


def section_signature(section: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Config section `section` ('model' or 'diffusion') as checkpoints record it: `KEYS_ADDED_LATER` left out
    at their defaults."""
    later = KEYS_ADDED_LATER[section]
    return {key: value for key, value in dict(values).items() if key not in later or later[key] != value}


def model_signature(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What a checkpoint must agree on to be restored: the model and diffusion sections, JSON-normalised,
    and `loss.time_sampling` unless 'uniform' (importance sampling keeps a loss history in the state).
    Keys added later are left out at their defaults (`section_signature`: `model.prediction` 'eps',
    `model.learn_variance` False, `diffusion.zero_terminal_snr` False), so checkpoints saved before they existed
    restore."""
    signature = {
        "model": section_signature("model", {**config.model.to_dict(), "unet": unet_signature(config.model.unet)}),
        "diffusion": section_signature("diffusion", config.diffusion.to_dict()),
    }
    if config.loss.get("time_sampling", "uniform") != "uniform":
        signature["loss"] = {"time_sampling": config.loss.time_sampling}
    return json.loads(json.dumps(signature))


def params_init_fn(model: MTDiffusion):
    """rng -> the parameters of an MTDiffusion model (`models.mt_diffusion.init_variables`; pure)."""
    return lambda rng: init_variables(model, rng)["params"]


def describe_loss(
    modalities: tuple[Modality, ...],
    prediction: str = "eps",
    time_weighting: str = "uniform",
    learn_variance: bool = False,
    time_sampling: str = "uniform",
    zero_terminal_snr: bool = False,
) -> str:
    """The training loss in words ("eps-MSE" for plain DDPM with the eps target, N = 0; no aggregation term
    where every weight schedule is 'zero', as for a DDPM conditioned through the denoiser alone), with how t is
    drawn and the schedule rescaled where they differ from the defaults."""
    terms = [f"{prediction}-MSE" + (" (min-SNR weighted)" if time_weighting == "min_snr" else "")]
    if any(m.weight_schedule[0] != "zero" for m in modalities):
        terms.append("aggregation MSE")
    recovered = [m.name for m in modalities if m.loss in ("categorical", "gaussian")]
    if recovered:
        terms.append(f"NLL of {', '.join(recovered)}")
    if learn_variance:
        terms.append("lambda L_vlb (learned variance)")
    notes = ["t importance-sampled"] if time_sampling == "importance" else []
    notes += ["zero-terminal-SNR schedule"] if zero_terminal_snr else []
    return "; ".join([" + ".join(terms), *notes])


def make_mt_diffusion_task(config: ml_collections.ConfigDict, name: str = "mt_diffusion") -> Task:
    """The config's MT-Diffusion model as a `Task` (model, schedule, loss, grids built once).

    Raises config_io.ConfigError naming the key: unknown or missing keys of the task's sections, an invalid
    modality, U-Net or schedule, a dataset without the model's inputs, an unknown sample kind.
    """
    with config_io.config_errors():
        config_io.check_known_keys(config, task_sections())
        model = build_model(config)
        schedule = build_schedule(config, model.modalities)
        loss_fn = objective.make_loss_fn(model, schedule, dict(config.loss))
        check_data_fits_model(config, model)
        kinds = tuple(config.sample.kinds)
        sample_grids.check_kinds(kinds)
    return Task(
        name=name,
        init_params=params_init_fn(model),
        loss_fn=loss_fn,
        signature=model_signature(config),
        model=model,
        schedule=schedule,
        make_sample_fns=functools.partial(
            sample_grids.make_sample_fns, kinds, model, schedule, config.sample.to_dict()
        ),
        loss_description=describe_loss(
            model.modalities,
            model.prediction,
            config.loss.time_weighting,
            model.learn_variance,
            config.loss.time_sampling,
            config.diffusion.zero_terminal_snr,
        ),
        init_loss_state=(
            functools.partial(resample.init_history, schedule.num_steps)
            if config.loss.time_sampling == "importance"
            else None
        ),
    )
