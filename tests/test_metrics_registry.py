"""The evaluator registry and common interface."""

import numpy as np
import pytest

from mmdiff_jax import metrics


def test_registry_lists_every_metric():
    assert {
        "psnr",
        "ssim",
        "lpips_vgg",
        "perceptual_fmnist_cnn",
        "fid",
        "precision_recall",
        "feature_distribution",
        "accuracy",
        "label_agreement",
        "miou",
    } <= set(metrics.registered_evaluators())
    with pytest.raises(KeyError, match="registered"):
        metrics.make_evaluator("inception_score")


def test_config_specs_and_merged_results():
    batch = {
        "image": np.zeros((2, 16, 16, 1), np.float32),
        "sample": np.full((2, 16, 16, 1), 0.2, np.float32),
        "mask": np.zeros((2, 16, 16, 1), np.float32),
        "label": np.array([1, 2]),
        "label_logits": np.array([1, 0]),
    }
    evaluators = metrics.make_evaluators(["psnr", ("psnr", {"region": "masked"}), {"name": "accuracy"}])
    results = metrics.evaluate(evaluators, [batch, batch])
    assert results == pytest.approx({"psnr": 20.0, "psnr_masked": 20.0, "accuracy": 0.5}, rel=1e-5)
    with pytest.raises(ValueError, match="report 'psnr'"):
        metrics.evaluate(metrics.make_evaluators(["psnr", "psnr"]), [batch])
    with pytest.raises(KeyError, match="segmentation"):
        metrics.evaluate(metrics.make_evaluators(["miou"]), [batch])
