"""Feature networks for the distribution metrics, and an offline perceptual distance.

A feature function is any `features(images [B, H, W, C] in [-1, 1]) -> [B, D]`;
FID and precision/recall take one, so another network plugs in unchanged.
Registered by name (`get_feature_fn`):

  "fmnist_cnn"    the project's Fashion-MNIST classifier
                  (`mmdiff_jax.data.embeddings.EmbeddingEncoder`, trained by
                  `train_embedding_encoder`, the same recipe and seed as the
                  default embeddings): its 64-d penultimate layer.
  "inception_v3"  the FID Inception-V3 (pytorch-fid's port of the TF
                  2015-12-05 graph, `inception`): its 2048-d pool3 layer.
                  Needs the user's weights, converted once
                  (`convert_inception_weights`); `weights_path` defaults to
                  `inception.default_weights_path()`. Images are resized to
                  299x299, as pytorch-fid does.

Our images are 28x28 Fashion-MNIST zero-padded to 32x32 (pad value -1): the
classifier sees the centre 28x28 crop.

The trained classifier's params are cached next to the prepared data
(`<data_dir>/fashion_mnist_debian/1.0.0/metrics_classifier_steps<S>_seed<K>.npz`,
with its test accuracy in "meta": 0.87 for the default 600 steps, seed 0);
training takes 10-70 s on 2 CPU cores, depending on their load.

`perceptual_distance` is an LPIPS-style distance on that classifier's
activations, uncalibrated: per layer (GELU(conv1) [14, 14, 8], GELU(conv2)
[7, 7, 16], the 64-d embedding), unit-normalise over channels, squared
difference, sum over channels, mean over space, sum over layers (the `lpips`
package's "baseline" form with unit weights). It is NOT LPIPS: report it as
"perceptual_fmnist_cnn", never as "lpips".
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mmdiff_jax.data import embeddings
from mmdiff_jax.data import fashion_mnist
from mmdiff_jax.metrics import base
from mmdiff_jax.metrics import inception
from mmdiff_jax.metrics import lpips

FeatureFn = Callable[[Any], jax.Array]
CLASSIFIER_SIZE = fashion_mnist.IMAGE_SHAPE[0]  # 28


def center_crop(images, size: int = CLASSIFIER_SIZE):
    """[B, H, W, C] -> [B, size, size, C], the centre (undoes the zero-padding)."""
    height, width = images.shape[1:3]
    if height < size or width < size or (height - size) % 2 or (width - size) % 2:
        raise ValueError(
            f"images {height}x{width} cannot be centre-cropped to {size}x{size} (need H, W >= {size}, H - {size} even)"
        )
    top, left = (height - size) // 2, (width - size) // 2
    return images[:, top : top + size, left : left + size]


@dataclasses.dataclass(frozen=True, eq=False)
class Classifier:
    """A trained `EmbeddingEncoder`; every method takes [B, H, W, 1] in [-1, 1]."""

    model: embeddings.EmbeddingEncoder
    params: Any
    meta: dict = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def _jitted(self):
        def run(params, images):
            (embedding, logits), state = self.model.apply(
                params,
                center_crop(jnp.asarray(images, jnp.float32)),
                capture_intermediates=True,
                mutable=["intermediates"],
            )
            inner = state["intermediates"]
            activations = [
                nn.gelu(inner["conv1"]["__call__"][0]),
                nn.gelu(inner["conv2"]["__call__"][0]),
                embedding,
            ]
            return embedding, logits, activations

        return jax.jit(run)

    def features(self, images) -> jax.Array:
        """The penultimate layer (the embedding) [B, 64]."""
        return self._jitted(self.params, images)[0]

    def logits(self, images) -> jax.Array:
        """[B, 10]."""
        return self._jitted(self.params, images)[1]

    def predict(self, images) -> jax.Array:
        """Predicted classes [B] int."""
        return jnp.argmax(self.logits(images), -1)

    def activations(self, images) -> list[jax.Array]:
        """The layers `perceptual_distance` compares (see the module docstring)."""
        return self._jitted(self.params, images)[2]


def perceptual_distance(classifier: Classifier, images0, images1) -> jax.Array:
    """Uncalibrated LPIPS-style distance on classifier activations, [B] (not LPIPS)."""
    return sum(lpips.layer_distances(classifier.activations(images0), classifier.activations(images1)))


def _cache_path(data_dir, idx_dir, steps, seed) -> pathlib.Path:
    return embeddings.default_embeddings_path(data_dir, idx_dir).with_name(
        f"metrics_classifier_steps{steps}_seed{seed}.npz"
    )


def train_classifier(
    data_dir=None, idx_dir=None, *, steps: int = embeddings.DEFAULT_STEPS, seed: int = 0, cache_path=None
) -> Classifier:
    """The Fashion-MNIST classifier, trained once and cached (see module docstring).

    Trains `EmbeddingEncoder` with `train_embedding_encoder` on the train split
    (the default-embeddings recipe), records its test accuracy, and stores the
    params at `cache_path` (default: beside the prepared data).
    """
    path = pathlib.Path(cache_path or _cache_path(data_dir, idx_dir, steps, seed))
    model = embeddings.EmbeddingEncoder()
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            flat = {k: jnp.asarray(data[k]) for k in data.files if k != "meta"}
        return Classifier(model, traverse_util.unflatten_dict(flat, sep="/"), meta)
    train = fashion_mnist.load_fashion_mnist("train", data_dir, idx_dir)
    test = fashion_mnist.load_fashion_mnist("test", data_dir, idx_dir)
    model, params = embeddings.train_embedding_encoder(train["image"], train["label"], steps=steps, seed=seed)
    _, predictions = embeddings.embed_images(model, params, test["image"])
    meta = {
        "network": "EmbeddingEncoder",
        "steps": steps,
        "seed": seed,
        "test_accuracy": float(np.mean(predictions == test["label"])),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    np.savez(temporary, meta=np.array(json.dumps(meta)), **{k: np.asarray(v) for k, v in flat.items()})
    os.replace(temporary, path)  # atomic: a concurrent reader sees all or nothing
    return Classifier(model, params, meta)


@functools.lru_cache(maxsize=4)
def default_classifier(data_dir=None, idx_dir=None) -> Classifier:
    """`train_classifier` with the default recipe, once per process."""
    return train_classifier(data_dir, idx_dir)


def _inception_v3(weights_path=None) -> FeatureFn:
    """pool3 features [B, 2048]; FileNotFoundError (saying how to get them) without weights."""
    return functools.partial(inception.inception_features, inception.load_params(weights_path))


_FEATURE_NETWORKS: dict[str, Callable[..., FeatureFn]] = {
    "fmnist_cnn": lambda **kw: default_classifier(**kw).features,
    "inception_v3": _inception_v3,
}


def feature_networks() -> list[str]:
    """The names `get_feature_fn` knows."""
    return sorted(_FEATURE_NETWORKS)


def get_feature_fn(features: str | FeatureFn, **kwargs) -> FeatureFn:
    """A feature function by registered name, or `features` itself if callable."""
    if callable(features):
        return features
    if features not in _FEATURE_NETWORKS:
        raise KeyError(f"unknown feature network {features!r}; known: {sorted(_FEATURE_NETWORKS)}, or pass a callable")
    return _FEATURE_NETWORKS[features](**kwargs)


def get_classifier(classifier: str | Classifier | Callable, **kwargs):
    """A `images -> predicted labels [B]` function: "fmnist_cnn", a Classifier or a callable."""
    if isinstance(classifier, Classifier):
        return classifier.predict
    if callable(classifier):
        return classifier
    if classifier != "fmnist_cnn":
        raise KeyError(f"unknown classifier {classifier!r}; known: ['fmnist_cnn']")
    return default_classifier(**kwargs).predict


@base.register("perceptual_fmnist_cnn", needs=("classifier",))
class PerceptualDistance(base.MeanEvaluator):
    """Mean `perceptual_distance` (Fashion-MNIST CNN, uncalibrated; not LPIPS).

    Reports "perceptual_fmnist_cnn". `classifier`: a Classifier (default: the
    cached default one, trained on first use).
    """

    def __init__(
        self,
        classifier: Classifier | None = None,
        reference: str = "image",
        prediction: str = "sample",
        name: str = "perceptual_fmnist_cnn",
    ):
        self.classifier = classifier
        self.keys, self.name = (reference, prediction), name
        super().__init__()

    def per_example(self, batch):
        if self.classifier is None:
            self.classifier = default_classifier()
        reference, prediction = (base.require(batch, key, self.name) for key in self.keys)
        return perceptual_distance(self.classifier, reference, prediction)
