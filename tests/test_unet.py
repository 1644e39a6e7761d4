"""The ADM-style U-Net: shapes, wiring (time embedding, attention, dropout), parameter count, bf16."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdiff_jax.models.layers import AttentionBlock, ResBlock, timestep_embedding
from mmdiff_jax.models.unet import UNet, unet_preset

KEY = jax.random.key(0, impl="rbg")  # rbg: much faster XLA compiles of the initialisers on CPU


def _normal(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _perturbed(variables, scale=0.3):
    """Zero-initialised output convs make a fresh U-Net return 0; perturb every parameter (NumPy noise:
    eager jax.random calls compile once per shape, slow on CPU)."""
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda x: x + scale * rng.normal(size=x.shape).astype(np.float32), variables)


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_timestep_embedding_matches_the_sinusoid_formula():
    t = jnp.array([0, 7, 999])
    embedding = timestep_embedding(t, 8)
    frequencies = np.exp(-np.log(10_000.0) * np.arange(4) / 4)
    arguments = np.outer([0, 7, 999], frequencies)
    expected = np.concatenate([np.cos(arguments), np.sin(arguments)], 1)
    np.testing.assert_allclose(embedding, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    model = UNet(unet_preset("tiny", attention_resolutions=(8, 4)), out_channels=3)
    x = _normal(2, 8, 8, 3, seed=2)
    variables = jax.jit(lambda key: model.init(key, x, jnp.array([1, 2]), train=False))(KEY)
    apply = jax.jit(lambda v, x, t: model.apply(v, x, t, train=False))
    return model, variables, x, apply


def test_unet_shapes_and_zero_initialised_output(tiny):
    model, variables, x, apply = tiny
    output = apply(variables, x, jnp.array([1, 500]))
    assert output.output.shape == (2, 8, 8, 3)
    assert output.features.shape == (2, 8, 8, 16)  # base_channels * channel_multipliers[0]
    assert output.bottleneck.shape == (2, 4, 4, 32)  # base_channels * channel_multipliers[-1], H / 2
    assert float(jnp.max(jnp.abs(output.output))) == 0.0  # ADM's zero-initialised final conv
    # Attention after every res block at resolutions 8 and 4: 1 + 1 (encoder), 1 (middle), 2 + 2 (decoder).
    attention = [name for name in variables["params"] if name.startswith("AttentionBlock")]
    assert len(attention) == 7


def test_unet_output_depends_on_t_and_x(tiny):
    model, variables, x, apply = tiny
    variables = _perturbed(variables)
    a = apply(variables, x, jnp.array([1, 1])).output
    b = apply(variables, x, jnp.array([900, 900])).output
    c = apply(variables, x[::-1], jnp.array([1, 1])).output
    assert float(jnp.mean(jnp.abs(a - b))) > 1e-3  # time embedding reaches the blocks (scale-shift norm)
    np.testing.assert_allclose(c[::-1], a, rtol=1e-4, atol=1e-4)  # examples are independent
    assert float(jnp.mean(jnp.abs(a[0] - a[1]))) > 1e-3


def test_resblock_dropout_and_scale_shift():
    block = ResBlock(8, dropout=0.5, num_groups=4)
    x, embedding = _normal(2, 4, 4, 8, seed=3), _normal(2, 16, seed=4)
    variables = _perturbed(jax.jit(lambda key: block.init(key, x, embedding, train=False))(KEY))

    @jax.jit
    def run(embedding, seed):
        rngs = {"dropout": jax.random.fold_in(KEY, seed)}
        return (
            block.apply(variables, x, embedding, train=False, rngs=rngs),
            block.apply(variables, x, embedding, train=True, rngs=rngs),
        )

    (eval_a, train_a), (eval_b, train_b), (eval_c, _) = run(embedding, 0), run(embedding, 1), run(2 * embedding, 0)
    np.testing.assert_array_equal(eval_a, eval_b)  # no dropout at evaluation
    assert float(jnp.mean(jnp.abs(train_a - train_b))) > 1e-3  # dropout masks differ with the rng
    assert float(jnp.mean(jnp.abs(eval_a - eval_c))) > 1e-3  # the embedding modulates the norm
    down = ResBlock(16, resample="down", num_groups=4)
    assert jax.eval_shape(lambda: down.init_with_output(KEY, x, embedding, train=False))[0].shape == (2, 2, 2, 16)


def test_attention_block_matches_a_numpy_softmax_reference():
    block = AttentionBlock(num_head_channels=4, num_groups=2)
    x = _normal(1, 3, 3, 8, seed=7)
    variables = _perturbed(jax.jit(block.init)(KEY, x))
    params = variables["params"]
    normed = nn.GroupNorm(2).apply({"params": params["GroupNorm_0"]}, x).reshape(1, 9, 8)
    qkv = np.asarray(normed @ params["qkv"]["kernel"] + params["qkv"]["bias"])
    q, k, v = (part.reshape(9, 2, 4).transpose(1, 0, 2) for part in np.split(qkv[0], 3, axis=-1))
    logits = q @ k.transpose(0, 2, 1) / 2.0  # sqrt(head channels)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = (weights @ v).transpose(1, 0, 2).reshape(9, 8)
    expected = np.asarray(x).reshape(9, 8) + attended @ params["proj_out"]["kernel"] + params["proj_out"]["bias"]
    np.testing.assert_allclose(block.apply(variables, x).reshape(9, 8), expected, rtol=1e-4, atol=1e-4)


def guided_diffusion_parameter_count(
    in_channels, model_channels, out_channels, num_res_blocks, attention_ds, channel_mult, num_classes
):
    """Parameters of guided-diffusion's UNetModel (scale-shift norm, resblock up/down), counted from its
    constructor: torch Conv/Linear (weight + bias), GroupNorm32 (scale + bias), class Embedding."""
    conv = lambda i, o, k: i * o * k * k + o  # noqa: E731
    linear = lambda i, o: i * o + o  # noqa: E731
    embed = 4 * model_channels

    def res(channels, out):
        return (
            2 * channels
            + conv(channels, out, 3)
            + linear(embed, 2 * out)
            + 2 * out
            + conv(out, out, 3)
            + (0 if channels == out else conv(channels, out, 1))
        )

    attention = lambda c: 2 * c + conv(c, 3 * c, 1) + conv(c, c, 1)  # noqa: E731
    total = linear(model_channels, embed) + linear(embed, embed) + num_classes * embed
    channels = model_channels * channel_mult[0]
    total += conv(in_channels, channels, 3)
    skips, ds = [channels], 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            total += res(channels, mult * model_channels)
            channels = mult * model_channels
            total += attention(channels) if ds in attention_ds else 0
            skips.append(channels)
        if level != len(channel_mult) - 1:
            total += res(channels, channels)
            skips.append(channels)
            ds *= 2
    total += 2 * res(channels, channels) + attention(channels)
    for level, mult in reversed(list(enumerate(channel_mult))):
        for index in range(num_res_blocks + 1):
            total += res(channels + skips.pop(), model_channels * mult)
            channels = model_channels * mult
            total += attention(channels) if ds in attention_ds else 0
            if level and index == num_res_blocks:
                total += res(channels, channels)
                ds //= 2
    return total + 2 * channels + conv(channels, out_channels, 3)


def test_adm64_parameter_count():
    """ADM ImageNet-64 (class-conditional, learned sigma: 6 output channels, 1000-class embedding)."""
    config = unet_preset("adm64", num_classes=1000)
    model = UNet(config, out_channels=6)
    x, t = jnp.zeros((1, 64, 64, 3)), jnp.zeros((1,), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(KEY, x, t, t, train=False))
    count = _count(shapes)
    published = 296e6  # Dhariwal & Nichol 2021, Table 14 / guided-diffusion 64x64 model
    reference = guided_diffusion_parameter_count(3, 192, 6, 3, (2, 4, 8), (1, 2, 3, 4), 1000)
    print(
        f"\nADM-64 U-Net parameters: {count:,} (guided-diffusion constructor: {reference:,}; "
        f"published {published / 1e6:.0f}M; relative difference {count / published - 1:+.3%})"
    )
    assert count == reference
    assert abs(count / published - 1) < 0.05
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))


def test_bf16_compute_keeps_float32_params():
    model = UNet(unet_preset("tiny"), out_channels=1, dtype=jnp.bfloat16)
    x = jnp.zeros((1, 8, 8, 1))
    output, variables = jax.eval_shape(lambda: model.init_with_output(KEY, x, jnp.ones((1,), jnp.int32), train=False))
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    assert output.output.dtype == jnp.bfloat16 and output.features.dtype == jnp.bfloat16


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="divisible by 2"):
        unet_preset("tiny").validate((7, 8))
    with pytest.raises(ValueError, match="num_groups"):
        unet_preset("tiny", base_channels=12).validate((8, 8))
    with pytest.raises(ValueError, match="unknown U-Net preset"):
        unet_preset("huge")
    assert unet_preset("adm64").channel_multipliers == (1, 2, 3, 4)


def test_remat_keeps_parameters_and_gradients_and_recomputes():
    """remat='nothing_saveable' wraps every block in jax.checkpoint: the same parameter tree (checkpoints
    stay interchangeable), the same loss and gradients (dropout on), and the backward pass recomputes."""
    config = unet_preset("tiny", num_res_blocks=1, channel_multipliers=(1,), attention_resolutions=(8,), dropout=0.2)
    plain, remat = (
        UNet(config, out_channels=1),
        UNet(dataclasses.replace(config, remat="nothing_saveable"), out_channels=1),
    )
    x, t = _normal(2, 8, 8, 1, seed=5), jnp.array([3, 40])
    variables = _perturbed(jax.jit(lambda key: plain.init(key, x, t, train=False))(KEY))
    shapes = lambda tree: jax.tree.map(jnp.shape, tree)  # noqa: E731
    assert shapes(jax.eval_shape(lambda: remat.init(KEY, x, t, train=False))) == shapes(variables)

    def loss(model, params):
        output = model.apply(params, x, t, train=True, rngs={"dropout": KEY}).output
        return jnp.mean(output**2)

    (plain_loss, plain_grads), (remat_loss, remat_grads) = (
        jax.jit(jax.value_and_grad(lambda p, m=model: loss(m, p)))(variables) for model in (plain, remat)
    )
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
    for ours, theirs in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss(remat, p)))(variables))
    assert jaxpr.count("checkpoint[") + jaxpr.count("remat") >= 4  # one per block (tiny: >= 4 blocks)
    assert "checkpoint[" not in str(jax.make_jaxpr(jax.grad(lambda p: loss(plain, p)))(variables))
    with pytest.raises(ValueError, match="unknown U-Net remat policy 'everything'"):
        UNet(dataclasses.replace(config, remat="everything"), out_channels=1).init(KEY, x, t, train=False)
