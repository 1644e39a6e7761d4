"""Image transition (issue 16): a low-resolution image -> the image, with MT-Diffusion's bridge schedule.

  python -m experiments.image_transition        # the CPU default (configs/image_transition.py)
  python -m experiments.image_transition --config=configs/image_transition.py:tiny --workdir=/tmp/transition_tiny

Trains, at the same budget and backbone (config section `model`, `train`):
  mt_diffusion   the source x_1 (the image average-pooled over 4x4 blocks) under a `bridge` weight schedule, so
                 z_T ~ N(lambda_T x_1, I) carries it, and seen by the denoiser (condition 'concat')
  no_bridge      the same with weight schedule 'zero': conditioned on the source, z_T ~ N(0, I)
  bridge_only    (experiment.bridge_only_ablation) the bridge alone, condition 'none': the paper's form
  plain_ddpm     N = 0, for SDEdit from the source
Then translates the sources of `experiment.transition.num_images` test images with each method (the same sampler,
steps and seed) and measures, against the image each source came from: PSNR and SSIM (whole image, [0, 1]), the
LPIPS-proxy (Fashion-MNIST CNN features; not LPIPS-VGG) and the FID-proxy of the outputs against the test set;
the source itself is the floor. Writes grids (source, truth, each method), metrics.json and report.md.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from experiments import baselines, common, evaluation, reporting, trainer
from experiments.conditioning import guidance_key
from mmdiff_jax import sampling, tasks

NAME = "image_transition"
LPIPS_PROXY = "LPIPS-proxy (perceptual distance on Fashion-MNIST CNN features, not LPIPS-VGG)"
FID_PROXY = "FID-proxy (Fashion-MNIST CNN features)"


def no_bridge_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with every modality's weight schedule 'zero': conditioned on the source, without the bridge."""
    plain = trainer.copy_config(config)
    for spec in plain.model.modalities.values():
        spec["weight_schedule"] = ("zero", 0.0)
    return plain


def method_labels(config: ml_collections.ConfigDict) -> dict[str, str]:
    section = config.experiment.transition
    gamma = config.model.modalities[tasks.modality_name(config, "image")].weight_schedule[1]
    return {
        "mt_diffusion": f"MT-Diffusion: bridge (height {gamma:g}) + source seen",
        **{guidance_key("mt_diffusion", s): f"MT-Diffusion, guidance s = {s:g}" for s in section.cfg_scales},
        "no_bridge": "conditioned on the source, no bridge",
        "bridge_only": "ablation: bridge only (the paper's form)",
        "sdedit": f"SDEdit from the source, plain DDPM (t0 = {section.sdedit_strength:g} T)",
        "low_resolution": "the source (4x4 block means)",
    }


def train_models(config: ml_collections.ConfigDict, run: common.Run) -> dict[str, trainer.Trained]:
    derived = {"no_bridge": no_bridge_config(config), "plain_ddpm": baselines.plain_ddpm_config(config)}
    if config.experiment.bridge_only_ablation:
        derived["bridge_only"] = baselines.aggregation_only_config(config)
    models = {"mt_diffusion": run.train("mt_diffusion", config, run.task)}
    for name, model_config in derived.items():
        models[name] = run.train(name, model_config, tasks.make_mt_diffusion_task(model_config, name=name))
    return models


def transition_methods(config: ml_collections.ConfigDict, models: dict[str, trainer.Trained], mesh=None) -> dict:
    """name -> fn(batch, rng) -> output images [B, H, W, C] in [-1, 1] (chains split over `mesh`)."""
    section, source = config.experiment.transition, tasks.modality_name(config, "image")
    sampler = evaluation.sampler_options(config.experiment.sampler, mesh)

    def translator(trained, **call_options):
        transition = sampling.make_transition_fn(trained.model, trained.schedule, source, **sampler)
        return lambda batch, rng: transition(trained.params, batch[source], rng, **call_options).image

    sdedit = baselines.make_sdedit(config, models["plain_ddpm"], section.sdedit_strength)
    methods = {"mt_diffusion": translator(models["mt_diffusion"])}
    for scale in section.cfg_scales:
        methods[guidance_key("mt_diffusion", scale)] = translator(models["mt_diffusion"], cfg_scales=scale)
    methods["no_bridge"] = translator(models["no_bridge"])
    if "bridge_only" in models:
        methods["bridge_only"] = translator(models["bridge_only"])
    methods["sdedit"] = lambda batch, rng: sdedit(batch[source], rng)
    methods["low_resolution"] = lambda batch, rng: batch[source]
    return methods


def evaluate(config: ml_collections.ConfigDict, run: common.Run, models, classifier) -> dict:
    """metrics[method] (PSNR, SSIM, LPIPS-proxy, FID-proxy) and the grid."""
    experiment, section = config.experiment, config.experiment.transition
    source, primary = tasks.modality_name(config, "image"), config.model.primary
    labels = method_labels(config)
    batches = evaluation.eval_batches(config, section.num_images, section.batch_size)
    truth = np.concatenate([b[primary] for b in batches])
    with run.phase("reference features"):
        reference = evaluation.reference_features(config, section.num_reference, classifier)
    count = experiment.grid_images
    rows = [("source", np.concatenate([b[source] for b in batches])[:count]), ("truth", truth[:count])]
    results = {}
    for name, translate in transition_methods(config, models, run.mesh).items():
        with run.phase(f"transition: {name}"):
            outputs = np.asarray(
                evaluation.map_batches(translate, batches, seed=experiment.seed, desc=name, mesh=run.mesh)
            )
        results[name] = evaluation.evaluate_metrics(
            (*section.metrics, "fid"), [{"image": truth, "sample": outputs}], classifier, reference_features=reference
        )
        if name != "low_resolution":
            rows.append((labels[name], outputs[:count]))
    results["real_test_images"] = evaluation.evaluate_metrics(
        ("fid",), [{"sample": truth}], classifier, reference_features=reference
    )
    run.report.image(
        "transition",
        reporting.labelled_grid(rows),
        f"The source (4x4 block means), the truth, then each method's output; "
        f"{evaluation.describe_sampler(experiment.sampler)}, the same seed for every method.",
        publish=True,
    )
    return results


def write_report(config: ml_collections.ConfigDict, run: common.Run, results: dict) -> None:
    experiment, section = config.experiment, config.experiment.transition
    labels = method_labels(config)
    methods = [name for name in labels if name in results]
    factor = evaluation.transform_op(config, "low_resolution").factor
    run.report.text(
        f"MT-Diffusion trained on {evaluation.data_name(config)} ({config.model.z_shape[0]}x{config.model.z_shape[1]}) "
        f"pairs of a low-resolution source ({factor}x{factor} block means, repeated "
        "back to full size) and the image it came from; every model has the same U-Net, steps, batch, optimizer "
        f"and EMA, predicts {config.model.prediction} and trains {config.train.steps} steps. Sampler for every "
        f"model: {evaluation.describe_sampler(experiment.sampler)}, z_0 estimates clipped to [-1, 1]; EMA "
        "parameters."
    )
    run.report.table(
        f"Low resolution -> image ({section.num_images} test images)",
        ["method", "PSNR ↑", "SSIM ↑", "LPIPS-proxy ↓", f"{FID_PROXY} ↓"],
        [
            [labels[m], results[m]["psnr"], results[m]["ssim"], results[m]["perceptual_fmnist_cnn"]]
            + [results[m]["fid_fmnist_cnn"]]
            for m in methods
        ]
        + [["real test images (the targets)", "—", "—", "—", results["real_test_images"]["fid_fmnist_cnn"]]],
        notes=[
            "PSNR (dB) and SSIM against the image each source came from, whole image, scaled to [0, 1].",
            f"{LPIPS_PROXY}; lower is better. LPIPS-VGG: not measured (needs the user's VGG-16 weights).",
            f"FID-proxy of the {section.num_images} outputs against {section.num_reference} test images; with this "
            "few samples it is biased upwards: the targets' own row is the floor for the same count.",
        ],
    )
    best = max((m for m in methods if m != "low_resolution"), key=lambda m: results[m]["psnr"])
    lines = [f"- Best PSNR: {labels[best]} ({results[best]['psnr']:.2f} dB)."]
    for a, b in (("mt_diffusion", "no_bridge"), ("mt_diffusion", "sdedit"), ("mt_diffusion", "bridge_only")):
        if a in results and b in results:
            lines.append(
                f"- {labels[a]} vs {labels[b]}: PSNR {results[a]['psnr'] - results[b]['psnr']:+.2f} dB, LPIPS-proxy "
                f"{results[a]['perceptual_fmnist_cnn'] - results[b]['perceptual_fmnist_cnn']:+.3f}, FID-proxy "
                f"{results[a]['fid_fmnist_cnn'] - results[b]['fid_fmnist_cnn']:+.1f}."
            )
    run.report.text("## Findings (computed from the numbers above)\n\n" + "\n".join(lines))


def run(config: ml_collections.ConfigDict, run: common.Run) -> None:
    models = train_models(config, run)
    with run.phase("metrics classifier"):
        classifier = evaluation.metrics_classifier(config)
    results = evaluate(config, run, models, classifier)
    run.report.metrics.update(
        setup={
            "labels": method_labels(config),
            "sampler": dict(config.experiment.sampler),
            "lpips_proxy": LPIPS_PROXY,
            "fid_proxy": FID_PROXY,
            "lpips_vgg": "not measured (no VGG-16 weights)",
            "classifier": dict(classifier.meta),
        },
        transition=results,
    )
    write_report(config, run, results)


if __name__ == "__main__":
    common.main(NAME, run)
