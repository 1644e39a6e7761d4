"""Masked pretraining (issue 7): MT-Diffusion with the image and a masked image, against its baselines.

  python -m experiments.masked_pretrain                                # the CPU default (configs/masked_pretrain.py)
  python -m experiments.masked_pretrain --config=configs/masked_pretrain.py:full   # real numbers, on a big machine
  python -m experiments.masked_pretrain --config=configs/masked_pretrain.py:tiny --workdir=/tmp/mp_tiny

Trains, at the same budget and backbone: MT-Diffusion (image + masked image), plain DDPM (N = 0) and the
one-pass reconstruction U-Net. Then measures (config section `experiment`):

  restoration    at each mask ratio, on the same test images with fresh patch masks (the known pixels pasted
                 back into every output): PSNR and SSIM on the hidden region, and the LPIPS-proxy (perceptual
                 distance on the Fashion-MNIST CNN's features, `perceptual_fmnist_cnn`; NOT LPIPS-VGG, whose
                 VGG weights are not available offline) on the whole image, for
                   mt_diffusion          MT-Diffusion, the masked image observed (the sampler's conditional path)
                   mt_diffusion_repaint  the same, known pixels re-imposed at every step (RePaint-style)
                   sdedit                SDEdit with the plain DDPM: the masked image noised to t0, denoised
                   ddpm_repaint          the plain DDPM, known pixels re-imposed at every step
                   reconstruction        the reconstruction-only U-Net (one pass)
                   masked_input          the hidden pixels left mid-grey (what every method starts from)
  unconditional  MT-Diffusion's joint samples (nothing observed) and plain DDPM's samples, same sampler, steps,
                 number and prior noise: FID-proxy, precision and recall in the Fashion-MNIST CNN's feature
                 space against the test images, with as many real training images as the floor.

Writes to the workdir (default workdirs/masked_pretrain): the three models' runs, grids/*.png (restorations
beside the masked inputs and the truth; joint samples with their generated masks drawn on them),
metrics.json and report.md (see experiments.common).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from experiments import baselines, common, conditioning, evaluation, reporting
from experiments import restoration as restoration_lib
from mmdiff_jax import sampling, tasks
from mmdiff_jax.modalities import MASK_KEY
from mmdiff_jax.tasks.mt_diffusion import describe_loss

NAME = "masked_pretrain"
LPIPS_PROXY = "LPIPS-proxy (perceptual distance on Fashion-MNIST CNN features, not LPIPS-VGG)"
FID_PROXY = "FID-proxy (Fashion-MNIST CNN features)"


def evaluate_restoration(config, run: common.Run, models, classifier) -> dict:
    """metrics[ratio][method] and one grid per ratio (the largest ratio's is published)."""
    section, experiment = config.experiment.restoration, config.experiment
    methods = restoration_lib.restoration_methods(config, models, run.mesh)
    labels = restoration_lib.method_labels(config)
    results, count = {}, experiment.grid_images
    for ratio in section.mask_ratios:
        batches = evaluation.eval_batches(
            config, section.num_images, section.batch_size, mask_ratio=float(ratio), transform_seed=experiment.seed
        )
        truth = np.concatenate([b[config.model.primary] for b in batches])
        mask = np.concatenate([b[MASK_KEY] for b in batches])
        hidden = float(1.0 - mask.mean())
        results[str(ratio)] = {"hidden_fraction": hidden}
        rows = [("truth", truth[:count]), ("masked input", reporting.tint_hidden(truth[:count], mask[:count]))]
        for name, restore in methods.items():
            with run.phase(f"restoration: {name}"):
                restored = evaluation.map_batches(
                    restore, batches, seed=experiment.seed, desc=f"{name} r={ratio}", mesh=run.mesh
                )
            restored = mask * truth + (1.0 - mask) * np.asarray(restored)  # the known pixels are given
            results[str(ratio)][name] = evaluation.evaluate_metrics(
                section.metrics, [{"image": truth, "sample": restored, "mask": mask}], classifier
            )
            if name != "masked_input":
                rows.append((labels[name], restored[:count]))
        run.report.image(
            f"restoration_mask{ratio}",
            reporting.labelled_grid(rows),
            f"Restoration at mask ratio {ratio} ({hidden:.0%} of the pixels hidden, blue): the truth, "
            f"the masked input, then each method (known pixels pasted back).",
            publish=ratio == max(section.mask_ratios),
        )
        print(
            f"[{NAME}] mask ratio {ratio}: "
            + ", ".join(f"{n} PSNR {results[str(ratio)][n].get('psnr_masked', float('nan')):.2f}" for n in methods),
            flush=True,
        )
    return results


def evaluate_unconditional(config, run: common.Run, models, classifier) -> dict:
    """FID-proxy / precision / recall of MT-Diffusion's joint samples and plain DDPM's, and the real floor."""
    section, experiment = config.experiment.unconditional, config.experiment
    sampler = evaluation.sampler_options(experiment.sampler, run.mesh)
    num_batches = section.num_samples // section.batch_size
    if section.num_samples % section.batch_size:
        raise ValueError(
            f"unconditional.num_samples {section.num_samples} is not a multiple of the batch size {section.batch_size}"
        )
    with run.phase("unconditional: reference features"):
        reference_features = evaluation.reference_features(config, section.num_reference, classifier)
        real = evaluation.eval_batches(config, section.num_samples, section.batch_size, split="train")
        real_images = np.concatenate([b[config.model.primary] for b in real])
    samples = {}
    for name in [name for name in ("mt_diffusion", "aggregation_only", "plain_ddpm") if name in models]:
        trained = models[name]
        sample = sampling.make_sample_fn(trained.model, trained.schedule, **sampler)
        with run.phase(f"unconditional: {name}"):
            samples[name] = evaluation.map_batches(
                lambda index, rng, sample=sample, params=trained.params: sample(
                    params, rng, batch_size=section.batch_size
                ),
                range(num_batches),
                seed=experiment.seed,
                desc=f"{name} samples",
                mesh=run.mesh,
            )
    results = {}
    for name, images in [(name, s.image) for name, s in samples.items()] + [("real_train_images", real_images)]:
        results[name] = evaluation.evaluate_metrics(
            section.metrics, [{"sample": images}], classifier, reference_features=reference_features
        )
    count = experiment.grid_images
    rows = [("MT-Diffusion (joint)", samples["mt_diffusion"].image[:count])]
    masked = tasks.modality_name(config, "masked_image")
    head = samples["mt_diffusion"].outputs.get(masked)
    if head is not None:  # the jointly generated masked image, the predicted mask drawn as hidden = blue
        rows.append(("its masked image", reporting.tint_hidden(head["image"][:count], head["mask"][:count] > 0.5)))
    rows.append(("plain DDPM", samples["plain_ddpm"].image[:count]))
    rows.append(("real (train)", real_images[:count]))
    run.report.image(
        "unconditional",
        reporting.labelled_grid(rows),
        f"Unconditional samples, {evaluation.describe_sampler(experiment.sampler)}, the same prior noise "
        f"per column: MT-Diffusion's joint samples (image and its generated masked image, predicted "
        f"hidden pixels blue), plain DDPM, real training images.",
        publish=True,
    )
    return results


def write_report(config, run: common.Run, restoration: dict, unconditional: dict, curves: dict) -> None:
    experiment, report = config.experiment, run.report
    labels = restoration_lib.method_labels(config)
    ratios = [str(r) for r in experiment.restoration.mask_ratios]
    methods = list(restoration_lib.all_methods(config))
    modality = config.model.modalities[tasks.modality_name(config, "masked_image")]
    masking = evaluation.transform_op(config, "masked_image")
    low, high = (masking.ratio, masking.ratio) if np.isscalar(masking.ratio) else masking.ratio
    masks = f"{masking.patch_size}x{masking.patch_size} patch" if masking.kind == "patch" else masking.kind
    report.text(
        f"MT-Diffusion trained on {evaluation.data_name(config)} ({config.model.z_shape[0]}x{config.model.z_shape[1]}) "
        f"with the image and a masked image ({masks} masks hiding {low:.0%}-{high:.0%} of the image; encoder '{modality.get('encoder') or 'default'}', weight schedule "
        f"{modality.weight_schedule[0]} of height {modality.weight_schedule[1]:g}), against "
        "plain DDPM (no auxiliary modality) and a reconstruction-only U-Net, all with the same U-Net, steps, batch, "
        "optimizer and EMA. One MT-Diffusion model serves every mask ratio and unconditional generation. "
        f"Sampler for every diffusion model: {evaluation.describe_sampler(experiment.sampler)}, z_0 estimates "
        f"clipped to [-1, 1]; EMA parameters. MT-Diffusion's loss: {run.task.loss_description}, "
        f"{config.train.steps} steps"
        + (
            " (v-prediction, the recipe bench/convergence.py found fastest on this report's own metrics: FID-proxy, "
            "PSNR hidden)."
            if run.task.loss_description == describe_loss(run.task.model.modalities, "v")
            else "."
        )
    )
    columns = ["method"] + [f"PSNR hidden, r={r} ↑" for r in ratios] + [f"LPIPS-proxy, r={r} ↓" for r in ratios]
    rows = [
        [labels[m]]
        + [restoration[r][m]["psnr_masked"] for r in ratios]
        + [restoration[r][m]["perceptual_fmnist_cnn"] for r in ratios]
        for m in methods
    ]
    hidden = ", ".join(f"r={r}: {restoration[r]['hidden_fraction']:.1%}" for r in ratios)
    report.table(
        "Restoration (mask ratio r = fraction of 4x4 patches hidden)",
        columns,
        rows,
        notes=[
            f"{experiment.restoration.num_images} test images per ratio (the same images, masks drawn per ratio; "
            f"hidden pixels {hidden}); known pixels pasted back into every output.",
            "PSNR hidden: PSNR (dB) over the hidden pixels only, images scaled to [0, 1]; higher is better.",
            f"{LPIPS_PROXY}, whole image; lower is better. LPIPS-VGG: not measured (needs the user's VGG-16 weights).",
        ],
        digits=3,
    )
    if all("ssim_masked" in restoration[r][m] for r in ratios for m in methods):
        report.table(
            "SSIM on the hidden region (↑)",
            ["method"] + [f"r={r}" for r in ratios],
            [[labels[m]] + [restoration[r][m]["ssim_masked"] for r in ratios] for m in methods],
        )
    section = experiment.unconditional
    names = {
        "mt_diffusion": "MT-Diffusion, joint samples (nothing observed)",
        "aggregation_only": "ablation: aggregation-only MT-Diffusion, joint samples",
        "plain_ddpm": "plain DDPM",
        "real_train_images": "real training images (floor)",
    }
    names = {name: label for name, label in names.items() if name in unconditional}
    report.table(
        f"Unconditional samples ({section.num_samples} per model, equal training budget)",
        ["model", f"{FID_PROXY} ↓", "precision ↑", "recall ↑"],
        [
            [
                names[n],
                unconditional[n]["fid_fmnist_cnn"],
                unconditional[n].get("precision_fmnist_cnn"),
                unconditional[n].get("recall_fmnist_cnn"),
            ]
            for n in names
        ],
        notes=[
            f"Against the features of {section.num_reference} test images; improved precision / recall "
            "(k = 3) in the same space. Not comparable with Inception FIDs; with this few samples FID is "
            "biased upwards, the real-image row shows the floor for the same count."
        ],
    )
    report.feature_space_tables(
        "Unconditional samples", {names[n]: unconditional[n] for n in names}, experiment.feature_spaces
    )
    conditioning.report_curve(
        run, curves, "restoration", f"PSNR hidden (dB) at mask ratio {experiment.curve.mask_ratio:g}", experiment.curve
    )
    report.text(
        "## Findings (computed from the numbers above)\n\n"
        + "\n".join(_findings(restoration, unconditional, ratios, methods, labels))
    )


def _findings(restoration, unconditional, ratios, methods, labels) -> list[str]:
    lines = []
    compared = [m for m in methods if m != "masked_input"]
    pairs = [
        ("mt_diffusion_repaint", "ddpm_repaint"),
        ("mt_diffusion_repaint", "sdedit"),
        ("mt_diffusion", "sdedit"),
        ("mt_diffusion", "ddpm_repaint"),
        ("mt_diffusion", "masked_input"),
        ("mt_diffusion", "aggregation_only"),
    ]
    for r in ratios:
        measured = restoration[r]
        best_psnr = max(compared, key=lambda m: measured[m]["psnr_masked"])
        best_lpips = min(compared, key=lambda m: measured[m]["perceptual_fmnist_cnn"])
        line = (
            f"- r={r}: best PSNR hidden: {labels[best_psnr]} ({measured[best_psnr]['psnr_masked']:.2f} dB); "
            f"best LPIPS-proxy: {labels[best_lpips]} ({measured[best_lpips]['perceptual_fmnist_cnn']:.3f})."
        )
        for a, b in pairs:
            if a in methods and b in methods:
                psnr = measured[a]["psnr_masked"] - measured[b]["psnr_masked"]
                lpips = measured[a]["perceptual_fmnist_cnn"] - measured[b]["perceptual_fmnist_cnn"]
                line += f" {labels[a]} vs {labels[b]}: PSNR {psnr:+.2f} dB, LPIPS-proxy {lpips:+.3f}."
        lines.append(line)
    mt, ddpm = unconditional["mt_diffusion"], unconditional["plain_ddpm"]
    fid_mt, fid_ddpm = mt["fid_fmnist_cnn"], ddpm["fid_fmnist_cnn"]
    verdict = "lower, better" if fid_mt < fid_ddpm else "higher, worse"
    lines.append(
        f"- Unconditional FID-proxy: MT-Diffusion {fid_mt:.2f} vs plain DDPM {fid_ddpm:.2f} ({verdict} for "
        f"MT-Diffusion by {abs(fid_mt - fid_ddpm):.2f}); precision {mt['precision_fmnist_cnn']:.2f} vs "
        f"{ddpm['precision_fmnist_cnn']:.2f}, recall {mt['recall_fmnist_cnn']:.2f} vs "
        f"{ddpm['recall_fmnist_cnn']:.2f}."
    )
    return lines


def run(config: ml_collections.ConfigDict, run: common.Run) -> None:
    batch = restoration_lib.curve_batch(config)
    models, curves = conditioning.train_with_curve(
        run,
        config,
        "restoration",
        lambda task, model_config: restoration_lib.restoration_metric(task, model_config, batch),
    )
    plain = baselines.plain_ddpm_config(config)
    models["plain_ddpm"] = run.train("plain_ddpm", plain, tasks.make_mt_diffusion_task(plain, name="plain_ddpm"))
    models["reconstruction"] = run.train("reconstruction", config, tasks.make_reconstruction_task(config))
    with run.phase("metrics classifier"):
        classifier = evaluation.metrics_classifier(config)
    restoration = evaluate_restoration(config, run, models, classifier)
    unconditional = evaluate_unconditional(config, run, models, classifier)
    run.report.metrics.update(
        setup={
            "labels": restoration_lib.method_labels(config),
            "sampler": dict(config.experiment.sampler),
            "lpips_proxy": LPIPS_PROXY,
            "fid_proxy": FID_PROXY,
            "lpips_vgg": "not measured (no VGG-16 weights)",
            "classifier": dict(classifier.meta),
        },
        restoration=restoration,
        unconditional=unconditional,
        curves=curves,
    )
    write_report(config, run, restoration, unconditional, curves)


if __name__ == "__main__":
    common.main(NAME, run, check=restoration_lib.check_config)
