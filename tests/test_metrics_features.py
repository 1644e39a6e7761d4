"""The Fashion-MNIST classifier as a feature network and perceptual distance."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdiff_jax import metrics
from mmdiff_jax.data import embeddings
from mmdiff_jax.metrics import features


@pytest.fixture(scope="module")
def classifier():
    model = embeddings.EmbeddingEncoder()
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    return features.Classifier(model, params)


def _padded(images28):
    """[B, 28, 28, 1] -> zero-padded [B, 32, 32, 1] (pad value -1, as the data)."""
    return np.pad(images28, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1)


def test_center_crop_undoes_the_padding():
    images = np.random.default_rng(0).uniform(-1, 1, (2, 28, 28, 1))
    np.testing.assert_array_equal(features.center_crop(_padded(images)), images)
    with pytest.raises(ValueError, match="centre-cropped"):
        features.center_crop(np.zeros((1, 31, 31, 1)))


def test_features_logits_and_activations(classifier):
    images = np.random.default_rng(1).uniform(-1, 1, (3, 28, 28, 1)).astype(np.float32)
    embedding, logits = classifier.model.apply(classifier.params, images)
    np.testing.assert_allclose(classifier.features(_padded(images)), embedding, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(classifier.logits(_padded(images)), logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(classifier.predict(images), np.argmax(logits, -1))
    conv1 = classifier.model.apply(classifier.params, images, method=lambda m, x: nn.gelu(m.conv1(x)))
    activations = classifier.activations(images)
    assert [a.shape for a in activations] == [(3, 14, 14, 8), (3, 7, 7, 16), (3, 64)]
    np.testing.assert_allclose(activations[0], conv1, rtol=1e-5, atol=1e-6)
    fn = features.get_feature_fn(classifier.features)
    assert fn(images).shape == (3, 64)


def test_perceptual_distance_is_the_baseline_formula(classifier):
    rng = np.random.default_rng(2)
    x0 = rng.uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32)
    x1 = rng.uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32)
    expected = 0
    for f0, f1 in zip(classifier.activations(x0), classifier.activations(x1)):
        f0, f1 = np.asarray(f0, np.float64), np.asarray(f1, np.float64)
        if f0.ndim == 2:
            f0, f1 = f0[:, None, None], f1[:, None, None]
        n0 = f0 / (np.linalg.norm(f0, axis=-1, keepdims=True) + 1e-10)
        n1 = f1 / (np.linalg.norm(f1, axis=-1, keepdims=True) + 1e-10)
        expected = expected + ((n0 - n1) ** 2).sum(-1).mean((1, 2))
    distance = features.perceptual_distance(classifier, x0, x1)
    np.testing.assert_allclose(distance, expected, rtol=1e-5)
    np.testing.assert_allclose(features.perceptual_distance(classifier, x0, x0), 0, atol=1e-6)
    evaluator = metrics.make_evaluator("perceptual_fmnist_cnn", classifier=classifier)
    evaluator.update({"image": x0, "sample": x1})
    np.testing.assert_allclose(evaluator.result()["perceptual_fmnist_cnn"], expected.mean(), rtol=1e-5)


def test_train_classifier_caches_params(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)

    def fake_split(split, data_dir=None, idx_dir=None):
        labels = np.arange(40) % 10
        images = rng.uniform(0, 40, (40, 28, 28, 1)) + 20 * labels[:, None, None, None]
        return {"image": images.astype(np.uint8), "label": labels}

    monkeypatch.setattr(features.fashion_mnist, "load_fashion_mnist", fake_split)
    path = tmp_path / "classifier.npz"
    trained = features.train_classifier(steps=3, cache_path=path)
    assert path.is_file() and 0 <= trained.meta["test_accuracy"] <= 1

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(features.embeddings, "train_embedding_encoder", no_training)
    loaded = features.train_classifier(steps=3, cache_path=path)
    assert loaded.meta == trained.meta == json.loads(json.dumps(trained.meta))
    images = rng.uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32)
    np.testing.assert_allclose(loaded.features(images), trained.features(images), rtol=1e-6)


def test_unknown_and_missing_feature_networks(tmp_path, monkeypatch):
    monkeypatch.setenv("MMDIFF_INCEPTION_WEIGHTS", str(tmp_path / "absent.npz"))
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        features.get_feature_fn("inception_v3")
    with pytest.raises(KeyError, match="fmnist_cnn"):
        features.get_feature_fn("resnet")
