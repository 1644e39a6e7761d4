"""mmdiff_jax: multi-modal, multi-task diffusion models (MT-Diffusion, ICLR 2024) in JAX/Flax.

Layers (each imports only the ones above it):
  schedules, diffusion,          the pure math (no Flax), docs/design.md sections 1-4
  targets, resample, losses, bound
  modalities, models             the modality specs; Flax Linen networks and the assembled MTDiffusion
  data                           TFDS builders and grain input pipelines
  training                       the trainer (no model code: what it trains comes in as a `Task`)
  sampling, metrics              samplers and evaluators
  tasks                          what is trained, built once from a config (MT-Diffusion, the baselines)
"""

__version__ = "0.1.0"
