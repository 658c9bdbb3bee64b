"""Data parallelism with ``jax.sharding``: batch split over devices, parameters replicated.

A 1-D ``Mesh`` with axis ``"data"`` spans the devices of every process. The batch
(and a carried recurrent state) is sharded along its leading axis, everything else
is replicated; ``jax.jit`` then inserts the gradient all-reduce itself, so the
train step's code is the same on one device and on many, and so are its results
up to the order of floating-point sums.

On a CPU, one device's program runs its recurrent loop on one core at a time:
each step is a chain of dependent ops too small for XLA:CPU to split over
threads, and it runs no independent ops of a step side by side. Several CPU
devices run their programs concurrently, so :func:`split_cpu` (before JAX's
first computation) with one device per core turns data parallelism into the
way a training step uses every core. Measured on the 2-core development CPU,
language-model training step, 1 vs 2 CPU devices, ms: LSTM H=128 B=32 T=1024
109 -> 83, GRU 101 -> 72; LSTM H=32 B=1024 T=32 18.3 -> 15.0; LSTM H=256 B=64
T=64 32.8 -> 28.3; 4 devices on 2 cores were slower than 2 (106 ms).

Multi-host: call ``jax.distributed.initialize(...)`` first (``experiments/train.py``
does it from ``--coordinator_address``, ``--num_processes``, ``--process_id``); every
process then builds the same global batch (batches are pure functions of
``(seed, epoch, step)``) and hands over only its own devices' rows.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FORCE_DEVICES_FLAG = "--xla_force_host_platform_device_count"
CORES_ENV = "RNN_JAX_CPU_CORES"


def distributed_problem(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> str | None:
    """What is wrong with the arguments of a multi-host ``jax.distributed.initialize``
    (``None``: nothing), as flags: process counts without a coordinator (they would
    be ignored), fewer than one process, a process id outside ``[0, num_processes)``.
    ``None`` counts and ids are left to JAX's cluster detection."""
    n, i = num_processes, process_id
    if not coordinator_address:
        if n is not None or i is not None:
            which = "num_processes" if n is not None else "process_id"
            return f"--{which}: needs --coordinator_address (host:port of process 0)"
        return None
    if n is not None and n < 1:
        return f"--num_processes: expected >= 1, got {n}"
    if i is not None and (i < 0 or (n is not None and i >= n)):
        return f"--process_id: expected 0 <= process_id < num_processes ({n}), got {i}"
    return None


def cpu_cores() -> int:
    """The CPUs this process may use: ``$RNN_JAX_CPU_CORES`` when set (a sweep running
    trials side by side gives each its share), else its affinity mask's CPUs."""
    if os.environ.get(CORES_ENV, "").strip().isdigit() and int(os.environ[CORES_ENV]) >= 1:
        return int(os.environ[CORES_ENV])
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


CPU_SPLIT_MIN_MACS = 2**24
"""Below this much recurrent matmul work per training step (:func:`recurrent_macs`),
:func:`cpu_device_count` keeps one device."""

_GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def recurrent_macs(
    cell: str,
    hidden_size: int,
    batch_size: int,
    num_steps: int,
    num_layers: int = 1,
    bidirectional: bool = False,
) -> int:
    """Multiply-adds of the recurrent matmuls ``H_{t-1} W_h`` in one forward pass:
    ``T * B * G * H * H`` per layer and direction (G gate blocks: 1, 3, 4)."""
    per_layer = num_steps * batch_size * _GATES[cell] * hidden_size * hidden_size
    return per_layer * num_layers * (2 if bidirectional else 1)


def cpu_device_count(batch_size: int, macs: int | None = None, cores: int | None = None) -> int:
    """How many CPU devices a batch of ``batch_size`` rows splits over by default: the
    largest ``n <= cores`` (default :func:`cpu_cores`) that divides ``batch_size``; 1
    when the step's recurrent work ``macs`` (:func:`recurrent_macs`) is below
    ``CPU_SPLIT_MIN_MACS``.

    Splitting costs a fixed ~0.2-0.4 ms per step (the devices' programs start and
    meet at the gradient all-reduce). Measured on the 2-core CPU, LSTM steps, 1 vs 2
    devices, ms: H=32 B=32 T=32 (4.2M MACs) 0.8 vs 1.0; H=32 B=64 T=32 (8.4M) 1.4
    vs 1.8; GRU H=32 B=32 T=64 (6.3M) 1.6 vs 2.2; H=32 B=128 T=32 (16.8M) 3.1-3.2
    vs 2.8-2.9; H=32 B=256 T=32 (33.6M) 4.8-6.7 vs 3.8-5.2; H=64 B=32 T=64 (33.6M)
    3.2-3.4 vs 2.8-3.0; the book's H=32 B=1024 T=32 18.3 vs 15.0.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if macs is not None and macs < CPU_SPLIT_MIN_MACS:
        return 1
    cores = cpu_cores() if cores is None else cores
    return max(n for n in range(1, max(1, cores) + 1) if batch_size % n == 0)


def forced_cpu_devices() -> int | None:
    """The CPU device count ``XLA_FLAGS`` forces (``--xla_force_host_platform_device_count``),
    or ``None``."""
    for flag in os.environ.get("XLA_FLAGS", "").split():
        if flag.startswith(FORCE_DEVICES_FLAG + "="):
            return int(flag.split("=", 1)[1])
    return None


def split_cpu(num_devices: int) -> int:
    """Makes JAX's CPU backend present ``num_devices`` devices (the same cores, each
    device running its own program): with :func:`data_mesh`, a batch is then split
    over them and the shards' loops run at once. Only the CPU backend changes; a
    GPU or TPU run keeps its devices.

    Call it before JAX's first computation: after that JAX refuses to change the
    count (RuntimeError), unless it is already ``num_devices``. A count forced in
    ``XLA_FLAGS`` wins and is left alone. Returns the number of CPU devices the backend will have.
    """
    if not isinstance(num_devices, int) or isinstance(num_devices, bool) or num_devices < 1:
        raise ValueError(f"num_devices: expected an int >= 1, got {num_devices!r}")
    forced = forced_cpu_devices()
    if forced is not None:
        return forced
    try:
        jax.config.update("jax_num_cpu_devices", num_devices)
    except RuntimeError:  # the backends are up: fine if they already have that many
        if len(jax.devices("cpu")) != num_devices:
            raise
    return num_devices


def data_mesh(enabled: bool = True) -> Mesh | None:
    """A mesh over all devices, or ``None`` with one device (or when disabled)."""
    devices = jax.devices()
    if not enabled or len(devices) == 1:
        return None
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def in_mesh(mesh: Mesh | None, fn):
    """``fn`` called (and so traced) with ``mesh`` set as JAX's current mesh: code
    that needs one device's share of the batch at trace time (``rnn_jax.fused``'s
    chunked layers) finds the data axis there. ``fn`` itself when ``mesh`` is None.

    Either order works: ``in_mesh(mesh, jax.jit(f))`` sets the mesh around the
    call (``jax.set_mesh``), ``jax.jit(in_mesh(mesh, f))`` sets its abstract form
    while ``jit`` traces ``f`` (``jax.sharding.use_abstract_mesh``; ``set_mesh``
    refuses to run inside a trace). With the arguments placed on the mesh
    (:func:`replicated`, :func:`shard_batch`) both compile the same program. Inside
    a trace they must be: XLA then fails to run the per-device layers of arguments
    left on one device (``xla.sdy.GlobalToLocalShape``)."""
    if mesh is None:
        return fn
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh: expected a jax.sharding.Mesh or None, got {type(mesh).__name__}")

    def call(*args, **kwargs):
        try:
            context = jax.set_mesh(mesh)
        except ValueError:  # being traced: what the layers read is the abstract mesh
            context = jax.sharding.use_abstract_mesh(mesh.abstract_mesh)
        with context:
            return fn(*args, **kwargs)

    return call


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from the same host value on every process (its local shards)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def shard_batch(batch: Any, mesh: Mesh | None) -> Any:
    """Places every array of ``batch`` with its leading (batch) axis split over devices.

    Raises:
      ValueError: an array whose leading axis does not divide over the devices.
    """
    if mesh is None:
        return batch
    n = mesh.shape[DATA_AXIS]
    for x in jax.tree.leaves(batch):
        shape = np.shape(x)
        if not shape or shape[0] % n:
            raise ValueError(
                f"batch: every array's leading (batch) axis must split evenly over the "
                f"{n} devices of the mesh, got an array of shape {shape}"
                + (f"; use a batch size that is a multiple of {n}" if shape else "")
            )
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: put_global(x, sharding), batch)


def _state_sharding(key: str, mesh: Mesh) -> NamedSharding:
    return batch_sharded(mesh) if key == "carry" else replicated(mesh)


def place_state(state: dict[str, Any], mesh: Mesh | None) -> dict[str, Any]:
    """Replicates the training state, except the carried state, which follows the batch.

    With no mesh, commits it to the default device, as a restored checkpoint is
    (:func:`abstract_state`): ``jit`` compiles uncommitted and committed arguments
    separately, so a resumed run would compile its step twice (once for the memory
    check on the fresh state, once for the restored one)."""
    if mesh is None:
        return jax.device_put(state, jax.devices()[0])
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
