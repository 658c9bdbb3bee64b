"""Whether a compiled step fits in the memory its devices have free.

XLA plans every buffer of a program when it compiles it, so what a step will
allocate is known before it runs: ``compiled.memory_analysis()`` gives, for one
device, the bytes of the program's arguments, outputs (some aliased to arguments)
and temporaries (the activations a training step saves for its backward pass, the
gradients, the workspace of each op). A step checked after its arguments
(parameters, optimiser state, the batch) were placed adds, per device::

    need = outputs - aliased + temporaries

Devices that share one memory add up: the CPU devices of a process
(``--xla_force_host_platform_device_count``, :func:`rnn_jax.parallel.split_cpu`)
all live in host RAM, while each GPU or TPU has its own. What is free:

* a GPU or TPU: ``bytes_limit - bytes_in_use`` of ``Device.memory_stats()``;
* the host: ``MemAvailable`` of ``/proc/meminfo``, and no more than the process's
  cgroup (v1 or v2) allows: its limit less its usage, not counting the page cache
  the kernel can drop (``inactive_file``).

A step that needs more is killed by the kernel's OOM killer on a CPU (no message,
often after minutes of swapping or paging) or fails with ``RESOURCE_EXHAUSTED`` on
an accelerator; :func:`estimate` says so before the first step runs. Measured on
the 2-core development VM (24 GiB, no swap, 2 CPU devices): an LSTM language
model with H=512, B=256, T=1000 planned 3.41 GB of temporaries per device and
peaked at 7.15 GB resident; with H=1024, T=2000 it planned 13.6 GB per device,
and the run was killed at 21 GB resident.

Setting the environment variable ``RNN_JAX_MEMORY_CHECK=0`` turns the check off
(:func:`enabled`), for a machine whose free memory this module misreads.

Processes that start together each see the same free memory, so steps that fit one
at a time can still run out together. ``RNN_JAX_MEMORY_BUDGET`` (bytes) caps the host
memory one process counts as free (:func:`budget`): ``experiments.sweep
--parallel=N`` gives each of its trials 1/N of the host memory free when the sweep
starts, so the trials that run at once fit together.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

ENV = "RNN_JAX_MEMORY_CHECK"
BUDGET_ENV = "RNN_JAX_MEMORY_BUDGET"
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a number near 2**63


class Estimate(NamedTuple):
    """What a compiled step adds to the memory its devices share, and what is free.

    ``need`` and ``available`` are bytes in the tightest memory (``pool``):
    ``need`` is ``per_device`` times the devices that share it; ``available`` is
    None where it cannot be read (then the step is taken to fit)."""

    per_device: int
    devices: int
    available: int | None
    pool: str

    @property
    def need(self) -> int:
        return self.per_device * self.devices

    @property
    def fits(self) -> bool:
        return self.available is None or self.need <= self.available

    @property
    def share(self) -> float | None:
        """``need / available``: None where ``available`` is unknown, infinite where
        nothing is free and something is needed."""
        if self.available is None:
            return None
        if self.available == 0:
            return math.inf if self.need else 0.0
        return self.need / self.available

    def describe(self) -> str:
        """``"27.3 GiB (13.6 GiB on each of 2 CPU devices, which share host
        memory), and 19.0 GiB of host memory is free"``."""
        if self.devices > 1:
            spread = (
                f" ({gib(self.per_device)} on each of {self.devices} CPU devices, which "
                f"share host memory)"
            )
        else:
            spread = ""
        free = "an unknown amount" if self.available is None else gib(self.available)
        return f"{gib(self.need)}{spread}, and {free} of {self.pool} is free"


class DoesNotFit(MemoryError):
    """A compiled step needs more memory than is free; ``estimate`` says how much."""

    def __init__(self, estimate: Estimate):
        super().__init__(f"the step would need {estimate.describe()}")
        self.estimate = estimate


def gib(n: int) -> str:
    """Bytes as ``"1.5 GiB"``, ``"0.25 MiB"`` (below 0.1 GiB) or ``"512 bytes"``
    (below 0.01 MiB)."""
    if n >= 0.1 * 2**30:
        return f"{n / 2**30:.1f} GiB"
    if n >= 0.01 * 2**20:
        return f"{n / 2**20:.2f} MiB"
    return f"{n:,} bytes"


def enabled() -> bool:
    """False when ``RNN_JAX_MEMORY_CHECK`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def budget() -> int | None:
    """The bytes of host memory this process may count as free, from
    ``RNN_JAX_MEMORY_BUDGET`` (set by a sweep that runs trials side by side); None
    when unset or empty.

    Raises:
      ValueError: naming the variable, for a value that is not a whole number >= 0.
    """
    value = os.environ.get(BUDGET_ENV, "").strip()
    if not value:
        return None
    try:
        cap = int(value)
    except ValueError:
        cap = -1
    if cap < 0:
        raise ValueError(f"{BUDGET_ENV}: expected a whole number of bytes >= 0, got {value!r}")
    return cap


def step_need(compiled: Any) -> int | None:
    """Bytes one device's run of ``compiled`` (a ``jax.stages.Compiled``) allocates
    beyond its arguments: outputs not aliased to an argument, plus temporaries.
    None when the backend gives no memory analysis."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001  (some backends raise NotImplementedError)
        return None
    if stats is None:
        return None
    try:
        out = stats.output_size_in_bytes - stats.alias_size_in_bytes
        return max(0, int(out + stats.temp_size_in_bytes))
    except AttributeError:
        return None


def estimate(compiled: Any, devices: Sequence[Any], held: int = 0) -> Estimate | None:
    """The memory ``compiled`` adds when run on ``devices`` (the devices of its
    mesh, or the one it runs on); None when it cannot be told. ``held``: host bytes
    this process already holds for the run (its placed state), which a budget
    counts too (what is free has them taken out already)."""
    return for_bytes(step_need(compiled), devices, held)


def for_bytes(per_device: int | None, devices: Sequence[Any], held: int = 0) -> Estimate | None:
    """``per_device`` bytes on each of ``devices`` (arrays about to be made there,
    such as a model's parameters) against their free memory; None when either is
    unknown. ``held``: as :func:`estimate`'s."""
    if per_device is None or not devices:
        return None
    cpus = [d for d in devices if d.platform == "cpu"]
    if cpus:  # one pool: host memory
        free, cap = host_available(), budget()
        if cap is not None:
            cap = max(0, cap - held)
        if cap is not None and (free is None or cap < free):
            pool = f"the host memory {BUDGET_ENV} allows" + (" beyond the model" if held else "")
            return Estimate(per_device, len(cpus), cap, pool)
        return Estimate(per_device, len(cpus), free, "host memory")
    tightest = None
    for device in devices:
        free = device_available(device)
        if free is not None and (tightest is None or free < tightest[0]):
            tightest = (free, device)
    if tightest is None:
        return Estimate(per_device, 1, None, f"{devices[0].platform} memory")
    free, device = tightest
    return Estimate(per_device, 1, free, f"{device.platform.upper()} {device.id}")


def device_available(device: Any) -> int | None:
    """An accelerator's free bytes (``bytes_limit - bytes_in_use``), or None."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return max(0, int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))


def host_available(
    meminfo: str | os.PathLike = "/proc/meminfo",
    cgroup_root: str | os.PathLike = _CGROUP_ROOT,
    self_cgroup: str | os.PathLike = "/proc/self/cgroup",
) -> int | None:
    """Bytes the host can still give this process: ``MemAvailable``, capped by the
    cgroup's limit less its usage net of inactive page cache. None when neither
    can be read (not Linux). The paths are arguments for tests."""
    cgroup = _cgroup_available(Path(cgroup_root), Path(self_cgroup))
    candidates = [_mem_available(Path(meminfo)), cgroup]
    known = [c for c in candidates if c is not None]
    return min(known) if known else None


def _mem_available(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available(root: Path, self_cgroup: Path) -> int | None:
    """Free bytes under this process's memory cgroup: the tightest ``limit - usage
    + inactive page cache`` of its folder and every folder above it (a limit can sit
    on a parent: a batch job's, with its steps below), in cgroup v2's unified tree
    and v1's ``memory`` one. None with no limit or no cgroup files."""
    own_v2 = own_v1 = None
    try:
        for line in self_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                own_v2 = path
            elif "memory" in controllers.split(","):
                own_v1 = path
    except (OSError, ValueError):
        pass
    folders = []  # (folder, limit file, usage file, inactive page cache key)
    for own in _ancestors(own_v2):
        folders.append((root / own, "memory.max", "memory.current", "inactive_file"))
    for own in _ancestors(own_v1):
        folders.append(
            (
                root / "memory" / own,
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
            )
        )
    free = None
    for folder, limit_file, usage_file, inactive_key in folders:
        limit = _read_int(folder / limit_file)
        usage = _read_int(folder / usage_file)
        if limit is None or usage is None or limit >= _NO_LIMIT:
            continue
        inactive = _stat(folder / "memory.stat", inactive_key) or 0
        room = max(0, limit - usage + min(inactive, usage))
        free = room if free is None else min(free, room)
    return free


def _ancestors(path: str | None) -> list[str]:
    """``"/a/b"`` -> ``["a/b", "a", ""]`` (relative to the hierarchy's root, which
    comes last); ``[]`` for None."""
    if path is None:
        return []
    parts = [p for p in path.split("/") if p]
    return ["/".join(parts[:n]) for n in range(len(parts), -1, -1)]


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        return None
    return None
