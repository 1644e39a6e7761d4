"""Accuracy, label agreement and mIoU on hand-made cases."""

import numpy as np
import pytest

from mmdiff_jax import metrics
from mmdiff_jax.metrics import agreement


def test_accuracy_and_label_agreement():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 5.0, 0.0], [0.0, 1.0, 0.0]])
    labels = np.array([0, 2, 0, 1])
    assert agreement.accuracy(logits, labels) == 0.75
    assert agreement.accuracy(np.array([0, 2, 1, 1]), labels) == 0.75
    evaluator = metrics.make_evaluator("accuracy")
    evaluator.update({"label_logits": logits[:1], "label": labels[:1]})
    evaluator.update({"label_logits": logits[1:], "label": labels[1:]})
    assert evaluator.result() == {"accuracy": 0.75}

    classifier = lambda images: np.asarray(images).reshape(len(images), -1)[:, 0]
    images = np.array([3, 1, 4, 1, 5]).reshape(5, 1, 1, 1)
    generated = np.array([3, 1, 4, 0, 0])
    assert agreement.label_agreement(generated, classifier(images)) == 0.6
    evaluator = metrics.make_evaluator("label_agreement", classifier=classifier)
    evaluator.update({"sample": images, "sample_label": generated})
    assert evaluator.result() == {"label_agreement": 0.6}


def test_mean_iou_by_hand():
    target = np.array([[[0, 0, 1, 1], [0, 0, 1, 1]]])
    prediction = np.array([[[0, 1, 1, 1], [0, 0, 1, 2]]])
    # class 0: I = 3, U = 4; class 1: I = 3, U = 5; class 2: I = 0, U = 1;
    # class 3 absent from both: left out.
    miou, per_class = agreement.iou_from_confusion(agreement.confusion_matrix(prediction, target, 4))
    np.testing.assert_allclose(per_class[:3], [0.75, 0.6, 0.0])
    assert np.isnan(per_class[3])
    assert miou == pytest.approx(0.45)
    logits = np.eye(4)[prediction]  # [B, H, W, K]
    assert agreement.mean_iou(logits, target, 4) == pytest.approx(0.45)
    # ignored target pixels count for nothing: without pixel (1, 3), class 1
    # has I = 3, U = 4 and class 2 is absent from both
    ignored = target.copy()
    ignored[0, 1, 3] = 255
    assert agreement.mean_iou(prediction, ignored, 4, ignore_index=255) == pytest.approx(0.75)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        agreement.mean_iou(prediction, target + 3, 4)


def test_miou_evaluator_sums_confusion_over_batches():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 11, (6, 8, 8))
    prediction = np.where(rng.uniform(size=target.shape) < 0.7, target, rng.integers(0, 11, target.shape))
    evaluator = metrics.make_evaluator("miou")
    for i in range(0, 6, 2):
        evaluator.update({"segmentation": target[i : i + 2], "sample_segmentation": prediction[i : i + 2]})
    assert evaluator.result()["miou"] == pytest.approx(agreement.mean_iou(prediction, target, 11))


def test_otsu_threshold_splits_two_levels_and_foreground_iou_uses_it():
    rng = np.random.default_rng(0)
    masks = np.zeros((2, 16, 16), np.int64)
    masks[:, 4:12, 4:10] = 3
    # Bright items (0.6 +- 0.05) on a grey, noisy background (-0.5 +- 0.1), not the scenes' black.
    images = np.where(masks[..., None] > 0, 0.6, -0.5) + 0.05 * rng.standard_normal((2, 16, 16, 1))
    images[masks == 0] += 0.05 * rng.standard_normal(images[masks == 0].shape)
    threshold = agreement.otsu_threshold(images[0])
    assert images[0][masks[0] == 0].max() <= threshold < images[0][masks[0] > 0].min()  # in the gap
    assert agreement.foreground_iou(images, masks) == 1.0
    # A fixed threshold below the background lights every pixel: the IoU is the foreground fraction.
    fraction = np.mean(masks > 0)
    np.testing.assert_allclose(agreement.foreground_iou(images, masks, threshold=-0.92), fraction)
    # Unrelated masks score low.
    assert agreement.foreground_iou(images, np.roll(masks, 6, axis=2)) < 0.5
