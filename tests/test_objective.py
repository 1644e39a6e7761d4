"""The training loss function: jit/grad, weights wiring, plain-DDPM reduction, bf16, clear errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmdiff_jax.modalities import Modality, modality_schedule
from mmdiff_jax.models.mt_diffusion import MTDiffusion, init_variables
from mmdiff_jax.models.unet import unet_preset
from mmdiff_jax.objective import LossConfig, make_loss_fn
from tests.test_modalities import KEY, MICRO, Z_SHAPE, random_batch

MODALITIES = (
    Modality("label", "label", num_classes=10, loss_weight=0.5),
    Modality("masked_image", "masked_image", (8, 8, 1), loss_weight=0.01),
)


@pytest.fixture(scope="module")
def setup():
    model = MTDiffusion(MICRO, MODALITIES, Z_SHAPE)
    params = jax.jit(lambda key: init_variables(model, key, 2))(KEY)["params"]
    return model, modality_schedule("linear", 100, MODALITIES), params, random_batch(MODALITIES, batch_size=4)


def test_loss_and_gradients_under_jit(setup):
    model, schedule, params, batch = setup
    recovery_weights = {"label": 2.0, "masked_image": 0.01}

    def with_label_weight(weight):  # lambda_i is the modality's loss_weight
        label = dataclasses.replace(MODALITIES[0], loss_weight=weight)
        return make_loss_fn(model.clone(modalities=(label, MODALITIES[1])), schedule)

    loss_fns = {weight: with_label_weight(weight) for weight in (0.5, 2.0)}

    @jax.jit
    def run(params, batch, rng):
        (loss, metrics), grads = jax.value_and_grad(loss_fns[2.0], has_aux=True)(params, batch, rng)
        other_loss, _ = loss_fns[0.5]({"params": params}, batch, rng)  # the full variables dict works too
        return loss, metrics, grads, other_loss

    loss, metrics, grads, other_loss = run(params, batch, KEY)
    assert set(metrics) == {
        "loss",
        "eps_mse",
        "aggregation_mse",
        "recovery/label",
        "recovery/masked_image",
        "accuracy/label",
    }
    expected = (
        metrics["eps_mse"]
        + metrics["aggregation_mse"]
        + sum(weight * metrics[f"recovery/{name}"] for name, weight in recovery_weights.items())
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # Same rng, same t and eps: only the label's recovery weight differs.
    np.testing.assert_allclose(loss - other_loss, 1.5 * metrics["recovery/label"], rtol=1e-4)
    # A fresh model predicts eps = 0 (zero-initialised output conv) and near-uniform labels.
    assert 0.6 < float(metrics["eps_mse"]) < 1.4
    assert abs(float(metrics["recovery/label"]) - np.log(10)) < 0.5
    assert 0.0 <= float(metrics["accuracy/label"]) <= 1.0
    for group in ("backbone", "encoders_label", "encoders_masked_image", "decoders_label", "decoders_masked_image"):
        norm = float(optax.tree.norm(grads[group]))
        assert np.isfinite(norm) and norm > 0, group
    # Another rng draws other t and eps.
    assert float(run(params, batch, jax.random.fold_in(KEY, 1))[0]) != float(loss)


def test_v_and_z0_predictions_train_on_their_targets(setup):
    """A fresh model outputs exactly 0 (zero-initialised output conv), so the first term is the mean square of
    the target: mean(z_0^2) for 'z_0'; for 'v' that of sqrt(abar_t) eps - sqrt(1 - abar_t) z_0 at the t and eps
    the loss draws (t, eps from the first two of split(rng, 3))."""
    model, schedule, params, batch = setup
    z_0 = np.asarray(batch["image"], np.float64)
    step_rng, noise_rng, _ = jax.random.split(KEY, 3)
    t = np.asarray(jax.random.randint(step_rng, (z_0.shape[0],), 1, schedule.num_steps + 1))
    eps = np.asarray(jax.random.normal(noise_rng, z_0.shape, jnp.float32), np.float64)
    alpha_bar = np.asarray(schedule.alpha_bar, np.float64)[t][:, None, None, None]
    v = np.sqrt(alpha_bar) * eps - np.sqrt(1.0 - alpha_bar) * z_0
    for prediction, expected in (("z_0", np.mean(z_0**2)), ("v", np.mean(v**2))):
        loss_fn = make_loss_fn(model.clone(prediction=prediction), schedule)
        loss, metrics = jax.jit(loss_fn)(params, batch, KEY)
        assert "eps_mse" not in metrics
        np.testing.assert_allclose(metrics[f"{prediction}_mse"], expected, rtol=1e-5)
        assert np.isfinite(float(loss))
    with pytest.raises(ValueError, match="unknown prediction target 'x0'"):
        model.clone(prediction="x0")


def test_without_auxiliary_modalities_it_is_plain_ddpm():
    model = MTDiffusion(MICRO, (), Z_SHAPE)
    schedule = modality_schedule("cosine", 50, ())
    params = jax.jit(lambda key: init_variables(model, key, 2))(KEY)["params"]
    batch = {"image": random_batch((), batch_size=8)["image"]}
    loss, metrics = jax.jit(make_loss_fn(model, schedule, LossConfig(eps_weight=2.0)))(params, batch, KEY)
    assert float(metrics["aggregation_mse"]) == 0.0
    np.testing.assert_allclose(loss, 2.0 * metrics["eps_mse"], rtol=1e-6)
    assert 0.7 < float(metrics["eps_mse"]) < 1.3  # eps_theta = 0 at init: mean eps^2 over 512 draws


def test_bf16_compute_gives_float32_loss_close_to_float32(setup):
    model, schedule, params, batch = setup
    bf16 = MTDiffusion(MICRO, MODALITIES, Z_SHAPE, dtype=jnp.bfloat16)
    losses = [jax.jit(make_loss_fn(m, schedule))(params, batch, KEY) for m in (model, bf16)]
    assert losses[1][0].dtype == jnp.float32
    np.testing.assert_allclose(losses[1][0], losses[0][0], rtol=0.02)


def test_configuration_errors_are_clear(setup):
    model, schedule, params, batch = setup
    with pytest.raises(ValueError, match=r"unknown loss config keys \['recovery_weights'\]"):
        make_loss_fn(model, schedule, {"recovery_weights": {"label": 1.0}})  # loss_weight of the modality
    with pytest.raises(ValueError, match=r"unknown loss config keys \['eps_weigth'\]"):
        make_loss_fn(model, schedule, {"eps_weigth": 1.0})
    with pytest.raises(ValueError, match="the schedule has weights for 1 modalities but the model has 2"):
        make_loss_fn(model, modality_schedule("linear", 100, MODALITIES[:1]))
    loss_fn = make_loss_fn(model, schedule)
    with pytest.raises(ValueError, match=r"batch is missing keys \['label'\]"):
        jax.jit(loss_fn)(params, {k: v for k, v in batch.items() if k != "label"}, KEY)
    with pytest.raises(ValueError, match=r"batch\['mask'\] must have shape"):
        loss_fn(params, batch | {"mask": batch["mask"][..., 0]}, KEY)


def test_unet_preset_default_fits_32x32_fashion_mnist():
    model = MTDiffusion(unet_preset("default"), (Modality("label", "label", num_classes=10),), (32, 32, 1))
    shapes = jax.eval_shape(lambda: init_variables(model, KEY))
    count = sum(x.size for x in jax.tree.leaves(shapes))
    print(f"\n'default' image+label model parameters: {count:,}")
    assert 1e6 < count < 2e7


def test_the_class_conditional_baseline_trains_on_the_configs_prediction_target():
    """The joint_image_label baseline regresses `model.prediction`'s target (its fresh U-Net outputs 0, so the
    loss is the target's mean square), says so in its loss, and keys its checkpoint on it unless it is eps."""
    from configs.joint_image_label import get_config
    from mmdiff_jax import tasks

    config = get_config("tiny")
    config.model.prediction = "eps"
    eps_task = tasks.make_class_conditional_ddpm_task(config)
    config.model.prediction = "v"
    task = tasks.make_class_conditional_ddpm_task(config)
    assert (eps_task.loss_description, task.loss_description) == ("eps-MSE", "v-MSE")
    assert "prediction" not in eps_task.signature["class_conditional_ddpm"]
    assert task.signature["class_conditional_ddpm"]["prediction"] == "v"
    params = jax.jit(task.init_params)(KEY)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (4, 28, 28, 1)).astype(np.float32), "label": np.arange(4, dtype=np.int32)}
    loss, metrics = jax.jit(task.loss_fn)(params, batch, KEY)
    t_key, noise_key, _ = jax.random.split(KEY, 3)
    t = np.asarray(jax.random.randint(t_key, (4,), 1, task.schedule.num_steps + 1))
    eps = np.asarray(jax.random.normal(noise_key, batch["image"].shape), np.float64)
    alpha_bar = np.asarray(task.schedule.alpha_bar, np.float64)[t][:, None, None, None]
    v = np.sqrt(alpha_bar) * eps - np.sqrt(1.0 - alpha_bar) * batch["image"]
    np.testing.assert_allclose(metrics["v_mse"], np.mean(v**2), rtol=1e-5)
    np.testing.assert_allclose(loss, metrics["v_mse"])


def test_the_loss_in_words_names_the_terms_the_loss_has():
    """The aggregation term only where some weight schedule is not 'zero' (there it is identically 0)."""
    from mmdiff_jax.tasks.mt_diffusion import describe_loss

    conditioned = Modality(name="label", kind="label", num_classes=10, weight_schedule=("zero", 1.0), head="none")
    aggregated = Modality(name="label", kind="label", num_classes=10)
    assert describe_loss((), "v") == "v-MSE"
    assert describe_loss((conditioned,), "v") == "v-MSE"
    assert describe_loss((), "v", zero_terminal_snr=True) == "v-MSE; zero-terminal-SNR schedule"
    assert describe_loss((aggregated,), "eps", learn_variance=True) == (
        "eps-MSE + aggregation MSE + NLL of label + lambda L_vlb (learned variance)"
    )


def test_the_segmenter_and_classifier_baselines_are_the_unet_with_the_modalitys_head():
    """The single-task baselines (`make_segmenter_task`, `make_classifier_task`): per-pixel logits [B, H, W, K]
    from the segmentation modality's conv head, [B, K] from the label's MLP head; the loss is the mean
    cross-entropy of those logits, written out here."""
    from configs import image_segmentation, joint_image_label
    from mmdiff_jax import tasks

    rng = np.random.default_rng(0)
    for config, task_fn, name, target_shape, head in (
        (image_segmentation.get_config("tiny"), tasks.make_segmenter_task, "segmentation", (2, 32, 32), "ConvHead_0"),
        (joint_image_label.get_config("tiny"), tasks.make_classifier_task, "label", (2,), "MLPHead_0"),
    ):
        task = task_fn(config)
        params = jax.jit(task.init_params)(KEY)
        assert head in params
        image = rng.uniform(-1, 1, (2,) + tuple(config.model.z_shape)).astype(np.float32)
        target = rng.integers(0, config.model.modalities[name]["num_classes"], target_shape).astype(np.int32)
        logits = np.asarray(task.model.apply({"params": params}, image), np.float64)
        assert logits.shape == target_shape + (config.model.modalities[name]["num_classes"],)
        log_p = logits - logits.max(-1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
        expected = -np.mean(np.take_along_axis(log_p, target[..., None], -1))
        loss, metrics = jax.jit(functools.partial(task.loss_fn, train=False))(
            params, {"image": image, name: target}, KEY
        )
        np.testing.assert_allclose(loss, expected, rtol=1e-5)
        np.testing.assert_allclose(metrics["accuracy"], np.mean(logits.argmax(-1) == target), rtol=1e-6)
