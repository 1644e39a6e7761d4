"""Flax LPIPS against an independent NumPy statement of the formula, with random
weights written in the official PyTorch layout and loaded through the converter."""

import numpy as np
import pytest

from mmdiff_jax import metrics
from mmdiff_jax.metrics import convert_lpips_weights
from mmdiff_jax.metrics import lpips

# torchvision VGG-16 `features`: index -> (in, out) channels of each 3x3 conv
CONVS = {
    0: (3, 64),
    2: (64, 64),
    5: (64, 128),
    7: (128, 128),
    10: (128, 256),
    12: (256, 256),
    14: (256, 256),
    17: (256, 512),
    19: (512, 512),
    21: (512, 512),
    24: (512, 512),
    26: (512, 512),
    28: (512, 512),
}
TAPS = (2, 7, 14, 21, 28)  # relu1_2 ... relu5_3
POOLS = (5, 10, 17, 24)  # a 2x2 max-pool precedes these convs
SHIFT = np.array([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)
SCALE = np.array([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1)


def random_torch_state(seed=0):
    """Random weights named and shaped as torchvision's VGG-16 and lpips' vgg.pth."""
    rng = np.random.default_rng(seed)
    vgg = {}
    for index, (cin, cout) in CONVS.items():
        vgg[f"features.{index}.weight"] = rng.normal(0, np.sqrt(2 / (9 * cin)), (cout, cin, 3, 3)).astype(np.float32)
        vgg[f"features.{index}.bias"] = rng.normal(0, 0.1, cout).astype(np.float32)
    vgg["classifier.0.weight"] = np.zeros((4, 3), np.float32)  # ignored
    lin = {
        f"lin{i}.model.1.weight": rng.uniform(0, 1, (1, c, 1, 1)).astype(np.float32)
        for i, c in enumerate((64, 128, 256, 512, 512))
    }
    return vgg, lin


def numpy_lpips(vgg, lin, x0, x1):
    """LPIPS of NCHW images in [-1, 1], straight from the torch-layout arrays."""

    def conv3x3(x, weight, bias):
        padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), (2, 3))
        return np.einsum("bchwij,ocij->bohw", windows, weight, optimize=True) + bias[None, :, None, None]

    def features(x):
        x, taps = (x - SHIFT) / SCALE, []
        for index in CONVS:
            if index in POOLS:
                b, c, h, w = x.shape
                x = x[:, :, : h // 2 * 2, : w // 2 * 2].reshape(b, c, h // 2, 2, w // 2, 2).max((3, 5))
            x = np.maximum(
                conv3x3(x, vgg[f"features.{index}.weight"].astype(np.float64), vgg[f"features.{index}.bias"]),
                0,
            )
            if index in TAPS:
                taps.append(x)
        return taps

    total = 0
    for layer, (f0, f1) in enumerate(zip(features(x0), features(x1))):
        n0 = f0 / (np.sqrt((f0**2).sum(1, keepdims=True)) + 1e-10)
        n1 = f1 / (np.sqrt((f1**2).sum(1, keepdims=True)) + 1e-10)
        weights = lin[f"lin{layer}.model.1.weight"].reshape(1, -1, 1, 1)
        total = total + (weights * (n0 - n1) ** 2).sum(1).mean((1, 2))
    return total


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    vgg, lin = random_torch_state()
    path = lpips.save_params(lpips.convert_torch_state_dicts(vgg, lin), tmp_path_factory.mktemp("lpips") / "lpips.npz")
    return vgg, lin, path


def test_converted_weights_match_numpy_formula(converted):
    vgg, lin, path = converted
    params = lpips.load_params(path)
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    x1 = np.clip(x0 + rng.normal(0, 0.3, x0.shape), -1, 1).astype(np.float32)
    ours = lpips.lpips_distance(params, x0.transpose(0, 2, 3, 1), x1.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(ours, numpy_lpips(vgg, lin, x0, x1), rtol=2e-4)
    same = lpips.lpips_distance(params, x0.transpose(0, 2, 3, 1), x0.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(same, 0.0, atol=1e-7)


def test_grayscale_is_repeated_and_evaluator_reads_weights(converted):
    _, _, path = converted
    rng = np.random.default_rng(2)
    gray0 = rng.uniform(-1, 1, (2, 16, 16, 1)).astype(np.float32)
    gray1 = rng.uniform(-1, 1, (2, 16, 16, 1)).astype(np.float32)
    params = lpips.load_params(path)
    expected = lpips.lpips_distance(params, np.repeat(gray0, 3, -1), np.repeat(gray1, 3, -1))
    evaluator = metrics.make_evaluator("lpips_vgg", weights=path)
    evaluator.update({"image": gray0, "sample": gray1})
    np.testing.assert_allclose(evaluator.result()["lpips_vgg"], np.mean(expected), rtol=1e-5)


def test_whole_lpips_state_dict_layout_converts_the_same(converted):
    vgg, lin, _ = converted
    slices = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}
    whole = {
        f"net.slice{slices[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": v
        for k, v in vgg.items()
        if k.startswith("features.")
    }
    whole.update(lin)
    whole["scaling_layer.shift"] = SHIFT.astype(np.float32)
    a = lpips.convert_torch_state_dicts(vgg, lin)
    b = lpips.convert_torch_state_dicts(whole)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_missing_and_mismatched_weights_fail_naming_them(tmp_path, monkeypatch):
    monkeypatch.setenv(lpips.WEIGHTS_ENV, str(tmp_path / "absent.npz"))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth") as error:
        lpips.load_params()
    assert str(tmp_path / "absent.npz") in str(error.value)
    vgg, lin = random_torch_state()
    del vgg["features.28.bias"]
    vgg["features.26.weight"] = vgg["features.26.weight"][:, :8]
    with pytest.raises(ValueError) as error:
        lpips.convert_torch_state_dicts(vgg, lin)
    assert "missing features/conv5_3/bias" in str(error.value)
    assert "features/conv5_2/kernel: shape (3, 3, 8, 512)" in str(error.value)


def test_converter_cli_finds_and_merges_both_files(tmp_path, monkeypatch):
    vgg, lin = random_torch_state()
    files = {str(tmp_path / "vgg16.pth"): vgg, str(tmp_path / "vgg.pth"): lin}
    monkeypatch.setattr(
        convert_lpips_weights, "read_torch_state_dict", lambda path: files[str(path)]
    )  # torch itself is not in CI
    out = convert_lpips_weights.main(
        [
            "--vgg16",
            str(tmp_path / "vgg16.pth"),
            "--lin",
            str(tmp_path / "vgg.pth"),
            "--out",
            str(tmp_path / "out.npz"),
        ]
    )
    with np.load(out) as data:
        np.testing.assert_array_equal(data["lin2/kernel"].reshape(-1), lin["lin2.model.1.weight"].reshape(-1))
        np.testing.assert_array_equal(data["features/conv1_1/kernel"], vgg["features.0.weight"].transpose(2, 3, 1, 0))
    monkeypatch.setattr(convert_lpips_weights, "installed_lpips_linear_weights", lambda: None)
    with pytest.raises(SystemExit, match="--lin"):
        convert_lpips_weights.main(["--vgg16", str(tmp_path / "vgg16.pth")])
