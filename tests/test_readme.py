"""The README's two commands are the ones users and CI run."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci_command = re.search(r'^TEST_COMMAND="(.*)"$', (ROOT / ".ci/run").read_text(), re.M).group(1)
    readme = (ROOT / "README.md").read_text()
    assert ci_command in readme, "the README's test command and .ci/run differ"
    assert "pytest" in ci_command and "dataset-fashion-mnist" in ci_command


def test_readme_opens_with_the_main_job_then_the_tests():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2
    assert "python -m experiments.masked_pretrain" in blocks[0]
    assert "pytest" in blocks[1]


def test_readme_python_examples_run():
    """Every ```python block of the README, in order, in one fresh interpreter."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    result = subprocess.run(
        [sys.executable, "-c", "\n".join(blocks)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_scale_out_commands_and_config_keys_exist():
    """Every `python -m` module, config file with its preset, and `config.` key the README's Scale out section
    names exists (each key in every config file the section uses)."""
    import importlib.util
    import runpy

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Scale out\n") : readme.index("\n## ", readme.index("## Scale out\n") + 1)]
    modules = set(re.findall(r"python -m (\w+(?:\.\w+)*)", section))
    assert {"mmdiff_jax.train", "experiments.masked_pretrain", "experiments.multitask"} <= modules
    for module in modules:
        assert importlib.util.find_spec(module) is not None, module
    configs = set(re.findall(r"--config=(configs/\w+\.py)(?::(\w+))?", section))
    keys = set(re.findall(r"config\.((?:\w+\.)*\w+)", section)) - {"py"}
    assert {"mesh.shape", "mesh.fsdp_min_size", "data.batch_size", "distributed.initialize"} <= keys
    for path, preset in configs:
        config = runpy.run_path(str(ROOT / path))["get_config"](preset)
        for key in keys:
            node = config
            for part in key.split("."):
                assert part in node, f"{path}:{preset} has no config.{key}"
                node = node[part]
