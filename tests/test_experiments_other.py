"""experiments.joint_image_label / image_segmentation / image_embedding end to end on their tiny configs (stand-in
Fashion-MNIST arrays), through the CLI in a child process (`training_helpers.run_experiment_cli`): every model
trained through its real training path, every evaluation, report.md / metrics.json / the published grid and
the --results_dir copy."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import image_embedding as embedding_config
from configs import joint_image_label as label_config
from configs import multitask as multitask_config
from mmdiff_jax.data import transforms
from mmdiff_jax.models.unet import UNet, UNetConfig
from mmdiff_jax.training.state import count_params
from tests.training_helpers import run_experiment_cli, source_flag, write_arrays


def _finite(tree) -> bool:
    if isinstance(tree, dict):
        return all(_finite(value) for value in tree.values())
    if isinstance(tree, list):
        return True
    return math.isfinite(tree)


def _check_outputs(workdir, results, grid, texts, steps):
    metrics = json.loads((workdir / "metrics.json").read_text())
    report = (workdir / "report.md").read_text()
    for text in ("Command: `python -m experiments.", "Wall time", *texts):
        assert text in report, text
    for name in ("report.md", "metrics.json", f"grids/{grid}.png"):
        assert (results / name).is_file(), name
    assert not list(results.rglob("checkpoints"))
    for name, record in metrics["training"].items():
        assert record["steps"] == steps[name], (name, record)
        assert (workdir / name / "checkpoints" / str(steps[name])).is_dir()
    return metrics


def _unet_params(config: UNetConfig) -> int:
    labels = jnp.zeros((1,), jnp.int32) if config.num_classes else None
    shapes = jax.eval_shape(
        lambda: UNet(config, out_channels=1).init(
            jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32), labels, train=False
        )
    )
    return count_params(shapes)


def _arrays(tmp_path) -> str:
    return source_flag(write_arrays(tmp_path / "arrays.npz", num_train=64, num_test=16))


def _embeddings(tmp_path, config_module) -> str:
    """A stand-in 64-d embedding file for the 64 + 16 stand-in images; the flag giving it to the config's
    embedding() transform."""
    rng = np.random.default_rng(0)
    path = tmp_path / "embeddings.npz"
    np.savez(
        path,
        train=rng.standard_normal((64, 64)).astype(np.float32),
        test=rng.standard_normal((16, 64)).astype(np.float32),
    )
    pipe = transforms.with_args(config_module.get_config("tiny").data.transforms, "embedding", path=str(path))
    return f"--config.data.transforms={pipe}"


def test_joint_image_label_tiny(tmp_path):
    run_experiment_cli("joint_image_label", tmp_path, _arrays(tmp_path))
    models = {"mt_diffusion": 3, "aggregation_only": 3, "class_conditional_ddpm": 3, "classifier": 3}
    metrics = _check_outputs(
        tmp_path / "run",
        tmp_path / "results",
        "samples",
        (
            "label->image agreement",
            "FID-proxy",
            "same-backbone classifier",
            "guidance s = 2",
            "ablation: aggregation-only",
            "against training steps",
        ),
        models,
    )
    for name in ("mt_diffusion", "aggregation_only"):
        joint = metrics["joint"][name]
        assert 0 <= joint["label_agreement"] <= 1 and sum(joint["generated_label_histogram"]) == 16
    # The guidance sweep for the label-conditioned model; the aggregation-only one has no guidance.
    assert set(metrics["label_to_image"]) == {
        "mt_diffusion",
        "mt_diffusion_cfg0",
        "mt_diffusion_cfg2",
        "aggregation_only",
        "class_conditional_ddpm",
    }
    for scores in metrics["label_to_image"].values():
        assert 0 <= scores["agreement"] <= 1 and math.isfinite(scores["fid_fmnist_cnn"])
    # The curves: measured while training at the configured steps (tiny: 2 points of 3 steps), kept in the workdir.
    assert {name: sorted(points) for name, points in metrics["curves"].items()} == {
        "mt_diffusion": ["2", "3"],
        "aggregation_only": ["2", "3"],
    }
    assert (
        json.loads((tmp_path / "run" / "mt_diffusion" / "label_to_image_curve.json").read_text())["points"]
        == metrics["curves"]["mt_diffusion"]
    )
    assert (tmp_path / "results" / "grids" / "label_to_image_curve.png").is_file()
    configs = {
        name: json.loads((tmp_path / "run" / name / "config.json").read_text())["model"]["modalities"]["label"]
        for name in ("mt_diffusion", "aggregation_only")
    }
    assert configs["mt_diffusion"]["condition"] == "embedding" and configs["aggregation_only"]["condition"] == "none"
    assert set(metrics["image_to_label"]) == {"mt_diffusion_t1", "classifier", "fmnist_cnn_judge"}
    assert metrics["training"]["class_conditional_ddpm"]["loss"] == "v-MSE"  # the config's v-prediction
    # The class-conditional baseline is the U-Net with ADM's class embedding: 10 x (4 x base_channels) more.
    unet = UNetConfig(**dict(label_config.get_config("tiny").model.unet))
    with_classes, without = _unet_params(dataclasses.replace(unet, num_classes=10)), _unet_params(unet)
    assert metrics["training"]["class_conditional_ddpm"]["num_params"] == with_classes
    assert with_classes - without == 10 * 4 * unet.base_channels
    assert metrics["training"]["classifier"]["loss"] == "cross-entropy"
    assert metrics["training"]["mt_diffusion"]["loss"] == "v-MSE + aggregation MSE + NLL of label"


def test_image_segmentation_tiny(tmp_path):
    run_experiment_cli("image_segmentation", tmp_path, _arrays(tmp_path))
    metrics = _check_outputs(
        tmp_path / "run",
        tmp_path / "results",
        "segmentation",
        (
            "mIoU (11 classes)",
            "foreground IoU",
            "Mask -> image",
            "guidance s = 2",
            "ablation: aggregation-only",
            "against training steps",
        ),
        {"mt_diffusion": 3, "aggregation_only": 3},
    )
    assert _finite(metrics["image_to_mask"]) and _finite(metrics["mask_to_image"])
    assert metrics["image_to_mask"]["all_background"]["miou"] < 1
    # The guidance sweep for the mask-conditioned model; the aggregation-only one has no guidance.
    assert set(metrics["mask_to_image"]) == {
        "mt_diffusion",
        "mt_diffusion_cfg0",
        "mt_diffusion_cfg2",
        "aggregation_only",
        "joint_samples_vs_unrelated_masks",
        "real_images",
    }
    assert all(0 <= scores["foreground_iou"] <= 1 for scores in metrics["mask_to_image"].values())
    assert {"mt_diffusion_t1", "aggregation_only_t1"} <= set(metrics["image_to_mask"])
    assert {name: sorted(points) for name, points in metrics["curves"].items()} == {
        "mt_diffusion": ["2", "3"],
        "aggregation_only": ["2", "3"],
    }


def test_image_embedding_tiny(tmp_path):
    run_experiment_cli("image_embedding", tmp_path, _arrays(tmp_path), _embeddings(tmp_path, embedding_config))
    metrics = _check_outputs(
        tmp_path / "run",
        tmp_path / "results",
        "samples",
        (
            "RMS distance",
            "random pair",
            "FID-proxy",
            "guidance s = 2",
            "ablation: aggregation-only",
            "against training steps",
        ),
        {"mt_diffusion": 3, "aggregation_only": 3},
    )
    scores = metrics["embedding_to_image"]
    assert set(scores) == {
        "mt_diffusion",
        "mt_diffusion_cfg0",
        "mt_diffusion_cfg2",
        "aggregation_only",
        "joint_samples",
        "random_pair",
        "source_image",
    }
    assert _finite(scores) and _finite(metrics["fid"])
    assert set(metrics["joint"]) == {"mt_diffusion", "aggregation_only"}
    assert {name: sorted(points) for name, points in metrics["curves"].items()} == {
        "mt_diffusion": ["2", "3"],
        "aggregation_only": ["2", "3"],
    }


def test_image_transition_tiny(tmp_path):
    run_experiment_cli("image_transition", tmp_path, _arrays(tmp_path))
    models = {"mt_diffusion": 3, "no_bridge": 3, "plain_ddpm": 3, "bridge_only": 3}
    metrics = _check_outputs(
        tmp_path / "run",
        tmp_path / "results",
        "transition",
        ("Low resolution -> image", "PSNR", "LPIPS-proxy", "FID-proxy", "bridge only", "SDEdit from the source"),
        models,
    )
    scores = metrics["transition"]
    assert set(scores) == {
        "mt_diffusion",
        "mt_diffusion_cfg2",
        "no_bridge",
        "bridge_only",
        "sdedit",
        "low_resolution",
        "real_test_images",
    }
    assert _finite(scores)
    # The three models differ only where the issue says: the bridge's weights and the denoiser's view of the source.
    configs = {
        name: json.loads((tmp_path / "run" / name / "config.json").read_text())["model"]["modalities"]
        for name in ("mt_diffusion", "no_bridge", "bridge_only", "plain_ddpm")
    }
    assert configs["mt_diffusion"]["low_resolution"]["weight_schedule"] == ["bridge", 1.0]
    assert configs["no_bridge"]["low_resolution"]["weight_schedule"] == ["zero", 0.0]
    assert configs["no_bridge"]["low_resolution"]["condition"] == "concat"
    assert configs["bridge_only"]["low_resolution"]["condition"] == "none"
    assert configs["plain_ddpm"] == {}


def test_multitask_tiny(tmp_path):
    run_experiment_cli("multitask", tmp_path, _arrays(tmp_path), _embeddings(tmp_path, multitask_config))
    # Every model trains 12 steps; equal total compute reads the comparators' checkpoints at 4 (3 pairwise models)
    # and 3 steps (4 single-task ones).
    comparators = ("pairwise_masked_image", "pairwise_label", "pairwise_vector")
    single = ("plain_ddpm", "label_ddpm", "embedding_ddpm", "classifier")
    metrics = _check_outputs(
        tmp_path / "run",
        tmp_path / "results",
        "samples",
        ("equal steps per task (12 each)", "equal total compute", "Where sharing helps", "pairwise: image + label"),
        dict.fromkeys(("multitask",) + comparators + single, 12),
    )
    for name, share in [(name, 4) for name in comparators] + [(name, 3) for name in single]:
        saved = sorted(int(path.name) for path in (tmp_path / "run" / name / "checkpoints").iterdir() if path.is_dir())
        assert saved == [share, 12], (name, saved)  # its equal-compute share and the last step only
    assert metrics["setup"]["steps"]["total_compute"] == {**dict.fromkeys(comparators, 4), **dict.fromkeys(single, 3)}
    for task in ("restoration", "label_to_image", "image_to_label", "embedding_to_image", "joint"):
        for matching in ("steps_per_task", "total_compute"):
            roles = metrics[task][matching]
            assert set(roles) == {"multitask", "pairwise", "single_task"}, (task, matching)
            assert all(_finite(scores) for scores in roles.values()), (task, matching, roles)
    # The same multitask scores in both matchings; a comparator's differ with its steps (another checkpoint).
    assert (
        metrics["label_to_image"]["steps_per_task"]["multitask"]
        == metrics["label_to_image"]["total_compute"]["multitask"]
    )
    assert metrics["restoration"]["steps_per_task"]["pairwise"] != metrics["restoration"]["total_compute"]["pairwise"]
    assert "label_agreement" in metrics["joint"]["steps_per_task"]["pairwise"]
    assert "label_agreement" not in metrics["joint"]["steps_per_task"]["single_task"]  # plain DDPM has no label
    modalities = {
        name: json.loads((tmp_path / "run" / name / "config.json").read_text())["model"]["modalities"]
        for name in ("multitask", "pairwise_label", "embedding_ddpm", "plain_ddpm")
    }
    assert set(modalities["multitask"]) == {"masked_image", "label", "embedding"}
    assert set(modalities["pairwise_label"]) == {"label"}
    assert modalities["pairwise_label"]["label"] == modalities["multitask"]["label"]
    assert modalities["embedding_ddpm"]["embedding"]["weight_schedule"] == ["zero", 0.0]
    assert modalities["embedding_ddpm"]["embedding"]["head"] == "none"
    assert modalities["plain_ddpm"] == {}


def test_multitask_scenes_tiny(tmp_path):
    """The scenes variant: the tasks of its modalities (masked image, segmentation mask) and their comparators."""
    run_experiment_cli("multitask", tmp_path, _arrays(tmp_path), config="multitask_scenes")
    # 6 steps each; equal total compute at 3 (2 pairwise models) and 2 steps (3 single-task ones).
    pairwise, single = (
        ("pairwise_masked_image", "pairwise_segmentation"),
        ("plain_ddpm", "segmentation_ddpm", "segmenter"),
    )
    metrics = _check_outputs(
        tmp_path / "run",
        tmp_path / "results",
        "samples",
        ("image + segmentation mask", "mask-conditional DDPM", "segmenter (same U-Net)", "No FID-proxy"),
        dict.fromkeys(("multitask",) + pairwise + single, 6),
    )
    assert metrics["setup"]["steps"]["total_compute"] == {**dict.fromkeys(pairwise, 3), **dict.fromkeys(single, 2)}
    assert {"restoration", "mask_to_image", "image_to_mask", "joint"} <= set(metrics)
    assert not {"label_to_image", "image_to_label", "embedding_to_image", "real_train_images"} & set(metrics)
    for task in ("restoration", "mask_to_image", "image_to_mask", "joint"):
        for matching in ("steps_per_task", "total_compute"):
            roles = metrics[task][matching]
            assert all(_finite(scores) for scores in roles.values()), (task, matching, roles)
    steps = metrics["image_to_mask"]["steps_per_task"]
    assert set(steps["single_task"]) == set(steps["multitask"]) == {"miou", "pixel_accuracy"}
    assert set(metrics["restoration"]["steps_per_task"]["multitask"]["0.5"]) == {"psnr_masked", "ssim_masked"}
    assert set(metrics["joint"]["steps_per_task"]["pairwise"]) == {"mask_agreement"}
    assert metrics["joint"]["steps_per_task"]["single_task"] == {}  # plain DDPM: no mask, no FID-proxy on scenes
    modalities = {
        name: json.loads((tmp_path / "run" / name / "config.json").read_text())["model"]["modalities"]
        for name in ("multitask", "pairwise_segmentation", "segmentation_ddpm")
    }
    assert set(modalities["multitask"]) == {"masked_image", "segmentation"}
    assert modalities["pairwise_segmentation"] == {"segmentation": modalities["multitask"]["segmentation"]}
    assert modalities["segmentation_ddpm"]["segmentation"]["head"] == "none"


def test_multitask_tasks_and_compute_shares_follow_the_configs_modalities():
    """Which tasks and comparators a multitask config gets, and the refusals (before anything trains)."""
    from configs import multitask as fashion_config
    from configs import multitask_scenes
    from experiments import multitask
    from mmdiff_jax.training.config_io import ConfigError

    scenes = multitask_scenes.get_config()
    assert multitask.comparators(scenes) == {
        "restoration": ("pairwise_masked_image", "plain_ddpm"),
        "mask_to_image": ("pairwise_segmentation", "segmentation_ddpm"),
        "image_to_mask": ("pairwise_segmentation", "segmenter"),
        "joint": ("pairwise_segmentation", "plain_ddpm"),
    }
    assert multitask.matched_steps(scenes)["total_compute"] == {
        "pairwise_masked_image": 60,
        "pairwise_segmentation": 60,
        "plain_ddpm": 40,
        "segmentation_ddpm": 40,
        "segmenter": 40,
    }
    fashion = fashion_config.get_config()
    assert set(multitask.comparators(fashion)) == {
        "restoration",
        "label_to_image",
        "embedding_to_image",
        "image_to_label",
        "joint",
    }
    assert multitask.comparators(fashion)["joint"] == ("pairwise_label", "plain_ddpm")
    for config in (scenes, fashion):
        multitask.check_config(config)
    scenes.train.steps = 124  # 124 / 3 does not divide it
    with pytest.raises(ConfigError, match="use a multiple of 6"):
        multitask.check_config(scenes)
    fashion.experiment.feature_spaces = ()
    with pytest.raises(ConfigError, match="judged by the Fashion-MNIST CNN"):
        multitask.check_config(fashion)
    lowres = fashion_config.get_config()
    lowres.model.modalities = {"low_resolution": {"kind": "masked_image"}}  # no label or mask: nothing to agree with
    with pytest.raises(ConfigError, match="needs one of"):
        multitask.check_config(lowres)
