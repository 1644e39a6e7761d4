"""Multitask (issue 16): one MT-Diffusion model on several modalities at once, against each task's pairwise model
and single-task baseline, at equal steps per task and at equal total compute.

  python -m experiments.multitask        # the CPU default (configs/multitask.py: Fashion-MNIST)
  python -m experiments.multitask --config=configs/multitask.py:tiny --workdir=/tmp/multitask_tiny
  python -m experiments.multitask --config=configs/multitask.py:full --workdir=workdirs/multitask_full
  python -m experiments.multitask --config=configs/multitask_scenes.py --workdir=workdirs/multitask_scenes
                                         # the scenes variant: image, masked image and segmentation mask

The config's modalities decide the tasks (`TASKS`): a masked image gives restoration, a label label -> image and
image -> label, an embedding embedding -> image, a segmentation mask mask -> image and image -> mask; joint
samples always. Trains (each model in workdir/<name>; the config file says why its settings), every one for
train.steps:
  multitask            MT-Diffusion with the image and every auxiliary modality of the config
  pairwise_<kind>      MT-Diffusion with the image and that modality alone
  plain_ddpm           N = 0 (restoration by RePaint, unconditional samples)
  label_ddpm, embedding_ddpm, segmentation_ddpm
                       conditional DDPMs: the modality seen through its condition path only (weights 'zero', no
                       head)
  classifier, segmenter
                       the same U-Net with the label / segmentation head, trained alone by cross-entropy on clean
                       images
each comparator evaluated at train.steps (equal steps per task) and at its checkpoint at train.steps / (the size
of its set) (equal total compute; `trainer.at_checkpoint`). Then the tasks' evaluations on every model, at the
same inputs, prior noise and sampler (`experiments.task_suite`).
"""

from __future__ import annotations

import math

import ml_collections
import numpy as np

from experiments import baselines, common, evaluation, reporting, trainer
from experiments.task_suite import TaskSuite
from mmdiff_jax import tasks
from mmdiff_jax.data.fashion_mnist import CLASS_NAMES
from mmdiff_jax.modalities import MASK_KEY
from mmdiff_jax.training.config_io import ConfigError

NAME = "multitask"
FID_PROXY = "FID-proxy (Fashion-MNIST CNN features)"
LPIPS_PROXY = "LPIPS-proxy (Fashion-MNIST CNN features)"
# task -> (the auxiliary modality kind it reads, its single-task comparator); its pairwise comparator is the model
# of the image and that modality ('pairwise_<kind>'), the multitask model serves every task. A config runs the
# tasks of its modalities' kinds, and 'joint' (samples with nothing observed) against the pairwise model of the
# first of JOINT_KINDS it has: the generated modality the samples' agreement is measured with.
TASKS = {
    "restoration": ("masked_image", "plain_ddpm"),
    "label_to_image": ("label", "label_ddpm"),
    "embedding_to_image": ("vector", "embedding_ddpm"),
    "image_to_label": ("label", "classifier"),
    "mask_to_image": ("segmentation", "segmentation_ddpm"),
    "image_to_mask": ("segmentation", "segmenter"),
}
JOINT_KINDS = ("label", "segmentation")
CONDITIONAL_DDPMS = {"label_ddpm": "label", "embedding_ddpm": "vector", "segmentation_ddpm": "segmentation"}
PREDICTORS = {"classifier": tasks.make_classifier_task, "segmenter": tasks.make_segmenter_task}
KIND_WORDS = {  # (as the pairwise model's partner, in the report's first sentence)
    "masked_image": ("masked image", "a masked image"),
    "label": ("label", "its class label"),
    "vector": ("embedding", "its 64-d CNN embedding"),
    "segmentation": ("segmentation mask", "its segmentation mask"),
}
SINGLE_TASK_LABELS = {
    "plain_ddpm": "plain DDPM",
    "label_ddpm": "label-conditional DDPM",
    "embedding_ddpm": "embedding-conditional DDPM",
    "segmentation_ddpm": "mask-conditional DDPM",
    "classifier": "classifier (same U-Net)",
    "segmenter": "segmenter (same U-Net)",
}


def kinds(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The kinds of the config's auxiliary modalities, in config order."""
    return tuple(spec["kind"] for spec in config.model.modalities.values())


def comparators(config: ml_collections.ConfigDict) -> dict[str, tuple[str, str]]:
    """task -> (pairwise model, single-task model), for the tasks of the config's modalities (`TASKS`) and
    'joint'."""
    present = kinds(config)
    found = {task: (f"pairwise_{kind}", single) for task, (kind, single) in TASKS.items() if kind in present}
    joint = next(kind for kind in JOINT_KINDS if kind in present)
    return {**found, "joint": (f"pairwise_{joint}", "plain_ddpm")}


def comparator_sets(config: ml_collections.ConfigDict) -> dict[str, tuple[str, ...]]:
    """'pairwise' / 'single_task' -> the names of that set's comparators (each set shares the compute)."""
    single = tuple(dict.fromkeys(single for _, single in comparators(config).values()))
    return {"pairwise": tuple(f"pairwise_{kind}" for kind in kinds(config)), "single_task": single}


# ----------------------------------------------------------------------------------------------- the models
def only_modality(config: ml_collections.ConfigDict, kind: str, conditional_ddpm: bool = False):
    """`config` with its `kind` modality alone (the pairwise model), or (`conditional_ddpm`) that modality with
    weight schedule 'zero' and no head: a conditional DDPM that sees it through its condition path only."""
    name = tasks.modality_name(config, kind)
    derived = trainer.copy_config(config)
    spec = dict(config.model.modalities[name])
    if conditional_ddpm:
        spec.update(weight_schedule=("zero", 0.0), head="none")
    derived.model.modalities = {name: spec}
    return derived


def comparator(config: ml_collections.ConfigDict, name: str):
    """(config, task) of comparator `name` (`comparators`), trained for train.steps with its checkpoint at its
    equal-total-compute share of them kept too (`matched_steps`)."""
    if name.startswith("pairwise_"):
        derived = only_modality(config, name[len("pairwise_") :])
    elif name == "plain_ddpm":
        derived = baselines.plain_ddpm_config(config)
    elif name in PREDICTORS:
        derived = trainer.copy_config(config)
    else:
        derived = only_modality(config, CONDITIONAL_DDPMS[name], True)
    share = matched_steps(config)["total_compute"][name]
    derived.train.update(checkpoint_every=0, checkpoint_steps=(share,), keep_checkpoints=2)  # share and last
    task = PREDICTORS[name](derived) if name in PREDICTORS else tasks.make_mt_diffusion_task(derived)
    return derived, task


def matched_steps(config: ml_collections.ConfigDict) -> dict[str, dict[str, int]]:
    """matching -> comparator -> steps: every one at train.steps, or its set's share of them."""
    steps = config.train.steps
    shares = {name: steps // len(names) for names in comparator_sets(config).values() for name in names}
    return {"steps_per_task": dict.fromkeys(shares, steps), "total_compute": shares}


def check_config(config: ml_collections.ConfigDict) -> None:
    """The config's modalities have tasks, and those that need the Fashion-MNIST CNN have it; the
    equal-total-compute rows read a comparator's checkpoint at its share of train.steps: that state is the state
    of a run of that many steps only if nothing in the run depends on its length."""
    present, known = kinds(config), {kind for kind, _ in TASKS.values()}
    if set(present) - known or not set(present) & set(JOINT_KINDS):
        raise ConfigError(
            f"config.model.modalities has kinds {list(present)}: the multitask experiment evaluates {sorted(known)} "
            f"and needs one of {list(JOINT_KINDS)} (the joint samples' agreement)"
        )
    if {"label", "vector"} & set(present) and "fmnist_cnn" not in config.experiment.feature_spaces:
        raise ConfigError(
            "config.experiment.feature_spaces: the label and embedding tasks are judged by the Fashion-MNIST CNN; "
            "include 'fmnist_cnn'"
        )
    if config.optim.schedule != "constant":
        raise ConfigError(
            f"config.optim.schedule {config.optim.schedule!r}: the multitask comparison needs 'constant' (a "
            "decaying schedule would make a checkpoint at step k differ from a k-step run)"
        )
    multiple = math.lcm(*map(len, comparator_sets(config).values()))
    for name, share in matched_steps(config)["total_compute"].items():
        if share < 1 or config.train.steps % share or share <= config.optim.warmup_steps:
            raise ConfigError(
                f"config.train.steps {config.train.steps}: {name}'s equal-compute share {share} must divide it "
                f"and exceed optim.warmup_steps ({config.optim.warmup_steps}); use a multiple of {multiple}"
            )


def train_all(config, run: common.Run) -> dict[str, trainer.Trained]:
    """'multitask' and every comparator at each matched step count (its checkpoint there), keyed
    '<name>_<steps>'."""
    models = {"multitask": run.train("multitask", config, run.task)}
    for name, share in matched_steps(config)["total_compute"].items():
        full = run.train(name, *comparator(config, name))
        models[f"{name}_{config.train.steps}"] = full
        models[f"{name}_{share}"] = trainer.at_checkpoint(full, share)
    return models


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate(config, run: common.Run, models, classifier) -> dict:
    """task -> matching -> role ('multitask', 'pairwise', 'single_task') -> scores, and the real-image floor."""
    evaluator = TaskSuite(config, run, classifier)
    steps = matched_steps(config)
    cache: dict[tuple[str, str], dict] = {}

    def scores(task: str, key: str) -> dict:
        if (task, key) not in cache:
            with run.phase(f"{task}: {key}"):
                cache[task, key] = getattr(evaluator, task)(models[key])
        return cache[task, key]

    results = {}
    for task, (pairwise, single) in comparators(config).items():
        results[task] = {
            matching: {
                "multitask": scores(task, "multitask"),
                "pairwise": scores(task, f"{pairwise}_{counts[pairwise]}"),
                "single_task": scores(task, f"{single}_{counts[single]}"),
            }
            for matching, counts in steps.items()
        }
    if classifier is not None:
        results["real_train_images"] = {"fid": evaluator.fid(evaluator.real)}
    _grid(config, run, models, evaluator)
    return results


def _grid(config, run: common.Run, models, evaluator: TaskSuite) -> None:
    """The multitask model's outputs: what it generates from each observed modality, joint samples (with their
    generated mask), restoration at the largest mask ratio."""
    count, name, primary = config.experiment.grid_images, models["multitask"].name, config.model.primary
    outputs = evaluator.images
    present, rows, words = kinds(config), [], []
    if "label" in present:
        names = [CLASS_NAMES[i].split("/")[0] for i in evaluator.labels[0][:count]]
        rows.append(("multitask: label -> image", outputs[name, "label_to_image"], names))
        words.append("samples for the labels written below")
    if "segmentation" in present:
        given = evaluator.test[0][evaluator.names["segmentation"]][:count]
        rows.append(
            ("given mask", reporting.overlay_classes(np.full_like(outputs[name, "mask_to_image"], -1.0), given))
        )
        rows.append(("multitask: mask -> image", outputs[name, "mask_to_image"]))
        words.append("samples for the test masks drawn above them")
    rows.append(("multitask: joint sample", outputs[name, "joint"]))
    if "segmentation" in present:
        rows.append(("  + its mask", reporting.overlay_classes(outputs[name, "joint"], outputs[name, "joint_mask"])))
        words.append("joint samples (nothing observed, their generated masks drawn on them)")
    else:
        words.append("joint samples (nothing observed)")
    if "masked_image" in present:
        ratio = max(config.experiment.restoration.mask_ratios)
        batch = {key: value[:count] for key, value in evaluator.masked[ratio][0].items()}
        rows += [
            ("masked input", reporting.tint_hidden(batch[primary], batch[MASK_KEY])),
            ("multitask: restored", outputs[name, f"restoration {ratio}"]),
            ("truth", batch[primary]),
        ]
        words.append(f"and restoration at mask ratio {ratio} (hidden pixels blue; known pixels pasted back)")
    run.report.image(
        "samples",
        reporting.labelled_grid(rows),
        f"The multitask model: {', '.join(words)}. {evaluation.describe_sampler(config.experiment.sampler)}.",
        publish=True,
    )


# ----------------------------------------------------------------------------------------------- report
def metric_rows(config) -> list[tuple[str, str, tuple, bool]]:
    """(task, metric label, path into a scores dict, higher is better) for every row group of the table, for the
    config's tasks (a row whose multitask score is absent, such as a metric the config does not compute, is left
    out of the table)."""
    experiment, present = config.experiment, comparators(config)
    rows = []
    for ratio in experiment.restoration.mask_ratios if "restoration" in present else ():
        rows += [
            ("restoration", f"PSNR hidden, r = {ratio} (dB)", (str(ratio), "psnr_masked"), True),
            ("restoration", f"SSIM hidden, r = {ratio}", (str(ratio), "ssim_masked"), True),
            ("restoration", f"{LPIPS_PROXY}, r = {ratio}", (str(ratio), "perceptual_fmnist_cnn"), False),
        ]
    rows += [
        ("label_to_image", "label -> image agreement", ("agreement",), True),
        ("label_to_image", f"label -> image {FID_PROXY}", ("fid",), False),
        ("embedding_to_image", "embedding -> image class agreement", ("class_agreement",), True),
        ("embedding_to_image", "embedding -> image cosine", ("cosine",), True),
        ("mask_to_image", "mask -> image foreground IoU", ("foreground_iou",), True),
    ]
    if "image_to_label" in present:
        level = experiment.classification.noise_level
        rows.append(("image_to_label", f"image -> label accuracy (t = {level})", ("accuracy",), True))
    if "image_to_mask" in present:
        level = experiment.segmentation.noise_level
        rows += [
            ("image_to_mask", f"image -> mask mIoU (t = {level})", ("miou",), True),
            ("image_to_mask", f"image -> mask pixel accuracy (t = {level})", ("pixel_accuracy",), True),
        ]
    rows += [
        ("joint", f"joint samples {FID_PROXY}", ("fid",), False),
        ("joint", "joint label agreement", ("label_agreement",), True),
        ("joint", "joint image-mask foreground IoU", ("mask_agreement",), True),
    ]
    return [row for row in rows if row[0] in present]


def _cell(value: float | None, steps: int | None) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" + ("" if steps is None else f" ({steps} steps)")


def _get(scores: dict, path: tuple):
    for key in path:
        scores = scores.get(key, {}) if isinstance(scores, dict) else {}
    return scores if isinstance(scores, float) else None


def table_notes(config, results: dict) -> list[str]:
    """The table's notes: which way is better, the FID-proxy's floor, what each single-task row is."""
    notes = ["Higher is better for PSNR, SSIM, agreements, accuracy, cosine, IoU; lower for FID-proxy and LPIPS-proxy."]
    if "real_train_images" in results:
        generation = config.experiment.generation
        notes.append(
            f"{FID_PROXY} of {generation.num_samples} samples against {generation.num_reference} test images: "
            f"biased upwards at this count; real training images score {results['real_train_images']['fid']:.2f} "
            "(the floor)."
        )
    else:
        notes.append(
            "No FID-proxy: the Fashion-MNIST CNN reads single centred items, not scenes. Foreground IoU: the lit "
            "pixels (above each image's Otsu threshold) against the mask's non-background pixels, model-free."
        )
    singles = {
        task.replace("_", " ").replace(" to ", " -> "): SINGLE_TASK_LABELS[single]
        for task, (_, single) in comparators(config).items()
    }
    notes.append(
        "Single-task rows: "
        + "; ".join(f"{task} by the {label}" for task, label in singles.items())
        + ". The plain DDPM restores by RePaint; its joint samples come with no generated modality to agree with."
        + "".join(
            f" The {name} reads clean images." for name in PREDICTORS if name in comparator_sets(config)["single_task"]
        )
    )
    return notes


def write_report(config, run: common.Run, results: dict) -> None:
    steps, total, sets = matched_steps(config), config.train.steps, comparator_sets(config)
    shares = {role: f"{len(names)} x {steps['total_compute'][names[0]]}" for role, names in sets.items()}
    words = [KIND_WORDS[kind][1] for kind in kinds(config)]
    modalities = " and ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words)
    run.report.text(
        f"One MT-Diffusion model trained on the image ({evaluation.data_name(config)}) with {modalities} at once (the "
        "multitask model), against the model each pairwise experiment trains (the "
        "image and one modality) and each task's single-task baseline: same U-Net, batch, optimizer, data order and "
        f"sampler ({evaluation.describe_sampler(config.experiment.sampler)}, the conditional sampler without "
        f"guidance for every model), EMA parameters (decay {config.optim.ema_decay:g}), constant learning rate. "
        "Two compute matchings: **equal steps per task** (every model "
        f"{total} steps: the multitask model trained each task for {total} steps at once) and **equal total "
        f"compute** (the multitask model's {total} steps against the pairwise set's {shares['pairwise']} and the "
        f"single-task set's {shares['single_task']})."
    )
    headers = ["task", "metric", "model", f"equal steps per task ({total} each)", "equal total compute"]
    table, findings = [], []
    for task, label, path, higher in metric_rows(config):
        pairwise, single = comparators(config)[task]
        roles = {
            "multitask": (f"multitask ({total})", "multitask"),
            "pairwise": (f"pairwise: image + {KIND_WORDS[pairwise[len('pairwise_') :]][0]}", pairwise),
            "single_task": (SINGLE_TASK_LABELS[single], single),
        }
        values = {matching: {role: _get(results[task][matching][role], path) for role in roles} for matching in steps}
        if values["steps_per_task"]["multitask"] is None:
            continue
        for role, (text, name) in roles.items():
            cells = [_cell(values[m][role], None if role == "multitask" else steps[m][name]) for m in steps]
            table.append([task.replace("_", " "), label, text] + cells)
        for matching in steps:
            mt = values[matching]["multitask"]
            for role in ("pairwise", "single_task"):
                other = values[matching][role]
                if other is not None:
                    outcome = "tie" if mt == other else "better" if (mt > other) == higher else "worse"
                    findings.append((matching, role, outcome, f"{label} ({mt:.3g} vs {other:.3g})"))
    run.report.table(
        "The multitask model against each task's pairwise model and single-task baseline",
        headers,
        table,
        notes=table_notes(config, results),
    )
    lines = []
    for matching in steps:
        for role in ("pairwise", "single_task"):
            rows = [f for f in findings if f[:2] == (matching, role)]
            by = {outcome: [f[3] for f in rows if f[2] == outcome] for outcome in ("better", "worse", "tie")}
            lines.append(
                f"- {matching.replace('_', ' ')}, multitask vs {role.replace('_', '-')}: better on "
                f"{len(by['better'])} of {len(rows)} metrics, worse on {len(by['worse'])}, tied on {len(by['tie'])}."
                + "".join(f" {outcome.capitalize()}: {'; '.join(items)}." for outcome, items in by.items() if items)
            )
    run.report.text("## Where sharing helps and where it hurts (computed from the table)\n\n" + "\n".join(lines))


def run(config: ml_collections.ConfigDict, run: common.Run) -> None:
    classifier = None
    if config.experiment.feature_spaces:  # the judge and FID-proxy features (not on scenes: configs say why)
        with run.phase("metrics classifier"):
            classifier = evaluation.metrics_classifier(config)
    models = train_all(config, run)
    results = evaluate(config, run, models, classifier)
    setup = {"sampler": dict(config.experiment.sampler), "steps": matched_steps(config)}
    if classifier is not None:
        setup.update(fid_proxy=FID_PROXY, judge=dict(classifier.meta))
    run.report.metrics.update(setup=setup, **results)
    write_report(config, run, results)


if __name__ == "__main__":
    common.main(NAME, run, check=check_config)
