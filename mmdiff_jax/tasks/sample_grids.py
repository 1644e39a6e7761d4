"""The MT-Diffusion task's periodic sample grids, as plug-ins: config `sample.kinds` lists what to draw.

A sample kind is a factory `make(model, schedule, sample_config, mesh) -> draw`, with
`draw(params, batch, rng) -> {grid name: images [R, N, H, W, C] in [-1, 1]}` (jit-compiled once; the
result replicated so process 0 can write it). The trainer passes the EMA params and the first evaluation
batch (the draw keeps its first `sample.num_images` examples), and writes each grid as a PNG.

Built in:
  one_step_x0  for each t = noise_level * T: rows x_0 | observed image-like inputs (e.g. the masked
               image, hidden pixels grey) | z_t ~ q(z_t | z_0, X) | the model's one-step estimate
               x0_hat = (z_t - m_t - sqrt(1 - abar_t) eps_theta(z_t, t)) / sqrt(abar_t), all modalities
               observed. A denoising preview, not a sample from the reverse process.
  ddim_joint   N samples of the reverse process with nothing observed (`mmdiff_jax.sampling`, DDIM with
               `sample.sampler.num_steps` steps, eta `sample.sampler.eta`): one row.
  ddim_conditional  per image-like modality i: rows x_0 | x_i (observed) | a DDIM sample given x_i.
Other kinds are added with `register_sample_kind`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mmdiff_jax import diffusion, targets
from mmdiff_jax.modalities import MASK_KEY, modality_data
from mmdiff_jax.models.mt_diffusion import MTDiffusion
from mmdiff_jax.training import mesh as mesh_lib
from mmdiff_jax.training.task import DrawFn

Array = jax.Array
SampleFactory = Callable[[MTDiffusion, Any, Mapping[str, Any], Mesh], DrawFn]
SAMPLE_KINDS: dict[str, SampleFactory] = {}


def register_sample_kind(name: str) -> Callable[[SampleFactory], SampleFactory]:
    """Decorator: makes a sample factory available to config `sample.kinds` under `name`."""

    def register(factory: SampleFactory) -> SampleFactory:
        SAMPLE_KINDS[name] = factory
        return factory

    return register


def check_kinds(kinds: tuple[str, ...]) -> None:
    """ValueError naming the kinds no factory is registered for."""
    unknown = sorted(set(kinds) - set(SAMPLE_KINDS))
    if unknown:
        raise ValueError(f"config.sample.kinds: unknown {unknown}; known: {sorted(SAMPLE_KINDS)}")


def make_sample_fns(
    kinds: tuple[str, ...], model: MTDiffusion, schedule: Any, sample_config: Mapping[str, Any], mesh: Mesh
) -> dict[str, DrawFn]:
    """{kind: draw} for the listed kinds (`Task.make_sample_fns` of the MT-Diffusion task)."""
    check_kinds(kinds)
    return {kind: SAMPLE_KINDS[kind](model, schedule, sample_config, mesh) for kind in kinds}


@register_sample_kind("one_step_x0")
def one_step_x0(model: MTDiffusion, schedule: Any, sample_config: Mapping[str, Any], mesh: Mesh) -> DrawFn:
    num_steps = schedule.num_steps
    steps = sorted({min(max(round(level * num_steps), 1), num_steps) for level in sample_config["noise_levels"]})
    shown_inputs = [
        m for m in model.modalities if m.kind in ("image", "masked_image") and m.shape == tuple(model.z_shape)
    ]

    def draw(params: Any, batch: Mapping[str, Array], rng: Array) -> dict[str, Array]:
        count = sample_config["num_images"]
        batch = {key: value[:count] for key, value in batch.items()}
        variables = {"params": params}
        z_0 = jnp.asarray(batch[model.primary], jnp.float32)
        inputs = [jnp.asarray(modality_data(m, batch), jnp.float32)[..., : model.z_shape[-1]] for m in shown_inputs]
        encodings = model.apply(variables, batch, method=model.encode)
        grids = {}
        for t_value in steps:
            t = jnp.full((z_0.shape[0],), t_value, jnp.int32)
            eps = jax.random.normal(jax.random.fold_in(rng, t_value), z_0.shape)
            z_t = diffusion.marginal_sample(schedule, z_0, t, eps, encodings=encodings)
            output = model.apply(variables, batch, z_t, t, train=False)
            x0_hat = targets.z0_from_prediction(
                schedule, z_t, t, output.prediction, model.prediction, encodings=encodings
            )
            grids[f"one_step_x0_t{t_value}"] = jnp.stack([z_0, *inputs, z_t, x0_hat])
        return grids

    return jax.jit(draw, out_shardings=mesh_lib.replicated(mesh))


def _ddim(model: MTDiffusion, schedule: Any, sample_config: Mapping[str, Any]):
    from mmdiff_jax.sampling import make_sample_fn  # the sampling layer; imported only when a DDIM kind is listed

    return make_sample_fn(
        model,
        schedule,
        method="ddim",
        num_steps=min(sample_config["sampler"]["num_steps"], schedule.num_steps),
        eta=sample_config["sampler"]["eta"],
    )


@register_sample_kind("ddim_joint")
def ddim_joint(model: MTDiffusion, schedule: Any, sample_config: Mapping[str, Any], mesh: Mesh) -> DrawFn:
    sample = _ddim(model, schedule, sample_config)

    def draw(params: Any, batch: Mapping[str, Array], rng: Array) -> dict[str, Array]:
        samples = sample(params, rng, {}, batch_size=sample_config["num_images"])
        return {"ddim_joint": samples.image[None]}

    return jax.jit(draw, out_shardings=mesh_lib.replicated(mesh))


@register_sample_kind("ddim_conditional")
def ddim_conditional(model: MTDiffusion, schedule: Any, sample_config: Mapping[str, Any], mesh: Mesh) -> DrawFn:
    sample = _ddim(model, schedule, sample_config)
    conditions = [
        m for m in model.modalities if m.kind in ("image", "masked_image") and m.shape == tuple(model.z_shape)
    ]
    if not conditions:
        raise ValueError(
            "sample kind 'ddim_conditional' draws given an image-like modality of z's shape; "
            f"the model has {[m.name for m in model.modalities]}"
        )

    def draw(params: Any, batch: Mapping[str, Array], rng: Array) -> dict[str, Array]:
        batch = {key: value[: sample_config["num_images"]] for key, value in batch.items()}
        grids = {}
        for m in conditions:
            observed = {m.name: batch[m.name]}
            if m.kind == "masked_image":
                observed[MASK_KEY] = batch[MASK_KEY]
            shown = jnp.asarray(modality_data(m, batch), jnp.float32)[..., : model.z_shape[-1]]
            samples = sample(params, jax.random.fold_in(rng, len(grids)), observed)
            grids[f"ddim_given_{m.name}"] = jnp.stack(
                [jnp.asarray(batch[model.primary], jnp.float32), shown, samples.image]
            )
        return grids

    return jax.jit(draw, out_shardings=mesh_lib.replicated(mesh))
