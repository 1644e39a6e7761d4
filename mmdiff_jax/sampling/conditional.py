"""The samplers wired to an `MTDiffusion` model: joint and conditional generation (docs/design.md section 3).

`observed` maps modality names to data in batch form (a masked image also needs 'mask'), exactly as
`MTDiffusion.predict` reads it. Any subset may be observed, including none (joint generation):
  ehat_i = E_i(x_i)          for observed modalities: in the reverse mean (a_t), in m_t, m_s (DDIM) and
                             in the prior mean m_T (z_T carries the source under a `bridge` schedule);
  ehat_i = E_i(D_i(h))       for the rest, from the same forward pass as eps.
`make_denoise` is that wiring; `make_sample_fn` compiles a sampler around it once per batch shape and
observed subset, and decodes the result: z_0 as the image (pixel space, clipped to [-1, 1]) and every
head's output from the last model call (`decode_heads`). Re-imposing known pixels (`repaint`,
`known_region`) and label-head guidance (`guidance`) are options of the same sampler; restoration, SDEdit and
image transition are built on it in `sampling.editing`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mmdiff_jax import targets
from mmdiff_jax.modalities import MASK_KEY, Modality, check_schedule, model_variables
from mmdiff_jax.models.mt_diffusion import MTDiffusion
from mmdiff_jax.sampling.guidance import classifier_free_guidance, classifier_guidance
from mmdiff_jax.sampling.restoration import known_region_hook
from mmdiff_jax.sampling.methods import check_sampler, sample_chain
from mmdiff_jax.sampling.samplers import Denoise, Prediction, SamplerOutput, prediction_from_output
from mmdiff_jax.schedules import DiffusionSchedule

Array = jax.Array
Observed = Mapping[str, Array]


class Samples(NamedTuple):
    image: Array  # [B, *S], z_0 clipped to [-1, 1] (pixel space: z_0 = x_0)
    z_0: Array  # [B, *S], the sampler's raw output
    outputs: dict[str, dict[str, Array]]  # name -> decoded head output (`decode_heads`), observed ones too


def observed_batch_size(observed: Observed, batch_size: int | None) -> int:
    """B from the observed arrays (which must agree), or `batch_size` when nothing is observed."""
    sizes = {name: value.shape[0] for name, value in observed.items()}
    if batch_size is not None:
        sizes["batch_size"] = batch_size
    if not sizes:
        raise ValueError("nothing is observed: give batch_size")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"observed arrays and batch_size disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))


CfgScales = float | Array | Mapping[str, float | Array] | None


def guidance_passes(
    model: MTDiffusion, observed: Observed, cfg_scales: CfgScales
) -> tuple[list[frozenset[str]], Array] | None:
    """The condition sets of classifier-free guidance and their scales (docs/design.md section 3b).

    cfg_scales None: no guidance (None returned). A scalar s, the joint form: passes [nothing seen, every
    observed conditioned modality seen], eps(none) + s (eps(all) - eps(none)). A mapping name -> s_i: the
    base set is the observed conditioned modalities without a scale, and pass i adds modality i,
    eps(base) + sum_i s_i (eps(base + i) - eps(base)). Scales are scalars (traced or concrete).
    Returns (K + 1 condition sets, the first the base; scales [K]) or None.
    """
    if cfg_scales is None:
        return None
    for name, value in cfg_scales.items() if isinstance(cfg_scales, Mapping) else [("", cfg_scales)]:
        if isinstance(value, str) or jnp.ndim(value) != 0:
            raise ValueError(
                f"cfg_scales{f'[{name!r}]' if name else ''} must be a scalar guidance scale, got {value!r}"
            )
    conditioned = {m.name for m in model.conditioned_modalities}
    visible = frozenset(name for name in observed if name in conditioned)
    if not isinstance(cfg_scales, Mapping):
        if not visible:
            raise ValueError(
                f"classifier-free guidance needs an observed conditioned modality; observed "
                f"{sorted(observed)}, conditioned {sorted(conditioned)}"
            )
        return [frozenset(), visible], jnp.reshape(jnp.asarray(cfg_scales, jnp.float32), (1,))
    wrong = sorted(set(cfg_scales) - visible)
    if wrong:
        raise ValueError(
            f"cfg_scales name {wrong}, which are not observed conditioned modalities "
            f"(observed and conditioned: {sorted(visible)})"
        )
    names = sorted(cfg_scales)
    base = visible - set(names)
    scales = jnp.stack([jnp.asarray(cfg_scales[name], jnp.float32) for name in names]) if names else jnp.zeros((0,))
    return [base] + [base | {name} for name in names], scales


def make_denoise(
    model: MTDiffusion, schedule: DiffusionSchedule, variables: Any, observed: Observed, cfg_scales: CfgScales = None
) -> Denoise:
    """denoise(z_t, t) -> Prediction(eps, ehat, heads, learned variance, z_0) through `MTDiffusion.predict` (eval mode).

    eps (and, for 'v' and 'z_0' targets, z_0) come from the model's output by `prediction_from_output`, with its
    own ehat in m_t, before guidance combines passes.

    ehat_i = E_i(x_i) for the modalities in `observed`, E_i(D_i(h)) for the others; aux = the heads'
    raw outputs (logits or means), name -> array. The denoiser sees every observed conditioned modality;
    with `cfg_scales` (see `guidance_passes`) the predictions of every condition set come from one model
    call on the passes stacked along the batch, combined by `guidance.classifier_free_guidance`.
    """
    targets.check_prediction(model.prediction, schedule)
    variables = model_variables(variables)
    passes = guidance_passes(model, observed, cfg_scales)

    def predict(z_t, t, observed_data, present=None):
        output = model.apply(variables, z_t, t, dict(observed_data), train=False, present=present, method=model.predict)
        return prediction_from_output(
            schedule,
            z_t,
            t,
            output.prediction,
            model.prediction,
            encodings=output.estimated_encodings,
            aux=output.heads,
            variance_interpolation=output.variance_interpolation,
        )

    if passes is None:
        return lambda z_t, t: predict(z_t, t, observed)
    condition_sets, scales = passes
    count = len(condition_sets)
    shown = {name for condition_set in condition_sets for name in condition_set}
    tiled = {name: jnp.concatenate([value] * count) for name, value in observed.items()}

    def guided(z_t: Array, t: Array) -> Prediction:
        batch = z_t.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (batch,))
        present = {
            name: jnp.repeat(jnp.asarray([name in condition_set for condition_set in condition_sets]), batch)
            for name in shown
        }
        output = predict(jnp.concatenate([z_t] * count), jnp.concatenate([t] * count), tiled, present)
        split = (
            lambda x, axis=0: jnp.moveaxis(  # noqa: E731  [.., count * B, ..] -> [count, .., B, ..]
                x.reshape(x.shape[:axis] + (count, batch) + x.shape[axis + 1 :]), axis, 0
            )
        )
        stacked = jax.tree.map(split, output._replace(estimated_encodings=None))._replace(
            estimated_encodings=split(output.estimated_encodings, 1)
        )
        return classifier_free_guidance(stacked, scales)

    return guided


def head_estimates(modalities: Sequence[Modality], heads: Mapping[str, Array]) -> dict[str, Array]:
    """Heads' outputs as estimates one can average: class probabilities (softmax) or Gaussian means."""
    return {
        m.name: jax.nn.softmax(heads[m.name], axis=-1) if m.loss == "categorical" else heads[m.name]
        for m in modalities
        if m.name in heads
    }


def decode_heads(modalities: Sequence[Modality], estimates: Mapping[str, Array]) -> dict[str, dict[str, Array]]:
    """Per modality with a head, from `head_estimates`:
    label         {'class_ids': [B] int32, 'probabilities': [B, K]}
    segmentation  {'class_map': [B, H, W] int32, 'probabilities': [B, H, W, K]}
    vector        {'vector': [B, D]};   image  {'image': [B, H, W, C]}
    masked_image  {'image': [B, H, W, C], 'mask': [B, H, W, 1]} (the predicted [x * mask, mask])
    """
    decoded = {}
    for m in modalities:
        if m.name not in estimates:
            continue
        value = estimates[m.name]
        if m.kind == "label":
            decoded[m.name] = {"class_ids": jnp.argmax(value, axis=-1).astype(jnp.int32), "probabilities": value}
        elif m.kind == "segmentation":
            decoded[m.name] = {"class_map": jnp.argmax(value, axis=-1).astype(jnp.int32), "probabilities": value}
        elif m.kind == "masked_image":
            decoded[m.name] = {"image": value[..., :-1], "mask": value[..., -1:]}
        else:
            decoded[m.name] = {m.kind: value}
    return decoded


def decode_samples(model: MTDiffusion, output: SamplerOutput) -> Samples:
    """A chain's output as `Samples`: z_0 clipped to [-1, 1] as the image, and every head decoded from the
    last model call."""
    outputs = decode_heads(model.modalities, head_estimates(model.modalities, output.aux))
    return Samples(jnp.clip(output.z_0, -1.0, 1.0), output.z_0, outputs)


def check_modality(model: MTDiffusion, name: str, kinds: tuple[str, ...], role: str) -> Modality:
    """The model's modality `name`; ValueError naming `role` unless its kind is one of `kinds` (and, for the
    role 'guidance', it has a head)."""
    for m in model.modalities:
        if m.name == name:
            if m.kind not in kinds or (role == "guidance" and m.head == "none"):
                raise ValueError(
                    f"{role} needs a modality of kind {kinds} with a head; {name!r} is {m.kind!r} with head {m.head!r}"
                )
            return m
    raise ValueError(f"{role}: no modality {name!r} in the model (has {[m.name for m in model.modalities]})")


def make_sample_fn(
    model: MTDiffusion,
    schedule: DiffusionSchedule,
    *,
    method: str = "ddim",
    num_steps: int | None = None,
    eta: float = 0.0,
    variance: str = "small",
    variant: str = "2M",
    spacing: str = "time_uniform",
    clip_denoised: bool = True,
    prior_refinements: int = 1,
    repaint: str | None = None,
    guidance: str | None = None,
    sharding: jax.sharding.Sharding | None = None,
):
    """A jit-compiled sampler for `model` on `schedule`.

    Args:
      method: 'ddpm' (all T steps, `variance` 'small' or 'large'), 'ddim' (`num_steps` respaced steps,
        default min(50, T), stochasticity `eta`) or 'dpm_solver++' (`num_steps` steps of DPM-Solver++
        `variant` '2M', '3M', '2S' or '1', `spacing` 'time_uniform' or 'logsnr'; `sampling.dpm_solver`).
      clip_denoised: clip the z_0 estimate to [-1, 1] at every step (pixel-space images).
      prior_refinements: fixed-point steps for m_T (see `samplers.prior_sample`).
      repaint: name of a masked-image modality: re-impose its known pixels at every step (it must be observed;
        the same as passing `known_region` = (its masked image, its mask)).
      guidance: name of a label modality whose head guides sampling towards `guidance_labels`.
      sharding: sharding of the batch axis of z (e.g. NamedSharding(mesh, P('data'))).
    Returns:
      sample(params, rng, observed=None, *, batch_size=None, prior_noise=None, guidance_labels=None,
             guidance_scale=1.0, cfg_scales=None, known_region=None) -> Samples;
      known_region = (x_known [B, *S], mask [B, H, W, 1], 1 = known) re-imposes x_known's known pixels after
      every step (RePaint-style, `restoration.known_region_hook`), whatever the model observes.
      Compiled once per batch size, observed subset and form of `cfg_scales` (None, a scalar, or a
      mapping name -> scale of observed conditioned modalities: classifier-free guidance, see
      `guidance_passes`); `batch_size` is static
      (needed only when nothing is observed); the scales' values, labels, params and observed values
      are traced.
    """
    check_schedule(model.modalities, schedule)
    num_steps = check_sampler(schedule, method, num_steps, variant, spacing)
    if repaint is not None:
        check_modality(model, repaint, ("masked_image",), "repaint")
    if guidance is not None:
        check_modality(model, guidance, ("label",), "guidance")

    def sample(
        params: Any,
        rng: Array,
        observed: Observed | None = None,
        *,
        batch_size: int | None = None,
        prior_noise: Array | None = None,
        guidance_labels: Array | None = None,
        guidance_scale: float | Array = 1.0,
        cfg_scales: CfgScales = None,
        known_region: tuple[Array, Array] | None = None,
    ) -> Samples:
        observed = dict(observed or {})
        shape = (observed_batch_size(observed, batch_size),) + model.z_shape
        denoise = make_denoise(model, schedule, params, observed, cfg_scales)
        if guidance is not None:
            if guidance_labels is None:
                raise ValueError(f"guidance by {guidance!r} needs guidance_labels [B]")
            labels = jnp.asarray(guidance_labels, jnp.int32)

            def log_likelihood(prediction: Prediction) -> Array:
                log_probabilities = jax.nn.log_softmax(prediction.aux[guidance], axis=-1)
                return jnp.take_along_axis(log_probabilities, labels[:, None], axis=-1)[:, 0]

            denoise = classifier_guidance(denoise, schedule, log_likelihood, guidance_scale)
        if repaint is not None:
            if repaint not in observed or MASK_KEY not in observed:
                raise ValueError(f"repaint={repaint!r} needs observed[{repaint!r}] and observed[{MASK_KEY!r}]")
            known_region = (observed[repaint], observed[MASK_KEY])
        hook = None
        if known_region is not None:
            hook = known_region_hook(schedule, jnp.asarray(known_region[0], jnp.float32), known_region[1])
        output = sample_chain(
            denoise,
            schedule,
            rng,
            shape,
            method=method,
            num_steps=num_steps,
            eta=eta,
            variance=variance,
            variant=variant,
            spacing=spacing,
            clip_denoised=clip_denoised,
            prior_noise=prior_noise,
            prior_refinements=prior_refinements,
            step_hook=hook,
            sharding=sharding,
        )
        return decode_samples(model, output)

    return jax.jit(sample, static_argnames=("batch_size",))
