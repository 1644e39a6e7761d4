"""The common evaluator interface and the registry (big_vision-style plug-ins).

An evaluator is built from plain keyword arguments, reads named arrays from
each batch it is given, and reports a flat {name: float} dict at the end:

  evaluator = make_evaluator("psnr", region="masked")
  for batch in batches:            # {"image": [B,H,W,C], "sample": ..., "mask": ...}
    evaluator.update(batch)
  evaluator.result()               # {"psnr_masked": 27.3}

An experiment lists the metrics it wants in its config, as data:

  config.metrics = ["psnr", ("psnr", {"region": "masked"}),
                    {"name": "fid", "features": "fmnist_cnn"}]
  evaluators = make_evaluators(config.metrics, resources={"classifier": cnn})
  results = evaluate(evaluators, batches)

Dependencies that are objects, not data (a classifier, a feature network and its reference features), are
injected the same way for every evaluator: each declares the ones it takes (`register(name, needs=...)`,
keyword arguments of those names) and `make_evaluator` fills them from the caller's `resources` unless the
spec gives them.

Batch keys (defaults; every evaluator takes its keys as arguments):
  image                [B, H, W, C] float, the reference images, in [-1, 1]
  sample               [B, H, W, C] float, generated / restored images
  mask                 [B, H, W, 1] float, 1 = kept, 0 = hidden (restoration)
  label                [B] int, true class labels
  label_logits         [B, K] the model's label-head logits (or [B] predictions)
  sample_label         [B] int (or [B, K] logits), generated labels
  segmentation         [B, H, W] int, true masks (0 = background)
  sample_segmentation  [B, H, W] int (or [B, H, W, K] logits), predicted masks
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

_REGISTRY: dict[str, Callable[..., "Evaluator"]] = {}
_NEEDS: dict[str, tuple[str, ...]] = {}


class Evaluator(abc.ABC):
    """A metric accumulated over batches: `update(batch)` then `result()`."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forgets every batch seen so far."""

    @abc.abstractmethod
    def update(self, batch: Mapping[str, Any]) -> None:
        """Accumulates one batch (a dict of arrays, see the module docstring)."""

    @abc.abstractmethod
    def result(self) -> dict[str, float]:
        """The metric(s) over every batch since the last reset."""


class MeanEvaluator(Evaluator):
    """Mean over examples of a per-example value; NaN values are left out.

    Subclasses set `self.name` and implement `per_example(batch) -> [B]`.
    """

    name: str

    def __init__(self):
        self.reset()

    def reset(self):
        self._sum = 0.0
        self._count = 0

    @abc.abstractmethod
    def per_example(self, batch: Mapping[str, Any]) -> Any:
        """[B] values for one batch."""

    def update(self, batch):
        values = np.asarray(self.per_example(batch), np.float64).reshape(-1)
        values = values[~np.isnan(values)]
        self._sum += float(values.sum())
        self._count += values.size

    def result(self):
        return {self.name: self._sum / self._count if self._count else float("nan")}


def require(batch: Mapping[str, Any], key: str, evaluator: str) -> Any:
    """batch[key], or a KeyError naming the evaluator and the keys present."""
    if key not in batch:
        raise KeyError(
            f"{evaluator} needs batch[{key!r}]; the batch has "
            f"{sorted(batch)}. Pass the key name as an argument if "
            "yours differs."
        )
    return batch[key]


def register(name: str, *, needs: tuple[str, ...] = ()):
    """Decorator: makes an evaluator factory available to `make_evaluator(name)`; `needs` names the
    keyword arguments it takes from the caller's `resources` (module docstring)."""

    def decorate(factory):
        if name in _REGISTRY:
            raise ValueError(f"evaluator {name!r} is registered twice")
        _REGISTRY[name] = factory
        _NEEDS[name] = tuple(needs)
        return factory

    return decorate


def registered_evaluators() -> list[str]:
    return sorted(_REGISTRY)


def evaluator_needs(name: str) -> tuple[str, ...]:
    """The resources evaluator `name` takes (`register(..., needs=)`); KeyError for an unknown name."""
    check_specs([name])
    return _NEEDS[name]


def parse_spec(spec: Any) -> tuple[str, dict[str, Any]]:
    """A config entry "name", (name, kwargs) or {"name": ..., **kwargs} as (name, kwargs)."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        kwargs = dict(spec)
        return kwargs.pop("name"), kwargs
    name, kwargs = spec
    return name, dict(kwargs)


def check_specs(specs: Iterable[Any]) -> None:
    """KeyError naming the specs' evaluators that are not registered (before anything is computed)."""
    unknown = sorted({parse_spec(spec)[0] for spec in specs} - set(_REGISTRY))
    if unknown:
        raise KeyError(f"unknown evaluators {unknown}; registered: {registered_evaluators()}")


def make_evaluator(name: str, resources: Mapping[str, Any] | None = None, **kwargs) -> Evaluator:
    """Evaluator `name` built with `kwargs`, its declared needs filled from `resources` where the kwargs
    do not give them."""
    check_specs([name])
    for need in _NEEDS[name]:
        if need not in kwargs and resources is not None and need in resources:
            kwargs[need] = resources[need]
    return _REGISTRY[name](**kwargs)


def make_evaluators(specs: Iterable[Any], resources: Mapping[str, Any] | None = None) -> list[Evaluator]:
    """Evaluators from config entries (`parse_spec`), each given the `resources` it needs."""
    return [make_evaluator(name, resources, **kwargs) for name, kwargs in map(parse_spec, specs)]


def evaluate(evaluators: Iterable[Evaluator], batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Resets, feeds every batch to every evaluator, and merges their results."""
    evaluators = list(evaluators)
    for evaluator in evaluators:
        evaluator.reset()
    for batch in batches:
        for evaluator in evaluators:
            evaluator.update(batch)
    results = {}
    for evaluator in evaluators:
        for name, value in evaluator.result().items():
            if name in results:
                raise ValueError(f"two evaluators report {name!r}; give one a different `name`")
            results[name] = value
    return results
