"""The pairwise experiments' evaluations, run on any trained model of the multitask comparison
(experiments/multitask.py): `TaskSuite(config, run, classifier)` draws the inputs of a task once, when it is first
evaluated, then

  restoration(trained)         the config's restoration metrics (PSNR on the hidden pixels, LPIPS-proxy, SSIM) at
                               each mask ratio (the masked image observed, or, for a model without it, re-imposed
                               at every step: RePaint); known pixels pasted back
  label_to_image(trained)      how often the Fashion-MNIST CNN judge puts the sample in the given class (balanced
                               labels), and its FID-proxy
  image_to_label(trained)      accuracy of the label head at z_t (t = classification.noise_level), or of a
                               classifier on clean images
  embedding_to_image(trained)  how often the judge puts the sample in the judge's class of the image the test
                               embedding came from; cosine and RMS distance between the given embedding and the
                               sample's (the embeddings' recipe, `evaluation.make_embed_fn`)
  mask_to_image(trained)       foreground IoU between the given test mask and the sample's lit pixels (above the
                               sample's Otsu threshold; model-free)
  image_to_mask(trained)       mIoU and pixel accuracy of the segmentation head at z_t (t =
                               segmentation.noise_level), or of a segmenter on clean images
  joint(trained)               unconditional samples: their FID-proxy (with a judge), the agreement of a generated
                               label with the judge's, the foreground IoU of a generated mask with its image

Each returns a dict of scores; the first images of each output are kept in `images` for the report's grid.
The label and embedding tasks and the FID-proxy need `classifier` (the Fashion-MNIST CNN; it reads single
centred items, not scenes); the others take None.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common, evaluation
from mmdiff_jax import sampling, tasks
from mmdiff_jax.metrics import agreement
from mmdiff_jax.modalities import MASK_KEY


class TaskSuite:
    """The tasks' evaluations of a trained model (the module docstring), on inputs drawn once: every model gets
    the same test images, masks, labels, embeddings and prior noise."""

    def __init__(self, config, run: common.Run, classifier):
        self.config, self.classifier, self.mesh = config, classifier, run.mesh
        self.images: dict[tuple[str, str], np.ndarray] = {}  # (model, task) -> the grid's outputs
        self.programs: dict[tuple[int, str], Any] = {}  # (id of the task, kind) -> a jit-compiled function
        experiment = config.experiment
        self.sampler, self.seed = evaluation.sampler_options(experiment.sampler, run.mesh), experiment.seed
        self.primary = config.model.primary
        self.names = {
            kind: tasks.modality_name(config, kind) for kind in {m["kind"] for m in config.model.modalities.values()}
        }

    # ------------------------------------------------------------------------------------- inputs (drawn once)
    @functools.cached_property
    def masked(self) -> dict[float, list[dict]]:
        """mask ratio -> the restoration batches (test images with masks of that ratio)."""
        section = self.config.experiment.restoration
        return {
            ratio: evaluation.eval_batches(
                self.config, section.num_images, section.batch_size, mask_ratio=float(ratio), transform_seed=self.seed
            )
            for ratio in section.mask_ratios
        }

    @functools.cached_property
    def test(self) -> list[dict]:
        """The generation batches of test examples (their embeddings, their masks)."""
        section = self.config.experiment.generation
        return evaluation.eval_batches(self.config, section.num_samples, section.batch_size)

    @functools.cached_property
    def labels(self) -> list[np.ndarray]:
        """Balanced class labels, batched as `test`."""
        section = self.config.experiment.generation
        labels = evaluation.balanced_labels(section.num_samples)
        return [labels[i : i + section.batch_size] for i in range(0, section.num_samples, section.batch_size)]

    @functools.cached_property
    def reference(self) -> dict[str, np.ndarray]:
        return evaluation.reference_features(
            self.config, self.config.experiment.generation.num_reference, self.classifier
        )

    @functools.cached_property
    def real(self) -> np.ndarray:
        """Training images, as many as the samples (the FID-proxy's floor)."""
        section = self.config.experiment.generation
        train = evaluation.eval_batches(self.config, section.num_samples, section.batch_size, split="train")
        return np.concatenate([b[self.primary] for b in train])

    @functools.cached_property
    def embed(self):
        section = self.config.experiment.generation
        statistics = evaluation.eval_batches(
            self.config, section.num_statistics, min(section.num_statistics, 1000), split="train"
        )
        return evaluation.make_embed_fn(self.classifier, np.concatenate([b[self.primary] for b in statistics]))

    @functools.cached_property
    def source_class(self) -> np.ndarray:
        """The judge's class of each `test` image."""
        return self.judge(np.concatenate([b[self.primary] for b in self.test]))

    @functools.cached_property
    def classify(self) -> list[dict]:
        """The image -> label batches."""
        section = self.config.experiment.classification
        return evaluation.eval_batches(self.config, section.num_images, section.batch_size)

    @functools.cached_property
    def segment(self) -> list[dict]:
        """The image -> mask batches."""
        section = self.config.experiment.segmentation
        return evaluation.eval_batches(self.config, section.num_images, section.batch_size)

    # ------------------------------------------------------------------------------------- helpers
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

    # ------------------------------------------------------------------------------------- the tasks
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

    def _predicted(self, trained, kind: str, batches: list[dict], noise_level: int) -> np.ndarray:
        """Class ids of the `kind` modality ('label' [N] or 'segmentation' [N, H, W]) predicted from the images
        of `batches`: by a predictor trained alone (`trained.schedule` None: the classifier, the segmenter) on the
        clean images, or by the model's head at z_t, t = `noise_level`."""
        if trained.schedule is None:
            predict = self._program(
                trained,
                "predict",
                lambda: jax.jit(lambda params, image: jnp.argmax(trained.model.apply({"params": params}, image), -1)),
            )
            return evaluation.map_batches(
                lambda b, rng: predict(trained.params, b[self.primary]), batches, seed=0, mesh=self.mesh
            )
        make, key = {
            "label": (sampling.make_classify_fn, "class_ids"),
            "segmentation": (sampling.make_segment_fn, "class_map"),
        }[kind]
        head = self._program(
            trained, f"predict {kind}", lambda: make(trained.model, trained.schedule, self.names[kind])
        )
        return evaluation.map_batches(
            lambda b, rng: head(trained.params, b[self.primary], rng, t=noise_level)[key],
            batches,
            seed=self.seed,
            mesh=self.mesh,
        )

    def image_to_label(self, trained) -> dict:
        truth = np.concatenate([b[self.names["label"]] for b in self.classify])
        t = int(self.config.experiment.classification.noise_level)
        return {"accuracy": agreement.accuracy(self._predicted(trained, "label", self.classify, t), truth)}

    def image_to_mask(self, trained) -> dict:
        name = self.names["segmentation"]
        truth = np.concatenate([b[name] for b in self.segment])
        t = int(self.config.experiment.segmentation.noise_level)
        predicted = self._predicted(trained, "segmentation", self.segment, t)
        return {
            "miou": agreement.mean_iou(predicted, truth, self.config.model.modalities[name]["num_classes"]),
            "pixel_accuracy": float(np.mean(predicted == truth)),
        }

    def mask_to_image(self, trained) -> dict:
        name = self.names["segmentation"]
        masks = [b[name] for b in self.test]
        images = self._keep(trained, "mask_to_image", self._sample(trained, masks, name).image)
        return {"foreground_iou": agreement.foreground_iou(images, np.concatenate(masks))}

    def joint(self, trained) -> dict:
        samples = self._sample(trained, [b[self.primary] for b in self.test])  # nothing observed
        images, scores = self._keep(trained, "joint", samples.image), {}
        if self.classifier is not None:
            scores["fid"] = self.fid(images)
        label = samples.outputs.get(self.names.get("label"))
        if label is not None:
            scores["label_agreement"] = agreement.label_agreement(label["class_ids"], self.judge(images))
        mask = samples.outputs.get(self.names.get("segmentation"))
        if mask is not None:
            scores["mask_agreement"] = agreement.foreground_iou(
                images, self._keep(trained, "joint_mask", mask["class_map"])
            )
        return scores
