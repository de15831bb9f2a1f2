"""Device mesh and shardings for data parallelism (one GPU, eight, or a pod).

One mesh axis, `data`: batches are split along it (P('data')) and parameters are
replicated (P()), or, FSDP-style (`fsdp_sharding`), each large array of the train
state (params, EMA params, optimizer moments) is split along one of its dimensions over
the same axis; XLA then inserts the all-gathers before use and reduce-scatters the
gradients. Axis types are given explicitly (Auto) since the default changed
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


# Arrays smaller than this stay replicated under FSDP: biases, norms and tiny kernels
# cost more in collective latency than they save in memory.
FSDP_MIN_SIZE = 1024


def fsdp_spec(shape: Sequence[int], num_devices: int, min_size: int = FSDP_MIN_SIZE) -> P:
    """P(...) splitting `shape` over `data` along its largest dimension divisible by
    num_devices; P() (replicated) for scalars, vectors, arrays of fewer than `min_size`
    elements, or when no dimension divides. E.g. [1152, 4608] on 8 devices ->
    P(None, 'data')."""
    shape = tuple(int(d) for d in shape)
    if num_devices <= 1 or len(shape) < 2 or int(np.prod(shape)) < min_size:
        return P()
    candidates = [i for i, d in enumerate(shape) if d % num_devices == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: (shape[i], -i))  # largest; first on ties
    return P(*(DATA_AXIS if i == axis else None for i in range(len(shape))))


def fsdp_sharding(tree: Any, mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> Any:
    """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs), by
    `fsdp_spec`. Typed PRNG keys and scalars come out replicated."""
    n = mesh.devices.size
    return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(np.shape(a), n, min_size)),
                        tree)


def state_sharding(abstract_state: Any, mesh: Mesh, fsdp: bool) -> Any:
    """The train state's shardings: all replicated, or FSDP over `data`."""
    if fsdp:
        return fsdp_sharding(abstract_state, mesh)
    repl = replicated(mesh)
    return jax.tree.map(lambda _: repl, abstract_state)


def gathered(tree: Any, mesh: Mesh) -> Any:
    """`tree` constrained to be replicated, inside a jitted function. Applied to FSDP
    params before the forward pass, XLA all-gathers each weight before use instead of
    re-sharding the batch-sharded activations to match the weight's split."""
    return jax.lax.with_sharding_constraint(tree, replicated(mesh))


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
