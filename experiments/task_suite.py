"""The pairwise experiments' evaluations, run on any trained model of the multitask comparison
(experiments/multitask.py): `TaskSuite(config, run, classifier)` draws the inputs once, then

  restoration(trained)         PSNR on the hidden pixels and LPIPS-proxy at each mask ratio (the masked image
                               observed, or, for a model without it, re-imposed at every step: RePaint); known
                               pixels pasted back
  label_to_image(trained)      how often the Fashion-MNIST CNN judge puts the sample in the given class (balanced
                               labels), and its FID-proxy
  image_to_label(trained)      accuracy of the label head at z_t (t = classification.noise_level), or of a
                               classifier on clean images
  embedding_to_image(trained)  how often the judge puts the sample in the judge's class of the image the test
                               embedding came from; cosine and RMS distance between the given embedding and the
                               sample's (the embeddings' recipe, `evaluation.make_embed_fn`)
  joint(trained)               FID-proxy of unconditional samples; agreement of a generated label with the judge's

Each returns a dict of scores; the first images of each output are kept in `images` for the report's grid.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common, evaluation
from mmdiff_jax import sampling, tasks
from mmdiff_jax.metrics import agreement
from mmdiff_jax.modalities import MASK_KEY

KINDS = ("masked_image", "label", "vector")  # the auxiliary modalities the five tasks read


class TaskSuite:
    """The five tasks' evaluations of a trained model (the module docstring), on inputs drawn once: every model
    gets the same test images, masks, labels, embeddings and prior noise."""

    def __init__(self, config, run: common.Run, classifier):
        self.config, self.classifier, self.mesh = config, classifier, run.mesh
        self.images: dict[tuple[str, str], np.ndarray] = {}  # (model, task) -> the grid's outputs
        self.programs: dict[tuple[int, str], Any] = {}  # (id of the task, kind) -> a jit-compiled function
        experiment = config.experiment
        self.sampler, self.seed = evaluation.sampler_options(experiment.sampler, run.mesh), experiment.seed
        self.primary = primary = config.model.primary
        self.names = {kind: tasks.modality_name(config, kind) for kind in KINDS}
        section = experiment.generation
        with run.phase("evaluation inputs"):
            self.masked = {
                ratio: evaluation.eval_batches(
                    config,
                    experiment.restoration.num_images,
                    experiment.restoration.batch_size,
                    mask_ratio=float(ratio),
                    transform_seed=self.seed,
                )
                for ratio in experiment.restoration.mask_ratios
            }
            self.test = evaluation.eval_batches(config, section.num_samples, section.batch_size)
            self.labels = [
                evaluation.balanced_labels(section.num_samples)[i : i + section.batch_size]
                for i in range(0, section.num_samples, section.batch_size)
            ]
            self.reference = evaluation.reference_features(config, section.num_reference, classifier)
            train = evaluation.eval_batches(config, section.num_samples, section.batch_size, split="train")
            self.real = np.concatenate([b[primary] for b in train])
            statistics = evaluation.eval_batches(
                config, section.num_statistics, min(section.num_statistics, 1000), split="train"
            )
            self.embed = evaluation.make_embed_fn(classifier, np.concatenate([b[primary] for b in statistics]))
            self.source_class = self.judge(np.concatenate([b[primary] for b in self.test]))
            section = experiment.classification
            self.classify = evaluation.eval_batches(config, section.num_images, section.batch_size)

    def judge(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.classifier.predict(images))

    def fid(self, images: np.ndarray) -> float:
        specs = self.config.experiment.generation.metrics
        scores = evaluation.evaluate_metrics(specs, [{"sample": images}], self.classifier, self.reference)
        return scores["fid_fmnist_cnn"]

    def _program(self, trained, kind: str, make):
        """`make()` once per network and kind: a comparator's two checkpoints share the compiled program."""
        key = (id(trained.task), kind)
        if key not in self.programs:
            self.programs[key] = make()
        return self.programs[key]

    def _sample(self, trained, given, name=None):
        sample = self._program(
            trained, "sample", lambda: sampling.make_sample_fn(trained.model, trained.schedule, **self.sampler)
        )
        observe = (lambda values: {name: values}) if name else (lambda values: None)
        return evaluation.map_batches(
            lambda values, rng: sample(trained.params, rng, observe(values), batch_size=len(values)),
            given,
            seed=self.seed,
            mesh=self.mesh,
        )

    def _keep(self, trained, task: str, images: np.ndarray) -> np.ndarray:
        """Keeps the first images of a task's outputs for the grid."""
        self.images[trained.name, task] = images[: self.config.experiment.grid_images]
        return images

    def restoration(self, trained) -> dict:
        masked = self.names["masked_image"]
        observe = masked if any(m.name == masked for m in trained.model.modalities) else None
        restore = self._program(
            trained,
            "restore",
            lambda: sampling.make_restore_fn(
                trained.model, trained.schedule, observe, repaint=observe is None, **self.sampler
            ),
        )
        scores = {}
        for ratio, batches in self.masked.items():
            truth = np.concatenate([b[self.primary] for b in batches])
            mask = np.concatenate([b[MASK_KEY] for b in batches])
            restored = evaluation.map_batches(
                lambda b, rng: restore(trained.params, b[masked], b[MASK_KEY], rng).image,
                batches,
                seed=self.seed,
                mesh=self.mesh,
            )
            restored = self._keep(trained, f"restoration {ratio}", mask * truth + (1.0 - mask) * restored)
            scores[str(ratio)] = evaluation.evaluate_metrics(
                self.config.experiment.restoration.metrics,
                [{"image": truth, "sample": restored, "mask": mask}],
                self.classifier,
            )
        return scores

    def label_to_image(self, trained) -> dict:
        images = self._keep(trained, "label_to_image", self._sample(trained, self.labels, self.names["label"]).image)
        return {
            "agreement": agreement.accuracy(self.judge(images), np.concatenate(self.labels)),
            "fid": self.fid(images),
        }

    def embedding_to_image(self, trained) -> dict:
        name = self.names["vector"]
        given = np.concatenate([b[name] for b in self.test])
        images = self._sample(trained, [b[name] for b in self.test], name).image
        return evaluation.embedding_scores(given, self.embed(images), self.source_class, self.judge(images))

    def image_to_label(self, trained) -> dict:
        truth = np.concatenate([b[self.names["label"]] for b in self.classify])
        if trained.schedule is None:  # the classifier
            predict = self._program(
                trained,
                "classify",
                lambda: jax.jit(lambda params, image: jnp.argmax(trained.model.apply({"params": params}, image), -1)),
            )
            predicted = evaluation.map_batches(
                lambda b, rng: predict(trained.params, b[self.primary]), self.classify, seed=0, mesh=self.mesh
            )
        else:
            t = int(self.config.experiment.classification.noise_level)
            classify = self._program(
                trained,
                "classify",
                lambda: sampling.make_classify_fn(trained.model, trained.schedule, self.names["label"]),
            )
            predicted = evaluation.map_batches(
                lambda b, rng: classify(trained.params, b[self.primary], rng, t=t)["class_ids"],
                self.classify,
                seed=self.seed,
                mesh=self.mesh,
            )
        return {"accuracy": agreement.accuracy(predicted, truth)}

    def joint(self, trained) -> dict:
        samples = self._sample(trained, self.labels)
        scores = {"fid": self.fid(self._keep(trained, "joint", samples.image))}
        label = samples.outputs.get(self.names["label"])
        if label is not None:
            scores["label_agreement"] = agreement.label_agreement(label["class_ids"], self.judge(samples.image))
        return scores
