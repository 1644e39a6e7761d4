"""Converts pytorch-fid's FID Inception-V3 weights (.pth) into our .npz.

  pip install torch==2.13.0     # the CPU wheel; only needed to read the .pth
  python -m mmdiff_jax.metrics.convert_inception_weights \
      --pth pt_inception-2015-12-05-6726825d.pth [--out FILE]

--pth: pytorch-fid's port of the TF 2015-12-05 Inception graph (you supply it:
       mmdiff_jax.metrics.inception.WEIGHTS_URL, the "fid_weights" release of
       github.com/mseitzer/pytorch-fid), or a saved pytorch-fid `InceptionV3`
       state dict.
--out: default mmdiff_jax.metrics.inception.default_weights_path().
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from mmdiff_jax.metrics import inception
from mmdiff_jax.metrics.convert_lpips_weights import read_torch_state_dict


def main(argv=None) -> pathlib.Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pth", required=True, type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args(argv)
    flat = inception.convert_torch_state_dict(read_torch_state_dict(args.pth))
    out = inception.save_params(flat, args.out or inception.default_weights_path())
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
