"""The assembled MT-Diffusion network (docs/design.md sections 3 and 5): encoders E_i, a shared U-Net
eps_theta with features h, heads D_i, and the conditioning paths into the U-Net; built from the `Modality`
specs of `mmdiff_jax.modalities`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmdiff_jax.modalities import (
    MASK_KEY,
    Batch,
    Modality,
    check_modalities,
    condition_data,
    modality_data,
    validate_batch,
)
from mmdiff_jax.targets import PREDICTIONS
from mmdiff_jax.models.conditioning import EmbeddingCondition, TokenCondition, spatial_condition
from mmdiff_jax.models.decoders import make_head
from mmdiff_jax.models.encoders import make_encoder
from mmdiff_jax.models.unet import UNet, UNetConfig

Array = jax.Array


class ModelOutput(NamedTuple):
    prediction: Array  # [B, *S] float32, the denoiser's output: eps_theta, v_theta or z0_theta (`prediction`)
    heads: dict[str, Array]  # name -> D_i(h), float32: logits [B, K] / [B, H, W, K], or a mean of x_i
    encodings: Array | None  # [N, B, *S], e_i = E_i(x_i) from the batch (None from `predict`)
    estimated_encodings: Array  # [N, B, *S], ehat_i
    # [B, *S] float32, ADM's learned variance: log sigma_t^2 = v log beta_t + (1 - v) log beta~_t
    # (`diffusion.reverse_log_variance`); None unless `learn_variance`.
    variance_interpolation: Array | None = None


class MTDiffusion(nn.Module):
    """The MT-Diffusion network: encoders E_i, a shared U-Net eps_theta with features h, heads D_i.

    Fields: `unet` (backbone size), `modalities` (the N auxiliary specs, in stack order), `z_shape`
    (H, W, C), `primary` (batch key of x_0), `dtype` (compute dtype of backbone and heads; params stay
    float32, every output is float32), `prediction` (what the U-Net outputs: 'eps', 'v' or 'z_0', of
    u_t = z_t - m_t; `targets.eps_from_prediction` converts), `learn_variance` (ADM's learned variance,
    Nichol & Dhariwal 2021: the U-Net has C more output channels, read as v = (out + 1) / 2, the interpolation
    of `diffusion.reverse_log_variance`; trained by the hybrid loss, docs/design.md section 3d). Everything is
    checked when the module is constructed.
    """

    unet: UNetConfig
    modalities: tuple[Modality, ...]
    z_shape: tuple[int, int, int]
    primary: str = "image"
    dtype: Any = jnp.float32
    prediction: str = "eps"
    learn_variance: bool = False

    def __post_init__(self):
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "z_shape", tuple(int(size) for size in self.z_shape))
        check_modalities(self.modalities, self.z_shape, self.primary)
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction target {self.prediction!r}; known: {PREDICTIONS}")
        self.unet.validate(self.z_shape[:2])
        super().__post_init__()

    def setup(self):
        channels = self.z_shape[-1]
        self.backbone = UNet(
            self.unet, out_channels=2 * channels if self.learn_variance else channels, dtype=self.dtype
        )
        self.encoders = {
            m.name: make_encoder(
                m.encoder,
                self.z_shape,
                normalize=m.normalize,
                num_classes=m.num_classes,
                kernel_size=m.encoder_kernel_size,
            )
            for m in self.modalities
        }
        self.decoders = {
            m.name: make_head(
                m.head,
                m.head_shape[-1] if m.head == "conv" else math.prod(m.head_shape),
                m.head_hidden or self.unet.base_channels,
                num_groups=self.unet.num_groups,
                dtype=self.dtype,
            )
            for m in self.modalities
            if m.head != "none"
        }
        features = 4 * self.unet.base_channels  # the U-Net's time-embedding width
        self.conditioners = {
            m.name: EmbeddingCondition(m.kind, features, m.num_classes)
            if m.condition == "embedding"
            else TokenCondition(m.kind, features, m.num_classes, m.token_patch_size)
            for m in self.modalities
            if m.condition in ("embedding", "cross_attention")
        }

    @property
    def conditioned_modalities(self) -> tuple[Modality, ...]:
        """The modalities the denoiser can see (`Modality.conditioned`; docs/design.md section 3b)."""
        return tuple(m for m in self.modalities if m.conditioned)

    def _stack(self, encodings: list[Array], batch_size: int) -> Array:
        if not encodings:
            return jnp.zeros((0, batch_size) + self.z_shape, jnp.float32)
        return jnp.stack(encodings)

    def encode(self, batch: Batch) -> Array:
        """e_i = E_i(x_i) for every modality, stacked: [N, B, *S] float32."""
        batch_size = validate_batch(self.modalities, self.z_shape, batch, primary=None)
        if not self.modalities:
            batch_size = batch[self.primary].shape[0]
        return self._stack([self.encoders[m.name](modality_data(m, batch)) for m in self.modalities], batch_size)

    def _present(self, present: Mapping[str, Array] | None, batch_size: int, visible: Sequence[str]) -> dict:
        """name -> [B] bool for every conditioned modality: `present` where given, else name in `visible`."""
        present = dict(present or {})
        conditioned = [m.name for m in self.conditioned_modalities]
        unknown = sorted(set(present) - set(conditioned))
        if unknown:
            raise ValueError(
                f"present names {unknown}, which are not conditioned modalities of the model "
                f"(conditioned: {conditioned})"
            )
        return {
            name: jnp.broadcast_to(jnp.asarray(present.get(name, name in visible), bool), (batch_size,))
            for name in conditioned
        }

    def _condition_inputs(self, source: Batch, present: Mapping[str, Array], batch_size: int):
        """The U-Net's condition inputs: extra input channels, time-embedding offset, context tokens."""
        channels, embedding, context = [], None, []
        for m in self.conditioned_modalities:
            data = condition_data(m, source, batch_size)
            if m.condition == "concat":
                channels.append(spatial_condition(data, present[m.name]))
            elif m.condition == "embedding":
                offset = self.conditioners[m.name](data, present[m.name])
                embedding = offset if embedding is None else embedding + offset
            else:
                context.append(self.conditioners[m.name](data, present[m.name]))
        return channels, embedding, (jnp.concatenate(context, axis=1) if context else None)

    def _denoise(
        self,
        z_t: Array,
        t: Array,
        known: Mapping[str, Array],
        present: Mapping[str, Array],
        source: Batch,
        *,
        train: bool,
    ):
        """The prediction, heads, ehat (ehat_i = known[name] where given, else E_i(D_i(h))) and the variance
        interpolation (None unless `learn_variance`); the denoiser sees the conditioned modalities of `source`
        where `present` (docs/design.md section 3b)."""
        if tuple(z_t.shape[1:]) != self.z_shape:
            raise ValueError(f"z_t must have shape [B, *{self.z_shape}], got {tuple(z_t.shape)}")
        t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), z_t.shape[:1])
        channels, embedding, context = self._condition_inputs(source, present, z_t.shape[0])
        x = jnp.concatenate([z_t] + channels, axis=-1) if channels else z_t
        output = self.backbone(x, t, condition_embedding=embedding, context=context, train=train)
        features = {"features": output.features, "bottleneck": output.bottleneck}
        heads, estimated = {}, []
        for m in self.modalities:
            if m.head != "none":
                prediction = self.decoders[m.name](features[m.head_features])
                heads[m.name] = prediction.reshape(z_t.shape[:1] + m.head_shape)
            if m.name in known:
                estimated.append(known[m.name])
            elif m.head == "none":
                raise ValueError(f"modality {m.name!r} has no head (head 'none'): it must be observed")
            else:
                estimated.append(self.encoders[m.name].from_prediction(heads[m.name]))
        prediction, interpolation = output.output.astype(jnp.float32), None
        if self.learn_variance:
            prediction, raw = jnp.split(prediction, 2, axis=-1)
            interpolation = (raw + 1.0) / 2.0  # ADM: the raw output in [-1, 1] maps to v in [0, 1]
        return prediction, heads, self._stack(estimated, z_t.shape[0]), interpolation

    def __call__(
        self, batch: Batch, z_t: Array, t: Array, *, train: bool, present: Mapping[str, Array] | None = None
    ) -> ModelOutput:
        """Training forward pass: z_t [B, *S], t [B] (or []) in 1..T, batch holding every modality.

        present: name -> [B] bool, which conditioned modalities the denoiser sees (default: none, the
        aggregation-only model). Where modality i is seen, ehat_i = e_i (as when it is observed in sampling).
        """
        encodings = self.encode(batch)
        batch_size = z_t.shape[0]
        present = self._present(present, batch_size, visible=())
        # Modalities without a head are always observed: ehat_i = e_i.
        known = {m.name: encodings[i] for i, m in enumerate(self.modalities) if m.head == "none"}
        prediction, heads, estimated, interpolation = self._denoise(z_t, t, known, present, batch, train=train)
        if present:
            estimated = jnp.stack(
                [
                    jnp.where(present[m.name].reshape((-1,) + (1,) * len(self.z_shape)), encodings[i], estimated[i])
                    if m.conditioned
                    else estimated[i]
                    for i, m in enumerate(self.modalities)
                ]
            )
        return ModelOutput(prediction, heads, encodings, estimated, interpolation)

    def predict(
        self, z_t: Array, t: Array, observed: Batch, *, train: bool = False, present: Mapping[str, Array] | None = None
    ) -> ModelOutput:
        """Sampling forward pass: z_t [B, *S], t [B] or [] in 1..T -> the prediction, heads and ehat.

        ehat_i = E_i(x_i) for observed modalities (whether or not the denoiser sees them), E_i(D_i(h)) for
        the rest. `observed` maps modality names to data in batch form (plus 'mask' with a masked image);
        its keys are static under jit. The denoiser sees every observed conditioned modality, unless
        `present` (name -> [B] or [] bool; names must be observed and conditioned) hides it (classifier-
        free guidance's unconditional passes); unobserved ones get the null condition. The heads predict
        every modality, the observed ones included. Returns `encodings` None.
        """
        names = {m.name for m in self.modalities}
        unknown = sorted(set(observed) - names - {MASK_KEY})
        if unknown:
            raise ValueError(f"observed modalities {unknown} are not in the model (known: {sorted(names)})")
        if MASK_KEY in observed and not any(m.kind == "masked_image" and m.name in observed for m in self.modalities):
            raise ValueError(f"observed has {MASK_KEY!r} but no masked image it belongs to")
        unseen = sorted(set(present or {}) - set(observed))
        if unseen:
            raise ValueError(
                f"present names modalities {unseen} that are not observed: the denoiser can only see observed data"
            )
        batch_size = validate_batch(self.modalities, self.z_shape, observed, primary=None, names=tuple(observed))
        if observed and batch_size != z_t.shape[0]:
            raise ValueError(f"observed modalities have batch size {batch_size}, z_t has {z_t.shape[0]}")
        present = self._present(present, z_t.shape[0], visible=tuple(observed))
        known = {
            m.name: self.encoders[m.name](modality_data(m, observed)) for m in self.modalities if m.name in observed
        }
        prediction, heads, estimated, interpolation = self._denoise(z_t, t, known, present, observed, train=train)
        return ModelOutput(prediction, heads, None, estimated, interpolation)


def example_batch(model: MTDiffusion, batch_size: int = 1) -> dict[str, Array]:
    """A zero batch of the right shapes and dtypes (for `init` and shape inference)."""
    batch = {model.primary: jnp.zeros((batch_size,) + model.z_shape, jnp.float32)}
    for m in model.modalities:
        integer = m.kind in ("label", "segmentation")
        batch[m.name] = jnp.zeros((batch_size,) + m.shape, jnp.int32 if integer else jnp.float32)
        if m.kind == "masked_image":
            batch[MASK_KEY] = jnp.ones((batch_size,) + m.shape[:2] + (1,), jnp.float32)
    return batch


def init_variables(model: MTDiffusion, rng: Array, batch_size: int = 1) -> dict[str, Any]:
    """model.init on an example batch: {'params': ...} (float32). Wrap in jax.eval_shape for shapes only."""
    batch = example_batch(model, batch_size)
    t = jnp.ones((batch_size,), jnp.int32)
    return model.init(rng, batch, batch[model.primary], t, train=False)
