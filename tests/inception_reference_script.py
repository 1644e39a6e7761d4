"""Runs pytorch-fid's InceptionV3 on random weights and dumps weights, images, features.

Run with an interpreter that has pytorch-fid 0.3.0 + torch + torchvision (NOT
the project's venv; see docs/design.md section 7):

  python tests/inception_reference_script.py OUT.npz [PTH_DIR]

pytorch-fid downloads its weights in `fid_inception_v3` through
`load_state_dict_from_url`; that name is replaced by one returning random
weights in the released file's layout (torchvision Inception3 names, 1008-class
"fc", BatchNorm running statistics far from 0 / 1). Stores that state dict as
"state/<key>", the `InceptionV3([3])` wrapper's as "wrapper/<key>", and per
case the images "<case>/images" [B, H, W, C] in [-1, 1] (our convention: fed
to pytorch-fid as (x + 1) / 2, gray repeated to RGB) and its pool3 features
"<case>/features" [B, 2048]. "resize_<H>x<W>/input" [2, 3, H, W] and
"/output" [2, 3, 299, 299] check F.interpolate(bilinear, align_corners=False)
alone. With PTH_DIR, the state dict is also saved there as
pt_inception_random.pth, to exercise the .pth converter.
"""

import sys
from importlib import metadata

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from pytorch_fid import inception as fid_inception

CASES = {"gray_32": (4, 32, 32, 1), "rgb_64": (2, 64, 64, 3), "rgb_331": (1, 331, 331, 3)}
RESIZE_SIZES = ((16, 16), (32, 20), (331, 331), (512, 300))


def random_state(rng):
    """Random weights with the released file's names and shapes."""
    template = torchvision.models.inception_v3(
        weights=None, num_classes=1008, aux_logits=False, init_weights=False
    ).state_dict()
    state = {}
    for key, value in template.items():
        shape = tuple(value.shape)
        if key.endswith("conv.weight"):
            array = rng.normal(0, np.sqrt(2 / np.prod(shape[1:])), shape)
        elif key.endswith("bn.weight"):
            array = rng.uniform(0.5, 1.5, shape)
        elif key.endswith(("bn.bias", "running_mean")):
            array = rng.normal(0, 0.3, shape)
        elif key.endswith("running_var"):
            array = rng.uniform(0.3, 3.0, shape)
        elif key.startswith("fc."):
            array = rng.normal(0, 0.01, shape)
        else:  # num_batches_tracked
            state[key] = value
            continue
        state[key] = torch.from_numpy(array.astype(np.float32))
    return state


def main(out, pth_dir=None):
    rng = np.random.default_rng(0)
    state = random_state(rng)
    fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state  # no download
    model = fid_inception.InceptionV3([fid_inception.InceptionV3.DEFAULT_BLOCK_INDEX]).eval()
    arrays = {f"state/{k}": v.numpy() for k, v in state.items()}
    arrays.update({f"wrapper/{k}": v.numpy() for k, v in model.state_dict().items()})
    if pth_dir:
        torch.save(state, f"{pth_dir}/pt_inception_random.pth")
    for case, shape in CASES.items():
        images = rng.uniform(-1, 1, shape).astype(np.float32)
        rgb = np.repeat(images, 3, -1) if shape[-1] == 1 else images
        with torch.no_grad():
            features = model(torch.from_numpy((rgb.transpose(0, 3, 1, 2) + 1) / 2))[0]
        arrays[f"{case}/images"] = images
        arrays[f"{case}/features"] = features.reshape(shape[0], -1).numpy()
    for height, width in RESIZE_SIZES:
        inputs = rng.uniform(-1, 1, (2, 3, height, width)).astype(np.float32)
        outputs = F.interpolate(torch.from_numpy(inputs), (299, 299), mode="bilinear", align_corners=False)
        arrays[f"resize_{height}x{width}/input"] = inputs
        arrays[f"resize_{height}x{width}/output"] = outputs.numpy()
    versions = ", ".join(
        f"{package} {metadata.version(package)}" for package in ("pytorch-fid", "torch", "torchvision")
    )
    np.savez(out, versions=np.array(versions), **arrays)


if __name__ == "__main__":
    main(*sys.argv[1:])
