"""The samplers wired to a tiny MTDiffusion: observed modalities enter exactly as specified.

Modalities: a masked image (bridge weights), a label, a segmentation mask and a source image (head 'none':
always observed, bridge weights, as for image transition). The masked image's encoder is swapped for a
probe with a known map, E(x * mask, mask) = 0.5 x mask + 0.25, so the encodings the samplers must use can
be written down independently of the model's own code.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdiff_jax.models import mt_diffusion as mt_diffusion_module
from mmdiff_jax import schedules
from mmdiff_jax.modalities import Modality
from mmdiff_jax.models.mt_diffusion import MTDiffusion, init_variables
from mmdiff_jax.models.encoders import Encoder, rms_normalize
from mmdiff_jax.models.unet import unet_preset
from mmdiff_jax.sampling import (
    make_classify_fn,
    make_restore_fn,
    make_sample_fn,
    make_sdedit_fn,
    make_segment_fn,
    make_transition_fn,
    respace,
)

Z_SHAPE = (8, 8, 1)
BATCH = 2
NUM_STEPS = 8


class ProbeEncoder(Encoder):
    """A known map in place of the masked image's conv encoder: e = 0.5 * x * mask + 0.25."""

    def __call__(self, x):
        channels = self.z_shape[-1]
        return 0.5 * x[..., :channels] * x[..., channels:] + 0.25


def probe(image, mask):
    return 0.5 * np.asarray(image) * np.asarray(mask) + 0.25


def random_variables(model):
    """Random parameters of the right shapes (no compiled init): weights ~ N(0, 1 / fan_in), biases and
    norm offsets ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.1^2), tables ~ N(0, 1). Unlike the real init the
    U-Net's output convolution is not zero, so eps != 0."""
    shapes = jax.eval_shape(lambda rng: init_variables(model, rng), jax.random.key(0))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        values = rng.standard_normal(leaf.shape)
        if "table" in name:
            return jnp.asarray(values, jnp.float32)
        if len(leaf.shape) >= 2:
            return jnp.asarray(values / np.sqrt(np.prod(leaf.shape[:-1])), jnp.float32)
        return jnp.asarray(("scale" in name) + 0.1 * values, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def setup():
    original = mt_diffusion_module.make_encoder

    def make_encoder(kind, z_shape, **options):
        return ProbeEncoder(z_shape, False) if kind == "conv1x1" else original(kind, z_shape, **options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mt_diffusion_module, "make_encoder", make_encoder)
        specs = (
            Modality("masked_image", "masked_image", Z_SHAPE, weight_schedule=("bridge", 1.0)),
            Modality("label", "label", (), num_classes=3, weight_schedule=("constant", 0.5)),
            Modality("segmentation", "segmentation", Z_SHAPE[:2], num_classes=2, weight_schedule=("bump", 1.0)),
            # A source image for transition: always observed (no head), identity encoder, bridge weights.
            Modality("source", "image", Z_SHAPE, head="none", weight_schedule=("bridge", 0.5)),
        )
        model = MTDiffusion(unet_preset("tiny"), specs, Z_SHAPE)
        # A short chain with abar_T ~ 0.2: the DDIM chain stays well conditioned in float32.
        noise = schedules.schedule_from_beta(np.linspace(0.05, 0.3, NUM_STEPS))
        schedule = schedules.diffusion_schedule(
            noise, [schedules.weight_schedule(m.weight_schedule[0], noise, m.weight_schedule[1]) for m in specs]
        )
        variables = random_variables(model)
        keys = jax.random.split(jax.random.key(2), 4)
        image = jnp.tanh(jax.random.normal(keys[0], (BATCH,) + Z_SHAPE))
        mask = (jax.random.uniform(keys[1], (BATCH, 8, 8, 1)) > 0.5).astype(jnp.float32)
        source = jnp.tanh(jax.random.normal(keys[3], (BATCH,) + Z_SHAPE))
        observed = {"masked_image": image, "mask": mask, "source": source}
        prior_noise = jax.random.normal(keys[2], (BATCH,) + Z_SHAPE)
        ddim = make_sample_fn(model, schedule, method="ddim", num_steps=4, eta=0.0, clip_denoised=False)
        yield dict(
            model=model,
            schedule=schedule,
            variables=variables,
            image=image,
            mask=mask,
            source=source,
            observed=observed,
            prior_noise=prior_noise,
            ddim=ddim,
        )


def independent_chain(setup, masked_image_observed=True, prediction="eps", schedule=None):
    """DDIM eta = 0 written out from docs/design.md with ehat stated independently of the sampler: the probe's
    E(x) for the observed masked image (or E(D(h)) if not observed), E(D(h)) for the label (softmax
    expectation of the normalised table) and the segmentation (normalised conv of the head's softmax), and
    the source image itself (identity encoder, always observed). `prediction`: what the network's output is
    read as (v: eps = sqrt(abar_t) v + sqrt(1 - abar_t) (z_t - m_t), z_0 = sqrt(abar_t) (z_t - m_t) - sqrt(1 - abar_t) v;
    z_0: eps = (z_t - m_t - sqrt(abar_t) z_0) / sqrt(1 - abar_t)). `schedule`: another than the setup's."""
    model, variables = setup["model"], setup["variables"]
    schedule = setup["schedule"] if schedule is None else schedule
    network = jax.jit(lambda z, t: model.apply(variables, z, t, {"source": setup["source"]}, method=model.predict))
    segmentation_conv = variables["params"]["encoders_segmentation"]["conv"]
    encode_segmentation = jax.jit(
        lambda probabilities: rms_normalize(
            nn.Conv(Z_SHAPE[-1], (3, 3)).apply({"params": segmentation_conv}, probabilities)
        )
    )
    table = np.asarray(rms_normalize(variables["params"]["encoders_label"]["table"]))
    lambda_ = np.asarray(schedule.lambda_, np.float64)
    alpha_bar, one_minus = (np.asarray(a, np.float64) for a in (schedule.alpha_bar, schedule.one_minus_alpha_bar))
    observed_encoding = probe(setup["image"], setup["mask"])

    def encodings_and_eps(z, t):
        output = network(jnp.asarray(z, jnp.float32), jnp.full((BATCH,), t, jnp.int32))
        label = np.asarray(jax.nn.softmax(output.heads["label"])) @ table
        segmentation = encode_segmentation(jax.nn.softmax(output.heads["segmentation"]))
        masked = observed_encoding
        if not masked_image_observed:
            predicted = np.asarray(output.heads["masked_image"])
            masked = probe(predicted[..., :1], predicted[..., 1:])
        encodings = [masked, label.reshape((BATCH,) + Z_SHAPE), np.asarray(segmentation), setup["source"]]
        return np.asarray(output.prediction, np.float64), [np.asarray(e, np.float64) for e in encodings], output.heads

    def m(t, encodings):
        return sum(lambda_[i, t] * encodings[i] for i in range(4))

    noise = np.asarray(setup["prior_noise"], np.float64)
    z = noise + m(NUM_STEPS, encodings_and_eps(noise, NUM_STEPS)[1])  # prior mean m_T with ehat
    steps = list(respace(NUM_STEPS, 4)) + [0]
    for t, s in zip(steps[:-1], steps[1:]):
        output, encodings, heads = encodings_and_eps(z, t)
        u_t = z - m(t, encodings)
        eps = {
            "eps": output,
            "v": np.sqrt(alpha_bar[t]) * output + np.sqrt(one_minus[t]) * u_t,
            "z_0": (u_t - np.sqrt(alpha_bar[t]) * output) / np.sqrt(one_minus[t]),
        }[prediction]
        z_0 = {
            "eps": (u_t - np.sqrt(one_minus[t]) * eps) / np.sqrt(alpha_bar[t]) if prediction == "eps" else None,
            "v": np.sqrt(alpha_bar[t]) * u_t - np.sqrt(one_minus[t]) * output,
            "z_0": output,
        }[prediction]
        z = np.sqrt(alpha_bar[s]) * z_0 + np.sqrt(one_minus[s]) * eps + m(s, encodings)
    return z, heads


def test_observed_modalities_enter_the_prior_and_reverse_means_as_specified(setup):
    expected, heads = independent_chain(setup)
    samples = setup["ddim"](setup["variables"], jax.random.key(5), setup["observed"], prior_noise=setup["prior_noise"])
    np.testing.assert_allclose(samples.z_0, expected, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(samples.image, np.clip(expected, -1, 1), atol=2e-4)
    # The statement is sharp: with the masked image unobserved (E(D(h)) in its place) the chain ends elsewhere.
    unobserved, _ = independent_chain(setup, masked_image_observed=False)
    assert np.abs(unobserved - expected).mean() > 0.05
    # The bridge weight puts lambda_T = 1 - sqrt(abar_T) of the probe's encoding into the prior mean m_T.
    assert float(setup["schedule"].lambda_[0, -1]) > 0.5
    # Heads' outputs from the last model call, decoded.
    np.testing.assert_allclose(samples.outputs["label"]["probabilities"], jax.nn.softmax(heads["label"]), atol=1e-5)
    np.testing.assert_array_equal(samples.outputs["label"]["class_ids"], np.argmax(heads["label"], -1))
    assert samples.outputs["segmentation"]["class_map"].shape == (BATCH, 8, 8)
    assert samples.outputs["masked_image"]["image"].shape == (BATCH,) + Z_SHAPE
    # A different rng with the same prior noise: same result (eta = 0), and no recompilation.
    again = setup["ddim"](setup["variables"], jax.random.key(6), setup["observed"], prior_noise=setup["prior_noise"])
    np.testing.assert_array_equal(again.z_0, samples.z_0)
    assert setup["ddim"]._cache_size() == 1


@pytest.mark.parametrize("prediction", ["v", "z_0"])
def test_a_model_predicting_v_or_z0_samples_through_its_eps(setup, prediction):
    """The same network read as a v- or z_0-predictor: the sampler converts its output to eps with the step's
    ehat in m_t, exactly as the chain written out independently."""
    model = setup["model"].clone(prediction=prediction)
    sample = make_sample_fn(model, setup["schedule"], method="ddim", num_steps=4, eta=0.0, clip_denoised=False)
    samples = sample(setup["variables"], jax.random.key(5), setup["observed"], prior_noise=setup["prior_noise"])
    expected, _ = independent_chain(setup, prediction=prediction)
    np.testing.assert_allclose(samples.z_0, expected, atol=2e-4, rtol=1e-4)
    as_eps, _ = independent_chain(setup)
    assert np.abs(as_eps - expected).mean() > 0.05  # the reading matters


def test_a_v_model_samples_a_zero_terminal_snr_chain(setup):
    """On a zero-terminal-SNR schedule (bump weights: lambda_T = 0) the first step from T reads the network's own
    z_0 = -v (eps = z_T carries no signal), the rest as above: the chain written out independently; an eps model
    is refused before tracing."""
    noise = schedules.rescale_zero_terminal_snr(schedules.schedule_from_beta(np.linspace(0.05, 0.3, NUM_STEPS)))
    schedule = schedules.diffusion_schedule(noise, [schedules.weight_schedule("bump", noise, 1.0)] * 4)
    model = setup["model"].clone(prediction="v")
    sample = make_sample_fn(model, schedule, method="ddim", num_steps=4, eta=0.0, clip_denoised=False)
    samples = sample(setup["variables"], jax.random.key(5), setup["observed"], prior_noise=setup["prior_noise"])
    expected, _ = independent_chain(setup, prediction="v", schedule=schedule)
    np.testing.assert_allclose(samples.z_0, expected, atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="needs the 'v' or 'z_0' prediction target"):
        make_sample_fn(setup["model"], schedule)(setup["variables"], jax.random.key(5), setup["observed"])


def test_transition_observes_the_source_image(setup):
    transition = make_transition_fn(
        setup["model"], setup["schedule"], "source", method="ddim", num_steps=4, eta=0.0, clip_denoised=False
    )
    others = {"masked_image": setup["image"], "mask": setup["mask"]}
    samples = transition(
        setup["variables"], setup["source"], jax.random.key(0), others, prior_noise=setup["prior_noise"]
    )
    reference = setup["ddim"](
        setup["variables"], jax.random.key(0), setup["observed"], prior_noise=setup["prior_noise"]
    )
    np.testing.assert_allclose(samples.z_0, reference.z_0, atol=1e-6)
    flipped = transition(
        setup["variables"], -setup["source"], jax.random.key(0), others, prior_noise=setup["prior_noise"]
    )
    assert np.abs(np.asarray(flipped.z_0) - np.asarray(samples.z_0)).mean() > 0.05
    with pytest.raises(ValueError, match="transition"):
        make_transition_fn(setup["model"], setup["schedule"], "label")


def test_label_guidance_uses_the_label_head(setup):
    model, schedule, variables = setup["model"], setup["schedule"], setup["variables"]
    guided = make_sample_fn(model, schedule, method="ddim", num_steps=4, eta=0.0, clip_denoised=False, guidance="label")
    target = jnp.array([0, 2])
    call = dict(prior_noise=setup["prior_noise"], guidance_labels=target)
    unguided = setup["ddim"](variables, jax.random.key(0), setup["observed"], prior_noise=setup["prior_noise"])
    at_zero = guided(variables, jax.random.key(0), setup["observed"], guidance_scale=0.0, **call)
    np.testing.assert_allclose(at_zero.z_0, unguided.z_0, atol=1e-5)
    strong = guided(variables, jax.random.key(0), setup["observed"], guidance_scale=30.0, **call)
    assert guided._cache_size() == 1  # the scale is traced
    probability = lambda s: np.asarray(s.outputs["label"]["probabilities"])[np.arange(BATCH), target]  # noqa: E731
    assert np.all(probability(strong) > probability(unguided))


def test_restoration_keeps_the_known_pixels_and_decodes_every_head(setup):
    restore = make_restore_fn(setup["model"], setup["schedule"], "masked_image", method="ddpm")
    samples = restore(
        setup["variables"], setup["image"], setup["mask"], jax.random.key(3), observed={"source": setup["source"]}
    )
    known = np.asarray(setup["mask"])[..., 0] == 1
    np.testing.assert_allclose(np.asarray(samples.z_0)[known], np.asarray(setup["image"])[known], atol=1e-6)
    assert np.abs(np.asarray(samples.z_0)[~known] - np.asarray(setup["image"])[~known]).mean() > 0.05
    assert np.all(np.isfinite(samples.z_0))
    label = samples.outputs["label"]
    np.testing.assert_allclose(np.sum(label["probabilities"], -1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(label["class_ids"], np.argmax(label["probabilities"], -1))
    with pytest.raises(ValueError, match="masked_image"):
        make_sample_fn(setup["model"], setup["schedule"], repaint="label")


def test_plain_model_restores_by_reimposition_and_sdedit():
    """A model that observes nothing (N = 0, plain DDPM): restoration re-imposes the known pixels alone (the
    same chain as the sampler with `known_region`), SDEdit starts from the guide; both need N = 0 inputs only."""
    plain = MTDiffusion(unet=unet_preset("tiny"), modalities=(), z_shape=Z_SHAPE)
    schedule = schedules.diffusion_schedule(schedules.schedule_from_beta(np.linspace(0.05, 0.3, NUM_STEPS)), [])
    variables = random_variables(plain)
    rng = np.random.default_rng(1)
    image = jnp.asarray(rng.uniform(-1, 1, (BATCH,) + Z_SHAPE), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(BATCH,) + Z_SHAPE[:2] + (1,)) < 0.5, jnp.float32)
    restore = make_restore_fn(plain, schedule, None, method="ddim", num_steps=4)
    restored = restore(variables, image, mask, jax.random.key(2))
    known = np.asarray(mask)[..., 0] == 1
    np.testing.assert_allclose(np.asarray(restored.z_0)[known], np.asarray(image)[known], atol=1e-6)
    direct = make_sample_fn(plain, schedule, method="ddim", num_steps=4)(
        variables, jax.random.key(2), batch_size=BATCH, known_region=(image, mask)
    )
    np.testing.assert_array_equal(restored.z_0, direct.z_0)
    with pytest.raises(ValueError, match="needs repaint=True"):
        make_restore_fn(plain, schedule, None, repaint=False)
    sdedit = make_sdedit_fn(plain, schedule, strength=0.5, num_steps=4)
    edited = sdedit(variables, image, jax.random.key(3))
    assert edited.image.shape == image.shape and np.all(np.abs(edited.image) <= 1.0) and edited.outputs == {}
    assert np.all(np.isfinite(edited.z_0))


def test_classification_and_segmentation_by_the_heads(setup):
    model, schedule, variables = setup["model"], setup["schedule"], setup["variables"]
    classify = make_classify_fn(model, schedule, num_noise_samples=3)
    segment = make_segment_fn(model, schedule, num_noise_samples=3)
    image, source = setup["image"], {"source": setup["source"]}
    labels = classify(variables, image, jax.random.key(0), source, t=2)
    assert labels["class_ids"].shape == (BATCH,) and labels["probabilities"].shape == (BATCH, 3)
    np.testing.assert_allclose(np.sum(labels["probabilities"], -1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(labels["class_ids"], np.argmax(labels["probabilities"], -1))
    again = classify(variables, image, jax.random.key(0), source, t=2)
    np.testing.assert_array_equal(again["probabilities"], labels["probabilities"])
    other_level = classify(variables, image, jax.random.key(0), source, t=7)
    assert np.abs(np.asarray(other_level["probabilities"]) - np.asarray(labels["probabilities"])).max() > 1e-4
    masks = segment(variables, image, jax.random.key(0), source, t=2)
    assert masks["class_map"].shape == (BATCH, 8, 8) and masks["probabilities"].shape == (BATCH, 8, 8, 2)
    with pytest.raises(ValueError, match="cannot be observed"):
        classify(variables, image, jax.random.key(0), {"label": jnp.zeros(BATCH, jnp.int32)})
