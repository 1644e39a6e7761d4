"""experiments.masked_pretrain end to end on its tiny config (stand-in Fashion-MNIST arrays), through the CLI:
three models trained through the real training paths, every restoration method at every mask ratio,
unconditional samples, the feature metrics, report.md / metrics.json / grids and the --results_dir copy; and
the same run on two processes, which gives the numbers of one.

The runs are child processes (`training_helpers.run_experiment_cli`): one process on one CPU device (run once
per session, shared by the tests; one device, as the other experiments' tests, whose programs it shares through
the compilation cache), and 2 processes x 2 fake devices."""

import json
import math
import types

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs.masked_pretrain import get_config
from experiments import common, machine, masked_pretrain, reporting, restoration, trainer
from mmdiff_jax.training import cli, config_io
from tests.training_helpers import REPO, file_lock, run_experiment_cli, shared_dir, write_arrays


@pytest.fixture
def one_process_run(tmp_path_factory):
    """The directory of the tiny run on one process, one device (arrays.npz, run/, results/), made once per
    session whichever test (or xdist worker) asks first."""
    root = shared_dir(tmp_path_factory, "masked_pretrain_one_process")
    with file_lock(root.parent / "masked_pretrain_one_process.lock"):
        if not (root / "run" / "metrics.json").exists():
            arrays = write_arrays(root / "arrays.npz", num_train=64, num_test=16)
            run_experiment_cli("masked_pretrain", root, f"--config.data.arrays_path={arrays}")
    return root


def test_masked_pretrain_tiny_end_to_end(one_process_run):
    config = get_config("tiny")
    workdir, results = one_process_run / "run", one_process_run / "results"

    metrics = json.loads((workdir / "metrics.json").read_text())
    methods = tuple(config.experiment.restoration.methods) + ("aggregation_only", "aggregation_only_repaint")
    for ratio in ("0.1", "0.25", "0.5"):
        measured = metrics["restoration"][ratio]
        assert 0 < measured["hidden_fraction"] < 1
        for method in methods:
            assert set(measured[method]) == {"psnr_masked", "ssim_masked", "perceptual_fmnist_cnn"}
            assert all(math.isfinite(value) for value in measured[method].values()), (ratio, method, measured)
    for name in ("mt_diffusion", "aggregation_only", "plain_ddpm", "real_train_images"):
        assert math.isfinite(metrics["unconditional"][name]["fid_fmnist_cnn"])
        assert 0 <= metrics["unconditional"][name]["precision_fmnist_cnn"] <= 1
    # Equal budgets; every model ran its steps and kept its final checkpoint and logs.
    training = metrics["training"]
    assert {name: record["steps"] for name, record in training.items()} == {
        "mt_diffusion": 3,
        "plain_ddpm": 3,
        "reconstruction": 3,
        "aggregation_only": 3,
    }
    # The conditioned model concatenates the masked image to the U-Net input; the ablation does not.
    assert (
        json.loads((workdir / "mt_diffusion" / "config.json").read_text())["model"]["modalities"]["masked_image"][
            "condition"
        ]
        == "concat"
    )
    assert (
        json.loads((workdir / "aggregation_only" / "config.json").read_text())["model"]["modalities"]["masked_image"][
            "condition"
        ]
        == "none"
    )
    assert json.loads((workdir / "plain_ddpm" / "config.json").read_text())["model"]["modalities"] == {}
    for name in training:
        assert (workdir / name / "checkpoints" / "3").is_dir() and (workdir / name / "tensorboard").is_dir()
        assert (workdir / name / "metrics.jsonl").is_file()
    # The restoration curve: measured while training at the configured steps (tiny: 2 points of 3 steps).
    assert {name: sorted(points) for name, points in metrics["curves"].items()} == {
        "mt_diffusion": ["2", "3"],
        "aggregation_only": ["2", "3"],
    }
    assert all(math.isfinite(value) for points in metrics["curves"].values() for value in points.values())
    assert metrics["run"]["wall_seconds"] > 0 and metrics["run"]["preset"] == "tiny"
    assert metrics["run"]["command"].startswith("python -m experiments.masked_pretrain --config=")

    report = (workdir / "report.md").read_text()
    for text in (
        "Command: `python -m experiments.masked_pretrain --config=",
        "Wall time",
        "PSNR hidden, r=0.5",
        "LPIPS-proxy",
        "FID-proxy",
        "LPIPS-VGG: not measured",
        "SDEdit",
        "reconstruction-only",
        "ablation: aggregation-only",
        "PSNR hidden (dB) at mask ratio 0.5 against training steps",
        "grids/unconditional.png",
        "grids/restoration_curve.png",
    ):
        assert text in report, text
    for name in (
        "report.md",
        "metrics.json",
        "grids/restoration_mask0.5.png",
        "grids/unconditional.png",
        "grids/restoration_curve.png",
    ):
        assert (results / name).is_file(), name
    assert not (results / "grids" / "restoration_mask0.1.png").exists()  # only published grids are copied
    assert not list(results.rglob("checkpoints"))


def _numbers(tree, path=""):
    """path -> leaf of a metrics.json tree, without the run's timings, machine and command."""
    if isinstance(tree, dict):
        return {
            key: value
            for name, child in tree.items()
            if name != "run" and not any(word in name for word in ("second", "time", "resumed_from"))
            for key, value in _numbers(child, f"{path}/{name}").items()
        }
    return {path: tree}


def test_two_processes_give_the_numbers_of_one(tmp_path, one_process_run):
    """2 processes x 2 devices against 1 process on 1 device, the same global batches: every number of
    metrics.json equal within float noise; the files written once; each process's data position checkpointed.
    The two-process run leaves out the aggregation-only ablation (a model of its own, trained and evaluated
    apart, as the other models: its numbers are the one-process run's either way); the suite's time."""
    arrays = one_process_run / "arrays.npz"
    logs = run_experiment_cli(
        "masked_pretrain",
        tmp_path,
        f"--config.data.arrays_path={arrays}",
        "--config.experiment.aggregation_only_ablation=False",
        devices=2,
        processes=2,
    )
    one = _numbers(json.loads((one_process_run / "run" / "metrics.json").read_text()))
    two = _numbers(json.loads((tmp_path / "run" / "metrics.json").read_text()))
    assert two.keys() <= one.keys() and len(two) > 100
    for prefix in ("/restoration/0.5/mt_diffusion/", "/unconditional/plain_ddpm/", "/curves/mt_diffusion/"):
        assert any(key.startswith(prefix) for key in two), prefix
    for key, value in two.items():
        if isinstance(value, float):
            assert math.isclose(value, one[key], rel_tol=1e-4, abs_tol=1e-6), (key, value, one[key])
        else:
            assert value == one[key], key
    assert "wrote " in logs[0] and "wrote " not in logs[1]  # process 0 writes the report
    assert (tmp_path / "results" / "report.md").is_file() and (tmp_path / "results" / "grids").is_dir()
    data = tmp_path / "run" / "mt_diffusion" / "checkpoints" / "3" / "data"
    assert sorted(p.name for p in data.glob("*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
