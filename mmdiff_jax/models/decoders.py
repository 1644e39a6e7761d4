"""Task decoder heads D_i on the shared backbone's features (docs/design.md section 5).

  'conv'  full-resolution head for images and masks: GN -> SiLU -> conv3x3 -> SiLU -> conv3x3,
          features [B, H, W, F] -> [B, H, W, out] (image mean, or segmentation logits with out = K).
  'mlp'   pooled head for labels and vectors: GN -> SiLU -> mean over H, W -> dense -> SiLU -> dense,
          features [B, h, w, F] -> [B, out] (class logits, or a vector mean).

Which backbone features a head reads is the modality's choice ('features': the U-Net's last decoder
activations at full resolution; 'bottleneck': its middle block). The paper leaves head placement open;
defaults are full resolution for conv heads and the bottleneck for MLP heads. Heads compute in the
model's compute dtype and return float32, so the recovery losses run in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

HEAD_KINDS = ("conv", "mlp", "none")


class ConvHead(nn.Module):
    """[B, H, W, F] -> [B, H, W, out_channels], float32."""

    out_channels: int
    hidden_channels: int
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Array) -> Array:
        h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype)(features))
        h = nn.silu(nn.Conv(self.hidden_channels, (3, 3), dtype=self.dtype)(h))
        return nn.Conv(self.out_channels, (3, 3), dtype=self.dtype)(h).astype(jnp.float32)


class MLPHead(nn.Module):
    """[B, h, w, F] -> mean-pooled -> [B, out_features], float32."""

    out_features: int
    hidden_features: int
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Array) -> Array:
        h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype)(features))
        h = jnp.mean(h, axis=(1, 2))
        h = nn.silu(nn.Dense(self.hidden_features, dtype=self.dtype)(h))
        return nn.Dense(self.out_features, dtype=self.dtype)(h).astype(jnp.float32)


def make_head(kind: str, out_size: int, hidden: int, *, num_groups: int, dtype: Dtype) -> nn.Module:
    """A head of the given kind ('conv' or 'mlp') producing `out_size` channels / features."""
    if kind == "conv":
        return ConvHead(out_size, hidden, num_groups, dtype)
    if kind == "mlp":
        return MLPHead(out_size, hidden, num_groups, dtype)
    raise ValueError(f"unknown head {kind!r}; known: {HEAD_KINDS[:2]}")
