"""Samplers and conditional generation (docs/design.md section 3).

samplers     pure DDPM / DDIM chains over a generic denoise(z_t, t) -> Prediction (no Flax)
dpm_solver   DPM-Solver++ (2M, 3M, 2S) over the same chains (no Flax)
methods      the samplers by name ('ddpm', 'ddim', 'dpm_solver++'): one entry for every caller
guidance     classifier guidance by a likelihood the denoiser computes (no Flax)
restoration  re-imposing known pixels at every step (RePaint-style), SDEdit (no Flax)
conditional  the wiring to MTDiffusion.predict: observed subsets, decoded heads, jit-compiled samplers
editing      restoration, SDEdit and image transition with a trained MTDiffusion model
prediction   classification and segmentation by the model's own heads
"""

import importlib

# Public name -> its module. Loaded on first use (PEP 562), so that `import mmdiff_jax.sampling.samplers` (or
# dpm_solver, guidance, restoration, methods) stays free of Flax and the models; `from mmdiff_jax.sampling
# import make_sample_fn` loads `conditional` and with it the models.
_EXPORTS = {
    **dict.fromkeys(
        (
            "Samples",
            "decode_heads",
            "head_estimates",
            "make_denoise",
            "make_sample_fn",
        ),
        "conditional",
    ),
    **dict.fromkeys(("make_restore_fn", "make_sdedit_fn", "make_transition_fn"), "editing"),
    **dict.fromkeys(("dpm_solver_sample", "solver_timesteps"), "dpm_solver"),
    "classifier_guidance": "guidance",
    **dict.fromkeys(("METHODS", "check_sampler", "sample_chain"), "methods"),
    **dict.fromkeys(("make_classify_fn", "make_predict_fn", "make_segment_fn"), "prediction"),
    **dict.fromkeys(("known_region_hook", "sdedit_sample"), "restoration"),
    **dict.fromkeys(
        (
            "Prediction",
            "SamplerOutput",
            "ddim_sample",
            "ddim_sigma",
            "ddim_step",
            "ddpm_sample",
            "ddpm_step",
            "prediction_from_output",
            "prior_sample",
            "respace",
        ),
        "samplers",
    ),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
