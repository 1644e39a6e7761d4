"""Parallelism, in one place: multi-host start-up, the device mesh, partition specs, global batches.

The mesh has two axes, `data` and `fsdp` (config `mesh.shape`, one entry may be -1 = "the rest of the
devices"). The batch is split over both axes (every device sees B / (data * fsdp) examples); parameters,
their EMA and the optimizer state are sharded over `fsdp` (each array along its largest dimension
divisible by the fsdp size, when it has at least `mesh.fsdp_min_size` elements) and replicated over
`data`. With `fsdp` = 1 this is plain data parallelism; with one device everything is replicated and the
same program runs unchanged. XLA (GSPMD) inserts the all-gathers and reduce-scatters.

Multi-host: `initialize_distributed` calls `jax.distributed.initialize` once per process, before any
other JAX call; each process then loads its own slice of the batch (`data.make_dataset` shards by
`jax.process_index()`), and `global_batch` assembles the global array with
`jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # the batch dimension is split over every device
DISTRIBUTED_MODES = ("auto", "always", "never")


def _cluster_environment() -> str | None:
    """Names the multi-process launcher found in the environment, if any (jax auto-detects the rest)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "multi-host TPU"
    return None


def initialize_distributed(config: Mapping[str, Any]) -> bool:
    """`jax.distributed.initialize` from config `distributed`; True when this is a multi-process run.

    Modes (`distributed.initialize`): 'auto' starts the distributed runtime when a coordinator address
    is given (config or $JAX_COORDINATOR_ADDRESS) or a multi-process launcher is detected (SLURM with
    several tasks, Open MPI, multi-host Cloud TPU: jax fills in the coordinator, process count and id);
    'always' always calls it; 'never' never does. On CPU, collectives go through gloo.
    Must run before any other JAX call that touches devices. Idempotent.
    """
    mode = config["initialize"]
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"distributed.initialize must be one of {DISTRIBUTED_MODES}, got {mode!r}")
    address = config["coordinator_address"] or None
    reason = "explicit coordinator address" if address else _cluster_environment()
    if mode == "never" or (mode == "auto" and reason is None):
        return False
    if jax.distributed.is_initialized():
        return True
    num_processes = config["num_processes"] if config["num_processes"] > 0 else None
    process_id = config["process_id"] if config["process_id"] >= 0 else None
    logging.info(
        "jax.distributed.initialize (%s): coordinator=%s num_processes=%s process_id=%s",
        reason or "forced",
        address,
        num_processes,
        process_id,
    )
    jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=process_id)
    return True


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """(data, fsdp) with a -1 entry filled in; ValueError when it does not fit `num_devices`."""
    shape = tuple(int(size) for size in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh.shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1 or any(size == 0 or size < -1 for size in shape):
        raise ValueError(f"mesh.shape {shape}: sizes must be positive, with at most one -1")
    known = math.prod(size for size in shape if size != -1)
    if num_devices % known:
        raise ValueError(
            f"mesh.shape {shape} does not divide the {num_devices} devices "
            f"({'x'.join(map(str, shape))} needs a multiple of {known})"
        )
    resolved = tuple(num_devices // known if size == -1 else size for size in shape)
    if math.prod(resolved) != num_devices:
        raise ValueError(
            f"mesh.shape {shape} uses {math.prod(resolved)} of the {num_devices} devices; "
            f"use -1 for one axis or sizes whose product is {num_devices}"
        )
    return resolved


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
    """The (data, fsdp) mesh over all global devices (GSPMD 'Auto' axes)."""
    devices = list(jax.devices() if devices is None else devices)
    resolved = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(resolved, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch dimension is split (data * fsdp)."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> PartitionSpec:
    """FSDP rule: split the largest dimension divisible by the fsdp size, for arrays of >= min_size elements.

    A rule on the shape alone gives the Adam moments the same spec as their parameter.
    """
    if fsdp_size == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    candidates = [axis for axis, size in enumerate(shape) if size % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda a: (shape[a], a))
    return PartitionSpec(*([None] * axis + ["fsdp"]))


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp_min_size: int) -> Any:
    """NamedShardings for every leaf of a train state (from `jax.eval_shape`): `param_spec` per leaf."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, param_spec(leaf.shape, fsdp_size, fsdp_min_size)), abstract_state
    )


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows -> global arrays split over the mesh (`jax.make_array_from_process_local_data`)."""
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for key, value in local_batch.items()
    }


def check_batch_size(name: str, batch_size: int, mesh: Mesh, accumulation_steps: int = 1) -> None:
    """ValueError unless the global batch splits evenly over processes, devices and micro-batches."""
    shards = batch_shards(mesh)
    if batch_size % (shards * accumulation_steps):
        extra = f" x {accumulation_steps} micro-batches" if accumulation_steps > 1 else ""
        raise ValueError(
            f"{name}={batch_size} is not divisible by the data-parallel size {shards} (mesh {dict(mesh.shape)}){extra}"
        )
    if batch_size % jax.process_count():
        raise ValueError(f"{name}={batch_size} is not divisible by the {jax.process_count()} processes")
