"""Sharded training on 8 fake CPU devices (a subprocess with its own XLA_FLAGS) and the mesh helpers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from mmdiff_jax.training import mesh as mesh_lib
from mmdiff_jax.training import steps as steps_lib
from tests import training_helpers as helpers


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    arrays = helpers.write_arrays(tmp_path_factory.mktemp("data") / "arrays.npz")
    env = helpers.child_env(devices=8)
    result = helpers.run_child(["sharding", str(arrays)], env, timeout=500)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_data_parallel_and_fsdp_steps_match_single_device(sharded_results):
    assert sharded_results["devices"] == 8
    single = sharded_results["single"]
    for name in ("data", "data_fsdp"):
        entry = sharded_results[name]
        np.testing.assert_allclose(entry["loss"], single["loss"], rtol=1e-5)
        np.testing.assert_allclose(entry["grad_norm"], single["grad_norm"], rtol=1e-4)
        assert entry["max_param_difference"] <= 1e-5 * max(1.0, entry["max_param_scale"]), (name, entry)
        assert entry["batch_shard_shape"][0] == 16 // 8  # the batch is split over all 8 devices


def test_params_and_optimizer_state_are_sharded_as_configured(sharded_results):
    data = sharded_results["data"]["sharding"]
    assert all(spec == [] for spec, _, _ in data.values())  # replicated over `data`
    fsdp = sharded_results["data_fsdp"]["sharding"]
    sharded = {key: value for key, value in fsdp.items() if "fsdp" in value[0]}
    assert len(sharded) >= 10
    # every array of >= 256 elements with a dimension divisible by 4 is split 4 ways along it
    for key, (spec, shard_shape, shape) in fsdp.items():
        divisible = any(size % 4 == 0 for size in shape)
        if np.prod(shape) >= 256 and divisible:
            assert key in sharded, key
            axis = spec.index("fsdp")
            assert shard_shape[axis] * 4 == shape[axis], (key, spec, shard_shape, shape)
        else:
            assert key not in sharded, key
    kernel = "[0]['backbone']['Conv_0']['kernel']"  # [3, 3, 1, 8]: 72 elements, stays replicated
    assert fsdp[kernel][0] == []
    moments = [key for key in sharded if key.startswith("[1]")]  # Adam's mu / nu follow their params
    assert moments and any("mu" in key for key in moments) and any("nu" in key for key in moments)


def test_mesh_shape_resolution_and_errors():
    assert mesh_lib.resolve_mesh_shape((-1, 1), 8) == (8, 1)
    assert mesh_lib.resolve_mesh_shape((2, -1), 8) == (2, 4)
    with pytest.raises(ValueError, match=r"mesh.shape \(3, -1\) does not divide the 8 devices"):
        mesh_lib.resolve_mesh_shape((3, -1), 8)
    with pytest.raises(ValueError, match="uses 4 of the 8 devices"):
        mesh_lib.resolve_mesh_shape((2, 2), 8)
    with pytest.raises(ValueError, match="at most one -1"):
        mesh_lib.resolve_mesh_shape((-1, -1), 8)


def test_param_spec_rule():
    assert mesh_lib.param_spec((3, 3, 64, 128), 4, 1024) == PartitionSpec(None, None, None, "fsdp")
    assert mesh_lib.param_spec((128,), 4, 1024) == PartitionSpec()  # too small
    assert mesh_lib.param_spec((3, 3, 5, 7), 4, 1) == PartitionSpec()  # nothing divisible
    assert mesh_lib.param_spec((3, 3, 64, 128), 1, 1) == PartitionSpec()  # no fsdp axis


def test_gradient_accumulation_averages_micro_batches():
    """k micro-batches: the mean of the k gradients, micro-batch j with rng fold_in(rng, j)."""

    def loss_fn(params, batch, rng, train=True):
        noise = jax.random.normal(rng, batch["x"].shape)
        loss = jnp.mean((batch["x"] * params["w"] + noise - batch["y"]) ** 2)
        return loss, {"loss": loss}

    batch = {"x": jnp.arange(8.0).reshape(8, 1), "y": jnp.ones((8, 1))}
    params, rng = {"w": jnp.array(0.5)}, jax.random.key(3)
    loss, _, grads, _ = steps_lib._gradients(loss_fn, params, batch, rng, accumulation_steps=2, batch_shards=2)
    micro = steps_lib.split_microbatches(batch, 2, 2)
    # device blocks [0..3], [4..7]; micro-batch 0 = rows 0, 1, 4, 5
    np.testing.assert_array_equal(micro["x"][0, :, 0], [0, 1, 4, 5])
    expected = [
        jax.value_and_grad(loss_fn, has_aux=True)(
            params, {k: v[j] for k, v in micro.items()}, jax.random.fold_in(rng, j)
        )
        for j in range(2)
    ]
    np.testing.assert_allclose(loss, np.mean([e[0][0] for e in expected]), rtol=1e-6)
    np.testing.assert_allclose(grads["w"], np.mean([e[1]["w"] for e in expected]), rtol=1e-6)
