"""Conditioning the denoiser (docs/design.md section 3b): what the U-Net sees, condition dropout, the
aggregation-only limit, and classifier-free guidance (exact end points, a toy with a known answer)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdiff_jax import diffusion
from mmdiff_jax.modalities import MASK_KEY, Modality, modality_schedule
from mmdiff_jax.models.mt_diffusion import MTDiffusion, example_batch, init_variables
from mmdiff_jax.models.unet import UNet, unet_preset
from mmdiff_jax.objective import condition_dropout, make_loss_fn
from mmdiff_jax.sampling import Prediction, ddim_sample, ddpm_sample, make_sample_fn
from mmdiff_jax.sampling.guidance import classifier_free_guidance
from mmdiff_jax.schedules import make_schedule

SHAPE = (8, 8, 1)
UNET = unet_preset(
    "tiny", base_channels=8, channel_multipliers=(1, 2), attention_resolutions=(), num_head_channels=8, num_groups=4
)


def _model(*specs):
    return MTDiffusion(UNET, tuple(specs), SHAPE)


def _masked(condition="concat", **fields):
    return Modality("masked_image", "masked_image", SHAPE, condition=condition, **fields)


def _label(condition="embedding", **fields):
    return Modality("label", "label", (), num_classes=3, condition=condition, **fields)


def _perturbed(variables, seed=7):
    """Every parameter moved off its initial value (zero-initialised output layers included)."""
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _batch(model, batch_size=4, seed=0):
    batch = example_batch(model, batch_size)
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    batch["image"] = jax.random.uniform(next(keys), batch["image"].shape, minval=-1, maxval=1)
    if "masked_image" in batch:
        batch["masked_image"] = jax.random.uniform(next(keys), batch["masked_image"].shape, minval=-1, maxval=1)
        batch[MASK_KEY] = (jax.random.uniform(next(keys), batch[MASK_KEY].shape) > 0.5).astype(jnp.float32)
    if "label" in batch:
        batch["label"] = jnp.arange(batch_size, dtype=jnp.int32) % 3
    return batch


def _backbone_inputs(fn):
    """Runs fn() (jit-compiled) and returns every (x, condition_embedding, context) the U-Net was called with."""

    def collect():
        calls = []

        def interceptor(next_fun, args, kwargs, context):
            if isinstance(context.module, UNet) and context.method_name == "__call__":
                calls.append((args[0], kwargs.get("condition_embedding"), kwargs.get("context")))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            fn()
        return calls

    return jax.jit(collect)()


def test_denoiser_sees_exactly_the_observed_data_and_the_null_otherwise():
    model = _model(_masked(), _label())
    variables = _perturbed(init_variables(model, jax.random.key(0)))
    batch = _batch(model)
    table = variables["params"]["conditioners_label"]["table"]["embedding"]  # [K + 1, E], row K: the null class
    data = jnp.concatenate([batch["masked_image"] * batch[MASK_KEY], batch[MASK_KEY]], axis=-1)
    z_t, t = batch["image"], jnp.full((4,), 3)

    # Sampling: observed -> the data and presence 1; unobserved -> zeros, presence 0 and the null class.
    observed = {name: batch[name] for name in ("masked_image", MASK_KEY, "label")}
    ((x, embedding, context),) = _backbone_inputs(
        lambda: model.apply(variables, z_t, t, observed, method=model.predict)
    )
    np.testing.assert_array_equal(x[..., :1], z_t)
    np.testing.assert_array_equal(x[..., 1:3], data)
    np.testing.assert_array_equal(x[..., 3], 1.0)
    np.testing.assert_array_equal(embedding, table[batch["label"]])
    assert context is None
    ((x, embedding, _),) = _backbone_inputs(lambda: model.apply(variables, z_t, t, {}, method=model.predict))
    np.testing.assert_array_equal(x[..., 1:], 0.0)
    np.testing.assert_array_equal(embedding, jnp.broadcast_to(table[3], embedding.shape))

    # Training: the condition dropout's draw decides, per example and modality.
    schedule = modality_schedule("linear", 50, model.modalities)
    rng = jax.random.key(3)
    calls = _backbone_inputs(lambda: make_loss_fn(model, schedule)(variables, batch, rng))
    x, embedding, _ = calls[-1]
    present = condition_dropout(model.modalities, jax.random.fold_in(rng, 1), 4)
    shown = present["masked_image"].astype(jnp.float32)[:, None, None, None]
    np.testing.assert_array_equal(x[..., 1:3], data * shown)
    np.testing.assert_array_equal(x[..., 3:], jnp.broadcast_to(shown, x[..., 3:].shape))
    np.testing.assert_array_equal(embedding, table[jnp.where(present["label"], batch["label"], 3)])


def test_condition_dropout_draws_each_modality_independently_at_its_rate():
    modalities = (_masked(p_uncond=0.2), _label(p_uncond=0.7))
    present = condition_dropout(modalities, jax.random.key(0), 20_000)
    assert abs(float(present["masked_image"].mean()) - 0.8) < 0.015
    assert abs(float(present["label"].mean()) - 0.3) < 0.015
    correlation = np.corrcoef(np.asarray(present["masked_image"]), np.asarray(present["label"]))[0, 1]
    assert abs(correlation) < 0.03


def test_cross_attention_tokens_reach_the_unet_and_the_null_tokens_otherwise():
    model = _model(_masked("cross_attention", token_patch_size=4), _label("cross_attention"))
    variables = _perturbed(init_variables(model, jax.random.key(0)))
    batch = _batch(model)
    observed = {name: batch[name] for name in ("masked_image", MASK_KEY, "label")}
    ((x, _, seen),) = _backbone_inputs(
        lambda: model.apply(variables, batch["image"], 3, observed, method=model.predict)
    )
    ((_, _, hidden),) = _backbone_inputs(lambda: model.apply(variables, batch["image"], 3, {}, method=model.predict))
    assert x.shape[-1] == 1 and seen.shape == hidden.shape == (4, 4 + 1, 32)  # 2 x 2 patches + one label token
    params = variables["params"]
    nulls = jnp.concatenate([params["conditioners_masked_image"]["null"], params["conditioners_label"]["null"]])
    np.testing.assert_array_equal(hidden, jnp.broadcast_to(nulls, hidden.shape))
    np.testing.assert_array_equal(seen[:, 4], params["conditioners_label"]["table"]["embedding"][batch["label"]])
    assert not np.allclose(seen[:, :4], hidden[:, :4])
    eps = jax.jit(lambda observed: model.apply(variables, batch["image"], 3, observed, method=model.predict).prediction)
    eps_seen, eps_hidden = eps(observed), eps({"label": batch["label"]})
    assert float(jnp.max(jnp.abs(eps_seen - eps_hidden))) > 1e-4  # the masked image's tokens move eps


@pytest.mark.parametrize("condition", ["concat", "embedding"])
def test_p_uncond_one_gives_the_aggregation_only_loss(condition):
    spec = _masked() if condition == "concat" else _label()
    conditioned = _model(dataclasses.replace(spec, p_uncond=1.0))
    plain = _model(dataclasses.replace(spec, condition="none"))
    plain_params = _perturbed(init_variables(plain, jax.random.key(0)))["params"]
    params = dict(init_variables(conditioned, jax.random.key(1))["params"])
    # The shared parameters are the aggregation-only model's; the condition path's own are arbitrary, except
    # the null class row, which is added to the time embedding (zero: no offset).
    for name, value in plain_params.items():
        if name != "backbone":
            params[name] = value
    backbone = jax.tree.map(lambda x: x, plain_params["backbone"])
    if condition == "concat":  # the first convolution reads two condition channels, zero when hidden
        kernel = backbone["Conv_0"]["kernel"]
        backbone["Conv_0"]["kernel"] = jnp.concatenate(
            [kernel, jnp.ones(kernel.shape[:2] + (3,) + kernel.shape[3:])], axis=2
        )
    else:
        params["conditioners_label"]["table"]["embedding"] = (
            params["conditioners_label"]["table"]["embedding"].at[-1].set(0.0)
        )
    params["backbone"] = backbone
    schedule = modality_schedule("linear", 50, plain.modalities)
    batch = _batch(plain)
    for seed in range(3):
        expected = make_loss_fn(plain, schedule)(plain_params, batch, jax.random.key(seed))
        got = make_loss_fn(conditioned, schedule)(params, batch, jax.random.key(seed))
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)
        for key, value in expected[1].items():
            np.testing.assert_allclose(got[1][key], value, rtol=1e-6, atol=1e-7, err_msg=key)


def test_seen_modalities_leave_the_aggregation_and_recovery_terms():
    """p_uncond = 0: the masked image is always seen, so ehat = e (aggregation error 0) and its recovery NLL
    is not counted; the head still trains where hidden (p_uncond = 1 gives a positive NLL)."""
    seen = _model(_masked(p_uncond=0.0, encoder="conv1x1"))
    variables = _perturbed(init_variables(seen, jax.random.key(0)))
    schedule = modality_schedule("linear", 50, seen.modalities)
    batch = _batch(seen)
    _, metrics = make_loss_fn(seen, schedule)(variables, batch, jax.random.key(0))
    assert float(metrics["aggregation_mse"]) == 0.0 and float(metrics["recovery/masked_image"]) == 0.0
    hidden = _model(_masked(p_uncond=1.0, encoder="conv1x1"))
    _, metrics = make_loss_fn(hidden, schedule)(variables, batch, jax.random.key(0))
    assert float(metrics["aggregation_mse"]) > 0.0 and float(metrics["recovery/masked_image"]) > 0.0


def test_guidance_end_points_equal_the_unguided_samplers():
    model = _model(_masked(), _label())
    variables = _perturbed(init_variables(model, jax.random.key(0)))
    schedule = modality_schedule("linear", 50, model.modalities)
    batch = _batch(model, batch_size=3)
    observed = {name: batch[name] for name in ("masked_image", MASK_KEY, "label")}
    sample = make_sample_fn(model, schedule, num_steps=6, eta=1.0)
    rng = jax.random.key(4)
    conditional = sample(variables, rng, observed).z_0
    # The guidance weights are exact at these end points (0 * P_0 + 1 * P_1); what differs is the program: the
    # passes run as one batch of 6 instead of 3, which rounds apart by ~2e-6 over the 6 steps.
    np.testing.assert_allclose(sample(variables, rng, observed, cfg_scales=1.0).z_0, conditional, atol=1e-5)
    np.testing.assert_allclose(
        sample(variables, rng, observed, cfg_scales={"masked_image": 1.0}).z_0, conditional, atol=1e-5
    )

    # Scale 0: the denoiser sees nothing (the observed data still enter the aggregation).
    hidden = {"masked_image": jnp.zeros(3, bool), "label": jnp.zeros(3, bool)}

    def unconditioned(z_t, t):
        output = model.apply(variables, z_t, t, observed, present=hidden, method=model.predict)
        return Prediction(output.prediction, output.estimated_encodings, output.heads)

    expected = jax.jit(
        lambda: ddim_sample(unconditioned, schedule, rng, (3,) + SHAPE, num_steps=6, eta=1.0, clip_denoised=True).z_0
    )()
    np.testing.assert_allclose(sample(variables, rng, observed, cfg_scales=0.0).z_0, expected, atol=1e-5)
    np.testing.assert_allclose(
        sample(variables, rng, observed, cfg_scales={"masked_image": 0.0, "label": 0.0}).z_0, expected, atol=1e-5
    )
    guided = sample(variables, rng, observed, cfg_scales={"label": 3.0}).z_0
    assert float(jnp.max(jnp.abs(guided - conditional))) > 1e-3


def test_guidance_refuses_what_is_not_observed_and_conditioned():
    model = _model(_masked(), _label(condition="none"))
    variables = init_variables(model, jax.random.key(0))
    schedule = modality_schedule("linear", 50, model.modalities)
    sample = make_sample_fn(model, schedule, num_steps=2)
    batch = _batch(model, batch_size=2)
    with pytest.raises(ValueError, match="not observed conditioned"):
        sample(variables, jax.random.key(0), {"label": batch["label"]}, cfg_scales={"label": 2.0})
    with pytest.raises(ValueError, match="needs an observed conditioned modality"):
        sample(variables, jax.random.key(0), batch_size=2, cfg_scales=2.0)
    observed = {"masked_image": batch["masked_image"], MASK_KEY: batch[MASK_KEY]}
    with pytest.raises(ValueError, match="must be a scalar guidance scale"):
        sample(variables, jax.random.key(0), observed, cfg_scales=jnp.ones(2))
    with pytest.raises(ValueError, match="no masked image it belongs to"):
        sample(variables, jax.random.key(0), {MASK_KEY: batch[MASK_KEY]})


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(kind="label", shape=(), num_classes=3, condition="concat"), "does not fit kind"),
        (dict(kind="masked_image", shape=SHAPE, condition="embedding"), "does not fit kind"),
        (dict(kind="masked_image", shape=SHAPE, condition="attention"), "unknown condition"),
        (dict(kind="masked_image", shape=SHAPE, condition="concat", p_uncond=1.5), "p_uncond"),
        (dict(kind="masked_image", shape=SHAPE, condition="cross_attention", token_patch_size=3), "token_patch_size"),
    ],
)
def test_condition_fields_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        Modality("x", **fields)


def test_guided_gaussian_toy_reproduces_the_conditional_distribution():
    """Data x_0 | c ~ N(mu_c, s_c^2), x_0 ~ N(mu_u, s_u^2) without c: the exact eps of each is known in closed
    form, E[eps | z_t] = sqrt(1 - abar) (z_t - sqrt(abar) mu) / (abar s^2 + 1 - abar). Guided DDPM at scale 1
    samples the conditional distribution and at scale 0 the unconditional one (to Monte-Carlo error)."""
    schedule = make_schedule("linear", 200, [])
    conditional, unconditional = (0.6, 0.2), (-0.3, 0.5)

    def exact_eps(z_t, t, mean, std):
        alpha_bar = diffusion.at_step(schedule.alpha_bar, t, z_t)
        return jnp.sqrt(1 - alpha_bar) * (z_t - jnp.sqrt(alpha_bar) * mean) / (alpha_bar * std**2 + 1 - alpha_bar)

    def guided(scale):
        def denoise(z_t, t):
            passes = jnp.stack([exact_eps(z_t, t, *unconditional), exact_eps(z_t, t, *conditional)])
            empty = jnp.zeros((2, 0) + z_t.shape)
            return classifier_free_guidance(Prediction(passes, empty), jnp.array([scale]))

        return denoise

    shape = (20_000, 1, 1, 1)
    for scale, (mean, std) in ((1.0, conditional), (0.0, unconditional)):
        samples = jax.jit(lambda: ddpm_sample(guided(scale), schedule, jax.random.key(0), shape).z_0)()
        assert abs(float(samples.mean()) - mean) < 4 * std / np.sqrt(shape[0]) + 0.01, scale
        assert abs(float(samples.std()) - std) < 0.02, scale
