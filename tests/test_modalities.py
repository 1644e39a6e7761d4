"""Modality specs, encoders, heads and the assembled MTDiffusion model: shapes, wiring, build-time errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdiff_jax.modalities import Modality, modality_schedule, validate_batch
from mmdiff_jax.models.mt_diffusion import MTDiffusion, example_batch, init_variables
from mmdiff_jax.models.encoders import make_encoder
from mmdiff_jax.models.unet import unet_preset

KEY = jax.random.key(0, impl="rbg")  # rbg: much faster XLA compiles of the initialisers on CPU
Z_SHAPE = (8, 8, 1)
TINY = unet_preset("tiny")
# One level (no down/up sampling) halves the compile time of the jit-ed init/apply on CPU.
MICRO = unet_preset("tiny", channel_multipliers=(1,), attention_resolutions=())

SETTINGS = {
    "masked_image": (Modality("masked_image", "masked_image", (8, 8, 1)),),
    "label": (Modality("label", "label", num_classes=10),),
    "segmentation": (Modality("segmentation", "segmentation", (8, 8), num_classes=4),),
    "embedding": (Modality("embedding", "vector", (5,)),),
}
HEAD_SHAPES = {"masked_image": (8, 8, 2), "label": (10,), "segmentation": (8, 8, 4), "embedding": (5,)}


def random_batch(modalities, batch_size=2, seed=0, z_shape=Z_SHAPE):
    rng = np.random.default_rng(seed)
    batch = {"image": rng.uniform(-1, 1, (batch_size,) + z_shape).astype(np.float32)}
    for m in modalities:
        if m.kind in ("label", "segmentation"):
            batch[m.name] = rng.integers(0, m.num_classes, (batch_size,) + m.shape).astype(np.int32)
        else:
            batch[m.name] = rng.normal(size=(batch_size,) + m.shape).astype(np.float32)
        if m.kind == "masked_image":
            batch["mask"] = (rng.uniform(size=(batch_size,) + m.shape[:2] + (1,)) < 0.5).astype(np.float32)
            batch[m.name] = batch[m.name] * batch["mask"]
    return {key: jnp.asarray(value) for key, value in batch.items()}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_each_setting_runs_init_and_apply_under_jit(setting):
    modalities = SETTINGS[setting]
    model = MTDiffusion(MICRO, modalities, Z_SHAPE)
    variables = jax.jit(lambda key: init_variables(model, key, 2))(KEY)
    batch, t = random_batch(modalities), jnp.array([3, 700])

    @jax.jit
    def run(variables, batch):
        output = model.apply(variables, batch, batch["image"], t, train=True, rngs={"dropout": KEY})
        predicted = model.apply(variables, batch["image"], t, {}, method=model.predict)
        return output, predicted, model.apply(variables, batch, method=model.encode)

    output, predicted, encodings = run(variables, batch)
    assert output.prediction.shape == (2,) + Z_SHAPE and output.prediction.dtype == jnp.float32
    assert {name: head.shape for name, head in output.heads.items()} == {setting: (2,) + HEAD_SHAPES[setting]}
    assert output.encodings.shape == output.estimated_encodings.shape == (1, 2) + Z_SHAPE
    np.testing.assert_allclose(output.encodings, encodings, atol=1e-6)
    # Learned encoders are RMS-normalised per example.
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(jnp.square(encodings), axis=(2, 3, 4))), 1.0, rtol=1e-3)
    # Without observations, predict's ehat is the training pass's E(D(h)), which ignores the batch's x_i.
    np.testing.assert_allclose(predicted.estimated_encodings, output.estimated_encodings, atol=1e-5)
    assert predicted.encodings is None


def test_estimated_encodings_use_observed_data_and_heads_otherwise():
    modalities = SETTINGS["label"] + SETTINGS["segmentation"]
    model = MTDiffusion(MICRO, modalities, Z_SHAPE)
    variables = jax.jit(lambda key: init_variables(model, key, 2))(KEY)
    batch, other = random_batch(modalities, seed=1), random_batch(modalities, seed=2)
    t = jnp.array([5, 5])

    @jax.jit
    def run(variables, batch, other):
        output = model.apply(variables, batch, batch["image"], t, train=False)
        changed = model.apply(variables, other | {"image": batch["image"]}, batch["image"], t, train=False)
        observed = model.apply(variables, batch["image"], t, {"label": batch["label"]}, method=model.predict)
        return output, changed, observed

    output, changed, observed = run(variables, batch, other)
    assert not np.allclose(output.encodings, changed.encodings)  # e_i follows the batch ...
    np.testing.assert_allclose(output.estimated_encodings, changed.estimated_encodings, atol=1e-6)  # ehat: z_t only
    np.testing.assert_allclose(observed.estimated_encodings[0], output.encodings[0], atol=1e-6)  # observed: e_i
    np.testing.assert_allclose(observed.estimated_encodings[1], output.estimated_encodings[1], atol=1e-6)


def test_encoders_reencode_predictions_consistently():
    z_shape = (4, 4, 2)
    cases = [
        ("table", dict(num_classes=3), jnp.array([0, 2]), jax.nn.one_hot(jnp.array([0, 2]), 3) * 50.0),
        (
            "onehot_conv",
            dict(num_classes=3),
            jnp.array([[[0, 1, 2, 1]] * 4, [[2] * 4] * 4]),
            jax.nn.one_hot(jnp.array([[[0, 1, 2, 1]] * 4, [[2] * 4] * 4]), 3) * 50.0,
        ),
    ]
    for kind, options, data, confident_logits in cases:
        encoder = make_encoder(kind, z_shape, normalize=True, **options)
        variables = jax.jit(encoder.init)(KEY, data)
        e = encoder.apply(variables, data)
        assert e.shape == (2,) + z_shape
        # A confident head re-encodes to the data's encoding (softmax expectation of the embedding).
        np.testing.assert_allclose(encoder.apply(variables, confident_logits, method="from_prediction"), e, atol=1e-4)
    table = make_encoder("table", z_shape, normalize=True, num_classes=3)
    variables = jax.jit(table.init)(KEY, jnp.array([0]))
    rows = table.apply(variables, jnp.arange(3))
    probabilities = jnp.array([[0.2, 0.3, 0.5]])
    mixed = table.apply(variables, jnp.log(probabilities), method="from_prediction")
    np.testing.assert_allclose(mixed[0], 0.2 * rows[0] + 0.3 * rows[1] + 0.5 * rows[2], atol=1e-5)
    np.testing.assert_allclose(table.apply(variables, probabilities, method="from_probabilities"), mixed, atol=1e-6)
    # Identity on a masked image [x * mask, mask] keeps the observed pixels only; no normalisation.
    identity = make_encoder("identity", z_shape, normalize=False)
    x, mask = jnp.full((1, 4, 4, 2), 0.5), jnp.zeros((1, 4, 4, 1)).at[:, :2].set(1.0)
    np.testing.assert_allclose(identity.apply({}, jnp.concatenate([x * mask, mask], -1)), x * mask)
    np.testing.assert_allclose(identity.apply({}, x), x)


def test_all_kinds_output_shapes_with_an_auxiliary_image_and_bf16():
    modalities = (
        Modality("source", "image", (8, 8, 1), head="conv"),
        Modality("masked_image", "masked_image", (8, 8, 1), encoder="identity"),
        Modality("embedding", "vector", (5,), head_features="features"),
    )
    batch = random_batch(modalities)
    outputs = {}
    variables = jax.jit(lambda key: init_variables(MTDiffusion(MICRO, modalities, Z_SHAPE), key, 2))(KEY)
    for dtype in (jnp.float32, jnp.bfloat16):
        model = MTDiffusion(MICRO, modalities, Z_SHAPE, dtype=dtype)
        # The compute dtype does not change the (float32) parameters.
        shapes = jax.eval_shape(lambda: init_variables(model, KEY, 2))
        signature = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
        assert signature(shapes) == signature(variables)
        outputs[dtype] = jax.jit(lambda v, b: model.apply(v, b, b["image"], jnp.array([1, 9]), train=False))(
            variables, batch
        )
    output = outputs[jnp.float32]
    assert {k: v.shape for k, v in output.heads.items()} == {
        "source": (2, 8, 8, 1),
        "masked_image": (2, 8, 8, 2),
        "embedding": (2, 5),
    }
    # Identity encoders: e = x for the image, e = x * mask for the masked image (not normalised).
    np.testing.assert_allclose(output.encodings[0], batch["source"], atol=1e-6)
    np.testing.assert_allclose(output.encodings[1], batch["masked_image"] * batch["mask"], atol=1e-6)
    for name in output.heads:
        assert outputs[jnp.bfloat16].heads[name].dtype == jnp.float32
        np.testing.assert_allclose(outputs[jnp.bfloat16].heads[name], output.heads[name], atol=0.1, rtol=0.1)
    assert outputs[jnp.bfloat16].prediction.dtype == jnp.float32


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Modality("x", "audio", (3,)), "modality 'x': unknown kind 'audio'"),
        (
            lambda: Modality("x", "image", (8, 8, 1), loss="categorical"),
            "modality 'x': loss 'categorical' does not match",
        ),
        (
            lambda: Modality("y", "label", num_classes=3, loss="gaussian"),
            "modality 'y': loss 'gaussian' does not match",
        ),
        (lambda: Modality("y", "label", num_classes=3, head="conv"), "modality 'y': head 'conv' does not fit"),
        (
            lambda: Modality("y", "label", num_classes=3, encoder="linear"),
            "modality 'y': encoder 'linear' does not fit",
        ),
        (lambda: Modality("y", "label", num_classes=3, loss="none"), "modality 'y': head 'mlp' with loss 'none'"),
        (lambda: Modality("s", "segmentation", (8, 8, 1), num_classes=3), "modality 's': kind 'segmentation' needs"),
        (lambda: Modality("s", "segmentation", (8, 8), num_classes=1), "modality 's': kind 'segmentation' needs num"),
        (lambda: Modality("v", "vector", (4,), weight_schedule=("cosine", 1.0)), "modality 'v': unknown weight"),
        (lambda: MTDiffusion(TINY, (Modality("m", "masked_image", (4, 4, 1)),), Z_SHAPE), "modality 'm': encoder"),
        (lambda: MTDiffusion(TINY, (Modality("src", "image", (8, 8, 3)),), Z_SHAPE), "modality 'src': the identity"),
        (lambda: MTDiffusion(TINY, (Modality("s", "segmentation", (4, 4), num_classes=3),), Z_SHAPE), "modality 's'"),
        (lambda: MTDiffusion(TINY, SETTINGS["label"] * 2, Z_SHAPE), "modality 'label' is listed twice"),
        (lambda: MTDiffusion(TINY, (Modality("image", "vector", (3,)),), Z_SHAPE), "modality 'image': the name is res"),
        (lambda: MTDiffusion(TINY, (), (5, 5, 1)), "divisible by 2"),
    ],
)
def test_build_time_errors_name_the_modality(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_batch_validation_and_unknown_observed_names():
    modalities = SETTINGS["label"] + SETTINGS["masked_image"]
    batch = random_batch(modalities)
    assert validate_batch(modalities, Z_SHAPE, batch) == 2
    with pytest.raises(ValueError, match=r"missing keys \['mask'\]"):
        validate_batch(modalities, Z_SHAPE, {k: v for k, v in batch.items() if k != "mask"})
    with pytest.raises(ValueError, match=r"batch\['image'\] must have shape \[B, \*\(8, 8, 1\)\]"):
        validate_batch(modalities, Z_SHAPE, batch | {"image": jnp.zeros((2, 8, 8, 3))})
    with pytest.raises(ValueError, match=r"batch\['label'\] must be integer"):
        validate_batch(modalities, Z_SHAPE, batch | {"label": jnp.zeros((2,))})
    with pytest.raises(ValueError, match="disagree on the batch size"):
        validate_batch(modalities, Z_SHAPE, batch | {"label": jnp.zeros((3,), jnp.int32)})
    model = MTDiffusion(TINY, modalities, Z_SHAPE)
    variables = jax.eval_shape(lambda: init_variables(model, KEY))
    with pytest.raises(ValueError, match=r"observed modalities \['lable'\] are not in the model"):
        jax.eval_shape(
            lambda v: model.apply(v, batch["image"], 3, {"lable": batch["label"]}, method="predict"), variables
        )


def test_modality_schedule_rows_follow_the_modality_order():
    modalities = (
        Modality("a", "label", num_classes=2, weight_schedule=("bump", 1.0)),
        Modality("b", "vector", (3,), weight_schedule=("bridge", 0.5)),
    )
    schedule = modality_schedule("linear", 50, modalities)
    sqrt_alpha_bar = np.sqrt(np.asarray(schedule.alpha_bar))
    np.testing.assert_allclose(schedule.lambda_[0], 4 * sqrt_alpha_bar * (1 - sqrt_alpha_bar), atol=1e-6)
    np.testing.assert_allclose(schedule.lambda_[1], 0.5 * (1 - sqrt_alpha_bar), atol=1e-6)
    assert example_batch(MTDiffusion(TINY, modalities, Z_SHAPE), 3)["a"].shape == (3,)
