"""The one place that builds the device mesh and says how arrays are laid out on it.

Sharding is data: the config names the mesh shape (`mesh.data`, `mesh.fsdp`, one of them -1 to
absorb the remaining devices) and the parameter layout (`sharding.params`: "replicate" or
"fsdp", plus optional `sharding.rules`, a list of (regex on the parameter path, PartitionSpec
tuple) pairs tried first). Model code never mentions devices.

Batches are split over both axes: in FSDP every device still sees its own slice of the batch.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids=None):
    """Joins a multi-host run. With no arguments JAX reads the cluster from its environment
    (TPU pods, SLURM, Open MPI); on localhost pass all three."""
    if coordinator is None and num_processes is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator, num_processes, process_id,
                                   local_device_ids=local_device_ids)


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence[Any] | None = None):
    """A mesh with axes ("data", "fsdp"). `shape` maps axis name -> size, one size may be -1.

    Axes are Auto: Flax linen's logical constraints and GSPMD propagation need them (jax 0.10's
    `jax.make_mesh` defaults to Explicit).
    """
    shape = dict(shape or {"data": -1, "fsdp": 1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid: {', '.join(MESH_AXES)}")
    devices = list(devices if devices is not None else jax.devices())
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
        sizes[sizes.index(-1)] = len(devices) // known
    needed = int(np.prod(sizes))
    if needed > len(devices) or (needed < len(devices) and jax.process_count() > 1):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {needed} "
                         f"devices, have {len(devices)}")
    # An explicit smaller mesh on one host uses the first devices (e.g. data=1 for debugging).
    devices = devices[:needed]
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _path_str(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2 ** 12) -> P:
    """Shards the largest dimension that the fsdp axis divides; small arrays stay replicated."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in np.argsort(shape)[::-1]:
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(mesh, abstract_tree, strategy: str = "replicate",
                   rules: Sequence[tuple[str, Sequence[Any]]] = ()):
    """NamedShardings for every leaf of a pytree of arrays (or ShapeDtypeStructs).

    Applies to the whole train state: optimizer moments have their parameters' shapes and so
    get their layout, scalars (step, counts) are replicated.
    """
    if strategy not in ("replicate", "fsdp"):
        raise ValueError(f"unknown parameter sharding {strategy!r}; valid: replicate, fsdp")
    compiled = [(re.compile(pattern), P(*spec)) for pattern, spec in rules]
    fsdp_size = mesh.shape["fsdp"]

    def one(path, leaf):
        name = _path_str(path)
        for pattern, spec in compiled:
            if pattern.search(name):
                return NamedSharding(mesh, spec)
        shape = tuple(getattr(leaf, "shape", ()))
        if strategy == "fsdp":
            return NamedSharding(mesh, fsdp_spec(shape, fsdp_size))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def global_batch(local_batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Assembles each host's slice of the batch into global arrays split over the mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}
