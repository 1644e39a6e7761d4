"""How an observed modality reaches the denoiser: eps_theta(z_t, t, c) (docs/design.md section 3b).

Each conditionable modality i has a condition path, the `condition` field of its `Modality`:

  path              kinds                                  c_i enters the U-Net as
  'none'            any                                    nothing (aggregation only: the ablation)
  'concat'          image, masked_image, segmentation      channels [x_i * p, p] concatenated to z_t
  'embedding'       label, vector                          a vector added to the time embedding
  'cross_attention' any                                    tokens the U-Net attends to

p [B] is 1 where the modality is visible to the denoiser and 0 where it is hidden (not observed, or
dropped in training with probability p_uncond). Every path has a learned null condition for p = 0:
  concat            the input is zero and the presence channel 0: the first convolution's bias and its
                    weights on the presence channel are the learned null (ADM-style inpainting input);
  embedding         an extra table row (labels) or a learned vector (vectors);
  cross_attention   a learned set of null tokens.
`spatial_condition` is pure; the two modules below hold the learned parts. The raw inputs come from
`modalities.condition_data`: float [B, H, W, C'] for spatial kinds (one-hot for segmentation), int
class ids [B] for labels, float [B, D] for vectors.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

CONDITION_KINDS = ("none", "concat", "embedding", "cross_attention")
SPATIAL_KINDS = ("image", "masked_image", "segmentation")
_NULL_INIT = nn.initializers.normal(0.02)


def spatial_condition(data: Array, present: Array) -> Array:
    """[x * p, p]: data [B, H, W, C'] float, present [B] -> [B, H, W, C' + 1] float32."""
    presence = jnp.asarray(present, jnp.float32)[:, None, None, None]
    data = jnp.asarray(data, jnp.float32) * presence
    return jnp.concatenate([data, jnp.broadcast_to(presence, data.shape[:-1] + (1,))], axis=-1)


class EmbeddingCondition(nn.Module):
    """A label or vector as a [B, features] vector for the time embedding (ADM's class path).

    Labels: a table of num_classes + 1 rows, the last one the null class. Vectors: a 2-layer MLP, and a
    learned null vector where hidden.
    """

    kind: str  # 'label' | 'vector'
    features: int
    num_classes: int = 0

    @nn.compact
    def __call__(self, data: Array, present: Array) -> Array:
        present = jnp.asarray(present, bool)
        if self.kind == "label":
            ids = jnp.where(present, jnp.asarray(data, jnp.int32), self.num_classes)
            return nn.Embed(self.num_classes + 1, self.features, name="table")(ids)
        h = nn.Dense(self.features)(jnp.asarray(data, jnp.float32))
        h = nn.Dense(self.features)(nn.silu(h))
        null = self.param("null", _NULL_INIT, (self.features,))
        return jnp.where(present[:, None], h, null)


class TokenCondition(nn.Module):
    """Any kind as tokens [B, L, features] for cross-attention; a learned null token set where hidden.

    Labels: one token (a table row); vectors: one token (a linear map); spatial kinds: one token per
    patch_size x patch_size patch (a strided convolution) plus a learned position embedding.
    """

    kind: str
    features: int
    num_classes: int = 0
    patch_size: int = 4

    @nn.compact
    def __call__(self, data: Array, present: Array) -> Array:
        present = jnp.asarray(present, bool)
        if self.kind == "label":
            tokens = nn.Embed(self.num_classes, self.features, name="table")(jnp.asarray(data, jnp.int32))[:, None]
        elif self.kind == "vector":
            tokens = nn.Dense(self.features)(jnp.asarray(data, jnp.float32))[:, None]
        else:
            patch = (self.patch_size, self.patch_size)
            tokens = nn.Conv(self.features, patch, strides=patch, padding="VALID")(jnp.asarray(data, jnp.float32))
            tokens = tokens.reshape(tokens.shape[0], math.prod(tokens.shape[1:3]), self.features)
            tokens = tokens + self.param("position", _NULL_INIT, tokens.shape[1:])
        null = self.param("null", _NULL_INIT, tokens.shape[1:])
        return jnp.where(present[:, None, None], tokens, null)
