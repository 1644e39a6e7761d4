"""Tasks: what the trainer trains (`training.Task`), built once from a config and passed on.

mt_diffusion   the config's MT-Diffusion model, schedule, loss and sample grids (plain DDPM: no modality),
               and the config schema of its sections (`base_config`: config files start from it)
baselines      the experiments' baseline networks on the same backbone (reconstruction, class-conditional
               DDPM, classifier, segmenter)
sample_grids   the MT-Diffusion task's periodic sample grids (config `sample.kinds`, pluggable)

task = tasks.make_mt_diffusion_task(config)
state = training.train_and_evaluate(config, workdir, task)
"""

from mmdiff_jax.tasks.baselines import (
    make_class_conditional_ddpm_task,
    make_classifier_task,
    make_reconstruction_task,
    make_segmenter_task,
)
from mmdiff_jax.tasks.mt_diffusion import base_config, build_model, make_mt_diffusion_task, modality_name
from mmdiff_jax.tasks.sample_grids import SAMPLE_KINDS, register_sample_kind
from mmdiff_jax.training.task import Task

__all__ = [
    "SAMPLE_KINDS",
    "Task",
    "base_config",
    "build_model",
    "make_class_conditional_ddpm_task",
    "make_classifier_task",
    "make_mt_diffusion_task",
    "make_reconstruction_task",
    "make_segmenter_task",
    "modality_name",
    "register_sample_kind",
]
