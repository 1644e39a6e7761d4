"""The entry points' flag mistakes: one line on stderr naming the flag, exit status 2, before any compilation
(they ended in ml_collections' AttributeError or pathlib's FileExistsError after a traceback)."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
HINT = "  (MMDIFF_DEBUG=1 shows the traceback)"
ENTRY_POINTS = [
    ("mmdiff_jax.train", "configs/default.py:tiny"),
    ("experiments.masked_pretrain", "configs/masked_pretrain.py:tiny"),
]


def run_entry_point(module: str, *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "MMDIFF_DEBUG"}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", **({"MMDIFF_DEBUG": "1"} if debug else {}))
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def error_lines(child: subprocess.CompletedProcess) -> list[str]:
    return [line for line in child.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("module, config", ENTRY_POINTS, ids=["train", "experiment"])
def test_unknown_config_key_names_the_flag_and_the_nearest_key(tmp_path, module, config):
    child = run_entry_point(module, f"--config={config}", "--config.train.stepz=5", f"--workdir={tmp_path / 'run'}")
    assert child.returncode == 2
    assert error_lines(child) == [
        f"error: --config.train.stepz=5: the config has no key 'stepz' (did you mean \"steps\"?){HINT}"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module, config", ENTRY_POINTS, ids=["train", "experiment"])
def test_workdir_that_is_a_file_is_refused_in_one_line(tmp_path, module, config):
    existing = tmp_path / "notes.txt"
    existing.write_text("not a run directory")
    workdir = existing if module == "mmdiff_jax.train" else existing / "run"
    child = run_entry_point(module, f"--config={config}", f"--workdir={workdir}")
    assert child.returncode == 2
    assert error_lines(child) == [f"error: --workdir={workdir}: {existing} exists and is not a directory{HINT}"]


def test_debug_variable_shows_the_traceback(tmp_path):
    child = run_entry_point(
        "mmdiff_jax.train",
        "--config=configs/default.py:tiny",
        "--config.train.stepz=5",
        f"--workdir={tmp_path / 'run'}",
        debug=True,
    )
    assert child.returncode != 0
    assert "Traceback (most recent call last)" in child.stderr
    assert "CommandLineError: --config.train.stepz=5: the config has no key 'stepz'" in child.stderr


def test_a_value_the_config_refuses_is_one_line_before_compiling(tmp_path):
    child = run_entry_point(
        "mmdiff_jax.train",
        "--config=configs/masked_pretrain.py:tiny",
        "--config.model.modalities.masked_image.condition=concatt",
        f"--workdir={tmp_path / 'run'}",
    )
    assert child.returncode == 2
    (line,) = error_lines(child)
    assert line.startswith(
        "error: config.model.modalities.masked_image: modality 'masked_image': unknown condition 'concatt'"
    ) and line.endswith(HINT)


def test_an_error_that_stops_a_run_is_printed_without_a_traceback(capsys, monkeypatch):
    """A workdir of another model (CheckpointMismatchError, lines naming each difference) or a non-finite loss:
    their name and message on stderr, exit status 1, in every entry point (`cli.reported`); MMDIFF_DEBUG=1
    raises them. Other errors propagate."""
    from mmdiff_jax.training import CheckpointMismatchError, NonFiniteLossError, cli

    monkeypatch.delenv("MMDIFF_DEBUG", raising=False)
    for error in (
        CheckpointMismatchError("refusing it\n  diffusion.x: checkpoint 1, config 2"),
        NonFiniteLossError("NaN"),
    ):
        with pytest.raises(SystemExit) as stop, cli.reported():
            raise error
        assert stop.value.code == 1
        assert capsys.readouterr().err == f"error: {type(error).__name__}: {error}\n{HINT.strip()}\n"
    with pytest.raises(ZeroDivisionError), cli.reported():
        raise ZeroDivisionError
    monkeypatch.setenv("MMDIFF_DEBUG", "1")
    with pytest.raises(CheckpointMismatchError), cli.reported():
        raise CheckpointMismatchError("refusing it")
