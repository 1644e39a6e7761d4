"""Modality encoders E_i : X_i -> Z, one per kind (docs/design.md section 5).

Every encoder maps a batch of its modality's data to z's shape S = (H, W, C), and also maps its head's
prediction D_i(h) to the estimated encoding ehat_i = E_i(D_i(h)) (docs/design.md section 3):

  encoder        data x_i                         prediction D_i(h)           weights
  'identity'     [B, H, W, C] image               [B, H, W, C] mean           none
                 [B, H, W, C + 1] masked image    [B, H, W, C + 1] mean       (e = x * mask)
  'conv1x1'      [B, H, W, C'] image(-like)       [B, H, W, C'] mean          1x1 conv C' -> C
  'table'        [B] int class ids                [B, K] logits               table [K, H W C]
  'onehot_conv'  [B, H, W] int class ids          [B, H, W, K] logits         kxk conv on one-hot, K -> C
  'linear'       [B, D] vectors                   [B, D] mean                 dense D -> H W C

A masked image enters as the C + 1 channels [x * mask, mask] (see `modalities.modality_data`).
Categorical predictions are re-encoded as the softmax expectation of the embedding, sum_k p_k E(k):
exact for the table (rows are normalised first); for 'onehot_conv' the expectation is taken before the
RMS normalisation (the conv is linear, the normalisation is not).

RMS normalisation (`normalize`): e / sqrt(mean(e^2) + eps) per example over all of S, so a learned
encoder cannot shrink its encoding to zero to make the aggregation free. It has no gain on purpose.
Encoders compute in float32 (they are tiny and define the diffusion space) and return float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

ENCODER_KINDS = ("identity", "conv1x1", "table", "onehot_conv", "linear")
_EPSILON = 1e-6


def rms_normalize(e: Array, axes: Sequence[int] | None = None) -> Array:
    """e / sqrt(mean(e^2 over `axes`) + eps); `axes` default: every axis but the first (per example)."""
    axes = tuple(range(1, e.ndim)) if axes is None else tuple(axes)
    return e * jax.lax.rsqrt(jnp.mean(jnp.square(e), axis=axes, keepdims=True) + _EPSILON)


class Encoder(nn.Module):
    """Base: `__call__(x)` encodes data, `from_prediction(p)` re-encodes a head's output; both -> [B, *S].

    Categorical encoders also offer `from_probabilities(p)`; `from_prediction` takes logits.
    """

    z_shape: tuple[int, int, int]
    normalize: bool = True

    def _finish(self, e: Array) -> Array:
        e = e.astype(jnp.float32)
        return rms_normalize(e) if self.normalize else e

    def __call__(self, x: Array) -> Array:
        raise NotImplementedError

    def from_prediction(self, prediction: Array) -> Array:
        """Image-like and vector kinds: ehat = E(predicted mean)."""
        return self(prediction)


class IdentityEncoder(Encoder):
    """e = x for an image of z's shape; e = x * mask for a masked image given as [x * mask, mask]."""

    def __call__(self, x: Array) -> Array:
        channels = self.z_shape[-1]
        if x.shape[-1] == channels + 1:  # masked image [x * mask, mask]
            x = x[..., :channels] * x[..., channels:]
        return self._finish(x)


class Conv1x1Encoder(Encoder):
    """e = W x + b per pixel, [B, H, W, C'] -> [B, H, W, C]."""

    def setup(self):
        self.conv = nn.Conv(self.z_shape[-1], (1, 1), name="conv")

    def __call__(self, x: Array) -> Array:
        return self._finish(self.conv(x.astype(jnp.float32)))


class TableEncoder(Encoder):
    """A learned z-shaped map per class: e = normalize(table[y]); ehat = sum_k softmax(logits)_k e_k."""

    num_classes: int = 0

    def setup(self):
        self.table = self.param("table", nn.initializers.normal(1.0), (self.num_classes, math.prod(self.z_shape)))

    def _rows(self) -> Array:
        return rms_normalize(self.table) if self.normalize else self.table

    def __call__(self, labels: Array) -> Array:
        return jnp.take(self._rows(), labels.astype(jnp.int32), axis=0).reshape((-1,) + self.z_shape)

    def from_probabilities(self, probabilities: Array) -> Array:
        """sum_k p_k e_k for class probabilities [B, K]."""
        return (probabilities.astype(jnp.float32) @ self._rows()).reshape((-1,) + self.z_shape)

    def from_prediction(self, logits: Array) -> Array:
        """ehat from the head's logits [B, K] (not probabilities): the softmax expectation."""
        return self.from_probabilities(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))


class OneHotConvEncoder(Encoder):
    """e = normalize(conv(one_hot(mask))), [B, H, W] ids -> [B, H, W, C]; ehat uses softmax(logits)."""

    num_classes: int = 0
    kernel_size: int = 3

    def setup(self):
        self.conv = nn.Conv(self.z_shape[-1], (self.kernel_size, self.kernel_size), name="conv")

    def __call__(self, class_ids: Array) -> Array:
        return self._finish(self.conv(jax.nn.one_hot(class_ids, self.num_classes, dtype=jnp.float32)))

    def from_probabilities(self, probabilities: Array) -> Array:
        """normalize(conv(p)) for per-pixel class probabilities [B, H, W, K]."""
        return self._finish(self.conv(probabilities.astype(jnp.float32)))

    def from_prediction(self, logits: Array) -> Array:
        """ehat from the head's logits [B, H, W, K] (not probabilities)."""
        return self.from_probabilities(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))


class LinearEncoder(Encoder):
    """e = reshape(W v + b), [B, D] -> [B, H, W, C]."""

    def setup(self):
        self.dense = nn.Dense(math.prod(self.z_shape), name="dense")

    def __call__(self, vectors: Array) -> Array:
        e = self.dense(vectors.astype(jnp.float32))
        return self._finish(e.reshape((-1,) + self.z_shape))


def make_encoder(
    kind: str, z_shape: tuple[int, int, int], *, normalize: bool, num_classes: int = 0, kernel_size: int = 3
) -> Encoder:
    """The encoder of the given kind (one of ENCODER_KINDS); shape checks live in `modalities`."""
    if kind == "identity":
        return IdentityEncoder(z_shape, normalize)
    if kind == "conv1x1":
        return Conv1x1Encoder(z_shape, normalize)
    if kind == "table":
        return TableEncoder(z_shape, normalize, num_classes)
    if kind == "onehot_conv":
        return OneHotConvEncoder(z_shape, normalize, num_classes, kernel_size)
    if kind == "linear":
        return LinearEncoder(z_shape, normalize)
    raise ValueError(f"unknown encoder {kind!r}; known: {ENCODER_KINDS}")
