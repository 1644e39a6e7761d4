"""Multitask (issue 16): one MT-Diffusion model on several modalities at once, against each task's pairwise model
and single-task baseline, at equal steps per task and at equal total compute.

  python -m experiments.multitask        # the CPU default (configs/multitask.py)
  python -m experiments.multitask --config=configs/multitask.py:tiny --workdir=/tmp/multitask_tiny
  python -m experiments.multitask --config=configs/multitask.py:full --workdir=workdirs/multitask_full

Trains (each model in workdir/<name>; configs/multitask.py says why these settings), every one for train.steps:
  multitask            MT-Diffusion with the image and every auxiliary modality of the config (train.steps)
  pairwise_<modality>  MT-Diffusion with the image and that modality alone
  plain_ddpm           N = 0 (restoration by RePaint, unconditional samples)
  label_ddpm, embedding_ddpm
                       conditional DDPMs: the modality seen through ADM's class path (weights 'zero', no head)
  classifier           the same U-Net trained alone by cross-entropy on clean images
each comparator evaluated at train.steps (equal steps per task) and at its checkpoint at train.steps / (the size
of its set) (equal total compute; `trainer.at_checkpoint`). Then the pairwise experiments' five evaluations on
every model, at the same inputs, prior noise and sampler (`experiments.task_suite`): restoration, label -> image,
image -> label, embedding -> image and joint samples.
"""

from __future__ import annotations

import ml_collections

from experiments import baselines, common, evaluation, reporting, trainer
from experiments.task_suite import KINDS, TaskSuite
from mmdiff_jax import tasks
from mmdiff_jax.data.fashion_mnist import CLASS_NAMES
from mmdiff_jax.modalities import MASK_KEY
from mmdiff_jax.training.config_io import ConfigError

NAME = "multitask"
FID_PROXY = "FID-proxy (Fashion-MNIST CNN features)"
LPIPS_PROXY = "LPIPS-proxy (Fashion-MNIST CNN features)"
PAIRWISE = KINDS  # the auxiliary kinds, one pairwise model each
SINGLE_TASK = ("plain_ddpm", "label_ddpm", "embedding_ddpm", "classifier")
# task -> (pairwise model, single-task model); the multitask model serves every task.
COMPARATORS = {
    "restoration": ("pairwise_masked_image", "plain_ddpm"),
    "label_to_image": ("pairwise_label", "label_ddpm"),
    "image_to_label": ("pairwise_label", "classifier"),
    "embedding_to_image": ("pairwise_vector", "embedding_ddpm"),
    "joint": ("pairwise_label", "plain_ddpm"),
}
PAIRWISE_LABELS = {
    "pairwise_masked_image": "pairwise: image + masked image",
    "pairwise_label": "pairwise: image + label",
    "pairwise_vector": "pairwise: image + embedding",
}
SINGLE_TASK_LABELS = {
    "plain_ddpm": "plain DDPM",
    "label_ddpm": "label-conditional DDPM",
    "embedding_ddpm": "embedding-conditional DDPM",
    "classifier": "classifier (same U-Net)",
}


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
    """(config, task) of comparator `name` (`COMPARATORS`), trained for train.steps with its checkpoint at its
    equal-total-compute share of them kept too (`matched_steps`)."""
    if name.startswith("pairwise_"):
        derived = only_modality(config, name[len("pairwise_") :])
    elif name == "plain_ddpm":
        derived = baselines.plain_ddpm_config(config)
    elif name == "classifier":
        derived = trainer.copy_config(config)
    else:
        derived = only_modality(config, {"label_ddpm": "label", "embedding_ddpm": "vector"}[name], True)
    share = matched_steps(config)["total_compute"][name]
    derived.train.update(checkpoint_every=0, checkpoint_steps=(share,), keep_checkpoints=2)  # share and last
    task = tasks.make_classifier_task(derived) if name == "classifier" else tasks.make_mt_diffusion_task(derived)
    return derived, task


def matched_steps(config: ml_collections.ConfigDict) -> dict[str, dict[str, int]]:
    """matching -> comparator -> steps: every one at train.steps, or its set's share of them."""
    steps = config.train.steps
    shares = {name: steps // len(PAIRWISE) for name in ("pairwise_" + kind for kind in PAIRWISE)}
    shares.update({name: steps // len(SINGLE_TASK) for name in SINGLE_TASK})
    return {"steps_per_task": dict.fromkeys(shares, steps), "total_compute": shares}


def check_config(config: ml_collections.ConfigDict) -> None:
    """The equal-total-compute rows read a comparator's checkpoint at its share of train.steps: that state is
    the state of a run of that many steps only if nothing in the run depends on its length."""
    if config.optim.schedule != "constant":
        raise ConfigError(
            f"config.optim.schedule {config.optim.schedule!r}: the multitask comparison needs 'constant' (a "
            "decaying schedule would make a checkpoint at step k differ from a k-step run)"
        )
    for name, share in matched_steps(config)["total_compute"].items():
        if share < 1 or config.train.steps % share or share <= config.optim.warmup_steps:
            raise ConfigError(
                f"config.train.steps {config.train.steps}: {name}'s equal-compute share {share} must divide it "
                f"and exceed optim.warmup_steps ({config.optim.warmup_steps}); use a multiple of 12"
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
    for task, (pairwise, single) in COMPARATORS.items():
        results[task] = {
            matching: {
                "multitask": scores(task, "multitask"),
                "pairwise": scores(task, f"{pairwise}_{counts[pairwise]}"),
                "single_task": scores(task, f"{single}_{counts[single]}"),
            }
            for matching, counts in steps.items()
        }
    results["real_train_images"] = {"fid": evaluator.fid(evaluator.real)}
    _grid(config, run, models, evaluator)
    return results


def _grid(config, run: common.Run, models, evaluator: TaskSuite) -> None:
    count, name, primary = config.experiment.grid_images, models["multitask"].name, config.model.primary
    ratio = max(config.experiment.restoration.mask_ratios)
    batch = {key: value[:count] for key, value in evaluator.masked[ratio][0].items()}
    rows = [
        (
            "multitask: label -> image",
            evaluator.images[name, "label_to_image"],
            [CLASS_NAMES[i].split("/")[0] for i in evaluator.labels[0][:count]],
        ),
        ("multitask: joint sample", evaluator.images[name, "joint"]),
        ("masked input", reporting.tint_hidden(batch[primary], batch[MASK_KEY])),
        ("multitask: restored", evaluator.images[name, f"restoration {ratio}"]),
        ("truth", batch[primary]),
    ]
    run.report.image(
        "samples",
        reporting.labelled_grid(rows),
        "The multitask model: samples for the labels written below, joint samples (nothing observed), and "
        f"restoration at mask ratio {ratio} (hidden pixels blue; known pixels pasted back). "
        f"{evaluation.describe_sampler(config.experiment.sampler)}.",
        publish=True,
    )


# ----------------------------------------------------------------------------------------------- report
def metric_rows(config) -> list[tuple[str, str, tuple, bool]]:
    """(task, metric label, path into a scores dict, higher is better) for every row group of the table."""
    rows = []
    for ratio in config.experiment.restoration.mask_ratios:
        rows.append(("restoration", f"PSNR hidden, r = {ratio} (dB)", (str(ratio), "psnr_masked"), True))
        rows.append(("restoration", f"{LPIPS_PROXY}, r = {ratio}", (str(ratio), "perceptual_fmnist_cnn"), False))
    rows += [
        ("label_to_image", "label -> image agreement", ("agreement",), True),
        ("label_to_image", f"label -> image {FID_PROXY}", ("fid",), False),
        (
            "image_to_label",
            f"image -> label accuracy (t = {config.experiment.classification.noise_level})",
            ("accuracy",),
            True,
        ),
        ("embedding_to_image", "embedding -> image class agreement", ("class_agreement",), True),
        ("embedding_to_image", "embedding -> image cosine", ("cosine",), True),
        ("joint", f"joint samples {FID_PROXY}", ("fid",), False),
        ("joint", "joint label agreement", ("label_agreement",), True),
    ]
    return rows


def _cell(value: float | None, steps: int | None) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" + ("" if steps is None else f" ({steps} steps)")


def _get(scores: dict, path: tuple):
    for key in path:
        scores = scores.get(key, {}) if isinstance(scores, dict) else {}
    return scores if isinstance(scores, float) else None


def write_report(config, run: common.Run, results: dict) -> None:
    steps, total = matched_steps(config), config.train.steps
    short = steps["total_compute"]
    pairwise_short, single_short = short["pairwise_label"], short["plain_ddpm"]
    run.report.text(
        "One MT-Diffusion model trained on the image with a masked image, its class label and its 64-d CNN "
        "embedding at once (the multitask model), against the model each pairwise experiment trains (the image "
        "and one modality) and each task's single-task baseline: same U-Net, batch, optimizer, data order and "
        f"sampler ({evaluation.describe_sampler(config.experiment.sampler)}, the conditional sampler without "
        f"guidance for every model), EMA parameters (decay {config.optim.ema_decay:g}), constant learning rate. "
        "Two compute matchings: **equal steps per task** (every model "
        f"{total} steps: the multitask model trained each task for {total} steps at once) and **equal total "
        f"compute** (the multitask model's {total} steps against the pairwise set's {len(PAIRWISE)} x "
        f"{pairwise_short} and the single-task set's {len(SINGLE_TASK)} x {single_short})."
    )
    headers = ["task", "metric", "model", f"equal steps per task ({total} each)", "equal total compute"]
    table, findings = [], []
    for task, label, path, higher in metric_rows(config):
        pairwise, single = COMPARATORS[task]
        roles = {
            "multitask": (f"multitask ({total})", "multitask"),
            "pairwise": (PAIRWISE_LABELS[pairwise], pairwise),
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
        notes=[
            "Arrows: PSNR, agreements, accuracy and cosine higher is better; FID-proxy and LPIPS-proxy lower.",
            f"{FID_PROXY} of {config.experiment.generation.num_samples} samples against "
            f"{config.experiment.generation.num_reference} test images: biased upwards at this count; real "
            f"training images score {results['real_train_images']['fid']:.2f} (the floor).",
            "Single-task rows: restoration and joint samples by the plain DDPM (RePaint; unconditional samples, "
            "which have no label), label -> image and embedding -> image by the conditional DDPMs, image -> label "
            "by the classifier on clean images.",
        ],
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
    with run.phase("metrics classifier"):
        classifier = evaluation.metrics_classifier(config)
    models = train_all(config, run)
    results = evaluate(config, run, models, classifier)
    run.report.metrics.update(
        setup={
            "sampler": dict(config.experiment.sampler),
            "fid_proxy": FID_PROXY,
            "judge": dict(classifier.meta),
            "steps": matched_steps(config),
        },
        **results,
    )
    write_report(config, run, results)


if __name__ == "__main__":
    common.main(NAME, run, check=check_config)
