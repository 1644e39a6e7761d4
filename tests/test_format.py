"""The tree is formatted by `ruff format` (ruff.toml; the version pinned in setup.py's test extras)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_tree_is_formatted():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"run `ruff format .` to format:\n{result.stdout[-3000:]}{result.stderr[-2000:]}"
