"""Experiments' FID / precision / recall in several feature spaces (config.experiment.feature_spaces): the
reference set and every feature evaluator go through each space, and the report gets a table per extra space.
A stand-in feature network is registered under a new name (the Inception network is tested on its own)."""

import numpy as np

from configs.masked_pretrain import get_config
from experiments import evaluation, reporting
from mmdiff_jax.metrics import distribution
from mmdiff_jax.metrics import features as features_lib
from tests.training_helpers import arrays_source, write_arrays


class _StandInClassifier:
    """The 'fmnist_cnn' slot: mean brightness per image row (a [B, H] feature)."""

    @staticmethod
    def features(images):
        return np.asarray(images, np.float32).mean(axis=(2, 3))


def _pixels(images):
    return np.asarray(images, np.float32).reshape(len(images), -1)[:, ::16]


def test_feature_evaluators_run_in_every_configured_space(tmp_path, monkeypatch):
    monkeypatch.setitem(features_lib._FEATURE_NETWORKS, "pixels", lambda **unused: _pixels)
    config = get_config("tiny")
    config.data.source = arrays_source(write_arrays(tmp_path / "arrays.npz", num_train=64, num_test=16))
    config.experiment.feature_spaces = ("fmnist_cnn", "pixels")
    classifier = _StandInClassifier()

    reference = evaluation.reference_features(config, 16, classifier)
    images = np.concatenate([b["image"] for b in evaluation.eval_batches(config, 16, 16)])
    assert set(reference) == {"fmnist_cnn", "pixels"}
    np.testing.assert_allclose(reference["pixels"], _pixels(images))
    np.testing.assert_allclose(reference["fmnist_cnn"], classifier.features(images), rtol=1e-6)

    samples = np.clip(images[::-1] + 0.3, -1, 1)
    results = evaluation.evaluate_metrics(
        config.experiment.unconditional.metrics, [{"sample": samples}], classifier, reference_features=reference
    )
    assert set(results) == {f"{m}_{space}" for m in ("fid", "precision", "recall") for space in reference}
    for space, features in (("pixels", _pixels), ("fmnist_cnn", classifier.features)):
        expected = distribution.fid(reference[space], np.asarray(features(samples), np.float32))
        np.testing.assert_allclose(results[f"fid_{space}"], expected, rtol=1e-4)

    # A spec naming its space runs there alone (no reference features given: the batch's images are the set).
    named = evaluation.evaluate_metrics(
        [("fid", {"features": "pixels"})], [{"image": images, "sample": samples}], classifier
    )
    assert named.keys() == {"fid_pixels"}
    np.testing.assert_allclose(named["fid_pixels"], distribution.fid(_pixels(images), _pixels(samples)), rtol=1e-4)

    report = reporting.Report("test", tmp_path)
    report.feature_space_tables("Unconditional samples", {"model": results}, config.experiment.feature_spaces)
    assert len(report.sections) == 1 and "Unconditional samples, pixels features" in report.sections[0]
    assert f"{results['fid_pixels']:.3f}" in report.sections[0]
