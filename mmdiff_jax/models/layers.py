"""The U-Net's building blocks (guided-diffusion's `nn.py` / `unet.py` blocks, in Flax Linen).

  timestep_embedding     t [B] -> [B, dim], the sinusoidal embedding
  ResBlock               residual block with scale-shift norm, optional down / up sampling inside
  AttentionBlock         multi-head self-attention over positions (`jax.nn.dot_product_attention`)
  CrossAttentionBlock    attention from positions to a condition's tokens

Every block takes and returns [B, H, W, C]; the assembled network is `unet.UNet`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any


def timestep_embedding(t: Array, dim: int, max_period: float = 10_000.0) -> Array:
    """Sinusoidal embedding of steps t [B] -> [B, dim]: [cos(t f_k), sin(t f_k)], f_k = max_period^(-k/half)."""
    half = dim // 2
    frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    arguments = jnp.asarray(t, jnp.float32)[:, None] * frequencies[None]
    embedding = jnp.concatenate([jnp.cos(arguments), jnp.sin(arguments)], axis=-1)
    if dim % 2:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding


def downsample_pool(x: Array) -> Array:
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def upsample_nearest(x: Array) -> Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ResBlock(nn.Module):
    """Residual block with scale-shift norm: x + Conv(Drop(SiLU(GN(h)(1 + s) + b))), h = Conv(SiLU(GN(x)))."""

    out_channels: int
    dropout: float = 0.0
    resample: str | None = None  # None, 'down' or 'up' (parameter-free, inside the block)
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, embedding: Array, train: bool) -> Array:
        """x [B, H, W, C], embedding [B, E] -> [B, H', W', out_channels]."""
        h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype)(x))
        if self.resample is not None:
            resample = downsample_pool if self.resample == "down" else upsample_nearest
            h, x = resample(h), resample(x)
        h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype)(h)
        scale_shift = nn.Dense(2 * self.out_channels, dtype=self.dtype)(nn.silu(embedding))
        scale, shift = jnp.split(scale_shift[:, None, None, :], 2, axis=-1)
        h = nn.GroupNorm(self.num_groups, dtype=self.dtype)(h) * (1 + scale) + shift
        h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=not train)
        h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros)(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="skip")(x)
        return x + h


def _normalized_positions(x: Array, num_groups: int, dtype: Dtype) -> Array:
    """GroupNorm(x) [B, H, W, C] flattened to the H * W positions [B, H * W, C] (the attention blocks' pre-norm)."""
    batch, height, width, channels = x.shape
    return nn.GroupNorm(num_groups, dtype=dtype)(x).reshape(batch, height * width, channels)


def _attend_and_add(x: Array, query: Array, key: Array, value: Array, num_head_channels: int, dtype: Dtype) -> Array:
    """x + proj_out(MultiHead(query, key, value)): query [B, H * W, C], key / value [B, L, C], C / num_head_channels
    heads (`jax.nn.dot_product_attention`); `proj_out` is zero-initialised, so a new block starts as the identity.
    Called inside the attention blocks' compact methods: `proj_out` is their submodule."""
    split = lambda part: part.reshape(part.shape[:2] + (-1, num_head_channels))  # noqa: E731
    h = jax.nn.dot_product_attention(split(query), split(key), split(value)).reshape(query.shape)
    h = nn.Dense(x.shape[-1], dtype=dtype, kernel_init=nn.initializers.zeros, name="proj_out")(h)
    return x + h.reshape(x.shape)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all H * W positions, pre-norm, zero-initialised output projection."""

    num_head_channels: int
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [B, H, W, C] -> [B, H, W, C]; C / num_head_channels heads."""
        h = _normalized_positions(x, self.num_groups, self.dtype)
        qkv = nn.Dense(3 * x.shape[-1], dtype=self.dtype, name="qkv")(h)
        return _attend_and_add(x, *jnp.split(qkv, 3, axis=-1), self.num_head_channels, self.dtype)


class CrossAttentionBlock(nn.Module):
    """Multi-head attention from every position to condition tokens, pre-norm, zero-initialised output
    projection (so a new condition path starts as the identity)."""

    num_head_channels: int
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        """x [B, H, W, C], context [B, L, D] -> [B, H, W, C]; C / num_head_channels heads."""
        channels = x.shape[-1]
        h = _normalized_positions(x, self.num_groups, self.dtype)
        query = nn.Dense(channels, dtype=self.dtype, name="query")(h)
        key_value = nn.Dense(2 * channels, dtype=self.dtype, name="key_value")(
            nn.LayerNorm(dtype=self.dtype)(context.astype(self.dtype))
        )
        return _attend_and_add(x, query, *jnp.split(key_value, 2, axis=-1), self.num_head_channels, self.dtype)
