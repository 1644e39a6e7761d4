"""Config validation (before any compilation), the optimizer schedule, writers: all fast, no training."""

import copy
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from configs.default import get_config
from mmdiff_jax import tasks
from mmdiff_jax.tasks.mt_diffusion import model_signature
from mmdiff_jax.training import checkpoint as checkpoint_lib
from mmdiff_jax.training import config_io, writers
from mmdiff_jax.training import state as state_lib
from tests import training_helpers as helpers


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return helpers.tiny_config(helpers.write_arrays(tmp_path_factory.mktemp("data") / "arrays.npz"))


def validate(config, num_devices=None):
    """The trainer's checks, then the task's (as `python -m mmdiff_jax.train` runs them)."""
    config_io.validate_config(config, num_devices=num_devices)
    return tasks.make_mt_diffusion_task(config)


def test_default_and_tiny_configs_validate(config):
    task = validate(config)
    assert [m.name for m in task.model.modalities] == ["masked_image"]
    full = get_config()
    config_io.check_known_keys(full)
    assert tasks.build_model(full).unet.base_channels == 64
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("huge")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.train.__setitem__("stepz", 3), r"unknown to the trainer or task: \['train.stepz'\]"),
        (
            lambda c: c.model.modalities.masked_image.__setitem__("kind", "smell"),
            r"config.model.modalities.masked_image: .*unknown kind 'smell'",
        ),
        (
            lambda c: c.model.modalities.masked_image.__setitem__("colour", 1),
            r"config.model.modalities.masked_image: unknown fields \['colour'\]",
        ),
        (lambda c: c.model.unet.__setitem__("depth", 3), r"unknown to the trainer or task: \['model.unet.depth'\]"),
        (lambda c: c.model.__setitem__("dtype", "float16"), "config.model.dtype must be one of"),
        (lambda c: c.mesh.__setitem__("shape", (2, -1)), r"mesh.shape \(2, -1\) does not divide the 1 devices"),
        (
            lambda c: c.data.__setitem__("transforms", "pad(32)|value_range()"),
            r"modality 'masked_image' reads the field 'masked_image', which config.data.source arrays\(.*\) with "
            r"config.data.transforms pad\(32\)\|value_range\(\) does not give \(it gives \['image', 'label'\]\)",
        ),
        (
            lambda c: c.data.__setitem__("transforms", "value_range()|masked_image()"),
            r"the primary modality \(config.model.primary\): .* gives 'image' per-example shape \(28, 28, 1\), the model expects "
            r"\(32, 32, 1\)",
        ),
        (
            lambda c: c.data.__setitem__("transforms", "masked_image()"),
            r"config.data.transforms: masked_image\(\) needs 'image' as float32, it is uint8",
        ),
        (
            lambda c: c.data.__setitem__("source", "folder('/no/such/folder')"),
            "config.data.source folder.*no such folder",
        ),
        (lambda c: c.model.modalities.masked_image.__setitem__("shape", (16, 16, 1)), "does not match z's shape"),
        (lambda c: c.optim.__setitem__("schedule", "exponential"), "optim.schedule must be one of"),
        (lambda c: c.loss.__setitem__("time_weighting", "snr"), r"config.loss.time_weighting: unknown 'snr'"),
        (lambda c: c.model.__setitem__("prediction", "x0"), r"unknown prediction target 'x0'"),
        (
            lambda c: c.diffusion.__setitem__("zero_terminal_snr", True),
            r"config.diffusion.zero_terminal_snr\) needs the 'v' or 'z_0' prediction target \(config.model.prediction",
        ),
        (
            lambda c: (
                c.diffusion.__setitem__("zero_terminal_snr", True),
                c.model.__setitem__("prediction", "v"),
                c.model.modalities.masked_image.__setitem__("weight_schedule", ("bridge", 1.0)),
            ),
            r"zero_terminal_snr \(config.diffusion\) forces lambda_T = 0 .* \['masked_image'\] have 'bridge'",
        ),
        (lambda c: c.train.__setitem__("best_mode", "best"), "best_mode must be 'min' or 'max'"),
        (
            lambda c: c.train.__setitem__("checkpoint_steps", (0, 2)),
            r"config.train.checkpoint_steps must be steps in 1..train.steps = 20, got \[0\]",
        ),
        (lambda c: c.__setitem__("prng_impl", "philox"), r"config.prng_impl must be one of \('threefry2x32', 'rbg'\)"),
    ],
)
def test_semantic_errors_name_the_key(config, mutate, message):
    broken = copy.deepcopy(config)
    broken.unlock()
    mutate(broken)
    with pytest.raises(ValueError, match=message):
        validate(broken, num_devices=1)  # one device, whatever XLA_FLAGS the caller set


def test_a_zero_terminal_snr_config_builds_its_schedule(config):
    zero_snr = copy.deepcopy(config)
    zero_snr.diffusion.zero_terminal_snr, zero_snr.model.prediction = True, "v"
    schedule = validate(zero_snr, num_devices=1).schedule
    assert float(schedule.alpha_bar[-1]) == 0 and float(schedule.lambda_[0, -1]) == 0
    assert float(validate(config, num_devices=1).schedule.alpha_bar[-1]) > 0


def test_batch_must_split_over_devices_and_micro_batches(config):
    from mmdiff_jax.training import mesh as mesh_lib

    mesh = mesh_lib.make_mesh((1, 1), jax.devices()[:1])  # one device, whatever XLA_FLAGS the caller set
    mesh_lib.check_batch_size("config.data.batch_size", 8, mesh, 2)
    broken = copy.deepcopy(config)
    broken.optim.grad_accumulation_steps = 3
    with pytest.raises(
        ValueError,
        match=r"config.data.batch_size=8 is not divisible by the data-parallel size 1 "
        r".* x 3 micro-batches",
    ):
        config_io.validate_config(broken, num_devices=1)


def test_learning_rate_schedule_warms_up_then_decays():
    optim = dict(get_config().optim)
    optim.update(learning_rate=1.0, end_learning_rate=0.1, warmup_steps=10, decay_steps=110)
    for kind in ("cosine", "linear"):
        schedule = state_lib.learning_rate_schedule(dict(optim, schedule=kind), total_steps=1000)
        np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(110)], [0, 0.5, 1, 0.1], atol=1e-6)
    constant = state_lib.learning_rate_schedule(dict(optim, schedule="constant"), total_steps=1000)
    np.testing.assert_allclose([constant(5), constant(500)], [0.5, 1.0], atol=1e-6)
    with pytest.raises(ValueError, match="must exceed optim.warmup_steps"):
        state_lib.learning_rate_schedule(dict(optim, decay_steps=5), total_steps=1000)


def test_optimizer_clips_and_decays_only_matrices():
    optim = dict(
        get_config().optim, learning_rate=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5, grad_clip_norm=1.0
    )
    optimizer, _ = state_lib.make_optimizer(optim, total_steps=10)
    params = {"kernel": jax.numpy.ones((2, 2)), "bias": jax.numpy.ones((2,))}
    zero_grads = jax.tree.map(jax.numpy.zeros_like, params)
    updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
    assert float(jax.numpy.abs(updates["kernel"]).max()) > 0 and float(jax.numpy.abs(updates["bias"]).max()) == 0
    huge = jax.tree.map(lambda p: 1e6 * jax.numpy.ones_like(p), params)
    clipped, _ = optax.clip_by_global_norm(1.0).update(huge, optax.EmptyState())
    np.testing.assert_allclose(optax.tree.norm(clipped), 1.0, rtol=1e-5)


def test_signature_and_shape_differences_are_named():
    saved = {"model": {"unet": {"base_channels": 8}, "dtype": "float32"}, "diffusion": {"num_steps": 100}}
    current = {"model": {"unet": {"base_channels": 16}, "dtype": "float32"}, "diffusion": {"num_steps": 100}}
    assert config_io.signature_differences(saved, current) == ["model.unet.base_channels: checkpoint 8, config 16"]
    current["diffusion"]["zero_terminal_snr"] = True  # a key left out of older signatures at its default
    assert config_io.signature_differences(saved, current)[0] == (
        "diffusion.zero_terminal_snr: checkpoint <not recorded: the default>, config True"
    )
    rematerialised = get_config()
    rematerialised.model.unet.remat = "nothing_saveable"  # same parameters: a checkpoint restores either way
    assert model_signature(rematerialised) == model_signature(get_config())
    # A key added later joins the signature only away from its default: older checkpoints restore.
    assert "zero_terminal_snr" not in model_signature(get_config())["diffusion"]
    zero_snr = get_config()
    zero_snr.diffusion.zero_terminal_snr = True
    assert model_signature(zero_snr)["diffusion"]["zero_terminal_snr"] is True
    old = {"params": {"w": jax.ShapeDtypeStruct((3, 4), np.float32), "gone": jax.ShapeDtypeStruct((2,), np.float32)}}
    new = {"params": {"w": jax.ShapeDtypeStruct((3, 5), np.float32), "new": jax.ShapeDtypeStruct((1,), np.float32)}}
    assert checkpoint_lib.shape_differences(old, new) == [
        "params/gone: not in the model (checkpoint (2,) float32)",
        "params/new: not in the checkpoint (model (1,) float32)",
        "params/w: checkpoint (3, 4) float32, model (3, 5) float32",
    ]


def test_image_grid_layout():
    images = np.stack([np.full((2, 4, 4, 1), -1.0), np.full((2, 4, 4, 1), 1.0)])  # 2 rows x 2 columns
    grid = writers.image_grid(images, padding=1)
    assert grid.shape == (11, 11) and grid.dtype == np.uint8
    assert grid[1, 1] == 0 and grid[6, 6] == 255 and grid[0, 0] == 255


def test_checkpointer_accepts_a_relative_directory(tmp_path, monkeypatch):
    """Orbax refuses relative paths at the first save; a relative --workdir must still keep its checkpoints."""

    class Position:  # the data-iterator protocol the checkpointer saves
        def __init__(self, index):
            self.index = index

        def get_state(self):
            return {"index": self.index}

        def set_state(self, state):
            self.index = state["index"]

    monkeypatch.chdir(tmp_path)
    checkpointer = checkpoint_lib.Checkpointer(
        "run/checkpoints", signature={"model": 1}, save_every=1, keep=1, async_save=False
    )
    state = {"w": np.arange(3.0, dtype=np.float32)}
    assert checkpointer.save(1, state, Position(7), force=True)
    checkpointer.wait_until_finished()
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()
    position = Position(0)
    restored = checkpointer.restore(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state), position)
    checkpointer.close()
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert position.index == 7


@pytest.mark.parametrize(
    "name",
    [
        "default",
        "masked_pretrain",
        "joint_image_label",
        "image_segmentation",
        "image_embedding",
        "image_transition",
        "multitask",
        "multitask_scenes",
    ],
)
def test_overriding_one_config_key_changes_no_other(name):
    """`--config.train.eval_every=100` must not move train.steps (as a shared ml_collections FieldReference
    would): every scalar of every preset is set alone, and the rest of the config stays as it was."""
    module = __import__(f"configs.{name}", fromlist=["get_config"])
    for preset in ("", "tiny"):
        before = module.get_config(preset).to_dict()
        flat = {
            key: value
            for key, value in config_io._flatten(before).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        for key, value in flat.items():
            config = module.get_config(preset)
            section, field = key.rsplit(".", 1) if "." in key else ("", key)
            target = config
            for part in filter(None, section.split(".")):
                target = target[part]
            target[field] = value + 7
            after = config_io._flatten(config.to_dict())
            changed = [k for k in flat if after[k] != flat[k]]
            assert changed == [key], f"configs/{name}.py preset {preset!r}: setting {key} also changed {changed}"


def test_the_trainer_imports_no_model_code():
    """`training/` takes what it trains as a Task: importing it (and running its checks) loads no network,
    modality, objective, sampler or task module; `mmdiff_jax.tasks` brings them."""
    script = (
        "import sys\n"
        "import mmdiff_jax.training\n"
        "model_code = ('mmdiff_jax.models', 'mmdiff_jax.modalities', 'mmdiff_jax.objective', 'mmdiff_jax.sampling',\n"
        "              'mmdiff_jax.tasks')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(model_code))\n"
        "assert not loaded, loaded\n"
        "import mmdiff_jax.tasks\n"
        "assert 'mmdiff_jax.models.mt_diffusion' in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(helpers.REPO)),
        cwd=helpers.REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
