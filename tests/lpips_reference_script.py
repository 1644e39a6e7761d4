"""Runs the reference PyTorch `lpips` package and dumps weights, images, distances.

Run with an interpreter that has lpips 0.1.4 + torch + torchvision (NOT the
project's venv; see docs/design.md section 7):

  python tests/lpips_reference_script.py OUT.npz [PTH_DIR]

For each case (random VGG-16 trunk with the official v0.1 linear weights; random
trunk and random linear weights) at two image sizes, it stores the LPIPS state
dict under "<case>/<torch key>", and per image size the images
"<case>_<size>/x0", "<case>_<size>/x1" ([B, 3, H, W] in [-1, 1]) and lpips'
distances "<case>_<size>/d" [B]. With PTH_DIR, the first case's random trunk
is also saved there in torchvision's layout ("features.N.weight"), as
vgg16_random_features.pth, to exercise the .pth converter.
"""

import sys
from importlib import metadata

import lpips
import numpy as np
import torch


def main(out, pth_dir=None):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    arrays = {}
    for case, calibrated in (("official_lin", True), ("random_lin", False)):
        model = lpips.LPIPS(net="vgg", pretrained=calibrated, pnet_rand=True, verbose=False).eval()
        if not calibrated:  # random non-negative weights, as calibrated ones are
            with torch.no_grad():
                for lin in model.lins:
                    lin.model[-1].weight.uniform_(0, 1)
        arrays.update({f"{case}/{k}": v.numpy() for k, v in model.state_dict().items()})
        if pth_dir and calibrated:  # the trunk alone, in torchvision's layout
            torch.save(
                {f"features.{k.split('.', 2)[2]}": v for k, v in model.state_dict().items() if k.startswith("net.")},
                f"{pth_dir}/vgg16_random_features.pth",
            )
        for size in (64, 32):
            name = f"{case}_{size}"
            x0 = rng.uniform(-1, 1, (4, 3, size, size)).astype(np.float32)
            x1 = np.clip(x0 + rng.normal(0, 0.3, x0.shape), -1, 1).astype(np.float32)
            with torch.no_grad():
                d = model(torch.from_numpy(x0), torch.from_numpy(x1)).reshape(-1)
            arrays[f"{name}/x0"], arrays[f"{name}/x1"] = x0, x1
            arrays[f"{name}/d"] = d.numpy()
    versions = ", ".join(f"{package} {metadata.version(package)}" for package in ("lpips", "torch", "torchvision"))
    np.savez(out, versions=np.array(versions), **arrays)


if __name__ == "__main__":
    main(*sys.argv[1:])
