"""Image + segmentation mask (issue 7): joint generation, image -> mask and mask -> image on multi-object scenes.

  python -m experiments.image_segmentation        # the CPU default
  python -m experiments.image_segmentation --config.preset=full --workdir=workdirs/image_segmentation_full
  python -m experiments.image_segmentation --config=configs/image_segmentation.py:tiny --workdir=/tmp/seg_tiny
(configs/image_segmentation.py; --workdir default workdirs/image_segmentation.)

Trains one MT-Diffusion model (image x_0 + segmentation mask x_1, 11 classes: background 0, item class c as
c + 1). Then measures (config section `experiment`):
  image -> mask  mIoU (11 classes) and pixel accuracy of the segmentation head on test scenes, z_t drawn from the
                 test image at noise level t; floor: every pixel background; reference: foreground by the pixel
                 threshold with the scene's most common item class (an oracle on the class, not a model)
  mask -> image  the test masks observed: foreground IoU between the given mask's foreground and the generated
                 image's lit pixels (> the scenes' threshold), and the model's own head's mIoU on the generated
                 image vs the given mask; the same measures with the joint samples (no mask given) paired with
                 the test masks as the chance level
  joint          foreground IoU and head mIoU between each joint sample's generated mask and its image
The Fashion-MNIST CNN of the FID-proxy reads single centred 28x28 items, not scenes: no FID-proxy here.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from experiments import common
from mmdiff_jax import sampling
from mmdiff_jax.metrics import agreement

NAME = "image_segmentation"


def segmentation_modality(config: ml_collections.ConfigDict) -> str:
    for name, spec in config.model.modalities.items():
        if spec["kind"] == "segmentation":
            return name
    raise ValueError(f"the config has no segmentation modality (modalities: {list(config.model.modalities)})")


def foreground_iou(images: np.ndarray, masks: np.ndarray, threshold: float) -> float:
    """IoU of {pixel > threshold} in images [B, H, W, 1] with {mask > 0} in masks [B, H, W], over all pixels."""
    lit, foreground = np.asarray(images)[..., 0] > threshold, np.asarray(masks) > 0
    return float(np.sum(lit & foreground) / max(np.sum(lit | foreground), 1))


def _mask_scores(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> dict[str, float]:
    return {"miou": agreement.mean_iou(predicted, truth, num_classes),
            "pixel_accuracy": float(np.mean(np.asarray(predicted) == np.asarray(truth)))}


def _threshold_reference(images, masks, threshold):
    """Foreground by the pixel threshold, labelled with each scene's most common true item class (an oracle)."""
    predicted = np.zeros_like(masks)
    for i, (image, mask) in enumerate(zip(images, masks)):
        items = mask[mask > 0]
        majority = np.bincount(items).argmax() if items.size else 0
        predicted[i][image[..., 0] > threshold] = majority
    return predicted


def run(config: ml_collections.ConfigDict, run: common.Run) -> None:
    experiment = config.experiment
    mt = run.train("mt_diffusion", config)
    name, primary = segmentation_modality(config), config.model.primary
    num_classes = config.model.modalities[name]["num_classes"]
    threshold = experiment.foreground_threshold
    segment = sampling.make_segment_fn(mt.model, mt.schedule, name)
    sample = sampling.make_sample_fn(mt.model, mt.schedule, **common.sampler_options(experiment.sampler))
    results: dict = {}

    section = experiment.segmentation
    test = common.eval_batches(config, section.num_images, section.batch_size, transform_seed=experiment.seed)
    images = np.concatenate([b[primary] for b in test])
    masks = np.concatenate([b[name] for b in test])
    image_to_mask = {}
    with run.phase("image -> mask"):
        for t in section.noise_levels:
            predicted = common.map_batches(lambda b, rng, t=t: segment(mt.params, b[primary], rng, t=int(t))[
                "class_map"], test, seed=experiment.seed, desc=f"segment t={t}")
            image_to_mask[f"mt_diffusion_t{t}"] = _mask_scores(predicted, masks, num_classes)
            if t == section.noise_levels[0]:
                first_prediction = predicted
    image_to_mask["all_background"] = _mask_scores(np.zeros_like(masks), masks, num_classes)
    image_to_mask["threshold_oracle_class"] = _mask_scores(_threshold_reference(images, masks, threshold), masks,
                                                           num_classes)
    results["image_to_mask"] = image_to_mask

    section = experiment.generation
    given = common.eval_batches(config, section.num_samples, section.batch_size, transform_seed=experiment.seed + 1)
    given_masks = np.concatenate([b[name] for b in given])
    with run.phase("mask -> image"):
        conditional = common.map_batches(lambda b, rng: sample(mt.params, rng, {name: b[name]}).image, given,
                                         seed=experiment.seed, desc="mask->image")
    with run.phase("joint samples"):
        joint = common.map_batches(lambda i, rng: sample(mt.params, rng, batch_size=section.batch_size),
                                   range(len(given)), seed=experiment.seed + 1, desc="joint")

    def own_head(generated):
        batches = [generated[i:i + section.batch_size] for i in range(0, len(generated), section.batch_size)]
        t = int(experiment.segmentation.noise_levels[0])
        return common.map_batches(lambda b, rng: segment(mt.params, b, rng, t=t)["class_map"], batches,
                                  seed=experiment.seed)

    joint_masks = joint.outputs[name]["class_map"]
    results["mask_to_image"] = {
        "mt_diffusion": {"foreground_iou": foreground_iou(conditional, given_masks, threshold),
                         "head_miou": agreement.mean_iou(own_head(conditional), given_masks, num_classes)},
        "joint_samples_vs_unrelated_masks": {
            "foreground_iou": foreground_iou(joint.image, given_masks, threshold),
            "head_miou": agreement.mean_iou(own_head(joint.image), given_masks, num_classes)},
        "real_images": {"foreground_iou": foreground_iou(
            np.concatenate([b[primary] for b in given]), given_masks, threshold)},
    }
    results["joint"] = {"foreground_iou": foreground_iou(joint.image, joint_masks, threshold),
                        "head_miou": agreement.mean_iou(own_head(joint.image), joint_masks, num_classes),
                        "generated_classes_per_pixel": np.bincount(joint_masks.reshape(-1),
                                                                   minlength=num_classes).tolist()}

    count = experiment.grid_images
    overlay = common.overlay_classes
    rows = [("test scene", images[:count]), ("its mask", overlay(images[:count], masks[:count])),
            (f"predicted (t={experiment.segmentation.noise_levels[0]})", overlay(images[:count],
                                                                                first_prediction[:count])),
            ("given mask", overlay(np.full_like(conditional[:count], -1.0), given_masks[:count])),
            ("mask -> image", conditional[:count]),
            ("  + given mask", overlay(conditional[:count], given_masks[:count])),
            ("joint sample", joint.image[:count]),
            ("  + its mask", overlay(joint.image[:count], joint_masks[:count]))]
    run.report.image("segmentation", common.labelled_grid(rows),
                     f"Rows 1-3: image -> mask (test scene, true mask, the head's mask). Rows 4-6: mask -> image "
                     f"(the given test mask, the sample, the mask drawn on it). Rows 7-8: joint samples and their "
                     f"generated masks. {common.describe_sampler(experiment.sampler)}.", publish=True)
    run.report.metrics.update(setup={"sampler": dict(experiment.sampler), "num_classes": num_classes,
                                     "foreground_threshold": threshold}, **results)
    write_report(config, run, results)


def write_report(config, run: common.Run, results: dict) -> None:
    experiment, report = config.experiment, run.report
    size = config.model.z_shape[0]
    options = config.data.options
    report.text(
        f"MT-Diffusion on {size}x{size} Fashion-MNIST scenes ({options.min_objects}-{options.max_objects} items, "
        "11 mask classes: background + 10) with the image and its segmentation mask; one model for all three tasks. "
        f"Sampler: {common.describe_sampler(experiment.sampler)}, z_0 estimates clipped to [-1, 1]; EMA parameters.")
    image_to_mask = results["image_to_mask"]
    rows = [[f"MT-Diffusion segmentation head, z_t from the image at t = {t}",
             image_to_mask[f"mt_diffusion_t{t}"]["miou"], image_to_mask[f"mt_diffusion_t{t}"]["pixel_accuracy"]]
            for t in experiment.segmentation.noise_levels]
    rows += [["every pixel background (floor)", image_to_mask["all_background"]["miou"],
              image_to_mask["all_background"]["pixel_accuracy"]],
             ["pixel threshold + the scene's true majority class (oracle reference)",
              image_to_mask["threshold_oracle_class"]["miou"],
              image_to_mask["threshold_oracle_class"]["pixel_accuracy"]]]
    report.table(f"Image -> mask ({experiment.segmentation.num_images} test scenes)",
                 ["method", "mIoU (11 classes) ↑", "pixel accuracy ↑"], rows,
                 notes=["mIoU averages the classes present in the predictions or the truth."])
    mask_to_image, joint = results["mask_to_image"], results["joint"]
    rows = [["MT-Diffusion, mask observed", mask_to_image["mt_diffusion"]["foreground_iou"],
             mask_to_image["mt_diffusion"]["head_miou"]],
            ["joint samples vs the same (unrelated) masks (chance)",
             mask_to_image["joint_samples_vs_unrelated_masks"]["foreground_iou"],
             mask_to_image["joint_samples_vs_unrelated_masks"]["head_miou"]],
            ["real scenes of the masks (ceiling)", mask_to_image["real_images"]["foreground_iou"], "—"],
            ["joint samples vs their own generated masks", joint["foreground_iou"], joint["head_miou"]]]
    report.table(f"Mask -> image and joint generation ({experiment.generation.num_samples} samples per row)",
                 ["samples", "foreground IoU ↑", "head mIoU ↑"], rows, notes=[
                     "Foreground IoU: IoU of the image's lit pixels (> the scenes' threshold 10/255) with the mask's "
                     "non-background pixels; model-free.",
                     "Head mIoU: the model's own segmentation head (t = 1) on the generated image vs the mask; it "
                     "shares the model's errors, so read it beside the image -> mask table."])
    mt, chance = mask_to_image["mt_diffusion"], mask_to_image["joint_samples_vs_unrelated_masks"]
    best = max((k for k in image_to_mask if k.startswith("mt_")), key=lambda k: image_to_mask[k]["miou"])
    lines = [f"- Image -> mask: best head mIoU {image_to_mask[best]['miou']:.3f} ({best}) vs the all-background "
             f"floor {image_to_mask['all_background']['miou']:.3f} and the oracle-class threshold "
             f"{image_to_mask['threshold_oracle_class']['miou']:.3f}.",
             f"- Mask -> image: foreground IoU {mt['foreground_iou']:.3f} vs chance {chance['foreground_iou']:.3f} "
             f"(real scenes {mask_to_image['real_images']['foreground_iou']:.3f}).",
             f"- Joint: generated image and mask overlap with foreground IoU {joint['foreground_iou']:.3f}."]
    report.text("## Findings (computed from the numbers above)\n\n" + "\n".join(lines))


def run_experiment(config: ml_collections.ConfigDict, workdir, results_dir=None, command=None) -> common.Run:
    return common.run_experiment(NAME, run, config, workdir, results_dir, command)


def main() -> None:
    common.main(NAME, run)


if __name__ == "__main__":
    main()
