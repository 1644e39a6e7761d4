"""A PyTorch port of the MT-Diffusion network, for benchmarks only (`bench/vs_torch.py`; its loss: `torch_loss`).

Written from `mmdiff_jax/models/unet.py` (ADM U-Net: sinusoidal time embedding + 2-layer MLP, scale-shift
ResBlocks with GroupNorm / SiLU / dropout, resblock up/down (avg-pool / nearest), multi-head self-attention
through `F.scaled_dot_product_attention`, zero-initialised output convs) and from the image + class-label
model of `mmdiff_jax.modalities` / `mmdiff_jax.objective`:
  label encoder  E(y) = rms_normalize(table)[y] reshaped to z's shape; ehat = softmax(logits) @ rows
  label head     GN -> SiLU -> mean over H, W -> Linear -> SiLU -> Linear (on the U-Net's bottleneck)
  loss           eps-MSE + aggregation MSE (in eps units) + cross-entropy of the label head
diffusers' `UNet2DModel` is not used: it has no scale-shift modulation of the second norm in the same
place, different skip wiring and attention blocks, so its parameter count and FLOPs differ from ADM's.

Layout: NCHW (PyTorch's default; `channels_last` is an option of vs_torch). Every submodule carries the
Flax module's name (`ResBlock_3.Conv_1`, `AttentionBlock_0.qkv`, ...), so `load_flax_params` copies a
Flax parameter tree into the port one to one (kernels transposed) and a test can compare outputs.
GroupNorm eps is Flax's 1e-6. Only the configurations the benchmarks use are ported (image + labels).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GROUP_NORM_EPS = 1e-6  # flax.linen.GroupNorm's default


def group_norm(num_groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups, channels, eps=GROUP_NORM_EPS)


def zero_(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """[B] steps -> [B, dim]: [cos(t f_k), sin(t f_k)], f_k = max_period^(-k/half) (as the Flax one)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arguments = t.float()[:, None] * frequencies[None]
    embedding = torch.cat([torch.cos(arguments), torch.sin(arguments)], dim=-1)
    return F.pad(embedding, (0, 1)) if dim % 2 else embedding


class ResBlock(nn.Module):
    """x + Conv(Drop(SiLU(GN(h)(1 + s) + b))), h = Conv(SiLU(GN(x))); resample 'down' / 'up' / None."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        embedding_dim: int,
        dropout: float,
        resample: str | None,
        num_groups: int,
    ):
        super().__init__()
        self.resample = resample
        self.GroupNorm_0 = group_norm(num_groups, in_channels)
        self.Conv_0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.Dense_0 = nn.Linear(embedding_dim, 2 * out_channels)
        self.GroupNorm_1 = group_norm(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.Conv_1 = zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return F.interpolate(x, scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.GroupNorm_0(x))
        if self.resample is not None:
            h, x = self._resample(h), self._resample(x)
        h = self.Conv_0(h)
        scale, shift = self.Dense_0(F.silu(embedding))[:, :, None, None].chunk(2, dim=1)
        h = self.GroupNorm_1(h) * (1 + scale) + shift
        h = self.Conv_1(self.dropout(F.silu(h)))
        if self.skip is not None:
            x = self.skip(x)
        return x + h


class AttentionBlock(nn.Module):
    """Pre-norm multi-head self-attention over H * W positions, zero-initialised output projection."""

    def __init__(self, channels: int, num_head_channels: int, num_groups: int):
        super().__init__()
        self.num_heads, self.head_channels = channels // num_head_channels, num_head_channels
        self.GroupNorm_0 = group_norm(num_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.GroupNorm_0(x).reshape(batch, channels, height * width).transpose(1, 2)  # [B, L, C]
        query, key, value = (
            part.reshape(batch, height * width, self.num_heads, self.head_channels).transpose(1, 2)
            for part in self.qkv(h).chunk(3, dim=-1)
        )
        h = F.scaled_dot_product_attention(query, key, value)  # [B, heads, L, head_channels]
        h = self.proj_out(h.transpose(1, 2).reshape(batch, height * width, channels))
        return x + h.transpose(1, 2).reshape(x.shape)


class UNet(nn.Module):
    """ADM U-Net on NCHW tensors; returns (eps, features, bottleneck) as the Flax `UNetOutput`.

    `config` is a `mmdiff_jax.models.unet.UNetConfig` (or anything with its fields). Submodules are
    created, and named, in the order Flax's compact `UNet.__call__` creates them.
    """

    def __init__(self, config: Any, in_channels: int, out_channels: int, resolution: int):
        super().__init__()
        self.config = config
        counts: dict[str, int] = {}

        def add(kind: str, module: nn.Module) -> str:
            name = f"{kind}_{counts.get(kind, 0)}"
            counts[kind] = counts.get(kind, 0) + 1
            self.add_module(name, module)
            return name

        base, groups = config.base_channels, config.num_groups
        levels = [base * multiplier for multiplier in config.channel_multipliers]
        embedding_dim = 4 * base
        block = lambda cin, cout, resample=None: add(  # noqa: E731
            "ResBlock", ResBlock(cin, cout, embedding_dim, config.dropout, resample, groups)
        )
        attention = lambda channels: add(  # noqa: E731
            "AttentionBlock", AttentionBlock(channels, config.num_head_channels, groups)
        )

        self.time = [
            add("Dense", nn.Linear(base, embedding_dim)),
            add("Dense", nn.Linear(embedding_dim, embedding_dim)),
        ]
        if config.num_classes:
            self.class_embedding = add("Embed", nn.Embedding(config.num_classes, embedding_dim))
        self.input_conv = add("Conv", nn.Conv2d(in_channels, levels[0], 3, padding=1))
        # The program: ('block', name) consumes h; ('attn', name); ('push',) a skip; ('pop_block', name).
        self.down_program: list[tuple[str, ...]] = []
        channels, skip_channels = levels[0], [levels[0]]
        for level, width in enumerate(levels):
            for _ in range(config.num_res_blocks):
                self.down_program.append(("block", block(channels, width)))
                channels = width
                if resolution in config.attention_resolutions:
                    self.down_program.append(("attn", attention(channels)))
                self.down_program.append(("push",))
                skip_channels.append(channels)
            if level != len(levels) - 1:
                if config.resblock_updown:
                    self.down_program.append(("block", block(channels, channels, "down")))
                else:
                    self.down_program.append(("conv_down", add("Conv", nn.Conv2d(channels, channels, 3, stride=2))))
                resolution //= 2
                self.down_program.append(("push",))
                skip_channels.append(channels)
        self.middle = [block(channels, channels), attention(channels), block(channels, channels)]
        self.up_program: list[tuple[str, ...]] = []
        for level, width in reversed(list(enumerate(levels))):
            for index in range(config.num_res_blocks + 1):
                self.up_program.append(("pop_block", block(channels + skip_channels.pop(), width)))
                channels = width
                if resolution in config.attention_resolutions:
                    self.up_program.append(("attn", attention(channels)))
                if level and index == config.num_res_blocks:
                    if config.resblock_updown:
                        self.up_program.append(("block", block(channels, channels, "up")))
                    else:
                        self.up_program.append(("conv_up", add("Conv", nn.Conv2d(channels, channels, 3, padding=1))))
                    resolution *= 2
        self.out_norm = add("GroupNorm", group_norm(groups, channels))
        self.out_conv = add("Conv", zero_(nn.Conv2d(channels, out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        module = self.get_submodule
        embedding = module(self.time[0])(timestep_embedding(t, self.config.base_channels))
        embedding = module(self.time[1])(F.silu(embedding))
        if self.config.num_classes:
            embedding = embedding + module(self.class_embedding)(y)
        h = module(self.input_conv)(x)
        skips = [h]
        for operation, *name in self.down_program:
            if operation == "block":
                h = module(name[0])(h, embedding)
            elif operation == "attn":
                h = module(name[0])(h)
            elif operation == "conv_down":  # Flax 'SAME' with stride 2 on even sizes pads (0, 1)
                h = module(name[0])(F.pad(h, (0, 1, 0, 1)))
            else:
                skips.append(h)
        h = module(self.middle[0])(h, embedding)
        h = module(self.middle[1])(h)
        h = module(self.middle[2])(h, embedding)
        bottleneck = h
        for operation, name in self.up_program:
            if operation == "pop_block":
                h = module(name)(torch.cat([h, skips.pop()], dim=1), embedding)
            elif operation == "block":
                h = module(name)(h, embedding)
            elif operation == "attn":
                h = module(name)(h)
            else:
                h = module(name)(F.interpolate(h, scale_factor=2, mode="nearest"))
        features = h
        output = module(self.out_conv)(F.silu(module(self.out_norm)(h)))
        return output, features, bottleneck


class MLPHead(nn.Module):
    """[B, F, h, w] -> GN -> SiLU -> mean over h, w -> Linear -> SiLU -> Linear -> [B, out]."""

    def __init__(self, in_features: int, out_features: int, hidden_features: int, num_groups: int):
        super().__init__()
        self.GroupNorm_0 = group_norm(num_groups, in_features)
        self.Dense_0 = nn.Linear(in_features, hidden_features)
        self.Dense_1 = nn.Linear(hidden_features, out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.GroupNorm_0(features)).mean(dim=(2, 3))
        return self.Dense_1(F.silu(self.Dense_0(h)))


def rms_normalize(e: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    """e / sqrt(mean(e^2 over all axes but the first) + eps)."""
    return e * torch.rsqrt(e.square().mean(dim=tuple(range(1, e.ndim)), keepdim=True) + epsilon)


class TableEncoder(nn.Module):
    """A learned z-shaped map per class (rows RMS-normalised); maps are [H, W, C] as in Flax, returned NCHW."""

    def __init__(self, num_classes: int, z_shape: tuple[int, int, int]):
        super().__init__()
        self.z_shape = tuple(z_shape)
        self.table = nn.Parameter(torch.randn(num_classes, math.prod(z_shape)))

    def rows(self) -> torch.Tensor:
        return rms_normalize(self.table)

    def _to_nchw(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.reshape((-1,) + self.z_shape).permute(0, 3, 1, 2)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self._to_nchw(self.rows()[labels])

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self._to_nchw(torch.softmax(logits.float(), dim=-1) @ self.rows())


class LabelMTDiffusion(nn.Module):
    """The image + one class label MT-Diffusion network (names as Flax's MTDiffusion with modality 'label')."""

    def __init__(self, unet_config: Any, z_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        height, _, channels = z_shape
        self.backbone = UNet(unet_config, channels, channels, height)
        self.encoders_label = TableEncoder(num_classes, z_shape)
        bottleneck = unet_config.base_channels * unet_config.channel_multipliers[-1]
        self.decoders_label = MLPHead(bottleneck, num_classes, unet_config.base_channels, unet_config.num_groups)

    def forward(self, labels: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor):
        """-> (eps [B, C, H, W], logits [B, K], e [B, C, H, W], ehat [B, C, H, W])."""
        encoding = self.encoders_label(labels)
        eps, _, bottleneck = self.backbone(z_t, t)
        logits = self.decoders_label(bottleneck)
        return eps, logits, encoding, self.encoders_label.from_logits(logits)


def load_flax_params(model: nn.Module, params: Mapping[str, Any]) -> int:
    """Copies a Flax parameter tree into the port (names must match one to one); returns values copied.

    Conv kernels [kh, kw, in, out] -> [out, in, kh, kw]; Dense kernels [in, out] -> [out, in];
    GroupNorm scale -> weight; Embed embedding -> weight; the label table as is. Raises KeyError naming
    every Flax parameter without a torch counterpart and every torch parameter left unset.
    """
    targets = dict(model.named_parameters())
    assigned, missing = set(), []

    def visit(tree: Mapping[str, Any], prefix: str) -> None:
        for key, value in tree.items():
            path = f"{prefix}{key}"
            if isinstance(value, Mapping):
                visit(value, path + ".")
                continue
            value = np.asarray(value, dtype=np.float32)
            leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(key, key)
            name = path.rsplit(".", 1)[0] + "." + leaf if "." in path else leaf
            if name not in targets:
                missing.append(path)
                continue
            if key == "kernel":
                value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
            target = targets[name]
            if tuple(target.shape) != value.shape:
                raise ValueError(f"{path}: Flax shape {value.shape} -> torch {name} {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(torch.from_numpy(np.array(value, copy=True)))
            assigned.add(name)

    visit(params, "")
    unset = sorted(set(targets) - assigned)
    if missing or unset:
        raise KeyError(f"Flax parameters without a torch counterpart: {missing}; torch parameters not set: {unset}")
    return sum(targets[name].numel() for name in assigned)


def count_params(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
