"""Image + class label (issue 7): joint generation, label -> image and image -> label with one MT-Diffusion model.

  python -m experiments.joint_image_label        # the CPU default
  python -m experiments.joint_image_label --config=configs/joint_image_label.py:full \
      --workdir=workdirs/joint_image_label_full
  python -m experiments.joint_image_label --config=configs/joint_image_label.py:tiny --workdir=/tmp/jil_tiny
(configs/joint_image_label.py; --workdir default workdirs/joint_image_label.)

Trains, at the same budget (steps, batch, optimizer, EMA) and backbone:
  mt_diffusion            MT-Diffusion with the image x_0 and the label x_1 (learned table encoder, 'bump' weights,
                          an MLP label head on the U-Net's bottleneck); the denoiser sees the label through ADM's
                          class path (condition 'embedding', hidden with probability p_uncond: docs/design.md 3b)
  aggregation_only        (with experiment.aggregation_only_ablation) the same with condition 'none': the label
                          enters through the aggregation only
  class_conditional_ddpm  the U-Net with ADM's class embedding (`UNetConfig.num_classes`), the MSE of the config's
                          prediction target (`model.prediction`) on (x, y)
  classifier              the same U-Net (t = 0) with the same MLP head on its bottleneck, cross-entropy on clean images
Then measures (config section `experiment`), with the project's Fashion-MNIST CNN as the independent judge:
  joint         label agreement of joint samples (generated label vs the CNN's class of the generated image),
                FID-proxy of the joint images
  label->image  agreement of the CNN's class of label-conditioned samples with the given label, FID-proxy,
                for MT-Diffusion (label observed; classifier-free guidance scales experiment.generation.cfg_scales)
                and the class-conditional DDPM, the same labels and prior noise
  curve         label->image agreement against training steps (experiment.curve), measured while training
  image->label  test accuracy of MT-Diffusion's label head at noise level t (z_t from the test image) and of the
                stand-alone classifier; the CNN judge's own accuracy as a reference
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import common, conditioning, evaluation, reporting, trainer
from mmdiff_jax import sampling, tasks
from mmdiff_jax.data.fashion_mnist import CLASS_NAMES
from mmdiff_jax.metrics import agreement

NAME = "joint_image_label"
FID_PROXY = "FID-proxy (Fashion-MNIST CNN features)"
Array = jax.Array


# ----------------------------------------------------------------------------------------------- baselines
def make_class_conditional_sample_fn(trained: trainer.Trained, section, mesh=None):
    """sample(params, labels [B], rng) -> images [B, H, W, C] in [-1, 1] by the config's sampler (the chain
    split over `mesh`)."""
    options = evaluation.sampler_options(section, mesh)
    model, schedule, prediction = trained.model, trained.schedule, trained.config.model.prediction

    def sample(params, labels, rng):
        def denoise(z_t, t):
            output = model.apply({"params": params}, z_t, t, labels)
            return sampling.prediction_from_output(schedule, z_t, t, output, prediction)

        shape = labels.shape[:1] + tuple(trained.config.model.z_shape)
        return jnp.clip(
            sampling.sample_chain(denoise, schedule, rng, shape, clip_denoised=True, **options).z_0, -1.0, 1.0
        )

    return jax.jit(sample)


# ----------------------------------------------------------------------------------------------- evaluation
def _judge(classifier, images: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(classifier.predict(images[i : i + 1000])) for i in range(0, len(images), 1000)])


def agreement_metric(task, config, classifier):
    """fn(params) -> label -> image agreement (judge CNN) of the MT-Diffusion `task` (its config `config`), on
    `experiment.curve.num_samples` balanced labels (classifier-free guidance `curve.cfg_scale` if its label is
    conditioned): the curve's metric (`conditioning.train_with_curve`)."""
    labels = evaluation.balanced_labels(config.experiment.curve.num_samples)
    sample = conditioning.curve_sampler(task, config, {tasks.modality_name(config, "label"): labels})

    def metric(params):
        return agreement.accuracy(_judge(classifier, sample(params).image), labels)

    return metric


def evaluate(config, run: common.Run, models, classifier) -> dict:
    experiment = config.experiment
    section = experiment.generation
    label, primary = tasks.modality_name(config, "label"), config.model.primary
    mt, ccddpm, standalone = models["mt_diffusion"], models["class_conditional_ddpm"], models["classifier"]
    num_batches, batch_size = section.num_samples // section.batch_size, section.batch_size
    given = [
        evaluation.balanced_labels(section.num_samples)[i * batch_size : (i + 1) * batch_size]
        for i in range(num_batches)
    ]  # balanced labels, the same for every model
    cc_sample = make_class_conditional_sample_fn(ccddpm, experiment.sampler, run.mesh)
    conditional, joint = conditioning.sample_sweep(
        run,
        {name: models[name] for name in ("mt_diffusion", "aggregation_only") if name in models},
        experiment.sampler,
        label,
        given,
        section.cfg_scales,
        seed=experiment.seed,
        task="label -> image samples",
    )
    with run.phase("label -> image samples: class_conditional_ddpm"):
        conditional["class_conditional_ddpm"] = evaluation.map_batches(
            lambda labels, rng: cc_sample(ccddpm.params, labels, rng),
            given,
            seed=experiment.seed,
            desc="cc-DDPM label->image",
            mesh=run.mesh,
        )
    given = np.concatenate(given)
    with run.phase("reference features"):
        reference_features = evaluation.reference_features(config, section.num_reference, classifier)
        real = np.concatenate(
            [b[primary] for b in evaluation.eval_batches(config, section.num_samples, batch_size, split="train")]
        )

    def fid(images):
        return evaluation.evaluate_metrics(
            section.metrics, [{"sample": images}], classifier, reference_features=reference_features
        )

    results = {"joint": {}, "label_to_image": {}, "real_train_images": fid(real)}
    for name, samples in joint.items():
        labels = samples.outputs[label]["class_ids"]
        results["joint"][name] = {
            "label_agreement": agreement.label_agreement(labels, _judge(classifier, samples.image)),
            "generated_label_histogram": np.bincount(labels, minlength=10).tolist(),
            **fid(samples.image),
        }
    for key, images in conditional.items():
        results["label_to_image"][key] = {
            "agreement": agreement.accuracy(_judge(classifier, images), given),
            **fid(images),
        }

    section = experiment.classification
    test = evaluation.eval_batches(config, section.num_images, section.batch_size)
    truth = np.concatenate([b[label] for b in test])
    classify = sampling.make_classify_fn(mt.model, mt.schedule, label)
    classify_standalone = jax.jit(
        lambda params, image: jnp.argmax(standalone.model.apply({"params": params}, image), -1)
    )
    with run.phase("image -> label"):
        accuracy = {}
        for t in section.noise_levels:
            predicted = evaluation.map_batches(
                lambda b, rng, t=t: classify(mt.params, b[primary], rng, t=int(t))["class_ids"],
                test,
                seed=experiment.seed,
                mesh=run.mesh,
            )
            accuracy[f"mt_diffusion_t{t}"] = agreement.accuracy(predicted, truth)
        accuracy["classifier"] = agreement.accuracy(
            evaluation.map_batches(
                lambda b, rng: classify_standalone(standalone.params, b[primary]), test, seed=0, mesh=run.mesh
            ),
            truth,
        )
        accuracy["fmnist_cnn_judge"] = agreement.accuracy(
            _judge(classifier, np.concatenate([b[primary] for b in test])), truth
        )
    results["image_to_label"] = accuracy

    count = experiment.grid_images
    names = lambda ids: [CLASS_NAMES[i].split("/")[0] for i in ids]  # noqa: E731
    mt_joint = joint["mt_diffusion"]
    rows = [("MT joint (its label)", mt_joint.image[:count], names(mt_joint.outputs[label]["class_ids"][:count]))]
    rows += [
        (
            f"MT label->image, s = {scale:g}",
            conditional[conditioning.guidance_key("mt_diffusion", scale)][:count],
            names(given[:count]),
        )
        for scale in experiment.generation.cfg_scales
        if scale != 0.0
    ]
    rows += [
        ("cc-DDPM label->image", conditional["class_conditional_ddpm"][:count], names(given[:count])),
        ("real (train)", real[:count]),
    ]
    run.report.image(
        "samples",
        reporting.labelled_grid(rows),
        f"{evaluation.describe_sampler(experiment.sampler)}. Row 1: MT-Diffusion's joint samples with their "
        "generated labels; then samples for the given labels written below (MT-Diffusion with the label "
        "observed, at each classifier-free guidance scale s > 0; the class-conditional DDPM), the same "
        "prior noise per column.",
        publish=True,
    )
    return results


def write_report(config, run: common.Run, results: dict) -> None:
    experiment, report = config.experiment, run.report
    section = experiment.generation
    report.text(
        f"MT-Diffusion on Fashion-MNIST ({config.model.z_shape[0]}x{config.model.z_shape[1]}) with the image and its "
        "class label, against a class-conditional DDPM (ADM class embedding) and a stand-alone classifier, all with "
        "the same U-Net, steps, batch, optimizer and EMA. Judge: the project's Fashion-MNIST CNN "
        f"(test accuracy {results['image_to_label']['fmnist_cnn_judge']:.3f} on the images below). Sampler for "
        f"every diffusion model: {evaluation.describe_sampler(experiment.sampler)}, EMA parameters."
    )
    label_to_image, joint = results["label_to_image"], results["joint"]
    fid_key = "fid_fmnist_cnn"
    named = {"MT-Diffusion, joint (nothing observed)": joint["mt_diffusion"]}
    mt = {scale: label_to_image[conditioning.guidance_key("mt_diffusion", scale)] for scale in section.cfg_scales}
    named.update(
        {
            f"MT-Diffusion, label -> image, guidance s = {scale:g}"
            + (" (the conditional)" if scale == 1 else ""): metrics
            for scale, metrics in mt.items()
        }
    )
    if "aggregation_only" in joint:
        named["ablation: aggregation-only, joint"] = joint["aggregation_only"]
        named["ablation: aggregation-only, label -> image"] = label_to_image["aggregation_only"]
    named["class-conditional DDPM, label -> image"] = label_to_image["class_conditional_ddpm"]
    named["real training images (floor)"] = results["real_train_images"]
    rows = [
        [row, metrics.get("label_agreement", "—"), metrics.get("agreement", "—"), metrics[fid_key]]
        for row, metrics in named.items()
    ]
    report.table(
        f"Generation ({section.num_samples} samples per row)",
        ["model", "joint label agreement ↑", "label->image agreement ↑", f"{FID_PROXY} ↓"],
        rows,
        notes=[
            "Joint label agreement: fraction of joint samples whose generated label equals the CNN judge's "
            "class of the generated image.",
            "Label->image agreement: fraction of samples the judge assigns to the given label (balanced "
            "labels, 10% per class). Guidance s: classifier-free, eps(null) + s (eps(label) - eps(null)); "
            "s = 0 is the model with the label hidden from the denoiser (the aggregation still carries it).",
            f"{FID_PROXY} against {section.num_reference} test images; not comparable with Inception FIDs; "
            "biased upwards at this sample count (the real-image row is the floor).",
        ],
    )
    report.feature_space_tables("Generation", named, experiment.feature_spaces)
    conditioning.report_curve(
        run, results["curves"], "label_to_image", "label -> image agreement (judge CNN)", experiment.curve
    )
    accuracy = results["image_to_label"]
    rows = [
        [f"MT-Diffusion label head, z_t from the image at t = {t}", accuracy[f"mt_diffusion_t{t}"]]
        for t in experiment.classification.noise_levels
    ]
    rows += [
        ["same-backbone classifier, trained alone (clean images)", accuracy["classifier"]],
        ["Fashion-MNIST CNN judge (reference)", accuracy["fmnist_cnn_judge"]],
    ]
    report.table(f"Image -> label ({experiment.classification.num_images} test images)", ["model", "accuracy ↑"], rows)
    mt_acc = accuracy[f"mt_diffusion_t{experiment.classification.noise_levels[0]}"]
    best = max(mt, key=lambda scale: mt[scale]["agreement"])
    histogram = joint["mt_diffusion"]["generated_label_histogram"]
    spread = sum(count >= 0.01 * section.num_samples for count in histogram)
    lines = [
        f"- Label->image: MT-Diffusion agreement {label_to_image['mt_diffusion']['agreement']:.3f} (the conditional, "
        f"s = 1), {mt[best]['agreement']:.3f} at its best guidance scale s = {best:g} (target "
        f">= 0.6), vs the class-conditional DDPM {label_to_image['class_conditional_ddpm']['agreement']:.3f}; "
        f"FID-proxy {label_to_image['mt_diffusion'][fid_key]:.2f} vs "
        f"{label_to_image['class_conditional_ddpm'][fid_key]:.2f}.",
        f"- Image->label: MT-Diffusion's head {mt_acc:.3f} vs the stand-alone classifier {accuracy['classifier']:.3f} "
        f"({mt_acc - accuracy['classifier']:+.3f}).",
        f"- Joint samples: generated label and image agree {joint['mt_diffusion']['label_agreement']:.1%} of the time "
        f"(chance 10%); generated label counts per class {histogram}: {spread} classes with >= 1% of the samples "
        "(target >= 8).",
    ]
    if "aggregation_only" in joint:
        lines.append(
            f"- Ablation (the label through the aggregation only, same budget): label->image agreement "
            f"{label_to_image['aggregation_only']['agreement']:.3f}; joint label agreement "
            f"{joint['aggregation_only']['label_agreement']:.3f}."
        )
    report.text("## Findings (computed from the numbers above)\n\n" + "\n".join(lines))


def run(config: ml_collections.ConfigDict, run: common.Run) -> None:
    with run.phase("metrics classifier"):
        classifier = evaluation.metrics_classifier(config)  # also the judge of the training curves
    models, curves = conditioning.train_with_curve(
        run, config, "label_to_image", functools.partial(agreement_metric, classifier=classifier)
    )
    models["class_conditional_ddpm"] = run.train(
        "class_conditional_ddpm", config, tasks.make_class_conditional_ddpm_task(config)
    )
    models["classifier"] = run.train("classifier", config, tasks.make_classifier_task(config))
    results = evaluate(config, run, models, classifier)
    results["curves"] = curves
    run.report.metrics.update(
        setup={"sampler": dict(config.experiment.sampler), "fid_proxy": FID_PROXY, "judge": dict(classifier.meta)},
        **results,
    )
    write_report(config, run, results)


if __name__ == "__main__":
    common.main(NAME, run)
