"""Data parallelism with ``jax.sharding``: batch split over devices, parameters replicated.

A 1-D ``Mesh`` with axis ``"data"`` spans the devices of every process. The batch
(and a carried recurrent state) is sharded along its leading axis, everything else
is replicated; ``jax.jit`` then inserts the gradient all-reduce itself, so the
train step's code is the same on one device and on many, and so are its results
up to the order of floating-point sums.

Multi-host: call ``jax.distributed.initialize(...)`` first (``experiments/train.py``
does it from ``--coordinator_address``, ``--num_processes``, ``--process_id``); every
process then builds the same global batch (batches are pure functions of
``(seed, epoch, step)``) and hands over only its own devices' rows.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(enabled: bool = True) -> Mesh | None:
    """A mesh over all devices, or ``None`` with one device (or when disabled)."""
    devices = jax.devices()
    if not enabled or len(devices) == 1:
        return None
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from the same host value on every process (its local shards)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def shard_batch(batch: Any, mesh: Mesh | None) -> Any:
    """Places every array of ``batch`` with its leading (batch) axis split over devices."""
    if mesh is None:
        return batch
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: put_global(x, sharding), batch)


def _state_sharding(key: str, mesh: Mesh) -> NamedSharding:
    return batch_sharded(mesh) if key == "carry" else replicated(mesh)


def place_state(state: dict[str, Any], mesh: Mesh | None) -> dict[str, Any]:
    """Replicates the training state, except the carried state, which follows the batch."""
    if mesh is None:
        return state
    placed = {}
    for key, value in state.items():
        sharding = _state_sharding(key, mesh)
        placed[key] = jax.tree.map(lambda x, s=sharding: put_global(np.asarray(x), s), value)
    return placed


def abstract_state(abstract: dict[str, Any], mesh: Mesh | None) -> dict[str, Any]:
    """``jax.ShapeDtypeStruct`` leaves with the shardings :func:`place_state` uses, so a
    checkpoint saved on any number of devices restores onto this mesh (or, with no
    mesh, onto the default device)."""

    def with_sharding(key):
        if mesh is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
            sharding = _state_sharding(key, mesh)
        return lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)

    return {k: jax.tree.map(with_sharding(k), v) for k, v in abstract.items()}
