"""Opt-in: the Flax LPIPS against the reference PyTorch `lpips` package.

Skipped unless MMDIFF_LPIPS_REFERENCE=1. The reference (lpips 0.1.4, which needs
torchvision, i.e. torch==2.14.1 + torchvision==0.29.1, a CUDA build) lives in a
throwaway venv, never in the project's (docs/design.md section 7); point
MMDIFF_LPIPS_REFERENCE_PYTHON at its interpreter (default: this one):

  python3.11 -m venv /tmp/lpips_ref && /tmp/lpips_ref/bin/pip install \
      torch==2.14.1 torchvision==0.29.1 lpips==0.1.4
  MMDIFF_LPIPS_REFERENCE=1 MMDIFF_LPIPS_REFERENCE_PYTHON=/tmp/lpips_ref/bin/python \
      .venv/bin/python -m pytest tests/test_metrics_lpips_reference.py

That interpreter runs tests/lpips_reference_script.py (random VGG-16 trunk with
the official and with random linear weights); this test converts its state dicts
and compares distances. Where torch imports here too (run the test with the
reference interpreter after installing the project's deps there), it also runs
the .pth converter on the saved trunk + the installed wheel's vgg.pth.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mmdiff_jax.metrics import convert_lpips_weights
from mmdiff_jax.metrics import lpips

REFERENCE_PYTHON = os.environ.get("MMDIFF_LPIPS_REFERENCE_PYTHON", sys.executable)
SCRIPT = pathlib.Path(__file__).with_name("lpips_reference_script.py")


def _reference_available():
    if os.environ.get("MMDIFF_LPIPS_REFERENCE") != "1":
        return False
    return subprocess.run([REFERENCE_PYTHON, "-c", "import lpips"], capture_output=True, check=False).returncode == 0


pytestmark = pytest.mark.skipif(
    not _reference_available(),
    reason="opt-in: set MMDIFF_LPIPS_REFERENCE=1 and MMDIFF_LPIPS_REFERENCE_PYTHON "
    "to an interpreter with lpips 0.1.4 (see the module docstring)",
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lpips_reference")
    subprocess.run([REFERENCE_PYTHON, str(SCRIPT), str(directory / "dump.npz"), str(directory)], check=True)
    return np.load(directory / "dump.npz"), directory


def _params(flat):
    return {"params": traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")}


@pytest.mark.parametrize("case", ["official_lin", "random_lin"])
def test_matches_reference_package(reference, case):
    data, _ = reference
    state = {k[len(case) + 1 :]: data[k] for k in data.files if k.startswith(case + "/")}
    params = _params(lpips.convert_torch_state_dicts(state))
    for size in (64, 32):
        name = f"{case}_{size}"
        x0, x1 = (data[f"{name}/{k}"].transpose(0, 2, 3, 1) for k in ("x0", "x1"))
        ours = np.asarray(lpips.lpips_distance(params, x0, x1))
        print(f"{data['versions']}: {name} max |ours - lpips| = {np.abs(ours - data[f'{name}/d']).max():.3g}")
        np.testing.assert_allclose(ours, data[f"{name}/d"], rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("lpips") is None,
    reason="the .pth converter needs torch and lpips here",
)
def test_pth_converter_on_reference_files(reference, tmp_path):
    data, directory = reference
    out = convert_lpips_weights.main(
        ["--vgg16", str(directory / "vgg16_random_features.pth"), "--out", str(tmp_path / "converted.npz")]
    )
    params = lpips.load_params(out)
    x0, x1 = (data[f"official_lin_64/{k}"].transpose(0, 2, 3, 1) for k in ("x0", "x1"))
    np.testing.assert_allclose(lpips.lpips_distance(params, x0, x1), data["official_lin_64/d"], rtol=1e-5, atol=1e-7)
