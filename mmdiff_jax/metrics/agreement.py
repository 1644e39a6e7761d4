"""Label and mask metrics: classification accuracy, label agreement, mIoU.

  accuracy        = mean[ argmax(label-head logits) == true label ]
                    (the model's label head on the test set)
  label_agreement = mean[ generated label == classifier(generated image) ]
                    (jointly generated (image, label) pairs, judged by an
                    independent classifier: by default the Fashion-MNIST CNN
                    of `features`, which the diffusion model never sees)
  mIoU            = mean over classes c of |P_c & T_c| / |P_c | T_c|,
                    from a confusion matrix summed over all images; class 0
                    (background) counts like any other; a class absent from
                    both prediction and target is left out of the mean;
                    pixels whose target is `ignore_index` are left out.
  foreground_iou  = |F & M| / |F | M| over all pixels, F the image's pixels
                    above a threshold (fixed, or each image's Otsu
                    threshold), M the mask's non-background pixels

Labels may be given as ints [B] (or [B, H, W]) or as logits with one more
trailing axis; logits are argmax-ed.
"""

from __future__ import annotations

import numpy as np

from mmdiff_jax.metrics import base
from mmdiff_jax.metrics import features as features_lib


def as_labels(values, label_ndim: int) -> np.ndarray:
    """ints of rank label_ndim, argmax-ing logits of rank label_ndim + 1."""
    values = np.asarray(values)
    if values.ndim == label_ndim + 1:
        return values.argmax(-1)
    if values.ndim != label_ndim:
        raise ValueError(
            f"expected labels of rank {label_ndim} or logits of rank {label_ndim + 1}, got shape {values.shape}"
        )
    return values.astype(np.int64)


def accuracy(predictions, labels) -> float:
    """Fraction of predictions ([B] ints or [B, K] logits) equal to labels [B]."""
    labels = np.asarray(labels).reshape(-1)
    return float(np.mean(as_labels(predictions, 1) == labels))


def label_agreement(generated_labels, classifier_labels) -> float:
    """Fraction of generated labels ([B] or [B, K] logits) the classifier agrees with."""
    return accuracy(generated_labels, classifier_labels)


def confusion_matrix(predictions, targets, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """[K, K] int64 counts, rows = target class, columns = predicted class."""
    targets = np.asarray(targets)
    predictions = as_labels(predictions, targets.ndim)
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {predictions.shape} and targets {targets.shape} differ in shape")
    targets, predictions = targets.reshape(-1), predictions.reshape(-1)
    keep = np.ones_like(targets, bool) if ignore_index is None else (targets != ignore_index)
    targets, predictions = targets[keep], predictions[keep]
    for name, values in (("target", targets), ("prediction", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} classes must lie in [0, {num_classes}), got [{values.min()}, {values.max()}]")
    return np.bincount(targets * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_from_confusion(confusion) -> tuple[float, np.ndarray]:
    """(mIoU, per-class IoU [K] with NaN for classes absent in both)."""
    confusion = np.asarray(confusion, np.float64)
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, intersection / union, np.nan)
    present = ~np.isnan(iou)
    return (float(iou[present].mean()) if present.any() else float("nan")), iou


def otsu_threshold(image, bins: int = 256, value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """Otsu's threshold of one image's values (Otsu 1979): the histogram split (`bins` over `value_range`)
    that maximises the between-class variance; pixels above it are the brighter class."""
    counts, edges = np.histogram(np.asarray(image, np.float64), bins=bins, range=value_range)
    centers = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centers)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    # The upper edge of the last bin of the darker class: every value of that class is <= it.
    return float(edges[1:][np.argmax(weight_low * weight_high * (mean_low - mean_high) ** 2)])


def foreground_iou(images, masks, threshold: float | None = None) -> float:
    """IoU, over all pixels of images [B, H, W, 1] and masks [B, H, W], of {pixel > threshold} with
    {mask > 0}. threshold None: each image's `otsu_threshold` (which does not look at the mask)."""
    values = np.asarray(images)[..., 0]
    if threshold is None:
        cut = np.array([otsu_threshold(image) for image in values]).reshape((-1,) + (1,) * (values.ndim - 1))
    else:
        cut = threshold
    lit, foreground = values > cut, np.asarray(masks) > 0
    return float(np.sum(lit & foreground) / max(np.sum(lit | foreground), 1))


def mean_iou(predictions, targets, num_classes: int, ignore_index: int | None = None) -> float:
    """mIoU of predicted masks ([B, H, W] ints or [B, H, W, K] logits) vs targets."""
    return iou_from_confusion(confusion_matrix(predictions, targets, num_classes, ignore_index))[0]


@base.register("accuracy")
class Accuracy(base.MeanEvaluator):
    """Accuracy of batch[predictions] (label-head logits or ints) vs batch[labels]."""

    def __init__(self, predictions: str = "label_logits", labels: str = "label", name: str = "accuracy"):
        self.keys, self.name = (predictions, labels), name
        super().__init__()

    def per_example(self, batch):
        predictions, labels = (base.require(batch, k, self.name) for k in self.keys)
        return as_labels(predictions, 1) == np.asarray(labels).reshape(-1)


@base.register("label_agreement")
class LabelAgreement(base.MeanEvaluator):
    """Generated labels batch[labels] vs classifier(batch[images]).

    classifier: "fmnist_cnn" (default, cached default network), a
    `features.Classifier`, or any callable images -> labels [B].
    """

    def __init__(
        self,
        images: str = "sample",
        labels: str = "sample_label",
        classifier="fmnist_cnn",
        name: str = "label_agreement",
    ):
        self.keys, self.name = (images, labels), name
        self._classifier, self._predict = classifier, None
        super().__init__()

    def per_example(self, batch):
        if self._predict is None:
            self._predict = features_lib.get_classifier(self._classifier)
        images, labels = (base.require(batch, k, self.name) for k in self.keys)
        return as_labels(labels, 1) == np.asarray(self._predict(images)).reshape(-1)


@base.register("miou")
class MeanIoU(base.Evaluator):
    """mIoU of batch[predictions] vs batch[targets] over all pixels seen.

    Reports `name` (default "miou"); num_classes default 11 (background + the
    10 Fashion-MNIST classes of the `scenes(...)` transform).
    """

    def __init__(
        self,
        num_classes: int = 11,
        predictions: str = "sample_segmentation",
        targets: str = "segmentation",
        ignore_index: int | None = None,
        name: str = "miou",
    ):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.keys, self.name = (predictions, targets), name
        self.reset()

    def reset(self):
        self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)

    def update(self, batch):
        predictions, targets = (base.require(batch, k, self.name) for k in self.keys)
        self.confusion += confusion_matrix(predictions, targets, self.num_classes, self.ignore_index)

    def result(self):
        return {self.name: iou_from_confusion(self.confusion)[0]}
