"""Opt-in: the Flax FID Inception-V3 against pytorch-fid 0.3.0 itself.

Skipped unless MMDIFF_INCEPTION_REFERENCE=1. The reference (pytorch-fid, which
needs torchvision, i.e. torch==2.14.1 + torchvision==0.29.1, a CUDA build) lives
in a throwaway venv, never in the project's (docs/design.md section 7); point
MMDIFF_INCEPTION_REFERENCE_PYTHON at its interpreter (default: this one):

  python3.11 -m venv /tmp/lpips_ref && /tmp/lpips_ref/bin/pip install torch==2.14.1 torchvision==0.29.1
  /tmp/lpips_ref/bin/pip install --no-deps pytorch-fid==0.3.0
  MMDIFF_INCEPTION_REFERENCE=1 MMDIFF_INCEPTION_REFERENCE_PYTHON=/tmp/lpips_ref/bin/python \
      .venv/bin/python -m pytest tests/test_metrics_inception_reference.py

That interpreter runs tests/inception_reference_script.py (random weights in the
released file's layout, no download); this test converts its state dicts and
compares features and the resize. Where torch imports here (the project's
"bench" extra), it also runs the .pth converter on the saved random weights.
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

from mmdiff_jax.metrics import convert_inception_weights
from mmdiff_jax.metrics import inception

REFERENCE_PYTHON = os.environ.get("MMDIFF_INCEPTION_REFERENCE_PYTHON", sys.executable)
SCRIPT = pathlib.Path(__file__).with_name("inception_reference_script.py")
CASES = ("gray_32", "rgb_64", "rgb_331")


def _reference_available():
    if os.environ.get("MMDIFF_INCEPTION_REFERENCE") != "1":
        return False
    command = [REFERENCE_PYTHON, "-c", "import pytorch_fid.inception"]
    return subprocess.run(command, capture_output=True, check=False).returncode == 0


pytestmark = pytest.mark.skipif(
    not _reference_available(),
    reason="opt-in: set MMDIFF_INCEPTION_REFERENCE=1 and MMDIFF_INCEPTION_REFERENCE_PYTHON "
    "to an interpreter with pytorch-fid 0.3.0 (see the module docstring)",
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    directory = tmp_path_factory.mktemp("inception_reference")
    subprocess.run([REFERENCE_PYTHON, str(SCRIPT), str(directory / "dump.npz"), str(directory)], check=True)
    return np.load(directory / "dump.npz"), directory


def _compare(params, data, label):
    for case in CASES:
        ours = np.asarray(inception.inception_features(params, data[f"{case}/images"]))
        expected = data[f"{case}/features"]
        difference, scale = np.abs(ours - expected).max(), np.abs(expected).max()
        print(f"{data['versions']}: {label} {case}: max |ours - pytorch-fid| = {difference:.3g}, ", end="")
        print(f"max |feature| {scale:.3g}")
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("layout", ["state", "wrapper"])
def test_matches_pytorch_fid(reference, layout):
    data, _ = reference
    state = {k[len(layout) + 1 :]: data[k] for k in data.files if k.startswith(layout + "/")}
    flat = convert_inception_weights.convert_torch_state_dict(state)
    params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")
    _compare(params, data, layout)


def test_resize_matches_interpolate(reference):
    data, _ = reference
    for key in (k for k in data.files if k.startswith("resize_") and k.endswith("/input")):
        ours = np.asarray(inception.preprocess(data[key].transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
        expected = data[key.replace("/input", "/output")]
        print(f"{key.split('/')[0]}: max |ours - F.interpolate| = {np.abs(ours - expected).max():.3g}")
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the .pth converter needs torch here")
def test_pth_converter_on_reference_file(reference, tmp_path):
    data, directory = reference
    out = convert_inception_weights.main(
        ["--pth", str(directory / "pt_inception_random.pth"), "--out", str(tmp_path / "converted.npz")]
    )
    _compare(inception.load_params(out), data, "pth")
