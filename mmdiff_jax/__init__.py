"""mmdiff_jax: multi-modal, multi-task diffusion models (MT-Diffusion, ICLR 2024) in JAX/Flax.

Layers (each imports only the ones above it):
  schedules, diffusion, losses   the pure math (no Flax), docs/design.md sections 1-4
  models, modalities             Flax Linen networks and the assembled model
  data                           TFDS builders and grain input pipelines
  training, sampling, metrics    loops, samplers and evaluators
"""

__version__ = "0.1.0"
