"""The training objective: the core math (`diffusion`, `losses`, `bound`) wired to an `MTDiffusion` model.

One step of the simplified multi-modal bound (docs/design.md section 4), for a batch and a PRNG key:
  t ~ U{1..T} (or importance-sampled, `resample`),  eps ~ N(0, I),  e_i = E_i(x_i),
  z_t = sqrt(abar_t) z_0 + sum_i lambda_t^(i) e_i + sqrt(1 - abar_t) eps      (`diffusion.marginal_sample`)
  loss = eps_weight * eps_mse + aggregation_weight * aggregation_mse + sum_i lambda_i L2_i
                                                                               (`losses.training_loss`)
where eps_mse is || eps_theta - eps ||^2, or for a model predicting v or z_0 (`MTDiffusion.prediction`)
the MSE of that target (`targets.prediction_target`), reported as 'v_mse' / 'z_0_mse',
with L2_i = -log p_theta(x_i | z_t) through head D_i (`modalities.recovery_nll`). Gradients reach the
encoders through z_t (via m_t) and through the aggregation term, as in the bound. A model with a learned
variance (`MTDiffusion.learn_variance`) adds ADM's lambda T L_t (`bound.variance_vlb`, the mean frozen;
`LossConfig.vlb_weight` = lambda), reported as 'vlb' (bits per dimension).

Condition dropout (docs/design.md section 3b): each conditioned modality i (`Modality.condition` other
than 'none') is shown to the denoiser independently per example with probability 1 - p_uncond_i; where
shown, ehat_i = e_i (its aggregation error is zero, as when it is observed in sampling) and its recovery
NLL is left out: L2_i is the mean over the examples where i was hidden (a head that sees its target would
learn to copy it). The forward process always uses the true encodings. With no conditioned modality the
loss (and its random draws) is the aggregation-only one exactly; p_uncond = 1 gives the same loss value.

`make_loss_fn(model, schedule, loss_config)(params, batch, rng, train=True) -> (loss, metrics)` is pure
and jit-able (keep `train` static); use it with `jax.value_and_grad(loss_fn, has_aux=True)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mmdiff_jax import bound, diffusion, losses, resample, targets
from mmdiff_jax.modalities import Modality, check_schedule, model_variables, recovery_nll, validate_batch
from mmdiff_jax.models.mt_diffusion import MTDiffusion
from mmdiff_jax.schedules import DiffusionSchedule

Array = jax.Array
LossFn = Callable[..., tuple[Array, dict[str, Array]]]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of the simplified bound's eps and aggregation terms (`config.loss`); each head's recovery
    weight lambda_i is its `Modality.loss_weight` (config.model.modalities.<name>.loss_weight)."""

    eps_weight: float = 1.0
    aggregation_weight: float = 1.0
    time_weighting: str = "uniform"  # or 'min_snr' (targets.time_weight)
    min_snr_gamma: float = 5.0
    vlb_weight: float = 0.001  # lambda of ADM's hybrid loss, for a model with `learn_variance` (else unused)
    time_sampling: str = "uniform"  # or 'importance' (ADM's loss-second-moment resampler, `resample`)

    def __post_init__(self):
        if self.time_weighting not in targets.TIME_WEIGHTINGS:
            raise ValueError(
                f"config.loss.time_weighting: unknown {self.time_weighting!r}; known: {targets.TIME_WEIGHTINGS}"
            )
        if self.time_sampling not in resample.TIME_SAMPLINGS:
            raise ValueError(
                f"config.loss.time_sampling: unknown {self.time_sampling!r}; known: {resample.TIME_SAMPLINGS}"
            )
        if not self.min_snr_gamma > 0:
            raise ValueError(f"config.loss.min_snr_gamma must be > 0, got {self.min_snr_gamma}")
        if not self.vlb_weight >= 0:
            raise ValueError(f"config.loss.vlb_weight must be >= 0, got {self.vlb_weight}")

    @classmethod
    def from_any(cls, config: LossConfig | Mapping[str, Any] | None) -> LossConfig:
        """From a LossConfig, a dict / ml_collections ConfigDict (unknown keys rejected), or None."""
        if config is None or isinstance(config, LossConfig):
            return config or cls()
        fields = {field.name for field in dataclasses.fields(cls)}
        values = dict(config.items())
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown loss config keys {unknown}; known: {sorted(fields)}")
        return cls(**values)


def make_loss_fn(
    model: MTDiffusion, schedule: DiffusionSchedule, loss_config: LossConfig | Mapping[str, Any] | None = None
) -> LossFn:
    """Returns loss_fn(params, batch, rng, train=True) -> (loss, metrics) for this model and schedule.

    Checked here (before any tracing): the schedule has one weight row per modality, and a zero-terminal-SNR
    schedule a 'v' or 'z_0' target (`targets.check_prediction`). Checked on each call,
    from static shapes: the batch. Each head's recovery NLL is weighted by its `Modality.loss_weight`.
    Metrics: 'loss', 'eps_mse', 'aggregation_mse', 'recovery/<name>' (mean NLL, nats per example) and
    'accuracy/<name>' for categorical heads.
    With `time_sampling` 'importance' the loss takes `loss_state=` (a `resample.LossHistory`), draws t from
    its p(t), weights each example by 1 / (T p(t)) ('loss' is that weighted mean; the other metrics are plain
    batch means) and returns (loss, (metrics, the history with this batch's per-example losses added)).
    """
    config = LossConfig.from_any(loss_config)
    check_schedule(model.modalities, schedule)
    targets.check_prediction(model.prediction, schedule)
    with_heads = {m.name: m for m in model.modalities if m.loss != "none"}
    recovery_weights = {name: float(m.loss_weight) for name, m in with_heads.items()}
    categorical = [name for name, m in with_heads.items() if m.loss == "categorical"]
    num_steps = schedule.num_steps

    importance = config.time_sampling == "importance"

    def loss_fn(
        params: Any,
        batch: Mapping[str, Array],
        rng: Array,
        train: bool = True,
        loss_state: resample.LossHistory | None = None,
    ) -> tuple[Array, Any]:
        """One Monte-Carlo estimate of the simplified bound on `batch`; rng drives t, eps and dropout."""
        if importance != (loss_state is not None):
            raise ValueError("loss_state is the loss history of time_sampling 'importance', and only of it")
        batch_size = validate_batch(model.modalities, model.z_shape, batch, primary=model.primary)
        variables = model_variables(params)
        step_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
        z_0 = jnp.asarray(batch[model.primary], jnp.float32)
        if importance:
            probabilities = resample.step_probabilities(loss_state)
            t, importance_weights = resample.sample_steps(step_rng, probabilities, batch_size)
        else:
            t = jax.random.randint(step_rng, (batch_size,), 1, num_steps + 1)
        eps = jax.random.normal(noise_rng, z_0.shape, jnp.float32)
        encodings = model.apply(variables, batch, method=model.encode)
        z_t = diffusion.marginal_sample(schedule, z_0, t, eps, encodings=encodings)
        present = condition_dropout(model.conditioned_modalities, jax.random.fold_in(rng, 1), batch_size)
        output = model.apply(variables, batch, z_t, t, train=train, present=present, rngs={"dropout": dropout_rng})
        nll = recovery_nll(model.modalities, output.heads, batch)
        for name, shown in present.items():
            if name in nll:  # the mean over the examples where the denoiser did not see modality `name`
                hidden = 1.0 - shown.astype(jnp.float32)
                fraction = jnp.mean(hidden)
                nll[name] = jnp.where(fraction > 0, nll[name] * hidden / jnp.maximum(fraction, 1e-12), 0.0)
        vlb = None
        if model.learn_variance:  # ADM's hybrid loss: L_t on the frozen mean trains the variance
            eps_prediction = targets.eps_from_prediction(
                schedule, z_t, t, output.prediction, model.prediction, encodings=output.estimated_encodings
            )
            vlb = bound.variance_vlb(
                schedule,
                z_t,
                t,
                z_0,
                eps_prediction,
                output.variance_interpolation,
                encodings=output.encodings,
                estimated_encodings=output.estimated_encodings,
                z0_prediction=targets.model_z0(
                    schedule, z_t, t, output.prediction, model.prediction, encodings=output.estimated_encodings
                ),
            )
        loss, metrics = losses.training_loss(
            schedule,
            t,
            targets.prediction_target(schedule, z_0, t, eps, model.prediction),
            output.prediction,
            nll,
            encodings=output.encodings,
            estimated_encodings=output.estimated_encodings,
            eps_weight=config.eps_weight,
            aggregation_weight=config.aggregation_weight,
            recovery_weights=recovery_weights,
            prediction=model.prediction,
            time_weighting=config.time_weighting,
            min_snr_gamma=config.min_snr_gamma,
            vlb=vlb,
            vlb_weight=config.vlb_weight,
            reduction="none" if importance else "mean",
        )
        for name in categorical:  # like L2, over the examples where the denoiser did not see the target
            correct = (jnp.argmax(output.heads[name], axis=-1) == batch[name]).astype(jnp.float32)
            if name in present:
                hidden = jnp.broadcast_to((~present[name]).reshape((-1,) + (1,) * (correct.ndim - 1)), correct.shape)
                metrics[f"accuracy/{name}"] = jnp.sum(jnp.where(hidden, correct, 0.0)) / jnp.maximum(jnp.sum(hidden), 1)
            else:
                metrics[f"accuracy/{name}"] = jnp.mean(correct)
        if not importance:
            return loss, metrics
        per_example, loss = loss, jnp.mean(importance_weights * loss)  # unbiased for the uniform-t loss
        metrics["loss"] = loss
        return loss, (metrics, resample.update_history(loss_state, t, jax.lax.stop_gradient(per_example)))

    return loss_fn


def condition_dropout(modalities: Sequence[Modality], rng: Array, batch_size: int) -> dict[str, Array]:
    """name -> [B] bool, True where the denoiser sees modality `name`: Bernoulli(1 - p_uncond) per example,
    independently per modality (one key per modality, folded in by position)."""
    return {
        m.name: jax.random.bernoulli(jax.random.fold_in(rng, index), 1.0 - m.p_uncond, (batch_size,))
        for index, m in enumerate(modalities)
    }
