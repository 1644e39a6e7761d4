"""Flax Linen networks: the shared ADM-style U-Net, modality encoders and task heads (docs/design.md section 5)."""

from mmdiff_jax.models.decoders import ConvHead, MLPHead, make_head
from mmdiff_jax.models.encoders import (
    Conv1x1Encoder,
    IdentityEncoder,
    LinearEncoder,
    OneHotConvEncoder,
    TableEncoder,
    make_encoder,
    rms_normalize,
)
from mmdiff_jax.models.layers import timestep_embedding
from mmdiff_jax.models.unet import PRESETS, UNet, UNetConfig, UNetOutput, unet_preset

__all__ = [
    "ConvHead",
    "MLPHead",
    "make_head",
    "Conv1x1Encoder",
    "IdentityEncoder",
    "LinearEncoder",
    "OneHotConvEncoder",
    "TableEncoder",
    "make_encoder",
    "rms_normalize",
    "PRESETS",
    "UNet",
    "UNetConfig",
    "UNetOutput",
    "timestep_embedding",
    "unet_preset",
]
