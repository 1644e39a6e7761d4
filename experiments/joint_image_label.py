"""Image + class label (issue 7): joint generation, label -> image and image -> label with one MT-Diffusion model.

  python -m experiments.joint_image_label        # the CPU default
  python -m experiments.joint_image_label --config.preset=full --workdir=workdirs/joint_image_label_full
  python -m experiments.joint_image_label --config=configs/joint_image_label.py:tiny --workdir=/tmp/jil_tiny
(configs/joint_image_label.py; --workdir default workdirs/joint_image_label.)

Trains, at the same budget (steps, batch, optimizer, EMA) and backbone:
  mt_diffusion            MT-Diffusion with the image x_0 and the label x_1 (learned table encoder, 'bump' weights,
                          an MLP label head on the U-Net's bottleneck)
  class_conditional_ddpm  the U-Net with ADM's class embedding (`UNetConfig.num_classes`), eps-MSE on (x, y)
  classifier              the same U-Net (t = 0) with the same MLP head on its bottleneck, cross-entropy on clean images
Then measures (config section `experiment`), with the project's Fashion-MNIST CNN as the independent judge:
  joint         label agreement of joint samples (generated label vs the CNN's class of the generated image),
                FID-proxy of the joint images
  label->image  agreement of the CNN's class of label-conditioned samples with the given label, FID-proxy,
                for MT-Diffusion (label observed) and the class-conditional DDPM, the same labels and prior noise
  image->label  test accuracy of MT-Diffusion's label head at noise level t (z_t from the test image) and of the
                stand-alone classifier; the CNN judge's own accuracy as a reference
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import common
from mmdiff_jax import diffusion, sampling
from mmdiff_jax.data.fashion_mnist import CLASS_NAMES
from mmdiff_jax.metrics import agreement
from mmdiff_jax.modalities import modality_schedule
from mmdiff_jax.models.decoders import make_head
from mmdiff_jax.models.unet import UNet, UNetConfig
from mmdiff_jax.training import Objective, config_io

NAME = "joint_image_label"
FID_PROXY = "FID-proxy (Fashion-MNIST CNN features)"
Array = jax.Array


# ----------------------------------------------------------------------------------------------- baselines' networks
class ClassConditionalDenoiser(nn.Module):
    """ADM's class-conditional DDPM: eps_theta(z_t, t, y) with y added to the time embedding."""

    unet: UNetConfig
    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z_t: Array, t: Array, labels: Array, *, train: bool = False) -> Array:
        output = UNet(self.unet, out_channels=self.channels, dtype=self.dtype)(z_t, t, labels, train=train)
        return output.output.astype(jnp.float32)


class BackboneClassifier(nn.Module):
    """The U-Net (t = 0) with MT-Diffusion's label head (MLP on the pooled bottleneck): image -> logits [B, K]."""

    unet: UNetConfig
    channels: int
    num_classes: int
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image: Array, *, train: bool = False) -> Array:
        steps = jnp.zeros(image.shape[:1], jnp.int32)
        output = UNet(self.unet, out_channels=self.channels, dtype=self.dtype)(image, steps, train=train)
        head = make_head("mlp", self.num_classes, self.hidden, num_groups=self.unet.num_groups, dtype=self.dtype)
        return head(output.bottleneck)


def _unet(config: ml_collections.ConfigDict, num_classes: int = 0) -> UNetConfig:
    return UNetConfig(**{**dict(config.model.unet), "num_classes": num_classes})


def label_modality(config: ml_collections.ConfigDict) -> str:
    for name, spec in config.model.modalities.items():
        if spec["kind"] == "label":
            return name
    raise ValueError(f"the config has no label modality (modalities: {list(config.model.modalities)})")


def plain_schedule(config: ml_collections.ConfigDict):
    return modality_schedule(config.diffusion.noise_schedule, config.diffusion.num_steps, ())


def train_class_conditional_ddpm(name, config, workdir) -> common.Trained:
    """The class-conditional DDPM baseline: eps-MSE with t ~ U{1..T}, z_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps."""
    height, width, channels = config.model.z_shape
    model = ClassConditionalDenoiser(_unet(config, len(CLASS_NAMES)), channels, config_io.DTYPES[config.model.dtype])
    schedule, primary, label = plain_schedule(config), config.model.primary, label_modality(config)

    def loss_fn(params, batch, rng, train: bool = True):
        image = jnp.asarray(batch[primary], jnp.float32)
        t_key, noise_key, dropout_key = jax.random.split(rng, 3)
        t = jax.random.randint(t_key, image.shape[:1], 1, schedule.num_steps + 1)
        noise = jax.random.normal(noise_key, image.shape)
        z_t = diffusion.marginal_sample(schedule, image, t, jnp.zeros((0,) + image.shape), noise)
        eps = model.apply({"params": params}, z_t, t, batch[label], train=train, rngs={"dropout": dropout_key})
        mse = jnp.mean((eps - noise) ** 2)
        return mse, {"eps_mse": mse}

    example = (jnp.zeros((1, height, width, channels)), jnp.ones((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
    objective = Objective(init_params=lambda rng: model.init(rng, *example)["params"], loss_fn=loss_fn,
                          signature={"class_conditional_ddpm": {"unet": config_io.unet_signature(config.model.unet),
                                                                "diffusion": dict(config.diffusion),
                                                                "z_shape": list(config.model.z_shape)}})
    return common.train_model(name, config, workdir, objective=objective, model=model, schedule=schedule)


def train_classifier(name, config, workdir) -> common.Trained:
    """The same-backbone classifier baseline: cross-entropy on clean images."""
    height, width, channels = config.model.z_shape
    spec = config.model.modalities[label_modality(config)]
    model = BackboneClassifier(_unet(config), channels, len(CLASS_NAMES),
                               spec.get("head_hidden", 0) or config.model.unet.base_channels,
                               config_io.DTYPES[config.model.dtype])
    primary, label = config.model.primary, label_modality(config)

    def loss_fn(params, batch, rng, train: bool = True):
        logits = model.apply({"params": params}, batch[primary], train=train, rngs={"dropout": rng})
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[label]))
        return loss, {"cross_entropy": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch[label])}

    objective = Objective(init_params=lambda rng: model.init(rng, jnp.zeros((1, height, width, channels)))["params"],
                          loss_fn=loss_fn,
                          signature={"classifier": {"unet": config_io.unet_signature(config.model.unet),
                                                    "z_shape": list(config.model.z_shape)}})
    return common.train_model(name, config, workdir, objective=objective, model=model)


def make_class_conditional_sample_fn(trained: common.Trained, section):
    """sample(params, labels [B], rng) -> images [B, H, W, C] in [-1, 1] by the config's sampler."""
    options = common.sampler_options(section)
    method = options.pop("method")
    model, schedule = trained.model, trained.schedule

    def sample(params, labels, rng):
        def denoise(z_t, t):
            eps = model.apply({"params": params}, z_t, t, labels)
            return sampling.Prediction(eps, jnp.zeros((0,) + z_t.shape, jnp.float32))

        shape = labels.shape[:1] + tuple(trained.config.model.z_shape)
        sampler = sampling.ddpm_sample if method == "ddpm" else sampling.ddim_sample
        return jnp.clip(sampler(denoise, schedule, rng, shape, clip_denoised=True, **options).z_0, -1.0, 1.0)

    return jax.jit(sample)


# ----------------------------------------------------------------------------------------------- evaluation
def _judge(classifier, images: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(classifier.predict(images[i:i + 1000])) for i in range(0, len(images), 1000)])


def evaluate(config, run: common.Run, models, classifier) -> dict:
    experiment = config.experiment
    section = experiment.generation
    label, primary = label_modality(config), config.model.primary
    mt, ccddpm, standalone = models["mt_diffusion"], models["class_conditional_ddpm"], models["classifier"]
    num_batches, batch_size = section.num_samples // section.batch_size, section.batch_size
    given = [np.arange(i * batch_size, (i + 1) * batch_size, dtype=np.int32) % len(CLASS_NAMES)
             for i in range(num_batches)]  # balanced labels, the same for both models
    sample = sampling.make_sample_fn(mt.model, mt.schedule, **common.sampler_options(experiment.sampler))
    cc_sample = make_class_conditional_sample_fn(ccddpm, experiment.sampler)
    with run.phase("joint samples"):
        joint = common.map_batches(lambda i, rng: sample(mt.params, rng, batch_size=batch_size), range(num_batches),
                                   seed=experiment.seed, desc="joint")
    with run.phase("label -> image samples"):
        mt_cond = common.map_batches(lambda labels, rng: sample(mt.params, rng, {label: labels}).image, given,
                                     seed=experiment.seed, desc="MT label->image")
        cc_cond = common.map_batches(lambda labels, rng: cc_sample(ccddpm.params, labels, rng), given,
                                     seed=experiment.seed, desc="cc-DDPM label->image")
    given = np.concatenate(given)
    with run.phase("reference features"):
        reference_features = common.reference_features(config, section.num_reference, classifier)
        real = np.concatenate([b[primary] for b in common.eval_batches(config, section.num_samples, batch_size,
                                                                       split="train")])

    def fid(images):
        return common.evaluate_metrics(section.metrics, [{"sample": images}], classifier,
                                       reference_features=reference_features)

    joint_labels = joint.outputs[label]["class_ids"]
    results = {
        "joint": {"label_agreement": agreement.label_agreement(joint_labels, _judge(classifier, joint.image)),
                  "generated_label_histogram": np.bincount(joint_labels, minlength=10).tolist(), **fid(joint.image)},
        "label_to_image": {
            "mt_diffusion": {"agreement": agreement.accuracy(_judge(classifier, mt_cond), given), **fid(mt_cond)},
            "class_conditional_ddpm": {"agreement": agreement.accuracy(_judge(classifier, cc_cond), given),
                                       **fid(cc_cond)},
        },
        "real_train_images": fid(real),
    }

    section = experiment.classification
    test = common.eval_batches(config, section.num_images, section.batch_size)
    truth = np.concatenate([b[label] for b in test])
    classify = sampling.make_classify_fn(mt.model, mt.schedule, label)
    classify_standalone = jax.jit(lambda params, image: jnp.argmax(standalone.model.apply({"params": params}, image),
                                                                   -1))
    with run.phase("image -> label"):
        accuracy = {}
        for t in section.noise_levels:
            predicted = common.map_batches(lambda b, rng, t=t: classify(mt.params, b[primary], rng, t=int(t))[
                "class_ids"], test, seed=experiment.seed)
            accuracy[f"mt_diffusion_t{t}"] = agreement.accuracy(predicted, truth)
        accuracy["classifier"] = agreement.accuracy(common.map_batches(
            lambda b, rng: classify_standalone(standalone.params, b[primary]), test, seed=0), truth)
        accuracy["fmnist_cnn_judge"] = agreement.accuracy(_judge(classifier, np.concatenate(
            [b[primary] for b in test])), truth)
    results["image_to_label"] = accuracy

    count = experiment.grid_images
    names = lambda ids: [CLASS_NAMES[i].split("/")[0] for i in ids]  # noqa: E731
    rows = [("MT joint (its label)", joint.image[:count], names(joint_labels[:count])),
            ("MT label->image", mt_cond[:count], names(given[:count])),
            ("cc-DDPM label->image", cc_cond[:count], names(given[:count])),
            ("real (train)", real[:count])]
    run.report.image("samples", common.labelled_grid(rows),
                     f"{common.describe_sampler(experiment.sampler)}. Row 1: MT-Diffusion's joint samples with their "
                     "generated labels; rows 2-3: samples for the given labels written below (MT-Diffusion with the "
                     "label observed; the class-conditional DDPM), the same prior noise per column.", publish=True)
    return results


def write_report(config, run: common.Run, results: dict) -> None:
    experiment, report = config.experiment, run.report
    section = experiment.generation
    report.text(
        f"MT-Diffusion on Fashion-MNIST ({config.model.z_shape[0]}x{config.model.z_shape[1]}) with the image and its "
        "class label, against a class-conditional DDPM (ADM class embedding) and a stand-alone classifier, all with "
        "the same U-Net, steps, batch, optimizer and EMA. Judge: the project's Fashion-MNIST CNN "
        f"(test accuracy {results['image_to_label']['fmnist_cnn_judge']:.3f} on the images below). Sampler for "
        f"every diffusion model: {common.describe_sampler(experiment.sampler)}, EMA parameters.")
    label_to_image = results["label_to_image"]
    fid_key, rows = "fid_fmnist_cnn", []
    rows.append(["MT-Diffusion, joint (nothing observed)", results["joint"]["label_agreement"], "—",
                 results["joint"][fid_key]])
    rows.append(["MT-Diffusion, label -> image", "—", label_to_image["mt_diffusion"]["agreement"],
                 label_to_image["mt_diffusion"][fid_key]])
    rows.append(["class-conditional DDPM, label -> image", "—", label_to_image["class_conditional_ddpm"]["agreement"],
                 label_to_image["class_conditional_ddpm"][fid_key]])
    rows.append(["real training images (floor)", "—", "—", results["real_train_images"][fid_key]])
    report.table(f"Generation ({section.num_samples} samples per row)",
                 ["model", "joint label agreement ↑", "label->image agreement ↑", f"{FID_PROXY} ↓"], rows, notes=[
                     "Joint label agreement: fraction of joint samples whose generated label equals the CNN judge's "
                     "class of the generated image.",
                     "Label->image agreement: fraction of samples the judge assigns to the given label (balanced "
                     "labels, 10% per class).",
                     f"{FID_PROXY} against {section.num_reference} test images; not comparable with Inception FIDs; "
                     "biased upwards at this sample count (the real-image row is the floor)."])
    report.feature_space_tables("Generation", {
        "MT-Diffusion, joint": results["joint"], "MT-Diffusion, label -> image": label_to_image["mt_diffusion"],
        "class-conditional DDPM, label -> image": label_to_image["class_conditional_ddpm"],
        "real training images (floor)": results["real_train_images"]}, experiment.feature_spaces)
    accuracy = results["image_to_label"]
    rows = [[f"MT-Diffusion label head, z_t from the image at t = {t}", accuracy[f"mt_diffusion_t{t}"]]
            for t in experiment.classification.noise_levels]
    rows += [["same-backbone classifier, trained alone (clean images)", accuracy["classifier"]],
             ["Fashion-MNIST CNN judge (reference)", accuracy["fmnist_cnn_judge"]]]
    report.table(f"Image -> label ({experiment.classification.num_images} test images)", ["model", "accuracy ↑"],
                 rows)
    mt_acc = accuracy[f"mt_diffusion_t{experiment.classification.noise_levels[0]}"]
    lines = [
        f"- Label->image: MT-Diffusion agreement {label_to_image['mt_diffusion']['agreement']:.3f} vs class-"
        f"conditional DDPM {label_to_image['class_conditional_ddpm']['agreement']:.3f}; FID-proxy "
        f"{label_to_image['mt_diffusion'][fid_key]:.2f} vs {label_to_image['class_conditional_ddpm'][fid_key]:.2f}.",
        f"- Image->label: MT-Diffusion's head {mt_acc:.3f} vs the stand-alone classifier {accuracy['classifier']:.3f} "
        f"({mt_acc - accuracy['classifier']:+.3f}).",
        f"- Joint samples: generated label and image agree {results['joint']['label_agreement']:.1%} of the time "
        f"(chance 10%); generated label counts per class {results['joint']['generated_label_histogram']}.",
    ]
    report.text("## Findings (computed from the numbers above)\n\n" + "\n".join(lines))


def run(config: ml_collections.ConfigDict, run: common.Run) -> None:
    models = {
        "mt_diffusion": run.train("mt_diffusion", config),
        "class_conditional_ddpm": run.train("class_conditional_ddpm", config, train_class_conditional_ddpm,
                                            loss="eps-MSE"),
        "classifier": run.train("classifier", config, train_classifier, loss="cross-entropy"),
    }
    with run.phase("metrics classifier"):
        classifier = common.metrics_classifier(config)
    results = evaluate(config, run, models, classifier)
    run.report.metrics.update(setup={"sampler": dict(config.experiment.sampler), "fid_proxy": FID_PROXY,
                                     "judge": dict(classifier.meta)}, **results)
    write_report(config, run, results)


def run_experiment(config: ml_collections.ConfigDict, workdir, results_dir=None, command=None) -> common.Run:
    return common.run_experiment(NAME, run, config, workdir, results_dir, command)


def main() -> None:
    common.main(NAME, run)


if __name__ == "__main__":
    main()
