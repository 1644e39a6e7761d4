"""Converts the official PyTorch LPIPS (VGG-16, v0.1) weights into our .npz.

  pip install torch==2.13.0     # the CPU wheel; only needed to read .pth files
  python -m mmdiff_jax.metrics.convert_lpips_weights \
      --vgg16 vgg16-397923af.pth [--lin lpips/weights/v0.1/vgg.pth] [--out FILE]

--vgg16: torchvision's ImageNet VGG-16 state dict (you supply it), or a whole
         saved `lpips.LPIPS` state dict (then --lin may be left out).
--lin:   the linear calibration weights shipped in the `lpips` wheel. Default:
         found in an installed `lpips` package (located without importing it,
         since it imports torchvision); else unpack the wheel
         (`pip download lpips==0.1.4 --no-deps`, it is a zip).
--out:   default mmdiff_jax.metrics.lpips.default_weights_path().
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys

from mmdiff_jax.metrics import lpips


def read_torch_state_dict(path) -> dict:
    try:
        import torch  # pylint: disable=g-import-not-at-top
    except ImportError as error:
        raise SystemExit("Reading .pth files needs PyTorch: pip install torch==2.13.0 (a local CPU wheel)") from error
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


def installed_lpips_linear_weights() -> pathlib.Path | None:
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        return None
    path = pathlib.Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"
    return path if path.is_file() else None


def main(argv=None) -> pathlib.Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vgg16", required=True, type=pathlib.Path)
    parser.add_argument("--lin", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args(argv)
    state_dicts = [read_torch_state_dict(args.vgg16)]
    if not any(k.startswith("lin") for k in state_dicts[0]):
        lin = args.lin or installed_lpips_linear_weights()
        if lin is None:
            raise SystemExit(
                "No --lin given and no installed `lpips` package: pass "
                "--lin .../lpips/weights/v0.1/vgg.pth from the lpips "
                "wheel (pip download lpips==0.1.4 --no-deps; unzip)"
            )
        state_dicts.append(read_torch_state_dict(lin))
    out = lpips.save_params(lpips.convert_torch_state_dicts(*state_dicts), args.out or lpips.default_weights_path())
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
