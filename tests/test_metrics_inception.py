"""Flax FID Inception-V3 against an independent NumPy statement of pytorch-fid's network
(NCHW, torch layout), with random weights written in pytorch-fid's state-dict layout and
loaded through the converter."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from mmdiff_jax import metrics
from mmdiff_jax.metrics import convert_inception_weights
from mmdiff_jax.metrics import distribution
from mmdiff_jax.metrics import features
from mmdiff_jax.metrics import inception

# ---- the network as torchvision / pytorch-fid state it: conv name -> (in, out, kernel, stride, padding)


def _block_convs(kind, prefix, cin, extra=None):
    """The BasicConv2d layers of one Inception block, as in torchvision's inception.py."""
    c7 = extra
    table = {
        "A": [
            ("branch1x1", cin, 64, (1, 1), 1, (0, 0)),
            ("branch5x5_1", cin, 48, (1, 1), 1, (0, 0)),
            ("branch5x5_2", 48, 64, (5, 5), 1, (2, 2)),
            ("branch3x3dbl_1", cin, 64, (1, 1), 1, (0, 0)),
            ("branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
            ("branch3x3dbl_3", 96, 96, (3, 3), 1, (1, 1)),
            ("branch_pool", cin, extra, (1, 1), 1, (0, 0)),
        ],
        "B": [
            ("branch3x3", cin, 384, (3, 3), 2, (0, 0)),
            ("branch3x3dbl_1", cin, 64, (1, 1), 1, (0, 0)),
            ("branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
            ("branch3x3dbl_3", 96, 96, (3, 3), 2, (0, 0)),
        ],
        "C": [
            ("branch1x1", cin, 192, (1, 1), 1, (0, 0)),
            ("branch7x7_1", cin, c7, (1, 1), 1, (0, 0)),
            ("branch7x7_2", c7, c7, (1, 7), 1, (0, 3)),
            ("branch7x7_3", c7, 192, (7, 1), 1, (3, 0)),
            ("branch7x7dbl_1", cin, c7, (1, 1), 1, (0, 0)),
            ("branch7x7dbl_2", c7, c7, (7, 1), 1, (3, 0)),
            ("branch7x7dbl_3", c7, c7, (1, 7), 1, (0, 3)),
            ("branch7x7dbl_4", c7, c7, (7, 1), 1, (3, 0)),
            ("branch7x7dbl_5", c7, 192, (1, 7), 1, (0, 3)),
            ("branch_pool", cin, 192, (1, 1), 1, (0, 0)),
        ],
        "D": [
            ("branch3x3_1", cin, 192, (1, 1), 1, (0, 0)),
            ("branch3x3_2", 192, 320, (3, 3), 2, (0, 0)),
            ("branch7x7x3_1", cin, 192, (1, 1), 1, (0, 0)),
            ("branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3)),
            ("branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0)),
            ("branch7x7x3_4", 192, 192, (3, 3), 2, (0, 0)),
        ],
        "E": [
            ("branch1x1", cin, 320, (1, 1), 1, (0, 0)),
            ("branch3x3_1", cin, 384, (1, 1), 1, (0, 0)),
            ("branch3x3_2a", 384, 384, (1, 3), 1, (0, 1)),
            ("branch3x3_2b", 384, 384, (3, 1), 1, (1, 0)),
            ("branch3x3dbl_1", cin, 448, (1, 1), 1, (0, 0)),
            ("branch3x3dbl_2", 448, 384, (3, 3), 1, (1, 1)),
            ("branch3x3dbl_3a", 384, 384, (1, 3), 1, (0, 1)),
            ("branch3x3dbl_3b", 384, 384, (3, 1), 1, (1, 0)),
            ("branch_pool", cin, 192, (1, 1), 1, (0, 0)),
        ],
    }[kind]
    return {f"{prefix}.{name}": spec for name, *spec in table}


CONVS = {
    "Conv2d_1a_3x3": (3, 32, (3, 3), 2, (0, 0)),
    "Conv2d_2a_3x3": (32, 32, (3, 3), 1, (0, 0)),
    "Conv2d_2b_3x3": (32, 64, (3, 3), 1, (1, 1)),
    "Conv2d_3b_1x1": (64, 80, (1, 1), 1, (0, 0)),
    "Conv2d_4a_3x3": (80, 192, (3, 3), 1, (0, 0)),
    **_block_convs("A", "Mixed_5b", 192, 32),
    **_block_convs("A", "Mixed_5c", 256, 64),
    **_block_convs("A", "Mixed_5d", 288, 64),
    **_block_convs("B", "Mixed_6a", 288),
    **_block_convs("C", "Mixed_6b", 768, 128),
    **_block_convs("C", "Mixed_6c", 768, 160),
    **_block_convs("C", "Mixed_6d", 768, 160),
    **_block_convs("C", "Mixed_6e", 768, 192),
    **_block_convs("D", "Mixed_7a", 768),
    **_block_convs("E", "Mixed_7b", 1280),
    **_block_convs("E", "Mixed_7c", 2048),
}


def random_torch_state(seed=0):
    """Random weights named and shaped as pytorch-fid's pt_inception-2015-12-05 .pth (OIHW)."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, (cin, cout, (kh, kw), _, _) in CONVS.items():
        state[f"{name}.conv.weight"] = rng.normal(0, np.sqrt(2 / (cin * kh * kw)), (cout, cin, kh, kw))
        state[f"{name}.bn.weight"] = rng.uniform(0.5, 1.5, cout)
        state[f"{name}.bn.bias"] = rng.normal(0, 0.3, cout)
        state[f"{name}.bn.running_mean"] = rng.normal(0, 0.3, cout)
        state[f"{name}.bn.running_var"] = rng.uniform(0.3, 3.0, cout)
        state[f"{name}.bn.num_batches_tracked"] = np.array(0)  # ignored
    state = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in state.items()}
    state["fc.weight"] = np.zeros((1008, 2048), np.float32)  # ignored
    state["fc.bias"] = np.zeros(1008, np.float32)
    return state


# ---- independent NumPy statement, NCHW, float64


def numpy_conv(x, weight, stride, padding):
    """torch.nn.functional.conv2d (no bias): x [B, C, H, W], weight [O, C, kh, kw]."""
    padded = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    windows = np.lib.stride_tricks.sliding_window_view(padded, weight.shape[2:], (2, 3))
    windows = windows[:, :, ::stride, ::stride]
    return np.einsum("bchwij,ocij->bohw", windows, weight, optimize=True)


def basic_conv(state, name, x):
    _, _, _, stride, padding = CONVS[name]
    x = numpy_conv(x, state[f"{name}.conv.weight"].astype(np.float64), stride, padding)
    scale, bias, mean, var = (
        state[f"{name}.bn.{k}"].astype(np.float64)[None, :, None, None]
        for k in ("weight", "bias", "running_mean", "running_var")
    )
    return np.maximum((x - mean) / np.sqrt(var + 1e-3) * scale + bias, 0)


def numpy_pool(x, kind, stride, padding):
    """3x3 max pool (padding -inf) or average pool counting only real pixels (count_include_pad=False)."""
    pad = ((0, 0), (0, 0), (padding,) * 2, (padding,) * 2)
    windows = lambda a: np.lib.stride_tricks.sliding_window_view(a, (3, 3), (2, 3))[:, :, ::stride, ::stride]
    if kind == "max":
        return windows(np.pad(x, pad, constant_values=-np.inf)).max((4, 5))
    counts = windows(np.pad(np.ones_like(x), pad)).sum((4, 5))
    return windows(np.pad(x, pad)).sum((4, 5)) / counts


def numpy_block(state, prefix, kind, x):
    conv = lambda name, y: basic_conv(state, f"{prefix}.{name}", y)
    if kind == "A":
        branches = [
            conv("branch1x1", x),
            conv("branch5x5_2", conv("branch5x5_1", x)),
            conv("branch3x3dbl_3", conv("branch3x3dbl_2", conv("branch3x3dbl_1", x))),
            conv("branch_pool", numpy_pool(x, "average", 1, 1)),
        ]
    elif kind == "B":
        branches = [
            conv("branch3x3", x),
            conv("branch3x3dbl_3", conv("branch3x3dbl_2", conv("branch3x3dbl_1", x))),
            numpy_pool(x, "max", 2, 0),
        ]
    elif kind == "C":
        seven = conv("branch7x7_3", conv("branch7x7_2", conv("branch7x7_1", x)))
        double = conv("branch7x7dbl_1", x)
        for index in (2, 3, 4, 5):
            double = conv(f"branch7x7dbl_{index}", double)
        branches = [conv("branch1x1", x), seven, double, conv("branch_pool", numpy_pool(x, "average", 1, 1))]
    elif kind == "D":
        seven = x
        for index in (1, 2, 3, 4):
            seven = conv(f"branch7x7x3_{index}", seven)
        branches = [conv("branch3x3_2", conv("branch3x3_1", x)), seven, numpy_pool(x, "max", 2, 0)]
    else:  # "E_1" (average pool) or "E_2" (max pool)
        three = conv("branch3x3_1", x)
        double = conv("branch3x3dbl_2", conv("branch3x3dbl_1", x))
        pooled = numpy_pool(x, "average" if kind == "E_1" else "max", 1, 1)
        branches = [
            conv("branch1x1", x),
            conv("branch3x3_2a", three),
            conv("branch3x3_2b", three),
            conv("branch3x3dbl_3a", double),
            conv("branch3x3dbl_3b", double),
            conv("branch_pool", pooled),
        ]
    return np.concatenate(branches, 1)


def torch_bilinear(x, size):
    """F.interpolate(x [B, C, H, W], size, mode="bilinear", align_corners=False), torch's formula.

    Source coordinates in float32, as torch computes them: in float64 they move by up to
    1e-4 pixel at H ~ 300, which shows.
    """
    for axis in (2, 3):
        length = x.shape[axis]
        scale, half = np.float32(length / size), np.float32(0.5)
        source = np.maximum(scale * (np.arange(size, dtype=np.float32) + half) - half, 0)
        low = np.minimum(source.astype(int), length - 1)
        high = np.minimum(low + 1, length - 1)
        weight = (source - low).astype(np.float64).reshape([-1 if a == axis else 1 for a in range(4)])
        x = np.take(x, low, axis) * (1 - weight) + np.take(x, high, axis) * weight
    return x


def numpy_inception(state, images):
    """pytorch-fid InceptionV3([3]) on images [B, H, W, C] in [-1, 1] -> [B, 2048]."""
    x = images.astype(np.float64).transpose(0, 3, 1, 2)
    x = torch_bilinear(np.repeat(x, 3, 1) if x.shape[1] == 1 else x, 299)
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
        x = basic_conv(state, name, x)
    x = numpy_pool(x, "max", 2, 0)
    x = basic_conv(state, "Conv2d_4a_3x3", basic_conv(state, "Conv2d_3b_1x1", x))
    x = numpy_pool(x, "max", 2, 0)
    blocks = "5b A 5c A 5d A 6a B 6b C 6c C 6d C 6e C 7a D 7b E_1 7c E_2".split()
    for name, kind in zip(blocks[::2], blocks[1::2]):
        x = numpy_block(state, f"Mixed_{name}", kind, x)
    return x.mean((2, 3))


# ---- tests


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    state = random_torch_state()
    path = inception.save_params(
        convert_inception_weights.convert_torch_state_dict(state),
        tmp_path_factory.mktemp("inception") / "inception.npz",
    )
    return state, path


IMAGES = np.random.default_rng(1).uniform(-1, 1, (2, 20, 20, 1)).astype(np.float32)


def test_converted_network_matches_numpy_statement(converted):
    state, path = converted
    ours = np.asarray(inception.inception_features(inception.load_params(path), IMAGES))
    expected = numpy_inception(state, IMAGES)
    assert ours.shape == (2, 2048) and np.all(np.isfinite(ours))
    assert np.abs(expected[0] - expected[1]).max() > 0.1  # the features tell the images apart
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-5 * np.abs(expected).max())


def test_bilinear_resize_is_torchs_align_corners_false():
    rng = np.random.default_rng(2)
    for height, width in ((16, 16), (20, 37), (331, 300)):  # up, mixed and down
        images = rng.uniform(-1, 1, (1, height, width, 3)).astype(np.float32)
        expected = torch_bilinear(images.astype(np.float64).transpose(0, 3, 1, 2), 299).transpose(0, 2, 3, 1)
        np.testing.assert_allclose(inception.preprocess(images), expected, rtol=0, atol=1e-5)
    gray = rng.uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
    np.testing.assert_array_equal(inception.preprocess(gray), inception.preprocess(np.repeat(gray, 3, -1)))
    with pytest.raises(ValueError, match="1 or 3"):
        inception.preprocess(np.zeros((1, 8, 8, 2)))


def test_average_pool_does_not_count_padding_and_last_block_max_pools():
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4, 1)
    pooled = np.asarray(inception.average_pool_3x3(x))[0, :, :, 0]
    assert pooled[0, 0] == np.mean([0, 1, 4, 5])  # a corner: 4 real pixels, not /9
    assert pooled[0, 1] == np.mean([0, 1, 2, 4, 5, 6])  # an edge: 6 real pixels
    np.testing.assert_allclose(pooled, numpy_pool(x.transpose(0, 3, 1, 2), "average", 1, 1)[0, 0])
    negative = -1 - x  # all < 0: a zero-padded max would show 0 at the border
    expected = numpy_pool(negative.transpose(0, 3, 1, 2), "max", 1, 1)[0, 0]
    np.testing.assert_array_equal(inception.max_pool_3x3(negative, 1)[0, :, :, 0], expected)


def test_converter_refuses_missing_and_misshaped_weights_and_imagenet_weights(converted):
    state = dict(converted[0])
    del state["Mixed_7c.branch_pool.bn.running_var"]
    key = "Mixed_6b.branch7x7_2.conv.weight"
    state[key] = state[key].transpose(0, 1, 3, 2)  # a 7x1 kernel where a 1x7 belongs
    state["Mixed_5b.branch1x1.bn.something"] = np.zeros(64, np.float32)
    with pytest.raises(ValueError) as error:
        convert_inception_weights.convert_torch_state_dict(state)
    message = str(error.value)
    assert "missing batch_stats/Mixed_7c/branch_pool/bn/var (192,)" in message
    assert "Mixed_6b/branch7x7_2/conv/kernel: shape (7, 1, 128, 128), expected (1, 7, 128, 128)" in message
    assert "unexpected Mixed_5b.branch1x1.bn.something" in message
    imagenet = dict(converted[0])
    imagenet["fc.weight"] = np.zeros((1000, 2048), np.float32)
    with pytest.raises(ValueError, match="1000 classes"):
        convert_inception_weights.convert_torch_state_dict(imagenet)


def test_wrapper_layout_and_cli_convert_the_same(converted, tmp_path, monkeypatch):
    state, path = converted
    blocks = [
        ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"],
        ["Conv2d_3b_1x1", "Conv2d_4a_3x3"],
        [f"Mixed_{name}" for name in "5b 5c 5d 6a 6b 6c 6d 6e".split()],
        ["Mixed_7a", "Mixed_7b", "Mixed_7c"],
    ]
    renamed = {name: f"blocks.{i}.{j}" for i, names in enumerate(blocks) for j, name in enumerate(names)}
    wrapper = {}
    for key, value in state.items():
        module, rest = key.split(".", 1)
        if module != "fc":
            wrapper[f"{renamed[module]}.{rest}"] = value
    # torch itself is not in CI
    monkeypatch.setattr(convert_inception_weights, "read_torch_state_dict", lambda _: wrapper)
    out = convert_inception_weights.main(["--pth", "inception_v3.pth", "--out", str(tmp_path / "out.npz")])
    with np.load(out) as cli, np.load(path) as direct:
        assert sorted(cli.files) == sorted(direct.files) and len(cli.files) == 5 * len(CONVS)
        for key in direct.files:
            np.testing.assert_array_equal(cli[key], direct[key])
        np.testing.assert_array_equal(
            cli["params/Mixed_6b/branch7x7_2/conv/kernel"],
            state["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0),
        )


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "absent.npz"))
    for load in (inception.load_params, lambda: features.get_feature_fn("inception_v3")):
        with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth") as error:
            load()
        assert str(tmp_path / "absent.npz") in str(error.value)
        assert "convert_inception_weights" in str(error.value)


def test_fid_evaluator_with_inception_features(converted, monkeypatch):
    _, path = converted
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(path))
    fid_calls = []

    def recorded_fid(reference, samples):
        # a stand-in: the FID formula is checked in test_metrics_distribution.py, and at D = 2048
        # its eigendecompositions take 10-30 s on 2 busy cores
        fid_calls.append((reference, samples, float(np.sum((reference.mean(0) - samples.mean(0)) ** 2))))
        return fid_calls[-1][-1]

    monkeypatch.setattr(distribution, "fid", recorded_fid)
    rng = np.random.default_rng(3)
    noisy = lambda: np.clip(IMAGES + rng.normal(0, 0.5, IMAGES.shape), -1, 1).astype(np.float32)
    batches = [{"image": IMAGES, "sample": noisy()} for _ in range(2)]
    evaluator = metrics.make_evaluator("fid", features="inception_v3")
    for batch in batches:
        evaluator.update(batch)
    result = evaluator.result()
    ((reference, samples, value),) = fid_calls
    assert result == {"fid_inception_v3": value} and value > 0
    feature_fn = features.get_feature_fn("inception_v3", weights_path=path)
    np.testing.assert_allclose(reference, np.concatenate([feature_fn(IMAGES)] * 2), rtol=1e-6)
    np.testing.assert_allclose(samples, np.concatenate([feature_fn(b["sample"]) for b in batches]), rtol=1e-6)


def test_random_params_have_the_network_shapes():
    params = inception.init_random_params(jax.random.key(0))
    inception.check_flat_params(traverse_util.flatten_dict(params, sep="/"), "init_random_params")
    random_features = np.asarray(inception.inception_features(params, IMAGES))
    assert random_features.shape == (2, 2048) and np.all(np.isfinite(random_features))
