"""Device mesh and shardings for data parallelism (one GPU, eight, or a pod).

One mesh axis, `data`: batches are split along it (P('data')) and parameters are
replicated (P()). Axis types are given explicitly (Auto) since the default changed
between JAX releases, and Explicit axes make shard_map and some ops demand shardings.
Multi-host: each process holds its slice of the global batch and
`global_batch` assembles the global array from those slices.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(global_batch: int, mesh: Mesh, what: str = "batch size") -> None:
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(f"{what} {global_batch} is not divisible by the {n} devices of "
                         f"the mesh; choose a multiple of {n}")
    if global_batch % jax.process_count():
        raise ValueError(f"{what} {global_batch} is not divisible by the "
                         f"{jax.process_count()} processes")


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of the batch -> global arrays sharded along `data`."""
    sharding = data_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def to_host(tree: Any) -> Any:
    """Fetches a (possibly multi-host) pytree of arrays to numpy on every process."""
    from jax.experimental import multihost_utils
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)
