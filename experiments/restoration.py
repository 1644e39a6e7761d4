"""The restoration methods masked_pretrain compares, and its training curve's metric.

RESTORATION_METHODS, check_config(config)   the names of config experiment.restoration.methods, checked
                                            before anything trains
all_methods(config), method_labels(config)  the methods a run evaluates (with the guidance sweep and the
                                            ablation) and their labels in the report
restoration_methods(config, models, mesh)   name -> fn(batch, rng) -> restored images [B, H, W, C]
curve_batch(config)                         the test batch the curve restores (experiment.curve)
restoration_metric(task, config, batch)     fn(params) -> PSNR on the hidden pixels (the curve's metric)
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from experiments import baselines, conditioning, evaluation, trainer
from mmdiff_jax import sampling, tasks
from mmdiff_jax.modalities import MASK_KEY


def _guided(scale: float) -> str:
    """The method name of MT-Diffusion at guidance scale `scale` (1: 'mt_diffusion', the conditional sampler)."""
    return conditioning.guidance_key("mt_diffusion", scale)


def method_labels(config: ml_collections.ConfigDict) -> dict[str, str]:
    strength = config.experiment.restoration.sdedit_strength
    return {
        "mt_diffusion": "MT-Diffusion (masked image observed)",
        "mt_diffusion_repaint": "MT-Diffusion + RePaint",
        **{_guided(s): f"MT-Diffusion, guidance s = {s:g}" for s in config.experiment.restoration.cfg_scales},
        "aggregation_only": "ablation: aggregation-only MT-Diffusion",
        "aggregation_only_repaint": "ablation: aggregation-only + RePaint",
        "sdedit": f"SDEdit, plain DDPM (t0 = {strength:g} T)",
        "ddpm_repaint": "plain DDPM + RePaint",
        "reconstruction": "reconstruction-only U-Net (one pass)",
        "masked_input": "masked input (hidden = grey)",
    }


RESTORATION_METHODS = (
    "mt_diffusion",
    "mt_diffusion_repaint",
    "sdedit",
    "ddpm_repaint",
    "reconstruction",
    "masked_input",
)  # config experiment.restoration.methods (`restoration_methods`)


def check_config(config: ml_collections.ConfigDict) -> None:
    """This experiment's own checks, before anything trains (`checks.check_experiment_section`)."""
    unknown = sorted(set(config.experiment.restoration.methods) - set(RESTORATION_METHODS))
    if unknown:
        raise ValueError(
            f"config.experiment.restoration.methods: unknown {unknown}; known: {list(RESTORATION_METHODS)}"
        )


def all_methods(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The configured restoration methods, the guidance sweep's and, with the ablation, the aggregation-only
    model's."""
    experiment = config.experiment
    methods = tuple(experiment.restoration.methods) + tuple(_guided(s) for s in experiment.restoration.cfg_scales)
    if experiment.aggregation_only_ablation:
        methods += ("aggregation_only", "aggregation_only_repaint")
    return tuple(dict.fromkeys(methods))  # s = 1 is 'mt_diffusion' itself


def restoration_methods(config: ml_collections.ConfigDict, models: dict[str, trainer.Trained], mesh=None) -> dict:
    """name -> fn(batch, rng) -> restored images [B, H, W, C], for the configured methods (their chains split
    over `mesh`: `evaluation.sampler_options`)."""
    sampler = evaluation.sampler_options(config.experiment.sampler, mesh)
    mt, ddpm, recon = models["mt_diffusion"], models["plain_ddpm"], models["reconstruction"]
    masked = tasks.modality_name(config, "masked_image")

    def restorer(trained, repaint, observe=True, **call_options):
        restore = sampling.make_restore_fn(
            trained.model, trained.schedule, masked if observe else None, repaint=repaint, **sampler
        )
        return lambda batch, rng: restore(trained.params, batch[masked], batch[MASK_KEY], rng, **call_options).image

    makers = {
        "mt_diffusion": lambda: restorer(mt, False),
        "mt_diffusion_repaint": lambda: restorer(mt, True),
        **{
            _guided(s): (lambda s=s: restorer(mt, False, **conditioning.cfg_options(s)))
            for s in config.experiment.restoration.cfg_scales
        },
        "aggregation_only": lambda: restorer(models["aggregation_only"], False),
        "aggregation_only_repaint": lambda: restorer(models["aggregation_only"], True),
        "sdedit": lambda: _sdedit(config, ddpm, masked),
        "ddpm_repaint": lambda: restorer(ddpm, True, observe=False),
        "reconstruction": lambda: _reconstructor(baselines.make_reconstruct_fn(recon), recon.params, masked),
        "masked_input": lambda: lambda batch, rng: batch[masked],
    }
    return {name: makers[name]() for name in all_methods(config)}  # known names: `check_config`


def _reconstructor(reconstruct, params, masked):
    return lambda batch, rng: reconstruct(params, batch[masked], batch[MASK_KEY])


def _sdedit(config, ddpm: trainer.Trained, masked: str):
    sdedit = baselines.make_sdedit(config, ddpm, config.experiment.restoration.sdedit_strength)
    return lambda batch, rng: sdedit(batch[masked], rng)


def curve_batch(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """`experiment.curve.num_samples` test images with masks at `curve.mask_ratio` (transform seed
    `experiment.seed`): what the restoration curve measures."""
    section = config.experiment.curve
    return evaluation.eval_batches(
        config,
        section.num_samples,
        section.num_samples,
        mask_ratio=float(section.mask_ratio),
        transform_seed=config.experiment.seed,
    )[0]


def restoration_metric(task, config, batch):
    """fn(params) -> PSNR (dB) on the hidden pixels of `batch` for the MT-Diffusion `task` (its config `config`;
    the masked image observed, no re-imposition;
    guidance `experiment.curve.cfg_scale` if the masked image is conditioned): the curve's metric
    (`conditioning.train_with_curve`)."""
    masked = tasks.modality_name(config, "masked_image")
    restore = sampling.make_restore_fn(
        task.model, task.schedule, masked, **evaluation.sampler_options(config.experiment.sampler)
    )
    cfg_scale = config.experiment.curve.cfg_scale if task.model.conditioned_modalities else None
    options = conditioning.cfg_options(cfg_scale)
    truth, mask = batch[config.model.primary], batch[MASK_KEY]

    def metric(params):
        restored = restore(params, batch[masked], mask, jax.random.key(config.experiment.seed), **options).image
        restored = mask * truth + (1.0 - mask) * np.asarray(restored)
        return evaluation.evaluate_metrics(
            (("psnr", {"region": "masked"}),), [{"image": truth, "sample": restored, "mask": mask}], None
        )["psnr_masked"]

    return metric
