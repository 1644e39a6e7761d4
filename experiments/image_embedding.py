"""Image + embedding vector (issue 7): joint generation and embedding -> image with one MT-Diffusion model.

  python -m experiments.image_embedding        # the CPU default
  python -m experiments.image_embedding --config.preset=full --workdir=workdirs/image_embedding_full
  python -m experiments.image_embedding --config=configs/image_embedding.py:tiny --workdir=/tmp/emb_tiny
(configs/image_embedding.py; --workdir default workdirs/image_embedding.)

Trains one MT-Diffusion model (image x_0 + the 64-d embedding x_1 of the project's Fashion-MNIST CNN). Then
measures (config section `experiment`), embedding the generated images with the same CNN recipe (the metrics'
classifier: `train_embedding_encoder`, 600 steps, seed 0, as the default embeddings), standardised by its
features' per-dimension mean / std over training images:
  embedding -> image  for test embeddings e: the RMS distance (per dimension) and cosine similarity between e
                      and the embedding of the generated image, and how often the CNN puts the generated image
                      in the class of the test image e came from. References: the embedding of the test image
                      itself (the ceiling: ~0 when the CNN reproduces the stored embeddings), a random other test
                      image (random pair), and joint samples (no embedding given) paired with e (chance).
  FID-proxy           of embedding -> image samples and of joint samples (nothing observed).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from experiments import common
from mmdiff_jax import sampling
from mmdiff_jax.metrics.distribution import compute_features

NAME = "image_embedding"
FID_PROXY = "FID-proxy (Fashion-MNIST CNN features)"


def vector_modality(config: ml_collections.ConfigDict) -> str:
    for name, spec in config.model.modalities.items():
        if spec["kind"] == "vector":
            return name
    raise ValueError(f"the config has no vector modality (modalities: {list(config.model.modalities)})")


def make_embed_fn(classifier, train_images: np.ndarray):
    """images [N, H, W, 1] -> standardised CNN features [N, D] (the stored embeddings' recipe)."""
    features = compute_features(classifier.features, train_images)
    mean, std = features.mean(0), features.std(0) + 1e-6
    return lambda images: (compute_features(classifier.features, images) - mean) / std


def embedding_scores(given: np.ndarray, embedded: np.ndarray, given_class: np.ndarray,
                     predicted_class: np.ndarray) -> dict[str, float]:
    """RMS distance per dimension, cosine similarity (means over examples) and class agreement."""
    distance = np.sqrt(np.mean((given - embedded) ** 2, axis=1))
    cosine = np.sum(given * embedded, 1) / (np.linalg.norm(given, axis=1) * np.linalg.norm(embedded, axis=1) + 1e-8)
    return {"rms_distance": float(distance.mean()), "cosine": float(cosine.mean()),
            "class_agreement": float(np.mean(given_class == predicted_class))}


def run(config: ml_collections.ConfigDict, run: common.Run) -> None:
    experiment, section = config.experiment, config.experiment.generation
    mt = run.train("mt_diffusion", config)
    name, primary = vector_modality(config), config.model.primary
    with run.phase("metrics classifier"):
        classifier = common.metrics_classifier(config)
    with run.phase("reference features"):
        statistics = common.eval_batches(config, section.num_statistics, min(section.num_statistics, 1000),
                                         split="train")
        embed = make_embed_fn(classifier, np.concatenate([b[primary] for b in statistics]))
        reference_features = common.reference_features(config, section.num_reference, classifier)
        real = np.concatenate([b[primary] for b in common.eval_batches(config, section.num_samples,
                                                                       section.batch_size, split="train")])
    test = common.eval_batches(config, section.num_samples, section.batch_size)
    images = np.concatenate([b[primary] for b in test])
    given = np.concatenate([b[name] for b in test])
    sample = sampling.make_sample_fn(mt.model, mt.schedule, **common.sampler_options(experiment.sampler))
    with run.phase("embedding -> image"):
        conditional = common.map_batches(lambda b, rng: sample(mt.params, rng, {name: b[name]}).image, test,
                                         seed=experiment.seed, desc="embedding->image")
    with run.phase("joint samples"):
        joint = common.map_batches(lambda i, rng: sample(mt.params, rng, batch_size=section.batch_size),
                                   range(len(test)), seed=experiment.seed, desc="joint")

    def predict(x):
        return np.asarray(classifier.predict(x))

    source_class = predict(images)
    random_pair = np.roll(images, 1, axis=0)
    rows = {"mt_diffusion": conditional, "joint_samples": joint.image, "random_pair": random_pair,
            "source_image": images}
    results = {"embedding_to_image": {key: embedding_scores(given, embed(x), source_class, predict(x))
                                      for key, x in rows.items()}}
    joint_head = np.asarray(joint.outputs[name]["vector"])
    results["joint"] = {"head_vs_image_embedding": embedding_scores(joint_head, embed(joint.image),
                                                                    predict(joint.image), predict(joint.image))}
    results["fid"] = {key: common.evaluate_metrics(section.metrics, [{"sample": x}], classifier,
                                                   reference_features=reference_features)
                      for key, x in (("mt_diffusion_embedding_to_image", conditional),
                                     ("mt_diffusion_joint", joint.image), ("real_train_images", real))}

    count = experiment.grid_images
    grid = common.labelled_grid([("source image", images[:count]), ("from its embedding", conditional[:count]),
                                 ("joint sample", joint.image[:count]), ("real (train)", real[:count])])
    run.report.image("samples", grid, "Row 1: test images whose embeddings are given; row 2: MT-Diffusion's samples "
                     "from those embeddings; row 3: joint samples (nothing observed); row 4: real training images. "
                     f"{common.describe_sampler(experiment.sampler)}.", publish=True)
    run.report.metrics.update(setup={"sampler": dict(experiment.sampler), "fid_proxy": FID_PROXY,
                                     "embedder": dict(classifier.meta)}, **results)
    write_report(config, run, results)


def write_report(config, run: common.Run, results: dict) -> None:
    experiment, section, report = config.experiment, config.experiment.generation, run.report
    report.text(
        "MT-Diffusion on Fashion-MNIST (28x28) with the image and its 64-d CNN embedding (the project's default "
        "embeddings, standardised per dimension). The generated images are embedded by the same CNN recipe. "
        f"Sampler: {common.describe_sampler(experiment.sampler)}, z_0 estimates clipped to [-1, 1]; EMA parameters.")
    scores = results["embedding_to_image"]
    labels = {"mt_diffusion": "MT-Diffusion, embedding observed",
              "joint_samples": "joint samples, no embedding given (chance)",
              "random_pair": "a random other test image (random pair)",
              "source_image": "the test image the embedding came from (ceiling)"}
    report.table(f"Embedding -> image ({section.num_samples} test embeddings)",
                 ["image compared with the given embedding", "RMS distance ↓", "cosine ↑", "class agreement ↑"],
                 [[labels[k], scores[k]["rms_distance"], scores[k]["cosine"], scores[k]["class_agreement"]]
                  for k in labels], notes=[
                     "RMS distance: sqrt(mean over the 64 standardised dimensions of (e_given - e_image)^2), averaged "
                     "over examples; cosine likewise. Class agreement: the CNN's class of the image equals its class "
                     "of the test image the embedding came from."])
    fid = results["fid"]
    report.table(f"Sample quality ({section.num_samples} per row)", ["samples", f"{FID_PROXY} ↓"],
                 [["MT-Diffusion, embedding -> image", fid["mt_diffusion_embedding_to_image"]["fid_fmnist_cnn"]],
                  ["MT-Diffusion, joint samples", fid["mt_diffusion_joint"]["fid_fmnist_cnn"]],
                  ["real training images (floor)", fid["real_train_images"]["fid_fmnist_cnn"]]],
                 notes=[f"Against the features of {section.num_reference} test images; not comparable with Inception "
                        "FIDs; biased upwards at this sample count (the real-image row is the floor)."])
    report.feature_space_tables("Sample quality", {
        "MT-Diffusion, embedding -> image": fid["mt_diffusion_embedding_to_image"],
        "MT-Diffusion, joint samples": fid["mt_diffusion_joint"], "real training images (floor)":
        fid["real_train_images"]}, config.experiment.feature_spaces)
    mt, pair = scores["mt_diffusion"], scores["random_pair"]
    lines = [f"- Embedding -> image: RMS distance {mt['rms_distance']:.3f} vs random pair {pair['rms_distance']:.3f} "
             f"and ceiling {scores['source_image']['rms_distance']:.3f}; class agreement {mt['class_agreement']:.3f} "
             f"vs random pair {pair['class_agreement']:.3f}.",
             f"- Joint samples: the generated embedding vs the embedding of the generated image, RMS distance "
             f"{results['joint']['head_vs_image_embedding']['rms_distance']:.3f}."]
    report.text("## Findings (computed from the numbers above)\n\n" + "\n".join(lines))


def run_experiment(config: ml_collections.ConfigDict, workdir, results_dir=None, command=None) -> common.Run:
    return common.run_experiment(NAME, run, config, workdir, results_dir, command)


def main() -> None:
    common.main(NAME, run)


if __name__ == "__main__":
    main()
