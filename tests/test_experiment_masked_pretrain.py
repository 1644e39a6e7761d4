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
from tests.training_helpers import REPO, file_lock, run_experiment_cli, shared_dir, source_flag, write_arrays


@pytest.fixture
def one_process_run(tmp_path_factory):
    """The directory of the tiny run on one process, one device (arrays.npz, run/, results/), made once per
    session whichever test (or xdist worker) asks first."""
    root = shared_dir(tmp_path_factory, "masked_pretrain_one_process")
    with file_lock(root.parent / "masked_pretrain_one_process.lock"):
        if not (root / "run" / "metrics.json").exists():
            arrays = write_arrays(root / "arrays.npz", num_train=64, num_test=16)
            run_experiment_cli("masked_pretrain", root, source_flag(arrays))
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
        source_flag(arrays),
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


def test_a_preset_is_picked_one_way():
    def parsed(*args):
        argv = ["prog", *args, "--config.train.steps=5"]
        flag_values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
        flag_values(argv)
        return cli.config_value(flag_values["config"])

    config = parsed(f"--config={REPO / 'configs/masked_pretrain.py'}:tiny")
    assert config.preset == "tiny" and config.diffusion.num_steps == get_config("tiny").diffusion.num_steps
    assert config.train.steps == 5
    # An override of the key alone would leave the rest at the file's preset: refused, saying how.
    with pytest.raises(
        cli.CommandLineError,
        match=r"--config.preset=tiny: a preset is picked with "
        r"--config=.*configs/masked_pretrain.py:tiny",
    ):
        parsed(f"--config={REPO / 'configs/masked_pretrain.py'}", "--config.preset=tiny")


def test_guidance_methods_are_named_as_every_experiment_names_them():
    """The guidance sweep's methods are `conditioning.guidance_key`'s names: s = 1 is the conditional sampler,
    'mt_diffusion' itself, listed once."""
    config = get_config("tiny")
    config.experiment.restoration.cfg_scales = (0.0, 1.0, 2.5)
    methods = restoration.all_methods(config)
    assert methods.count("mt_diffusion") == 1 and "mt_diffusion_cfg1" not in methods
    assert {"mt_diffusion_cfg0", "mt_diffusion_cfg2.5"} <= set(methods)
    assert set(methods) <= set(restoration.method_labels(config))


def test_labelled_grid_shapes():
    images = np.zeros((3, 28, 28, 1), np.float32)
    grid = reporting.labelled_grid(
        [("a", images), ("longer label", reporting.tint_hidden(images, np.ones_like(images)), ["x", "y", "z"])]
    )
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    assert grid.shape[1] > 3 * 56 and grid.shape[0] > 2 * 56


def test_load_sentence_says_when_other_jobs_shared_the_cores():
    quiet = machine.load_sentence({"mean": 1.6, "max": 2.2, "start": 0.9}, cores=2)
    busy = machine.load_sentence({"mean": 4.8, "max": 9.0, "start": 5.1}, cores=2)
    assert "mean 1.6, max 2.2, at start 0.9: about what this run alone puts on the cores." in quiet
    assert busy.endswith("other jobs shared the cores, so an idle machine runs faster.")


def test_metric_curve_measures_at_its_steps_and_a_resumed_run_keeps_earlier_points(tmp_path):
    assert trainer.curve_steps(1000, 4) == [250, 500, 750, 1000] and trainer.curve_steps(3, 4) == [1, 2, 3]
    curve = trainer.MetricCurve(tmp_path / "curve.json", [2, 4], lambda params: 10 * params)
    for step in (1, 2, 3):
        curve(step, types.SimpleNamespace(ema_params=2.0), {})
    assert curve.points == {2: 20.0}
    resumed = trainer.MetricCurve(tmp_path / "curve.json", [2, 4], lambda params: params)
    resumed(4, types.SimpleNamespace(ema_params=3.0), {})
    assert resumed.points == {2: 20.0, 4: 3.0}
    assert json.loads((tmp_path / "curve.json").read_text()) == {"settings": {}, "points": {"2": 20.0, "4": 3.0}}
    # Points measured with other settings (another sampler, say) are not this run's: dropped.
    other = trainer.MetricCurve(tmp_path / "curve.json", [2, 4], lambda params: params, {"sampler": "ddim"})
    assert other.points == {}


def _set(path, value):
    def mutate(config):
        *sections, key = path.split(".")
        section = config.experiment
        for name in sections:
            section = section[name]
        section[key] = value

    return mutate


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_set("sampler.method", "dpm"), r"config.experiment.sampler: .*unknown sampling method 'dpm'"),
        (_set("sampler.spacing", "uniform"), r"config.experiment.sampler: .*spacing"),
        (_set("sampler.num_stepz", 3), r"config.experiment.sampler: unknown keys \['num_stepz'\]"),
        (_set("restoration.methods", ("sdedit", "inpaint")), r"restoration.methods: unknown \['inpaint'\]"),
        (_set("restoration.metrics", ("psnr", "psnrr")), r"config.experiment.restoration.metrics: .*\['psnrr'\]"),
        (_set("feature_spaces", ("fmnist_cnn", "clip")), r"config.experiment.feature_spaces: unknown \['clip'\]"),
        (_set("unconditional.num_samples", 6), r"unconditional.num_samples = 6 is not a multiple of .*batch_size = 4"),
        (_set("curve.num_points", 0), r"config.experiment.curve: num_points \(0\)"),
    ],
)
def test_a_bad_experiment_section_is_refused_before_anything_trains(tmp_path, mutate, message):
    """The whole config is checked before any training (otherwise these fail after it, at evaluation)."""
    config = get_config("tiny")
    config.experiment.sampler.method = "dpm_solver++"
    mutate(config)
    with pytest.raises(config_io.ConfigError, match=message):
        common.run_experiment(
            masked_pretrain.NAME, masked_pretrain.run, config, tmp_path / "run", check=restoration.check_config
        )
    assert not (tmp_path / "run").exists()
