"""Image + embedding vector (issue 7): joint generation and embedding -> image with one MT-Diffusion model.

  python -m experiments.image_embedding        # the CPU default
  python -m experiments.image_embedding --config=configs/image_embedding.py:full \
      --workdir=workdirs/image_embedding_full
  python -m experiments.image_embedding --config=configs/image_embedding.py:tiny --workdir=/tmp/emb_tiny
(configs/image_embedding.py; --workdir default workdirs/image_embedding.)

Trains, at the same budget (steps, batch, optimizer, EMA) and backbone:
  mt_diffusion      MT-Diffusion with the image x_0 and the 64-d embedding x_1 of the project's Fashion-MNIST CNN;
                    the denoiser sees the embedding through ADM's class path (condition 'embedding', hidden with
                    probability p_uncond: docs/design.md section 3b)
  aggregation_only  (experiment.aggregation_only_ablation) the same with condition 'none': the embedding enters
                    through the aggregation only
Then measures (config section `experiment`), embedding the generated images with the same CNN recipe (the metrics'
classifier: `train_embedding_encoder`, 600 steps, seed 0, as the default embeddings), standardised by its
features' per-dimension mean / std over training images:
  embedding -> image  for test embeddings e: the RMS distance (per dimension) and cosine similarity between e
                      and the embedding of the generated image, and how often the CNN puts the generated image
                      in the class of the test image e came from; MT-Diffusion at each classifier-free guidance
                      scale of experiment.generation.cfg_scales. References: the embedding of the test image
                      itself (the ceiling: ~0 when the CNN reproduces the stored embeddings), a random other test
                      image (random pair), and joint samples (no embedding given) paired with e (chance).
  curve               embedding -> image class agreement against training steps (experiment.curve)
  FID-proxy           of embedding -> image samples and of joint samples (nothing observed).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from experiments import common, conditioning, evaluation, reporting
from mmdiff_jax import tasks

NAME = "image_embedding"
FID_PROXY = "FID-proxy (Fashion-MNIST CNN features)"


def agreement_metric(task, config, classifier, given: np.ndarray, source_class: np.ndarray):
    """fn(params) -> how often the CNN puts the image generated from each embedding in `given` [N, D] in the class
    `source_class` [N] of the test image it came from (guidance `experiment.curve.cfg_scale` if the embedding is
    conditioned): the curve's metric (`conditioning.train_with_curve`)."""
    sample = conditioning.curve_sampler(task, config, {tasks.modality_name(config, "vector"): given})

    def metric(params):
        return float(np.mean(np.asarray(classifier.predict(sample(params).image)) == source_class))

    return metric


def run(config: ml_collections.ConfigDict, run: common.Run) -> None:
    experiment, section = config.experiment, config.experiment.generation
    name, primary = tasks.modality_name(config, "vector"), config.model.primary
    with run.phase("metrics classifier"):
        classifier = evaluation.metrics_classifier(config)

    def predict(x):
        return np.asarray(classifier.predict(x))

    curve_test = evaluation.eval_batches(config, experiment.curve.num_samples, experiment.curve.num_samples)[0]
    models, curves = conditioning.train_with_curve(
        run,
        config,
        "embedding_to_image",
        lambda task, model_config: agreement_metric(
            task, model_config, classifier, curve_test[name], predict(curve_test[primary])
        ),
    )
    with run.phase("reference features"):
        statistics = evaluation.eval_batches(
            config, section.num_statistics, min(section.num_statistics, 1000), split="train"
        )
        embed = evaluation.make_embed_fn(classifier, np.concatenate([b[primary] for b in statistics]))
        reference_features = evaluation.reference_features(config, section.num_reference, classifier)
        real = np.concatenate(
            [
                b[primary]
                for b in evaluation.eval_batches(config, section.num_samples, section.batch_size, split="train")
            ]
        )
    test = evaluation.eval_batches(config, section.num_samples, section.batch_size)
    images = np.concatenate([b[primary] for b in test])
    given = np.concatenate([b[name] for b in test])
    conditional, joint = conditioning.sample_sweep(
        run,
        models,
        experiment.sampler,
        name,
        [b[name] for b in test],
        section.cfg_scales,
        seed=experiment.seed,
        task="embedding -> image",
    )

    source_class = predict(images)
    rows = {
        **conditional,
        "joint_samples": joint["mt_diffusion"].image,
        "random_pair": np.roll(images, 1, axis=0),
        "source_image": images,
    }
    results = {
        "embedding_to_image": {
            key: evaluation.embedding_scores(given, embed(x), source_class, predict(x)) for key, x in rows.items()
        }
    }
    results["joint"] = {
        model_name: {
            "head_vs_image_embedding": evaluation.embedding_scores(
                np.asarray(samples.outputs[name]["vector"]),
                embed(samples.image),
                predict(samples.image),
                predict(samples.image),
            )
        }
        for model_name, samples in joint.items()
    }
    fid_rows = {
        **{f"{key}_embedding_to_image": x for key, x in conditional.items()},
        **{f"{key}_joint": samples.image for key, samples in joint.items()},
        "real_train_images": real,
    }
    results["fid"] = {
        key: evaluation.evaluate_metrics(
            section.metrics, [{"sample": x}], classifier, reference_features=reference_features
        )
        for key, x in fid_rows.items()
    }
    results["curves"] = curves

    count = experiment.grid_images
    grid = reporting.labelled_grid(
        [("source image", images[:count])]
        + [
            (f"embedding, s = {scale:g}", conditional[conditioning.guidance_key("mt_diffusion", scale)][:count])
            for scale in section.cfg_scales
            if scale != 0.0
        ]
        + [("joint sample", joint["mt_diffusion"].image[:count]), ("real (train)", real[:count])]
    )
    run.report.image(
        "samples",
        grid,
        "Row 1: test images whose embeddings are given; then MT-Diffusion's samples "
        "from those embeddings at each classifier-free guidance scale s > 0, the same prior noise per "
        "column; joint samples (nothing observed); real training images. "
        f"{evaluation.describe_sampler(experiment.sampler)}.",
        publish=True,
    )
    run.report.metrics.update(
        setup={"sampler": dict(experiment.sampler), "fid_proxy": FID_PROXY, "embedder": dict(classifier.meta)},
        **results,
    )
    write_report(config, run, results)


def write_report(config, run: common.Run, results: dict) -> None:
    experiment, section, report = config.experiment, config.experiment.generation, run.report
    report.text(
        "MT-Diffusion on Fashion-MNIST (28x28) with the image and its 64-d CNN embedding (the project's default "
        "embeddings, standardised per dimension); the denoiser sees the embedding through ADM's class path. The "
        "generated images are embedded by the same CNN recipe. "
        f"Sampler: {evaluation.describe_sampler(experiment.sampler)}, z_0 estimates clipped to [-1, 1]; EMA parameters."
    )
    scores, fid = results["embedding_to_image"], results["fid"]
    labels = {
        conditioning.guidance_key("mt_diffusion", scale): f"MT-Diffusion, embedding observed, guidance s = "
        f"{scale:g}" + (" (the conditional)" if scale == 1 else "")
        for scale in section.cfg_scales
    }
    if "aggregation_only" in scores:
        labels["aggregation_only"] = "ablation: aggregation-only, embedding observed"
    labels.update(
        {
            "joint_samples": "joint samples, no embedding given (chance)",
            "random_pair": "a random other test image (random pair)",
            "source_image": "the test image the embedding came from (ceiling)",
        }
    )
    report.table(
        f"Embedding -> image ({section.num_samples} test embeddings)",
        [
            "image compared with the given embedding",
            "RMS distance ↓",
            "cosine ↑",
            "class agreement ↑",
            f"{FID_PROXY} ↓",
        ],
        [
            [
                label,
                scores[k]["rms_distance"],
                scores[k]["cosine"],
                scores[k]["class_agreement"],
                fid[f"{k}_embedding_to_image"]["fid_fmnist_cnn"] if f"{k}_embedding_to_image" in fid else "—",
            ]
            for k, label in labels.items()
        ],
        notes=[
            "RMS distance: sqrt(mean over the 64 standardised dimensions of (e_given - e_image)^2), averaged "
            "over examples; cosine likewise. Class agreement: the CNN's class of the image equals its class "
            "of the test image the embedding came from.",
            "Guidance s: classifier-free, eps(null) + s (eps(embedding) - eps(null)); s = 0 is the model "
            "with the embedding hidden from the denoiser (the aggregation still carries it).",
            f"{FID_PROXY} against {section.num_reference} test images; not comparable with Inception FIDs; "
            "biased upwards at this sample count.",
        ],
    )
    joint_rows = {f"{conditioning.MODEL_LABELS[k]}, joint samples": k for k in results["joint"]}
    report.table(
        f"Joint samples ({section.num_samples} per row)",
        ["samples", f"{FID_PROXY} ↓", "generated embedding vs the image's, RMS distance ↓"],
        [
            [label, fid[f"{k}_joint"]["fid_fmnist_cnn"], results["joint"][k]["head_vs_image_embedding"]["rms_distance"]]
            for label, k in joint_rows.items()
        ]
        + [["real training images (floor)", fid["real_train_images"]["fid_fmnist_cnn"], "—"]],
    )
    report.feature_space_tables(
        "Sample quality",
        {
            **{labels[k]: fid[f"{k}_embedding_to_image"] for k in labels if f"{k}_embedding_to_image" in fid},
            **{label: fid[f"{k}_joint"] for label, k in joint_rows.items()},
            "real training images (floor)": fid["real_train_images"],
        },
        experiment.feature_spaces,
    )
    conditioning.report_curve(
        run, results["curves"], "embedding_to_image", "embedding -> image class agreement", experiment.curve
    )
    mt = {scale: scores[conditioning.guidance_key("mt_diffusion", scale)] for scale in section.cfg_scales}
    best = max(mt, key=lambda scale: mt[scale]["class_agreement"])
    pair, chance = scores["random_pair"], scores["joint_samples"]
    lines = [
        f"- Embedding -> image (the conditional, s = 1): RMS distance {mt[1.0]['rms_distance']:.3f} vs random "
        f"pair {pair['rms_distance']:.3f} and ceiling {scores['source_image']['rms_distance']:.3f}; class "
        f"agreement {mt[1.0]['class_agreement']:.3f}, {mt[best]['class_agreement']:.3f} at its best guidance "
        f"scale s = {best:g} (target >= 0.5), vs random pair {pair['class_agreement']:.3f} and joint samples "
        f"{chance['class_agreement']:.3f}."
    ]
    if "aggregation_only" in scores:
        lines.append(
            f"- Ablation (the embedding through the aggregation only, same budget): class agreement "
            f"{scores['aggregation_only']['class_agreement']:.3f}, RMS distance "
            f"{scores['aggregation_only']['rms_distance']:.3f}."
        )
    lines.append(
        f"- Joint samples: the generated embedding vs the embedding of the generated image, RMS distance "
        f"{results['joint']['mt_diffusion']['head_vs_image_embedding']['rms_distance']:.3f}."
    )
    report.text("## Findings (computed from the numbers above)\n\n" + "\n".join(lines))


if __name__ == "__main__":
    common.main(NAME, run)
