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
of its set) (equal total compute; `trainer.at_checkpoint`). Then the pairwise experiments' evaluations, every model at the same inputs, prior noise and sampler:
  restoration         PSNR on the hidden pixels and LPIPS-proxy at each mask ratio (masked image observed; the
                      plain DDPM re-imposes the known pixels); known pixels pasted back
  label_to_image      how often the Fashion-MNIST CNN judge puts the sample in the given class (balanced labels)
  image_to_label      accuracy of the label head at z_t (t = classification.noise_level) / the classifier
  embedding_to_image  how often the judge puts the sample in the judge's class of the image the test embedding
                      came from; cosine between the given embedding and the sample's (the embeddings' recipe)
  joint               FID-proxy of unconditional samples; agreement of the generated label with the judge's
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import baselines, common, evaluation, reporting, trainer
from experiments.image_embedding import embedding_scores, make_embed_fn
from experiments.joint_image_label import balanced_labels
from mmdiff_jax import sampling, tasks
from mmdiff_jax.data.fashion_mnist import CLASS_NAMES
from mmdiff_jax.metrics import agreement
from mmdiff_jax.modalities import MASK_KEY
from mmdiff_jax.training.config_io import ConfigError

NAME = "multitask"
FID_PROXY = "FID-proxy (Fashion-MNIST CNN features)"
LPIPS_PROXY = "LPIPS-proxy (Fashion-MNIST CNN features)"
PAIRWISE = ("masked_image", "label", "vector")  # the auxiliary kinds, one pairwise model each
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
    derived.train.checkpoint_every, derived.train.keep_checkpoints = share, config.train.steps // share
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
class Evaluator:
    """The five tasks' evaluations of a trained model, on inputs drawn once (the same for every model)."""

    def __init__(self, config, run: common.Run, classifier):
        self.config, self.run, self.classifier = config, run, classifier
        self.images: dict[tuple[str, str], np.ndarray] = {}  # (model, task) -> the grid's outputs
        self.programs: dict[tuple[int, str], Any] = {}  # (id of the task, kind) -> a jit-compiled function
        experiment = config.experiment
        self.sampler, self.seed, primary = evaluation.sampler_options(experiment.sampler), experiment.seed, "image"
        self.names = {kind: tasks.modality_name(config, kind) for kind in PAIRWISE}
        section = experiment.generation
        with run.phase("evaluation inputs"):
            self.masked = {
                ratio: evaluation.eval_batches(
                    config,
                    experiment.restoration.num_images,
                    experiment.restoration.batch_size,
                    mask_ratio=float(ratio),
                    transform_seed=self.seed,
                )
                for ratio in experiment.restoration.mask_ratios
            }
            self.test = evaluation.eval_batches(config, section.num_samples, section.batch_size)
            self.labels = [
                balanced_labels(section.num_samples)[i : i + section.batch_size]
                for i in range(0, section.num_samples, section.batch_size)
            ]
            self.reference = evaluation.reference_features(config, section.num_reference, classifier)
            train = evaluation.eval_batches(config, section.num_samples, section.batch_size, split="train")
            self.real = np.concatenate([b[primary] for b in train])
            statistics = evaluation.eval_batches(
                config, section.num_statistics, min(section.num_statistics, 1000), split="train"
            )
            self.embed = make_embed_fn(classifier, np.concatenate([b[primary] for b in statistics]))
            self.source_class = self.judge(np.concatenate([b[primary] for b in self.test]))
            section = experiment.classification
            self.classify = evaluation.eval_batches(config, section.num_images, section.batch_size)

    def judge(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.classifier.predict(images))

    def fid(self, images: np.ndarray) -> float:
        specs = self.config.experiment.generation.metrics
        scores = evaluation.evaluate_metrics(specs, [{"sample": images}], self.classifier, self.reference)
        return scores["fid_fmnist_cnn"]

    def _program(self, trained, kind: str, make):
        """`make()` once per network and kind: a comparator's two checkpoints share the compiled program."""
        key = (id(trained.task), kind)
        if key not in self.programs:
            self.programs[key] = make()
        return self.programs[key]

    def _sample(self, trained, given, name=None):
        sample = self._program(
            trained, "sample", lambda: sampling.make_sample_fn(trained.model, trained.schedule, **self.sampler)
        )
        observe = (lambda values: {name: values}) if name else (lambda values: None)
        return evaluation.map_batches(
            lambda values, rng: sample(trained.params, rng, observe(values), batch_size=len(values)),
            given,
            seed=self.seed,
        )

    def _keep(self, trained, task: str, images: np.ndarray) -> np.ndarray:
        """Keeps the first images of a task's outputs for the grid."""
        self.images[trained.name, task] = images[: self.config.experiment.grid_images]
        return images

    def restoration(self, trained) -> dict:
        masked = self.names["masked_image"]
        observe = masked if any(m.name == masked for m in trained.model.modalities) else None
        restore = self._program(
            trained,
            "restore",
            lambda: sampling.make_restore_fn(
                trained.model, trained.schedule, observe, repaint=observe is None, **self.sampler
            ),
        )
        scores = {}
        for ratio, batches in self.masked.items():
            truth = np.concatenate([b["image"] for b in batches])
            mask = np.concatenate([b[MASK_KEY] for b in batches])
            restored = evaluation.map_batches(
                lambda b, rng: restore(trained.params, b[masked], b[MASK_KEY], rng).image, batches, seed=self.seed
            )
            restored = self._keep(trained, f"restoration {ratio}", mask * truth + (1.0 - mask) * restored)
            scores[str(ratio)] = evaluation.evaluate_metrics(
                self.config.experiment.restoration.metrics,
                [{"image": truth, "sample": restored, "mask": mask}],
                self.classifier,
            )
        return scores

    def label_to_image(self, trained) -> dict:
        images = self._keep(trained, "label_to_image", self._sample(trained, self.labels, self.names["label"]).image)
        return {
            "agreement": agreement.accuracy(self.judge(images), np.concatenate(self.labels)),
            "fid": self.fid(images),
        }

    def embedding_to_image(self, trained) -> dict:
        name = self.names["vector"]
        given = np.concatenate([b[name] for b in self.test])
        images = self._sample(trained, [b[name] for b in self.test], name).image
        return embedding_scores(given, self.embed(images), self.source_class, self.judge(images))

    def image_to_label(self, trained) -> dict:
        truth = np.concatenate([b[self.names["label"]] for b in self.classify])
        if trained.schedule is None:  # the classifier
            predict = self._program(
                trained,
                "classify",
                lambda: jax.jit(lambda params, image: jnp.argmax(trained.model.apply({"params": params}, image), -1)),
            )
            predicted = evaluation.map_batches(
                lambda b, rng: predict(trained.params, b["image"]), self.classify, seed=0
            )
        else:
            t = int(self.config.experiment.classification.noise_level)
            classify = self._program(
                trained,
                "classify",
                lambda: sampling.make_classify_fn(trained.model, trained.schedule, self.names["label"]),
            )
            predicted = evaluation.map_batches(
                lambda b, rng: classify(trained.params, b["image"], rng, t=t)["class_ids"],
                self.classify,
                seed=self.seed,
            )
        return {"accuracy": agreement.accuracy(predicted, truth)}

    def joint(self, trained) -> dict:
        samples = self._sample(trained, self.labels)
        scores = {"fid": self.fid(self._keep(trained, "joint", samples.image))}
        label = samples.outputs.get(self.names["label"])
        if label is not None:
            scores["label_agreement"] = agreement.label_agreement(label["class_ids"], self.judge(samples.image))
        return scores


def evaluate(config, run: common.Run, models, classifier) -> dict:
    """task -> matching -> role ('multitask', 'pairwise', 'single_task') -> scores, and the real-image floor."""
    evaluator = Evaluator(config, run, classifier)
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


def _grid(config, run: common.Run, models, evaluator: Evaluator) -> None:
    count, name = config.experiment.grid_images, models["multitask"].name
    ratio = max(config.experiment.restoration.mask_ratios)
    batch = {key: value[:count] for key, value in evaluator.masked[ratio][0].items()}
    rows = [
        (
            "multitask: label -> image",
            evaluator.images[name, "label_to_image"],
            [CLASS_NAMES[i].split("/")[0] for i in evaluator.labels[0][:count]],
        ),
        ("multitask: joint sample", evaluator.images[name, "joint"]),
        ("masked input", reporting.tint_hidden(batch["image"], batch[MASK_KEY])),
        ("multitask: restored", evaluator.images[name, f"restoration {ratio}"]),
        ("truth", batch["image"]),
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
        "guidance for every model), raw parameters. Two compute matchings: **equal steps per task** (every model "
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
                    better = mt > other if higher else mt < other
                    findings.append((task, label, matching, role, "helps" if better else "hurts", mt, other))
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
            rows = [f for f in findings if f[2] == matching and f[3] == role]
            helps = [f"{f[1]} ({f[5]:.3g} vs {f[6]:.3g})" for f in rows if f[4] == "helps"]
            hurts = [f"{f[1]} ({f[5]:.3g} vs {f[6]:.3g})" for f in rows if f[4] == "hurts"]
            lines.append(
                f"- {matching.replace('_', ' ')}, multitask vs {role.replace('_', '-')}: better on "
                f"{len(helps)} of {len(rows)} metrics"
                + (f": {'; '.join(helps)}" if helps else "")
                + (f". Worse on {'; '.join(hurts)}" if hurts else "")
                + "."
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
