"""The shared denoising backbone: an ADM-style U-Net (Dhariwal & Nichol 2021, guided-diffusion).

Built as guided-diffusion's `UNetModel` with `use_scale_shift_norm=True`: sinusoidal time embedding
through a 2-layer MLP (width 4 * base_channels), residual blocks whose second group norm is modulated
by the embedding (h = GN(h) (1 + scale) + shift), dropout, down/up sampling (strided conv / nearest +
conv, or inside residual blocks with `resblock_updown`), multi-head self-attention at the configured
resolutions, channel multipliers per level, zero-initialised output convolutions. Attention uses
`jax.nn.dot_product_attention` (cuDNN flash attention on GPU). The blocks are in `layers`.

Shapes: x [B, H, W, C_in] -> eps [B, H, W, out_channels]; the heads read `features` (the last decoder
activations at full resolution, [B, H, W, base_channels * channel_multipliers[0]]) and `bottleneck`
(the middle block's output, [B, H / 2^(L-1), W / 2^(L-1), base_channels * channel_multipliers[-1]]).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmdiff_jax.models.layers import (
    AttentionBlock,
    CrossAttentionBlock,
    ResBlock,
    timestep_embedding,
    upsample_nearest,
)

Array = jax.Array
Dtype = Any


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The backbone's size; plain keyword fields so an ml_collections ConfigDict maps onto it.

    attention_resolutions are spatial sizes (e.g. (32, 16, 8) for a 64x64 input), as in ADM's flags.
    `num_classes` > 0 adds ADM's class embedding to the time embedding (the classic class-conditional
    baseline; MT-Diffusion conditions through the encoders instead and leaves it 0).
    `remat`: '' (off) or a `jax.checkpoint_policies` policy (REMAT_POLICIES) applied to every residual and
    attention block: the backward pass recomputes what the policy does not save (less memory, more FLOPs;
    'nothing_saveable' keeps only the blocks' inputs). Parameters and results are the same either way.
    """

    base_channels: int = 64
    channel_multipliers: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (8,)
    num_head_channels: int = 32
    dropout: float = 0.1
    resblock_updown: bool = True
    num_groups: int = 32
    num_classes: int = 0
    remat: str = ""

    def __post_init__(self):
        # Config files give lists; keep the dataclass hashable.
        object.__setattr__(self, "channel_multipliers", tuple(self.channel_multipliers))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))

    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * multiplier for multiplier in self.channel_multipliers)

    def validate(self, spatial_shape: Sequence[int]) -> None:
        """Raises ValueError when this U-Net cannot run on inputs of spatial shape (H, W)."""
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown U-Net remat policy {self.remat!r}; known: {sorted(REMAT_POLICIES)}")
        factor = 2 ** (len(self.channel_multipliers) - 1)
        if any(size % factor for size in spatial_shape):
            raise ValueError(
                f"U-Net with {len(self.channel_multipliers)} levels needs H and W divisible by "
                f"{factor}, got {tuple(spatial_shape)}"
            )
        for channels in self.level_channels():
            if channels % self.num_groups:
                raise ValueError(f"U-Net width {channels} is not divisible by num_groups={self.num_groups}")
        attended = [
            c
            for level, c in enumerate(self.level_channels())
            if spatial_shape[0] // 2**level in self.attention_resolutions
        ]
        attended.append(self.level_channels()[-1])  # the middle block always attends
        for channels in attended:
            if channels % self.num_head_channels:
                raise ValueError(
                    f"U-Net width {channels} is not divisible by num_head_channels={self.num_head_channels}"
                )


# UNetConfig.remat -> the policy of `jax.checkpoint` around each block (MaxDiffusion's gradient_checkpoint).
REMAT_POLICIES = {
    "": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


PRESETS: dict[str, UNetConfig] = {
    # Unit tests: ~0.2M parameters, compiles in seconds on CPU.
    "tiny": UNetConfig(
        base_channels=16,
        channel_multipliers=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_head_channels=16,
        dropout=0.0,
        num_groups=8,
    ),
    # CPU experiments on 32x32 Fashion-MNIST: ~7.7M parameters.
    "default": UNetConfig(
        base_channels=64,
        channel_multipliers=(1, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(8,),
        num_head_channels=32,
        dropout=0.1,
    ),
    # ADM ImageNet-64 (guided-diffusion's 64x64 flags): 295.9M with 3 -> 6 channels and 1000 classes.
    "adm64": UNetConfig(
        base_channels=192,
        channel_multipliers=(1, 2, 3, 4),
        num_res_blocks=3,
        attention_resolutions=(32, 16, 8),
        num_head_channels=64,
        dropout=0.1,
        resblock_updown=True,
    ),
}


def unet_preset(name: str, **overrides) -> UNetConfig:
    """A named size ('tiny', 'default', 'adm64') with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown U-Net preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


class UNetOutput(NamedTuple):
    output: Array  # [B, H, W, out_channels]: eps (and ADM's variance channels if out_channels is doubled)
    features: Array  # [B, H, W, base_channels * channel_multipliers[0]]: full-resolution features
    bottleneck: Array  # [B, H / 2^(L-1), W / 2^(L-1), base_channels * channel_multipliers[-1]]


class UNet(nn.Module):
    """ADM U-Net. Output dtype is the compute dtype; params are float32 (`param_dtype` default)."""

    config: UNetConfig
    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        y: Array | None = None,
        *,
        condition_embedding: Array | None = None,
        context: Array | None = None,
        train: bool,
    ) -> UNetOutput:
        """x [B, H, W, C_in], t [B] integer steps, y [B] class ids (only with config.num_classes > 0).

        condition_embedding [B, 4 * base_channels] is added to the time embedding; with context [B, L, D]
        (condition tokens) a cross-attention block follows every self-attention block
        (`models.conditioning`, docs/design.md section 3b).
        """
        config, dtype = self.config, self.dtype
        config.validate(x.shape[1:3])
        residual_class, attention_class, cross_class = ResBlock, AttentionBlock, CrossAttentionBlock
        if config.remat:  # train (argument 3, counting self) is a Python bool: static
            policy = REMAT_POLICIES[config.remat]
            residual_class = nn.remat(ResBlock, policy=policy, static_argnums=(3,))
            attention_class = nn.remat(AttentionBlock, policy=policy)
            cross_class = nn.remat(CrossAttentionBlock, policy=policy)
        # Explicit names, the ones Flax gives the plain classes: the same parameters with and without remat.
        residual_ids, attention_ids = itertools.count(), itertools.count()
        block = lambda channels, resample=None: residual_class(  # noqa: E731
            channels, config.dropout, resample, config.num_groups, dtype, name=f"ResBlock_{next(residual_ids)}"
        )
        cross_ids = itertools.count()

        def attention(h):
            h = attention_class(
                config.num_head_channels, config.num_groups, dtype, name=f"AttentionBlock_{next(attention_ids)}"
            )(h)
            if context is None:
                return h
            return cross_class(
                config.num_head_channels, config.num_groups, dtype, name=f"CrossAttentionBlock_{next(cross_ids)}"
            )(h, context)

        embedding_dim = 4 * config.base_channels
        embedding = timestep_embedding(t, config.base_channels)
        embedding = nn.Dense(embedding_dim, dtype=dtype)(embedding)
        embedding = nn.Dense(embedding_dim, dtype=dtype)(nn.silu(embedding))
        if config.num_classes:
            if y is None:
                raise ValueError("this U-Net has a class embedding (num_classes > 0): pass class ids y")
            embedding = embedding + nn.Embed(config.num_classes, embedding_dim, dtype=dtype)(y)
        if condition_embedding is not None:
            embedding = embedding + condition_embedding.astype(embedding.dtype)

        resolution = x.shape[1]
        h = nn.Conv(config.level_channels()[0], (3, 3), dtype=dtype)(x.astype(dtype))
        skips = [h]
        for level, channels in enumerate(config.level_channels()):
            for _ in range(config.num_res_blocks):
                h = block(channels)(h, embedding, train)
                if resolution in config.attention_resolutions:
                    h = attention(h)
                skips.append(h)
            if level != len(config.channel_multipliers) - 1:
                if config.resblock_updown:
                    h = block(channels, "down")(h, embedding, train)
                else:
                    h = nn.Conv(channels, (3, 3), strides=(2, 2), dtype=dtype)(h)
                resolution //= 2
                skips.append(h)

        h = block(h.shape[-1])(h, embedding, train)
        h = attention(h)
        h = block(h.shape[-1])(h, embedding, train)
        bottleneck = h

        for level, channels in reversed(list(enumerate(config.level_channels()))):
            for index in range(config.num_res_blocks + 1):
                h = block(channels)(jnp.concatenate([h, skips.pop()], axis=-1), embedding, train)
                if resolution in config.attention_resolutions:
                    h = attention(h)
                if level and index == config.num_res_blocks:
                    if config.resblock_updown:
                        h = block(channels, "up")(h, embedding, train)
                    else:
                        h = nn.Conv(channels, (3, 3), dtype=dtype)(upsample_nearest(h))
                    resolution *= 2
        features = h

        h = nn.silu(nn.GroupNorm(config.num_groups, dtype=dtype)(h))
        output = nn.Conv(self.out_channels, (3, 3), dtype=dtype, kernel_init=nn.initializers.zeros)(h)
        return UNetOutput(output, features, bottleneck)
