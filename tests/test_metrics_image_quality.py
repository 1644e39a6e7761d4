"""PSNR / SSIM (whole image and hidden region) against hand computations."""

import numpy as np
import pytest

from mmdiff_jax import metrics
from mmdiff_jax.metrics import image_quality


def _gaussian_window(size=11, sigma=1.5):
    x = np.arange(size) - size // 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    window = np.outer(g, g)
    return window / window.sum()


def numpy_ssim_map(a, b, size=11, sigma=1.5):
    """SSIM map of [H, W] images in [0, 1], 'valid' windows, written out directly."""
    window = _gaussian_window(size, sigma)
    c1, c2 = 0.01**2, 0.03**2
    out = np.empty((a.shape[0] - size + 1, a.shape[1] - size + 1))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            pa, pb = a[i : i + size, j : j + size], b[i : i + size, j : j + size]
            mu_a, mu_b = (window * pa).sum(), (window * pb).sum()
            var_a = (window * pa**2).sum() - mu_a**2
            var_b = (window * pb**2).sum() - mu_b**2
            cov = (window * pa * pb).sum() - mu_a * mu_b
            out[i, j] = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return out


def test_psnr_whole_and_masked_by_hand():
    reference = np.zeros((2, 8, 8, 1), np.float32)  # 0.5 in [0, 1]
    mask = np.ones((2, 8, 8, 1), np.float32)
    mask[:, :4] = 0  # top half hidden
    prediction = reference + np.where(mask == 0, 0.2, 1.0).astype(np.float32)
    # unit-range errors: 0.1 on hidden pixels, 0.5 on kept ones
    np.testing.assert_allclose(image_quality.psnr(reference, prediction, mask), [20.0, 20.0], rtol=1e-5)
    whole = -10 * np.log10((0.1**2 + 0.5**2) / 2)
    np.testing.assert_allclose(image_quality.psnr(reference, prediction), [whole, whole], rtol=1e-5)


def test_psnr_random_images_against_numpy():
    rng = np.random.default_rng(0)
    reference = rng.uniform(-1, 1, (3, 16, 16, 2)).astype(np.float32)
    prediction = np.clip(reference + rng.normal(0, 0.1, reference.shape), -1, 1).astype(np.float32)
    mask = (rng.uniform(size=(3, 16, 16, 1)) > 0.5).astype(np.float32)
    error = ((reference - prediction) / 2.0) ** 2
    hidden = np.broadcast_to(mask == 0, error.shape)
    expected_masked = [-10 * np.log10(error[i][hidden[i]].mean()) for i in range(3)]
    expected_whole = -10 * np.log10(error.mean((1, 2, 3)))
    np.testing.assert_allclose(image_quality.psnr(reference, prediction, mask), expected_masked, rtol=1e-5)
    np.testing.assert_allclose(image_quality.psnr(reference, prediction), expected_whole, rtol=1e-5)
    # [B, H, W] masks work too
    np.testing.assert_allclose(image_quality.psnr(reference, prediction, mask[..., 0]), expected_masked, rtol=1e-5)


def test_ssim_constant_images_closed_form():
    a = np.full((1, 16, 16, 1), -0.5, np.float32)  # 0.25
    b = np.full((1, 16, 16, 1), 0.5, np.float32)  # 0.75
    c1 = 0.01**2
    expected = (2 * 0.25 * 0.75 + c1) / (0.25**2 + 0.75**2 + c1)
    np.testing.assert_allclose(image_quality.ssim(a, b), [expected], rtol=1e-5)
    np.testing.assert_allclose(image_quality.ssim(a, a), [1.0], rtol=1e-6)


def test_ssim_whole_and_masked_against_numpy():
    rng = np.random.default_rng(1)
    reference = rng.uniform(-1, 1, (2, 16, 16, 1)).astype(np.float32)
    prediction = reference.copy()
    prediction[:, :, 8:] = rng.uniform(-1, 1, (2, 16, 8, 1))  # right half changed
    mask = np.ones((2, 16, 16, 1), np.float32)
    mask[:, :, 8:] = 0
    maps = [numpy_ssim_map((reference[i, ..., 0] + 1) / 2, (prediction[i, ..., 0] + 1) / 2) for i in range(2)]
    np.testing.assert_allclose(image_quality.ssim(reference, prediction), [m.mean() for m in maps], atol=1e-5)
    # map[i, j] is centred on pixel (i + 5, j + 5): hidden centres are columns j + 5 >= 8
    np.testing.assert_allclose(
        image_quality.ssim(reference, prediction, mask), [m[:, 3:].mean() for m in maps], atol=1e-5
    )


def test_masked_metrics_without_hidden_pixels_are_nan_and_skipped():
    reference = np.zeros((2, 16, 16, 1), np.float32)
    prediction = reference + 0.2
    mask = np.ones((2, 16, 16, 1), np.float32)
    mask[1, 8, 8] = 0
    assert np.isnan(image_quality.psnr(reference, prediction, mask)[0])
    assert np.isnan(image_quality.ssim(reference, prediction, mask)[0])
    evaluator = metrics.make_evaluator("psnr", region="masked")
    evaluator.update({"image": reference, "sample": prediction, "mask": mask})
    np.testing.assert_allclose(evaluator.result()["psnr_masked"], 20.0, rtol=1e-5)


def test_evaluators_average_over_batches():
    rng = np.random.default_rng(2)
    batches = [
        {
            "image": rng.uniform(-1, 1, (n, 16, 16, 1)).astype(np.float32),
            "sample": rng.uniform(-1, 1, (n, 16, 16, 1)).astype(np.float32),
        }
        for n in (1, 3)
    ]
    results = metrics.evaluate(metrics.make_evaluators(["psnr", "ssim"]), batches)
    every_psnr = np.concatenate([image_quality.psnr(b["image"], b["sample"]) for b in batches])
    np.testing.assert_allclose(results["psnr"], every_psnr.mean(), rtol=1e-5)
    assert set(results) == {"psnr", "ssim"}
    with pytest.raises(ValueError, match="region"):
        metrics.make_evaluator("ssim", region="hole")
