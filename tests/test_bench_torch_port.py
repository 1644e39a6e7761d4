"""The benchmark's PyTorch port (bench/torch_unet.py) is the same network and loss as the Flax model.

Same parameter count (tiny and default configs) and, with the Flax weights copied in, the same eps, label
logits, encodings, re-encodings and loss terms for given z_0, t and eps. Skipped without PyTorch (a
benchmark-only extra: pip install torch==2.13.0).
"""

import pathlib
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import torch_loss  # noqa: E402
import torch_unet  # noqa: E402

from mmdiff_jax import diffusion, losses  # noqa: E402
from mmdiff_jax.modalities import Modality, modality_schedule, recovery_nll  # noqa: E402
from mmdiff_jax.models.mt_diffusion import MTDiffusion, init_variables  # noqa: E402
from mmdiff_jax.models.unet import unet_preset  # noqa: E402


def _model(preset: str, z_shape, num_classes: int = 10, **overrides) -> MTDiffusion:
    label = Modality(name="label", kind="label", num_classes=num_classes, weight_schedule=("bump", 1.0))
    return MTDiffusion(unet=unet_preset(preset, **overrides), modalities=(label,), z_shape=z_shape)


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("preset", ["tiny", "default"])
def test_parameter_count_matches(preset):
    model = _model(preset, (32, 32, 1))
    shapes = jax.eval_shape(lambda key: init_variables(model, key), jax.random.key(0))["params"]
    port = torch_unet.LabelMTDiffusion(model.unet, model.z_shape, 10)
    assert torch_unet.count_params(port) == _count(shapes)


@pytest.mark.parametrize("resblock_updown", [True, False])
def test_same_outputs_and_loss_given_the_same_weights(resblock_updown):
    # 8x8 input: the tiny preset attends at resolution 4 (level 1) as well as in the middle block.
    model = _model("tiny", (8, 8, 2), num_classes=5, resblock_updown=resblock_updown)
    params = jax.eval_shape(lambda key: init_variables(model, key), jax.random.key(0))["params"]
    # Random weights everywhere (the zero-initialised output layers would hide errors).
    draw = np.random.default_rng(1).standard_normal
    params = jax.tree.map(lambda leaf: (0.3 * draw(leaf.shape)).astype(np.float32), params)
    port = torch_unet.LabelMTDiffusion(model.unet, model.z_shape, 5)
    assert torch_unet.load_flax_params(port, params) == _count(params)
    port.eval()

    schedule = modality_schedule("linear", 1000, model.modalities)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (3, 8, 8, 2)).astype(np.float32), "label": np.array([0, 3, 4], np.int32)}
    t = np.array([1, 500, 1000], np.int32)
    eps = rng.standard_normal((3, 8, 8, 2)).astype(np.float32)

    @jax.jit  # one compilation instead of many small op-by-op ones
    def reference(params, batch, t, eps):
        variables = {"params": params}
        encodings = model.apply(variables, batch, method=model.encode)
        z_t = diffusion.marginal_sample(schedule, batch["image"], t, eps, encodings=encodings)
        output = model.apply(variables, batch, z_t, t, train=False)
        loss, metrics = losses.training_loss(
            schedule,
            t,
            eps,
            output.prediction,
            recovery_nll(model.modalities, output.heads, batch),
            encodings=output.encodings,
            estimated_encodings=output.estimated_encodings,
            recovery_weights={"label": 1.0},
        )
        return z_t, output, loss, metrics

    z_t, output, loss, metrics = reference(params, batch, t, eps)

    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))  # noqa: E731
    labels = torch.from_numpy(batch["label"]).long()
    with torch.no_grad():
        eps_t, logits_t, encoding_t, estimated_t = port(labels, nchw(z_t), torch.from_numpy(t).long())
        loss_t, metrics_t = torch_loss.loss_terms(
            port,
            torch_loss.ScheduleTensors(schedule),
            nchw(batch["image"]),
            labels,
            torch.from_numpy(t).long(),
            nchw(eps),
        )

    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-4)  # noqa: E731
    close(eps_t.numpy().transpose(0, 2, 3, 1), output.prediction)
    close(logits_t.numpy(), output.heads["label"])
    close(encoding_t.numpy().transpose(0, 2, 3, 1), output.encodings[0])
    close(estimated_t.numpy().transpose(0, 2, 3, 1), output.estimated_encodings[0])
    for name in ("eps_mse", "aggregation_mse", "recovery/label"):
        close(metrics_t[name].item(), metrics[name])
    close(loss_t.item(), loss)
