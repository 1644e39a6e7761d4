"""The PyTorch port's training loss (`torch_unet`'s network), for benchmarks only (`bench/vs_torch.py`).

The simplified bound of `mmdiff_jax.objective.make_loss_fn` for the image + class-label model:
eps-MSE + aggregation MSE (in eps units) + cross-entropy of the label head, on NCHW images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch_unet import LabelMTDiffusion


class ScheduleTensors:
    """The `DiffusionSchedule` arrays the loss reads, as torch tensors (modality 0's weights)."""

    def __init__(self, schedule: Any, device: str | torch.device = "cpu"):
        tensor = lambda values: torch.tensor(np.array(values), dtype=torch.float32, device=device)  # noqa: E731
        self.num_steps = int(schedule.num_steps)
        self.beta, self.alpha = tensor(schedule.beta), tensor(schedule.alpha)
        self.alpha_bar, self.one_minus_alpha_bar = tensor(schedule.alpha_bar), tensor(schedule.one_minus_alpha_bar)
        self.w, self.lambda_ = tensor(schedule.w)[0], tensor(schedule.lambda_)[0]


def loss_terms(
    model: LabelMTDiffusion,
    schedule: ScheduleTensors,
    images: torch.Tensor,
    labels: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The simplified bound of `objective.make_loss_fn` for given t [B] and eps [B, C, H, W] (NCHW images).

    z_t = sqrt(abar_t) z_0 + lambda_t e + sqrt(1 - abar_t) eps
    loss = mean (eps_theta - eps)^2 + mean (w_t (ehat - e) / c_t)^2 + mean CE(logits, y),
    c_t = beta_t / (sqrt(alpha_t) sqrt(1 - abar_t)).
    """
    at = lambda values: values[t][:, None, None, None]  # noqa: E731
    encoding = model.encoders_label(labels)
    z_t = (
        at(schedule.alpha_bar).sqrt() * images
        + at(schedule.lambda_) * encoding
        + at(schedule.one_minus_alpha_bar).sqrt() * eps
    )
    eps_prediction, logits, encoding, estimated = model(labels, z_t, t)
    eps_mse = (eps_prediction.float() - eps).square().mean()
    eps_coefficient = at(schedule.beta) / (at(schedule.alpha).sqrt() * at(schedule.one_minus_alpha_bar).sqrt())
    aggregation_mse = (at(schedule.w) * (estimated - encoding) / eps_coefficient).square().mean()
    recovery = F.cross_entropy(logits.float(), labels.long())
    loss = eps_mse + aggregation_mse + recovery
    accuracy = (logits.argmax(dim=-1) == labels).float().mean()
    return loss, {
        "loss": loss,
        "eps_mse": eps_mse,
        "aggregation_mse": aggregation_mse,
        "recovery/label": recovery,
        "accuracy/label": accuracy,
    }


def training_loss(
    model: LabelMTDiffusion,
    schedule: ScheduleTensors,
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One Monte-Carlo estimate: t ~ U{1..T}, eps ~ N(0, I), then `loss_terms`."""
    t = torch.randint(1, schedule.num_steps + 1, (images.shape[0],), device=images.device, generator=generator)
    eps = torch.randn(images.shape, device=images.device, generator=generator, dtype=images.dtype)
    return loss_terms(model, schedule, images, labels, t, eps)
