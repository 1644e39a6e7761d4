"""PSNR and SSIM of restorations, on the whole image or on the hidden region only.

Images are [B, H, W, C] floats in `value_range` (default [-1, 1], the
project's scaling); both metrics first map them to [0, 1], the range dm-pix
assumes, so numbers are comparable with the usual 8-bit PSNR / SSIM.

  psnr = -10 log10(MSE),    MSE over all pixels and channels of one image
                            (dm_pix.psnr), or, for the masked region, over
                            the hidden pixels only (mask == 0).
  ssim = mean of the SSIM map (dm_pix.ssim: 11x11 Gaussian window, sigma 1.5,
         k1 = 0.01, k2 = 0.03, "valid" filtering, so the map is
         [H - 10, W - 10]); for the masked region, the mean of the map over
         the windows whose centre pixel is hidden. Windows near the border of
         the hole also see kept pixels: that is SSIM's window, not a leak.

Both return one value per image [B]; an image with no hidden pixel (or no
hidden window centre) gives NaN for the masked variants, and the evaluators
leave NaNs out of their mean.
"""

from __future__ import annotations

import functools

import dm_pix
import jax
import jax.numpy as jnp

from mmdiff_jax.metrics import base


def _to_unit(images, value_range):
    low, high = value_range
    return (jnp.asarray(images, jnp.float32) - low) / (high - low)


def _hidden(mask, shape):
    """mask [B, H, W, 1 or C] (1 kept, 0 hidden) -> hidden indicator [B, H, W, C]."""
    mask = jnp.asarray(mask)
    if mask.ndim == len(shape) - 1:
        mask = mask[..., None]
    return jnp.broadcast_to(mask == 0, shape).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames="value_range")
def psnr(reference, prediction, mask=None, value_range=(-1.0, 1.0)):
    """PSNR in dB per image [B]; with `mask`, over the hidden pixels only.

    reference, prediction: [B, H, W, C]; mask: [B, H, W, 1] or [B, H, W],
    1 = kept, 0 = hidden.
    """
    a, b = _to_unit(reference, value_range), _to_unit(prediction, value_range)
    if mask is None:
        return dm_pix.psnr(a, b)
    hidden = _hidden(mask, a.shape)
    count = hidden.sum(axis=(1, 2, 3))
    mse = (hidden * (a - b) ** 2).sum(axis=(1, 2, 3)) / count
    return jnp.where(count > 0, -10.0 * jnp.log10(mse), jnp.nan)


@functools.partial(jax.jit, static_argnames=("value_range", "filter_size", "filter_sigma"))
def ssim(
    reference,
    prediction,
    mask=None,
    value_range=(-1.0, 1.0),
    filter_size: int = 11,
    filter_sigma: float = 1.5,
):
    """SSIM per image [B] (dm-pix); with `mask`, over the hidden window centres.

    reference, prediction: [B, H, W, C] with H, W >= filter_size (odd).
    """
    if filter_size % 2 != 1:
        raise ValueError(f"filter_size must be odd, got {filter_size}")
    a, b = _to_unit(reference, value_range), _to_unit(prediction, value_range)
    if mask is None:
        return dm_pix.ssim(a, b, max_val=1.0, filter_size=filter_size, filter_sigma=filter_sigma)
    ssim_map = dm_pix.ssim(a, b, max_val=1.0, filter_size=filter_size, filter_sigma=filter_sigma, return_map=True)
    half = filter_size // 2  # map[i, j] is the window centred on pixel (i + half, j + half)
    hidden = _hidden(mask, a.shape)[:, half : a.shape[1] - half, half : a.shape[2] - half]
    count = hidden.sum(axis=(1, 2, 3))
    total = (hidden * ssim_map).sum(axis=(1, 2, 3))
    return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)


class _RestorationMetric(base.MeanEvaluator):
    function = None

    def __init__(
        self,
        region: str = "whole",
        reference: str = "image",
        prediction: str = "sample",
        mask: str = "mask",
        value_range=(-1.0, 1.0),
        name: str | None = None,
        **options,
    ):
        if region not in ("whole", "masked"):
            raise ValueError(f"region must be 'whole' or 'masked', got {region!r}")
        self.region, self.keys = region, (reference, prediction, mask)
        self.value_range, self.options = tuple(value_range), options
        default = self.metric if region == "whole" else f"{self.metric}_masked"
        self.name = name or default
        super().__init__()

    def per_example(self, batch):
        reference, prediction, mask = self.keys
        mask = base.require(batch, mask, self.name) if self.region == "masked" else None
        return type(self).function(
            base.require(batch, reference, self.name),
            base.require(batch, prediction, self.name),
            mask,
            value_range=self.value_range,
            **self.options,
        )


@base.register("psnr")
class PSNR(_RestorationMetric):
    """Mean PSNR (dB) of batch[prediction] against batch[reference].

    region: "whole" (reports "psnr") or "masked" (hidden pixels, "psnr_masked").
    """

    metric = "psnr"
    function = staticmethod(psnr)


@base.register("ssim")
class SSIM(_RestorationMetric):
    """Mean SSIM; region "whole" ("ssim") or "masked" ("ssim_masked")."""

    metric = "ssim"
    function = staticmethod(ssim)
