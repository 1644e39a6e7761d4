"""Evaluation for the experiments: data batches, batched sampling, the sampler section, metrics.

eval_batches(config, num_examples, batch_size, split, mask_ratio, transform_seed)   first examples, batches
                                       (the same on every process)
map_batches(fn, batches, seed, desc, mesh)   fn(batch, rng) -> arrays, over batches split over the mesh,
                                       gathered and concatenated (numpy, on every process)
sampler_options(section, mesh), describe_sampler(section)
                                       a config sampler section -> `sampling.make_sample_fn` kwargs / words
metrics_classifier(config)             the Fashion-MNIST CNN of the feature metrics (cached)
reference_features(config, num_reference, classifier)   space -> features of the reference images, for
                                       each of config.experiment.feature_spaces ('fmnist_cnn', 'inception_v3')
evaluate_metrics(specs, batches, classifier, reference_features=None)   config evaluator specs -> dict
balanced_labels(num_samples)           labels cycling over the classes (label -> image prompts)
make_embed_fn(classifier, train_images), embedding_scores(...)   the embedding recipe of the data and the
                                       embedding -> image scores (distance, cosine, class agreement)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from experiments.trainer import copy_config
from mmdiff_jax import metrics as metrics_lib
from mmdiff_jax import data as data_lib
from mmdiff_jax.data import embeddings, fashion_mnist
from mmdiff_jax.data import transforms as transforms_lib
from mmdiff_jax.metrics import features as features_lib
from mmdiff_jax.metrics.distribution import compute_features
from mmdiff_jax.training import config_io
from mmdiff_jax.training import mesh as mesh_lib


def eval_batches(
    config: ml_collections.ConfigDict,
    num_examples: int,
    batch_size: int,
    split: str | None = None,
    *,
    mask_ratio: float | None = None,
    transform_seed: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """The first `num_examples` examples of `split` (default `config.data.eval_split`), unshuffled, as numpy
    batches of `batch_size` (a divisor of num_examples). `mask_ratio`: the masked_image transform's ratio
    instead of the config's; `transform_seed`: the seed of the masks and layouts (default `config.seed`).
    Every process reads the same whole batches: `map_batches` splits them over the mesh."""
    if num_examples % batch_size:
        raise ValueError(f"num_examples {num_examples} is not a multiple of the batch size {batch_size}")
    config = copy_config(config)
    config.data.eval_batch_size = batch_size
    transforms = config.data.transforms
    if mask_ratio is not None:
        transforms = transforms_lib.with_args(transforms, "masked_image", ratio=mask_ratio)
    iterator = config_io.make_eval_iterator(
        config, whole_batches=True, split=split, transforms=transforms, transform_seed=transform_seed
    )
    batches = [next(iterator, None) for _ in range(num_examples // batch_size)]
    if batches[-1] is None:
        raise ValueError(f"split {split or config.data.eval_split!r} has fewer than {num_examples} examples")
    return batches


def map_batches(
    fn: Callable[[Any, jax.Array], Any],
    batches: Iterable[Any],
    seed: int,
    desc: str | None = None,
    mesh: Mesh | None = None,
) -> Any:
    """fn(batch, rng_i) for each batch (rng_i = fold_in(key(seed), i)), outputs concatenated along axis 0
    as numpy (any pytree of arrays), the whole result on every process. `desc` shows a progress bar.

    With `mesh` (the trained models' mesh: `common.Run.mesh`) the batch's arrays go onto it first, split over
    its devices along the batch axis (replicated where the batch does not divide over them), so every device of
    every process computes its share; the outputs are gathered from all processes (`process_allgather`).
    Every process must call this with the same batches (`eval_batches` reads them alike)."""
    batches = list(batches)
    key = jax.random.key(seed)
    progress = None
    if desc and jax.process_index() == 0:
        from tqdm import tqdm

        progress = tqdm(total=len(batches), desc=desc, unit="batch", dynamic_ncols=True)
    outputs = []
    for index, batch in enumerate(batches):
        if mesh is not None:
            batch = jax.tree.map(functools.partial(_on_mesh, mesh), batch)
        outputs.append(jax.tree.map(_gathered, fn(batch, jax.random.fold_in(key, index))))
        if progress is not None:
            progress.update()
    if progress is not None:
        progress.close()
    return jax.tree.map(lambda *parts: np.concatenate([np.asarray(p) for p in parts]), *outputs)


def _on_mesh(mesh: Mesh, value: Any) -> Any:
    """A numpy array (the same on every process) as a global array on `mesh`: split along its first axis
    when that divides over the batch shards, else replicated; anything else as it is."""
    if not isinstance(value, np.ndarray):
        return value
    split = value.ndim and value.shape[0] % mesh_lib.batch_shards(mesh) == 0
    sharding = mesh_lib.batch_sharding(mesh) if split else mesh_lib.replicated(mesh)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _gathered(value: Any) -> np.ndarray:
    """An output as numpy: a global array spanning processes gathered whole, anything else read here."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(value)


def sampler_options(section: Mapping[str, Any], mesh: Mesh | None = None) -> dict[str, Any]:
    """A config sampler section {method ('ddpm' | 'ddim' | 'dpm_solver++'), num_steps, eta, variant, spacing}
    -> keyword arguments of `mmdiff_jax.sampling.make_sample_fn` / `sample_chain` (num_steps dropped for
    'ddpm', which runs all T steps). With `mesh` (`common.Run.mesh`) also `sharding`: the chain's batch split
    over the mesh, as `map_batches` splits its inputs (joint samples, with nothing observed, too)."""
    options = dict(section)
    if mesh is not None:
        options["sharding"] = mesh_lib.batch_sharding(mesh)
    if options.get("method") == "ddpm":
        options.pop("num_steps", None)
        options.pop("eta", None)
    return options


SAMPLER_KEYS = ("method", "num_steps", "eta", "variant", "spacing", "variance")


def describe_sampler(section: Mapping[str, Any]) -> str:
    """A config sampler section in words (method, steps and the options it uses)."""
    if section["method"] == "ddpm":
        return "DDPM (all T steps)"
    if section["method"] == "dpm_solver++":
        return (
            f"DPM-Solver++ ({section.get('variant', '2M')}), {section['num_steps']} steps, "
            f"{section.get('spacing', 'time_uniform').replace('_', '-')} spacing"
        )
    return f"DDIM, {section['num_steps']} steps, eta = {section['eta']:g}"


def data_name(config: ml_collections.ConfigDict) -> str:
    """How reports name the training data: 'Fashion-MNIST' for the offline default, else the source string."""
    source = config_io.data_source(config)
    return "Fashion-MNIST" if source.name == "fashion_mnist" else f"`{config.data.source}`"


def transform_op(config: ml_collections.ConfigDict, name: str):
    """The op `name` of `config.data.transforms` (its arguments: mask ratio, patch size, ...); ValueError if
    the config has none."""
    op = transforms_lib.find(config.data.transforms, name)
    if op is None:
        raise ValueError(f"config.data.transforms {config.data.transforms!r} has no {name}(...)")
    return op


def metrics_classifier(config: ml_collections.ConfigDict) -> features_lib.Classifier:
    """The Fashion-MNIST CNN of the feature metrics (`config.experiment.classifier`: steps, seed).

    On the fashion_mnist() source it is `features.train_classifier` (trained once, cached beside the prepared
    data; the default 600 steps / seed 0 are the shared default classifier). On another source of 28x28 grey
    images with 10 classes (tests' stand-in arrays) it is trained on that source's `config.data.split`,
    uncached; any other source is refused with a ValueError naming the keys to change.
    """
    spec = config.experiment.classifier
    source = config_io.data_source(config)
    if source.name == "fashion_mnist":
        return features_lib.train_classifier(source.data_dir, source.idx_dir, steps=spec.steps, seed=spec.seed)
    raw = data_lib.dataset_spec(source, config.data.split)
    if raw.features.get("image", ((),))[0] != fashion_mnist.IMAGE_SHAPE or raw.num_classes.get("label") != 10:
        raise ValueError(
            f"the Fashion-MNIST CNN (feature space 'fmnist_cnn', the label and embedding judges) needs 28x28x1 "
            f"images with 10 labels; config.data.source {config.data.source!r} gives {dict(raw.features)}, "
            f"classes {dict(raw.num_classes)}: drop 'fmnist_cnn' from config.experiment.feature_spaces"
        )
    examples = data_lib.make_map_dataset(source, config.data.split)
    images = np.stack([examples[i]["image"] for i in range(len(examples))])
    labels = np.array([examples[i]["label"] for i in range(len(examples))])
    model, params = embeddings.train_embedding_encoder(images, labels, steps=spec.steps, seed=spec.seed)
    return features_lib.Classifier(model, params, {"steps": spec.steps, "seed": spec.seed, "data": config.data.source})


def feature_fn(space: str, classifier: features_lib.Classifier) -> features_lib.FeatureFn:
    """The feature network of a feature space: 'fmnist_cnn' (`classifier`), or a registered one such as
    'inception_v3' (its weights from $MMDIFF_INCEPTION_WEIGHTS or the default path; loaded once)."""
    return classifier.features if space == "fmnist_cnn" else _feature_network(space)


@functools.lru_cache(maxsize=None)
def _feature_network(space: str) -> features_lib.FeatureFn:
    return features_lib.get_feature_fn(space)


def reference_features(
    config: ml_collections.ConfigDict, num_reference: int, classifier: features_lib.Classifier
) -> dict[str, np.ndarray]:
    """space -> features [num_reference, D] of the first eval images, for each of
    `config.experiment.feature_spaces` (the FID / precision / recall reference set)."""
    batches = eval_batches(config, num_reference, min(num_reference, 1000))
    images = np.concatenate([b[config.model.primary] for b in batches])
    return {
        space: compute_features(feature_fn(space, classifier), images) for space in config.experiment.feature_spaces
    }


def evaluate_metrics(
    specs: Sequence[Any],
    batches: Iterable[Mapping[str, Any]],
    classifier: features_lib.Classifier,
    reference_features: Mapping[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """`mmdiff_jax.metrics` evaluators from config specs ("name", (name, kwargs) or {"name": ...}) over
    `batches`, each given the resources it declares (`metrics.evaluator_needs`): `classifier`, and for an
    evaluator of a feature space (fid / precision_recall / feature_distribution) its network, name and reference
    features, once per space of `reference_features` (from `reference_features()`; default: 'fmnist_cnn' alone,
    whose network is `classifier`'s features) or in the one space its spec names (`features`)."""
    references = dict(reference_features or {"fmnist_cnn": None})
    evaluators = []
    for name, kwargs in map(metrics_lib.parse_spec, specs):
        resources = {"classifier": classifier}
        if "features" not in metrics_lib.evaluator_needs(name) or callable(kwargs.get("features")):
            evaluators.append(metrics_lib.make_evaluator(name, resources, **kwargs))
            continue
        named = kwargs.pop("features", None)
        for space, reference in (references if named is None else {named: references.get(named)}).items():
            space_resources = dict(
                resources, features=feature_fn(space, classifier), feature_name=space, reference_features=reference
            )
            evaluators.append(metrics_lib.make_evaluator(name, space_resources, **kwargs))
    return metrics_lib.evaluate(evaluators, batches)


def balanced_labels(num_samples: int) -> np.ndarray:
    """[num_samples] int32 class labels 0, 1, ..., 9, 0, 1, ...: every Fashion-MNIST class equally often."""
    return np.arange(num_samples, dtype=np.int32) % fashion_mnist.NUM_CLASSES


def make_embed_fn(classifier, train_images: np.ndarray):
    """images [N, H, W, 1] -> standardised CNN features [N, D] (the stored embeddings' recipe)."""
    features = compute_features(classifier.features, train_images)
    mean, std = features.mean(0), features.std(0) + 1e-6
    return lambda images: (compute_features(classifier.features, images) - mean) / std


def embedding_scores(
    given: np.ndarray, embedded: np.ndarray, given_class: np.ndarray, predicted_class: np.ndarray
) -> dict[str, float]:
    """RMS distance per dimension, cosine similarity (means over examples) and class agreement."""
    distance = np.sqrt(np.mean((given - embedded) ** 2, axis=1))
    cosine = np.sum(given * embedded, 1) / (np.linalg.norm(given, axis=1) * np.linalg.norm(embedded, axis=1) + 1e-8)
    return {
        "rms_distance": float(distance.mean()),
        "cosine": float(cosine.mean()),
        "class_agreement": float(np.mean(given_class == predicted_class)),
    }
