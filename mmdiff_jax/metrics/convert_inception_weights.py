"""Converts pytorch-fid's FID Inception-V3 weights (.pth) into our .npz.

  pip install torch==2.13.0     # the CPU wheel; only needed to read the .pth
  python -m mmdiff_jax.metrics.convert_inception_weights \
      --pth pt_inception-2015-12-05-6726825d.pth [--out FILE]

--pth: pytorch-fid's port of the TF 2015-12-05 Inception graph (you supply it:
       mmdiff_jax.metrics.inception.WEIGHTS_URL, the "fid_weights" release of
       github.com/mseitzer/pytorch-fid), or a saved pytorch-fid `InceptionV3`
       state dict.
--out: default mmdiff_jax.metrics.inception.default_weights_path().

`convert_torch_state_dict` does the conversion in NumPy (torch only reads the file).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
from collections.abc import Mapping

import numpy as np

from mmdiff_jax.metrics import inception
from mmdiff_jax.metrics.convert_lpips_weights import read_torch_state_dict


# pytorch-fid's PyTorch layout -> our flat Flax variables.

# pytorch-fid's InceptionV3 wrapper ("blocks.I.J.") -> torchvision's Inception3 names (the .pth's)
_WRAPPER_NAMES = {
    "blocks.0.0": "Conv2d_1a_3x3",
    "blocks.0.1": "Conv2d_2a_3x3",
    "blocks.0.2": "Conv2d_2b_3x3",
    "blocks.1.0": "Conv2d_3b_1x1",
    "blocks.1.1": "Conv2d_4a_3x3",
    **{f"blocks.2.{i}": f"Mixed_{name}" for i, name in enumerate("5b 5c 5d 6a 6b 6c 6d 6e".split())},
    "blocks.3.0": "Mixed_7a",
    "blocks.3.1": "Mixed_7b",
    "blocks.3.2": "Mixed_7c",
}
_KEY = re.compile(r"^(?P<module>(?:Conv2d|Mixed)_[\w.]+?)\.(?P<layer>conv|bn)\.(?P<tensor>\w+)$")
_TENSORS = {
    ("conv", "weight"): "params/{}/conv/kernel",
    ("bn", "weight"): "params/{}/bn/scale",
    ("bn", "bias"): "params/{}/bn/bias",
    ("bn", "running_mean"): "batch_stats/{}/bn/mean",
    ("bn", "running_var"): "batch_stats/{}/bn/var",
}
CLASSES = 1008  # the TF graph's classifier; torchvision's ImageNet Inception-V3 has 1000


def convert_torch_state_dict(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """pytorch-fid's weights (NumPy arrays) -> flat Flax variables.

    Accepts the released .pth (torchvision Inception3 names:
    "Mixed_5b.branch1x1.conv.weight" [O, I, kh, kw], "...bn.running_var", ...)
    or a saved pytorch-fid `InceptionV3` ("blocks.2.0.branch1x1.conv.weight").
    Ignores "fc.*", "AuxLogits.*" and "num_batches_tracked"; refuses a 1000-class
    "fc" (torchvision's ImageNet weights, not FID's). Raises naming every
    missing, unexpected or mis-shaped weight.
    """
    flat, unexpected = {}, []
    for key, value in state.items():
        if key.startswith(("fc.", "AuxLogits.")) or key.endswith("num_batches_tracked"):
            if key == "fc.weight" and np.shape(value)[0] != CLASSES:
                raise ValueError(
                    f"fc.weight has {np.shape(value)[0]} classes, not {CLASSES}: these are not the FID "
                    "Inception weights (torchvision's ImageNet Inception-V3 has 1000); use "
                    f"pt_inception-2015-12-05-6726825d.pth ({inception.WEIGHTS_URL})"
                )
            continue
        name = key
        if name.startswith("blocks."):
            prefix = ".".join(name.split(".")[:3])
            name = _WRAPPER_NAMES.get(prefix, prefix) + name[len(prefix) :]
        match = _KEY.match(name)
        if match is None or (match["layer"], match["tensor"]) not in _TENSORS:
            unexpected.append(key)
            continue
        value = np.asarray(value, np.float32)
        if match["layer"] == "conv":
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        flat[_TENSORS[match["layer"], match["tensor"]].format(match["module"].replace(".", "/"))] = value
    inception.check_flat_params(flat, "the converted state dict", unexpected)
    return flat


def main(argv=None) -> pathlib.Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pth", required=True, type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args(argv)
    flat = convert_torch_state_dict(read_torch_state_dict(args.pth))
    out = inception.save_params(flat, args.out or inception.default_weights_path())
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
