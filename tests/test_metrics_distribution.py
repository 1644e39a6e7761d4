"""FID against closed forms for Gaussians; improved precision/recall on known clouds."""

import numpy as np
import pytest
import scipy.linalg

from mmdiff_jax import metrics
from mmdiff_jax.metrics import distribution


def _random_covariance(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def _sqrtm_formula(m1, s1, m2, s2):
    """The textbook form with scipy's sqrtm of the (non-symmetric) product."""
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * root)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2
    assert distribution.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9 + 1)
    # commuting (diagonal) covariances: sum (sqrt(a) - sqrt(b))^2
    a, b = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    assert distribution.frechet_distance(np.zeros(5), np.diag(a), np.zeros(5), np.diag(b)) == pytest.approx(
        np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-10
    )
    # general covariances: the sqrtm form
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = _random_covariance(rng, 6), _random_covariance(rng, 6)
    assert distribution.frechet_distance(m1, s1, m2, s2) == pytest.approx(_sqrtm_formula(m1, s1, m2, s2), rel=1e-8)
    assert distribution.frechet_distance(m1, s1, m1, s1) == pytest.approx(0, abs=1e-9)


def test_fid_of_samples_approaches_the_analytic_value():
    rng = np.random.default_rng(1)
    m1, m2 = np.zeros(4), np.array([0.5, -0.5, 0.0, 1.0])
    s1, s2 = _random_covariance(rng, 4), _random_covariance(rng, 4)
    x = rng.multivariate_normal(m1, s1, 20000)
    y = rng.multivariate_normal(m2, s2, 20000)
    analytic = _sqrtm_formula(m1, s1, m2, s2)
    assert distribution.fid(x, y) == pytest.approx(analytic, rel=0.03)
    assert distribution.fid(x, x) == pytest.approx(0, abs=1e-8)


def test_precision_recall_by_hand_one_dimension():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    generated = np.array([[0.5], [10.0], [3.9], [-1.5]])
    # real radii (k = 1) are all 1: 0.5 and 3.9 are inside, 10 and -1.5 are not.
    # generated radii: 2, 2, 3.4, 6.1: every real point is inside one.
    assert distribution.precision_recall(real, generated, k=1) == (0.5, 1.0)
    np.testing.assert_allclose(distribution.knn_radii(generated, k=1), [2, 6.1, 3.4, 2], rtol=1e-6)


def test_precision_recall_count_exact_duplicates():
    """150 random non-negative 2048-d vectors, each 4 times, against themselves (also shuffled): every point lies
    in the balls of radius 0 of its copies. Matmul-form float32 distances turned those zeros into up to 7e-4
    and gave (0.83, 0.83)."""
    rng = np.random.default_rng(0)
    features = np.repeat(rng.uniform(0, 1, (150, 2048)).astype(np.float32), 4, axis=0)
    np.testing.assert_array_equal(distribution.knn_radii(features), 0.0)
    assert distribution.precision_recall(features, features) == (1.0, 1.0)
    assert distribution.precision_recall(features, features[rng.permutation(len(features))]) == (1.0, 1.0)


def test_precision_recall_identical_disjoint_nested():
    rng = np.random.default_rng(2)
    real = rng.uniform(0, 1, (1000, 2))
    assert distribution.precision_recall(real, real) == (1.0, 1.0)
    assert distribution.precision_recall(real, real + 10) == (0.0, 0.0)
    inner = rng.uniform(0, 0.5, (1000, 2))  # covers a quarter of the real square
    precision, recall = distribution.precision_recall(real, inner)
    assert precision > 0.97
    assert 0.2 < recall < 0.35


def test_evaluators_with_a_feature_callable():
    rng = np.random.default_rng(3)
    flatten = lambda images: np.asarray(images).reshape(len(images), -1)
    batches = [
        {"image": rng.normal(size=(200, 2, 2, 1)), "sample": rng.normal(1.0, 1.0, size=(200, 2, 2, 1))}
        for _ in range(2)
    ]
    results = metrics.evaluate(
        metrics.make_evaluators(
            [
                {"name": "fid", "features": flatten, "feature_name": "pixels"},
                ("precision_recall", {"features": flatten, "feature_name": "pixels"}),
            ]
        ),
        batches,
    )
    reference = np.concatenate([flatten(b["image"]) for b in batches])
    samples = np.concatenate([flatten(b["sample"]) for b in batches])
    assert results["fid_pixels"] == pytest.approx(distribution.fid(reference, samples))
    assert (results["precision_pixels"], results["recall_pixels"]) == distribution.precision_recall(reference, samples)
    fixed = metrics.make_evaluator("fid", features=flatten, feature_name="pixels", reference_features=reference)
    for batch in batches:
        fixed.update({"sample": batch["sample"]})
    assert fixed.result()["fid_pixels"] == pytest.approx(results["fid_pixels"])
    with pytest.raises(ValueError, match="feature_name"):
        metrics.make_evaluator("fid", features=flatten)
