"""FID and improved precision / recall, in the space of any feature function.

FID (Heusel et al. 2017), exact, in float64:
  FID = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr( (S_1 S_2)^(1/2) ),
  tr( (S_1 S_2)^(1/2) ) = sum_i sqrt(eig_i( S_1^(1/2) S_2 S_1^(1/2) )),
the second form symmetric PSD, so `eigh` computes it stably (no complex
parts to discard, as with sqrtm of the non-symmetric product). S: covariance
with ddof = 1 (as pytorch-fid / TTUR).

Improved precision / recall (Kynkaanniemi et al. 2019), k = 3:
  each point's manifold ball has radius = distance to its k-th nearest
  neighbour in its own set (the point itself excluded);
  precision = fraction of generated points inside some ball of the real set,
  recall    = fraction of real points inside some ball of the generated set.
Distances are computed in row batches with JAX, in two passes: one matmul,
|q|^2 - 2 q.p + |p|^2 (float32, HIGHEST precision), screens every pair, and the
few pairs that decide a result (each query's nearest candidates) are measured
again as sum_d (q_d - p_d)^2, which is exactly 0 for identical vectors and
accurate relative to the distance itself. The matmul form alone is accurate
only relative to |q|^2 + |p|^2: for 2048-d features it turns zero distances
into up to 7e-4, so exact duplicates (radius 0) missed their own balls
(150 vectors x 4 copies scored 0.84, not 1.0, against themselves).

Which feature space a number is in is part of its name: the evaluators report
"fid_<features>", "precision_<features>", "recall_<features>", e.g.
"fid_fmnist_cnn" (the project's Fashion-MNIST classifier, see `features`):
not comparable with Inception FIDs ("fid_inception_v3", `inception`, with the user's weights).

Sanity check on the real data, "fmnist_cnn" features (600-step classifier,
test accuracy 0.87), images padded to 32x32:
  test[:5000] vs test[5000:]          FID   0.33   precision 0.87  recall 0.87
  train[:10000] vs test               FID   0.14   precision 0.87  recall 0.87
  2x2 box-blurred test vs train[:10k] FID   9.8    precision 0.89  recall 0.43
  N(0, 0.5) noise vs train[:10k]      FID 284      precision 0.45  recall 0.00
(precision 0.45 for noise: noise lands in the large balls of outlying real
points, the known weakness of k-NN manifolds; read precision with FID.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmdiff_jax.metrics import base
from mmdiff_jax.metrics import features as features_lib


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """features [N, D] -> (mean [D], covariance [D, D]), float64, ddof = 1."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def _symmetric_sqrt(matrix):
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(mean1, covariance1, mean2, covariance2) -> float:
    """Frechet distance between N(mean1, covariance1) and N(mean2, covariance2)."""
    mean1, mean2 = np.asarray(mean1, np.float64), np.asarray(mean2, np.float64)
    covariance1 = np.asarray(covariance1, np.float64)
    covariance2 = np.asarray(covariance2, np.float64)
    root1 = _symmetric_sqrt(covariance1)
    product = root1 @ covariance2 @ root1
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)).sum()
    distance = np.sum((mean1 - mean2) ** 2) + np.trace(covariance1) + np.trace(covariance2) - 2 * trace_root
    return float(max(distance, 0.0))


def fid(features1, features2) -> float:
    """FID between two feature sets [N1, D], [N2, D]."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


# Candidates per query re-measured exactly beyond those a result needs: covers near-ties within the
# screening error (~1e-3 for 2048-d features).
_EXTRA_CANDIDATES = 8


def _screening_distances(queries, points):
    """[B, D], [N, D] -> [B, N] squared distances by one matmul; error ~ eps (|q|^2 + |p|^2)."""
    dot = jnp.matmul(queries, points.T, precision=jax.lax.Precision.HIGHEST)
    squared = jnp.sum(queries**2, 1)[:, None] - 2 * dot + jnp.sum(points**2, 1)[None]
    return jnp.maximum(squared, 0)


def _exact_distances(queries, points, indices):
    """[B, D], [N, D], int [B, M] -> [B, M] squared distances sum_d (q_d - p_d)^2 to points[indices]."""
    return jax.lax.map(lambda column: jnp.sum(jnp.square(queries - points[column]), 1), indices.T).T


def _smallest_indices(scores, count):
    """[B, N] -> int [B, count]: per row, the columns of the `count` smallest scores (count <= N)."""
    return jax.lax.top_k(-scores, count)[1]


@functools.partial(jax.jit, static_argnames="k")
def _kth_smallest(queries, points, k):
    """k-th smallest exact squared distance from each query row to `points` (ties counted separately)."""
    count = min(k + _EXTRA_CANDIDATES, points.shape[0])
    candidates = _smallest_indices(_screening_distances(queries, points), count)
    return jnp.sort(_exact_distances(queries, points, candidates), 1)[:, k - 1]


@jax.jit
def _inside_any(queries, points, squared_radii):
    """[B] whether each query lies in some ball (points[j], radii[j]), decided on exact distances for the
    balls whose screening margin |q - p_j|^2 - r_j^2 is smallest."""
    margins = _screening_distances(queries, points) - squared_radii[None]
    candidates = _smallest_indices(margins, min(_EXTRA_CANDIDATES, points.shape[0]))
    return jnp.any(_exact_distances(queries, points, candidates) <= squared_radii[candidates], 1)


def _row_batches(function, queries, batch_size):
    """function over equal row batches of queries (the last one padded), concatenated."""
    size = min(batch_size, queries.shape[0])
    padding = -queries.shape[0] % size  # one shape, so one compilation
    padded = jnp.pad(queries, ((0, padding), (0, 0)))
    outputs = [np.asarray(function(padded[i : i + size])) for i in range(0, padded.shape[0], size)]
    return np.concatenate(outputs)[: queries.shape[0]]


def knn_radii(points, k: int = 3, batch_size: int = 1024) -> np.ndarray:
    """[N] distance from each point to its k-th nearest other point."""
    points = jnp.asarray(points, jnp.float32)
    if points.shape[0] <= k:
        raise ValueError(f"need more than k = {k} points, got {points.shape[0]}")
    squared = _row_batches(  # k + 1: the point itself is its nearest neighbour
        lambda rows: _kth_smallest(rows, points, k + 1), points, batch_size
    )
    return np.sqrt(squared)


def manifold_fraction(queries, points, radii, batch_size: int = 1024) -> float:
    """Fraction of `queries` inside at least one ball (points[j], radii[j])."""
    points = jnp.asarray(points, jnp.float32)
    squared_radii = jnp.asarray(radii, jnp.float32) ** 2
    inside = _row_batches(
        lambda rows: _inside_any(rows, points, squared_radii), jnp.asarray(queries, jnp.float32), batch_size
    )
    return float(inside.mean())


def precision_recall(real, generated, k: int = 3, batch_size: int = 1024) -> tuple[float, float]:
    """Improved (precision, recall) of `generated` [M, D] against `real` [N, D]."""
    precision = manifold_fraction(generated, real, knn_radii(real, k, batch_size), batch_size)
    recall = manifold_fraction(real, generated, knn_radii(generated, k, batch_size), batch_size)
    return precision, recall


def compute_features(feature_fn, images, batch_size: int = 500) -> np.ndarray:
    """feature_fn over `images` [N, ...] in batches -> [N, D] float32."""
    return np.concatenate(
        [np.asarray(feature_fn(images[i : i + batch_size]), np.float32) for i in range(0, len(images), batch_size)]
    )


class FeatureDistribution(base.Evaluator):
    """FID and/or precision-recall between batch[reference] and batch[samples].

    features: a registered feature network name ("fmnist_cnn", "inception_v3")
      or a callable [B, H, W, C] -> [B, D] (give `feature_name` then).
    reference_features: optional precomputed [N, D] reference set (e.g. the
      whole test split); batches then need only batch[samples].
    Reports "<metric>_<feature_name>" for metric in `metrics`.
    """

    def __init__(
        self,
        metrics=("fid", "precision", "recall"),
        features="fmnist_cnn",
        feature_name: str | None = None,
        reference: str = "image",
        samples: str = "sample",
        reference_features=None,
        k: int = 3,
    ):
        unknown = set(metrics) - {"fid", "precision", "recall"}
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}")
        if feature_name is None and callable(features):
            raise ValueError(
                "give `feature_name` for a callable `features`: it names the feature space in the reported keys"
            )
        self.metrics, self.k = tuple(metrics), k
        self.feature_name = feature_name or features
        self._features, self._feature_fn = features, None
        self.keys = (reference, samples)
        self.fixed_reference = None if reference_features is None else np.asarray(reference_features, np.float32)
        self.reset()

    def reset(self):
        self._reference, self._samples = [], []

    def update(self, batch):
        if self._feature_fn is None:  # lazily: the default network trains on first use
            self._feature_fn = features_lib.get_feature_fn(self._features)
        reference, samples = self.keys
        if self.fixed_reference is None:
            self._reference.append(
                np.asarray(self._feature_fn(base.require(batch, reference, type(self).__name__)), np.float32)
            )
        self._samples.append(
            np.asarray(self._feature_fn(base.require(batch, samples, type(self).__name__)), np.float32)
        )

    def result(self):
        reference = self.fixed_reference if self.fixed_reference is not None else np.concatenate(self._reference)
        samples = np.concatenate(self._samples)
        results = {}
        if "fid" in self.metrics:
            results[f"fid_{self.feature_name}"] = fid(reference, samples)
        if {"precision", "recall"} & set(self.metrics):
            precision, recall = precision_recall(reference, samples, self.k)
            if "precision" in self.metrics:
                results[f"precision_{self.feature_name}"] = precision
            if "recall" in self.metrics:
                results[f"recall_{self.feature_name}"] = recall
        return results


FEATURE_NEEDS = ("features", "feature_name", "reference_features")  # a feature space: network, name, reference set
base.register("feature_distribution", needs=FEATURE_NEEDS)(FeatureDistribution)
base.register("fid", needs=FEATURE_NEEDS)(functools.partial(FeatureDistribution, metrics=("fid",)))
base.register("precision_recall", needs=FEATURE_NEEDS)(
    functools.partial(FeatureDistribution, metrics=("precision", "recall"))
)
