"""Modality specs and the functions over them (docs/design.md sections 3 and 5); the network they assemble is
`models.mt_diffusion.MTDiffusion`.

The primary modality x_0 (batch key `primary`, default 'image') defines the diffusion space: z_0 = x_0,
an image in [-1, 1] of shape S = (H, W, C). Each auxiliary modality i = 1..N is a `Modality`: its batch
key, its kind, its encoder E_i, head D_i, recovery loss and weight schedule. `MTDiffusion` assembles the
shared U-Net, the encoders and the heads; the stack order of encodings [N, B, *S] is the order of the
modality tuple, as is the row order of the `DiffusionSchedule` weights built by `modality_schedule`.

Batches are dicts of arrays: image [B, H, W, C] float in [-1, 1]; masked_image [B, H, W, C] with
mask [B, H, W, 1] (1 = observed); label [B] int; segmentation [B, H, W] int; vector [B, D] float.
A masked image's data x_i is the C + 1 channels [x * mask, mask]: its encoder reads them and its head
predicts them (a Gaussian mean), so re-encoding E_i(D_i(h)) needs no mask from outside.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mmdiff_jax import losses
from mmdiff_jax.models.conditioning import (
    CONDITION_KINDS,
    SPATIAL_KINDS,
)
from mmdiff_jax.models.decoders import HEAD_KINDS
from mmdiff_jax.models.encoders import ENCODER_KINDS
from mmdiff_jax.schedules import WEIGHT_SCHEDULES, DiffusionSchedule, make_schedule

Array = jax.Array
Batch = Mapping[str, Array]

MASK_KEY = "mask"
LOSS_KINDS = ("gaussian", "categorical", "none")
HEAD_FEATURES = ("features", "bottleneck")


class _KindRule(NamedTuple):
    encoders: tuple[str, ...]  # the first is the default
    head: str  # default head; 'none' is always allowed too
    loss: str  # the only loss that fits the kind's head output
    shape_rank: int  # len(Modality.shape)


_RULES = {
    "image": _KindRule(("identity", "conv1x1"), "conv", "gaussian", 3),
    "masked_image": _KindRule(("conv1x1", "identity"), "conv", "gaussian", 3),
    "label": _KindRule(("table",), "mlp", "categorical", 0),
    "segmentation": _KindRule(("onehot_conv",), "conv", "categorical", 2),
    "vector": _KindRule(("linear",), "mlp", "gaussian", 1),
}
MODALITY_KINDS = tuple(_RULES)


@dataclasses.dataclass(frozen=True)
class Modality:
    """One auxiliary modality (hashable: usable as a Flax module field).

    Attributes:
      name: the batch key it reads (a masked image also reads 'mask').
      kind: 'image' | 'masked_image' | 'label' | 'segmentation' | 'vector'.
      shape: per-example shape: (H, W, C) for images, (H, W) for segmentation, (D,) for vectors, () for labels.
      num_classes: K for labels and segmentation; class ids must lie in 0..K-1 (not checked under jit:
        an id outside gives NaN encodings).
      weight_schedule: (kind, gamma) for `schedules.make_schedule`, in lambda form.
      loss_weight: lambda_i, the weight of this head's recovery NLL (nats per example) in the loss.
      encoder: one of `encoders.ENCODER_KINDS` fitting the kind; None: the kind's default.
      normalize: RMS-normalise the encoding; None: yes for learned encoders, no for 'identity' (it has
        no parameters, cannot collapse, and keeps pixel scale).
      head: 'conv' (full resolution), 'mlp' (pooled) or 'none' (always-observed conditioning); None: default.
      loss: 'categorical' (labels, segmentation), 'gaussian' (images, vectors) or 'none' (with head 'none').
      head_features: 'features' (full resolution) or 'bottleneck'; None: 'features' for conv heads,
        'bottleneck' for MLP heads.
      head_hidden: hidden width of the head; 0: the backbone's base width.
      head_log_scale: fixed log std of the Gaussian p(x_i | z_t) of image and vector heads.
      encoder_kernel_size: kernel size of the segmentation encoder's conv.
      condition: how the observed data reaches the denoiser (`models.conditioning`, docs/design.md
        section 3b): 'none' (the aggregation only), 'concat' (spatial kinds), 'embedding' (labels,
        vectors) or 'cross_attention' (any kind).
      p_uncond: probability that training hides this modality from the denoiser, per example (condition
        dropout); 1 trains the joint model only; 0 never trains the null condition nor, since a seen
        modality's recovery loss is not counted, the head. Unused with condition 'none'.
      token_patch_size: patch size of a spatial kind's cross-attention tokens (must divide H and W).
    """

    name: str
    kind: str
    shape: tuple[int, ...] = ()
    num_classes: int = 0
    weight_schedule: tuple[str, float] = ("bump", 1.0)
    loss_weight: float = 1.0
    encoder: str | None = None
    normalize: bool | None = None
    head: str | None = None
    loss: str | None = None
    head_features: str | None = None
    head_hidden: int = 0
    head_log_scale: float = 0.0
    encoder_kernel_size: int = 3
    condition: str = "none"
    p_uncond: float = 0.2
    token_patch_size: int = 4

    def __post_init__(self):
        where = f"modality {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"{where}: the name must be a non-empty string (the batch key)")
        if self.kind not in _RULES:
            raise ValueError(f"{where}: unknown kind {self.kind!r}; known: {MODALITY_KINDS}")
        rule = _RULES[self.kind]
        resolve = lambda field, value: object.__setattr__(self, field, value)  # noqa: E731
        resolve("shape", tuple(int(size) for size in self.shape))
        resolve("weight_schedule", (str(self.weight_schedule[0]), float(self.weight_schedule[1])))
        resolve("encoder", self.encoder or rule.encoders[0])
        resolve("normalize", self.encoder != "identity" if self.normalize is None else bool(self.normalize))
        resolve("head", self.head or rule.head)
        resolve("loss", self.loss or ("none" if self.head == "none" else rule.loss))
        resolve("head_features", self.head_features or ("features" if self.head == "conv" else "bottleneck"))
        resolve("p_uncond", float(self.p_uncond))

        if len(self.shape) != rule.shape_rank or any(size < 1 for size in self.shape):
            raise ValueError(
                f"{where}: kind {self.kind!r} needs a shape of {rule.shape_rank} positive sizes, got {self.shape}"
            )
        if self.kind in ("label", "segmentation") and self.num_classes < 2:
            raise ValueError(f"{where}: kind {self.kind!r} needs num_classes >= 2, got {self.num_classes}")
        if self.encoder not in rule.encoders:
            raise ValueError(
                f"{where}: encoder {self.encoder!r} does not fit kind {self.kind!r}; "
                f"use one of {rule.encoders} (all encoders: {ENCODER_KINDS})"
            )
        if self.head not in (rule.head, "none"):
            raise ValueError(
                f"{where}: head {self.head!r} does not fit kind {self.kind!r}; use {rule.head!r} "
                f"or 'none' (all heads: {HEAD_KINDS})"
            )
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"{where}: unknown loss {self.loss!r}; known: {LOSS_KINDS}")
        if (self.head == "none") != (self.loss == "none"):
            raise ValueError(
                f"{where}: head {self.head!r} with loss {self.loss!r}: a head needs a loss and "
                f"loss 'none' needs head 'none'"
            )
        if self.head != "none" and self.loss != rule.loss:
            output = "class logits" if rule.loss == "categorical" else "a Gaussian mean"
            raise ValueError(
                f"{where}: loss {self.loss!r} does not match its {self.head!r} head, which predicts "
                f"{output} for kind {self.kind!r}; use loss {rule.loss!r}"
            )
        if self.head_features not in HEAD_FEATURES or (self.head == "conv" and self.head_features != "features"):
            raise ValueError(
                f"{where}: head_features {self.head_features!r} is not valid for head {self.head!r} "
                f"(conv heads read 'features'; MLP heads 'features' or 'bottleneck')"
            )
        if self.condition not in CONDITION_KINDS:
            raise ValueError(f"{where}: unknown condition {self.condition!r}; known: {CONDITION_KINDS}")
        fitting = {"concat": SPATIAL_KINDS, "embedding": ("label", "vector")}.get(self.condition, MODALITY_KINDS)
        if self.kind not in fitting:
            raise ValueError(
                f"{where}: condition {self.condition!r} does not fit kind {self.kind!r} (it takes "
                f"{fitting}); 'cross_attention' takes any kind"
            )
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"{where}: p_uncond must lie in [0, 1], got {self.p_uncond}")
        if (
            self.condition == "cross_attention"
            and self.kind in SPATIAL_KINDS
            and (self.token_patch_size < 1 or any(size % self.token_patch_size for size in self.shape[:2]))
        ):
            raise ValueError(
                f"{where}: token_patch_size {self.token_patch_size} must divide the spatial size {self.shape[:2]}"
            )
        if self.weight_schedule[0] not in WEIGHT_SCHEDULES:
            raise ValueError(f"{where}: unknown weight schedule {self.weight_schedule[0]!r}; known: {WEIGHT_SCHEDULES}")

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Per-example shape of x_i as encoders read it and Gaussian heads predict it."""
        if self.kind == "masked_image":
            return self.shape[:2] + (self.shape[2] + 1,)
        return self.shape

    @property
    def head_shape(self) -> tuple[int, ...]:
        """Per-example shape of the head's output: logits [..., K] or the mean of x_i."""
        if self.kind in ("label", "segmentation"):
            return self.shape + (self.num_classes,)
        return self.data_shape

    @property
    def conditioned(self) -> bool:
        """Whether the denoiser can see this modality (condition other than 'none')."""
        return self.condition != "none"

    def check_fits(self, z_shape: tuple[int, int, int]) -> None:
        """Raises ValueError, naming the modality, when E_i's output cannot have z's shape."""
        spatial_only = self.encoder in ("conv1x1", "onehot_conv")
        if self.encoder == "identity" and self.shape != tuple(z_shape):
            problem = f"the identity encoder keeps shape {self.shape}"
        elif spatial_only and self.shape[:2] != tuple(z_shape[:2]):
            problem = f"encoder {self.encoder!r} keeps the spatial size {self.shape[:2]}"
        else:
            return
        raise ValueError(f"modality {self.name!r}: {problem}, which does not match z's shape {tuple(z_shape)}")


def check_modalities(modalities: Sequence[Modality], z_shape: tuple[int, int, int], primary: str) -> None:
    """Build-time checks of a modality list against z: types, unique and known names, encoder shapes."""
    if len(z_shape) != 3:
        raise ValueError(f"z_shape must be (H, W, C), got {z_shape}")
    seen = set()
    for modality in modalities:
        if not isinstance(modality, Modality):
            raise ValueError(f"expected Modality specs, got {modality!r}")
        if modality.name in seen:
            raise ValueError(f"modality {modality.name!r} is listed twice")
        if modality.name in (primary, MASK_KEY):
            raise ValueError(
                f"modality {modality.name!r}: the name is reserved (primary modality "
                f"{primary!r}, or {MASK_KEY!r} for masked images)"
            )
        seen.add(modality.name)
        modality.check_fits(z_shape)


def modality_schedule(
    noise_kind: str,
    num_steps: int,
    modalities: Sequence[Modality],
    *,
    modality_normalized: bool = False,
    zero_terminal_snr: bool = False,
) -> DiffusionSchedule:
    """The `DiffusionSchedule` whose weight row i belongs to modalities[i] (`schedules.make_schedule`)."""
    kept = [m.name for m in modalities if m.weight_schedule[0] in ("bridge", "constant") and m.weight_schedule[1]]
    if zero_terminal_snr and kept:
        raise ValueError(
            f"zero_terminal_snr (config.diffusion) forces lambda_T = 0 for every modality, but {kept} have "
            "'bridge' or 'constant' weights, which keep lambda_T > 0 (z_T would carry them): give them 'bump' or "
            "'zero' weights (config.model.modalities.<name>.weight_schedule)"
        )
    return make_schedule(
        noise_kind,
        num_steps,
        [m.weight_schedule for m in modalities],
        modality_normalized=modality_normalized,
        zero_terminal_snr=zero_terminal_snr,
    )


def check_schedule(modalities: Sequence[Modality], schedule: DiffusionSchedule) -> None:
    """ValueError unless `schedule` has one weight row per modality (`modality_schedule` builds it)."""
    if schedule.num_modalities != len(modalities):
        raise ValueError(
            f"the schedule has weights for {schedule.num_modalities} modalities but the model has "
            f"{len(modalities)} ({[m.name for m in modalities]}): build it with `modalities.modality_schedule`"
        )


def model_variables(params: Any) -> dict[str, Any]:
    """The Flax variables {'params': ...} from the parameter tree, or the variables dict itself."""
    if isinstance(params, Mapping) and set(params.keys()) == {"params"}:
        return dict(params)
    return {"params": params}


def modality_data(modality: Modality, batch: Batch) -> Array:
    """x_i from a batch: the array at `modality.name`; a masked image as [x * mask, mask] (C + 1 channels)."""
    data = batch[modality.name]
    if modality.kind == "masked_image":
        mask = jnp.asarray(batch[MASK_KEY], jnp.float32)
        return jnp.concatenate([jnp.asarray(data, jnp.float32) * mask, mask], axis=-1)
    return data


def condition_data(modality: Modality, batch: Batch, batch_size: int) -> Array:
    """The raw input of c_i (`models.conditioning`): float data for spatial kinds (one-hot for segmentation)
    and vectors, int ids for labels; zeros of that shape where the batch lacks the modality (it is then
    hidden from the denoiser, so the values never matter)."""
    if modality.name not in batch:
        shape = modality.head_shape if modality.kind == "segmentation" else modality.data_shape
        return jnp.zeros((batch_size,) + shape, jnp.int32 if modality.kind == "label" else jnp.float32)
    data = modality_data(modality, batch)
    if modality.kind == "segmentation":
        return jax.nn.one_hot(data, modality.num_classes, dtype=jnp.float32)
    return data


def validate_batch(
    modalities: Sequence[Modality],
    z_shape: tuple[int, ...],
    batch: Batch,
    primary: str | None = "image",
    names: Sequence[str] | None = None,
) -> int:
    """Checks keys, shapes and dtypes of a batch (works on tracers: shapes are static); returns B.

    `primary` None skips x_0; `names` restricts the check to those modalities (e.g. the observed ones).
    """
    expected: dict[str, tuple[tuple[int, ...], bool | None]] = {}  # key -> (per-example shape, integer?)
    if primary is not None:
        expected[primary] = (tuple(z_shape), False)
    for m in modalities:
        if names is not None and m.name not in names:
            continue
        expected[m.name] = (m.shape, m.kind in ("label", "segmentation"))
        if m.kind == "masked_image":
            expected[MASK_KEY] = (m.shape[:2] + (1,), None)  # any dtype: cast to float32
    missing = sorted(set(expected) - set(batch))
    if missing:
        raise ValueError(f"batch is missing keys {missing} (has {sorted(batch)})")
    batch_sizes = {}
    for key, (shape, integer) in expected.items():
        value = batch[key]
        if tuple(value.shape[1:]) != shape or value.ndim != len(shape) + 1:
            raise ValueError(f"batch[{key!r}] must have shape [B, *{shape}], got {tuple(value.shape)}")
        if integer is not None and integer != bool(jnp.issubdtype(value.dtype, jnp.integer)):
            raise ValueError(
                f"batch[{key!r}] must be {'integer class ids' if integer else 'floating'}, got dtype {value.dtype}"
            )
        batch_sizes[key] = value.shape[0]
    if len(set(batch_sizes.values())) > 1:
        raise ValueError(f"batch entries disagree on the batch size: {batch_sizes}")
    return next(iter(batch_sizes.values()), 0)


def recovery_nll(modalities: Sequence[Modality], heads: Mapping[str, Array], batch: Batch) -> dict[str, Array]:
    """L2 per modality with a head: name -> -log p_theta(x_i | z_t), [B] nats (float32)."""
    nll = {}
    for m in modalities:
        if m.loss == "categorical":
            nll[m.name] = losses.categorical_nll(heads[m.name], batch[m.name])
        elif m.loss == "gaussian":
            target = jnp.asarray(modality_data(m, batch), jnp.float32)
            nll[m.name] = losses.gaussian_nll(heads[m.name], target, m.head_log_scale)
    return nll
