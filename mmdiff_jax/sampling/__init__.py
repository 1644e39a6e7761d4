"""Samplers and conditional generation (docs/design.md section 3).

  samplers     pure DDPM / DDIM chains over a generic denoise(z_t, t) -> Prediction (no Flax)
  dpm_solver   DPM-Solver++ (2M, 3M, 2S) over the same chains (no Flax)
  methods      the samplers by name ('ddpm', 'ddim', 'dpm_solver++'): one entry for every caller
  guidance     classifier guidance by a likelihood the denoiser computes (no Flax)
  restoration  re-imposing known pixels at every step, RePaint-style (no Flax)
  conditional  the wiring to MTDiffusion.predict: observed subsets, decoded heads, jit-compiled samplers
  prediction   classification and segmentation by the model's own heads
"""

from mmdiff_jax.sampling.conditional import (Samples, decode_heads, head_estimates, make_denoise,
                                             make_restore_fn, make_sample_fn, make_transition_fn)
from mmdiff_jax.sampling.dpm_solver import dpm_solver_sample, solver_timesteps
from mmdiff_jax.sampling.guidance import classifier_guidance
from mmdiff_jax.sampling.methods import METHODS, check_sampler, sample_chain
from mmdiff_jax.sampling.prediction import make_classify_fn, make_predict_fn, make_segment_fn
from mmdiff_jax.sampling.restoration import known_region_hook
from mmdiff_jax.sampling.samplers import (Prediction, SamplerOutput, ddim_sample, ddim_sigma, ddim_step,
                                          ddpm_sample, ddpm_step, prior_sample, respace)

__all__ = [
    "Samples", "decode_heads", "head_estimates", "make_denoise", "make_restore_fn", "make_sample_fn",
    "make_transition_fn", "classifier_guidance", "make_classify_fn", "make_predict_fn", "make_segment_fn",
    "known_region_hook", "dpm_solver_sample", "solver_timesteps", "METHODS", "check_sampler", "sample_chain",
    "Prediction", "SamplerOutput", "ddim_sample", "ddim_sigma", "ddim_step", "ddpm_sample", "ddpm_step",
    "prior_sample", "respace",
]
