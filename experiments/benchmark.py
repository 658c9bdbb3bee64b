r"""Times one training step of the character language model: rnn_jax, flax.linen, PyTorch.

    python -m experiments.benchmark                                  # every config, cell, depth
    python -m experiments.benchmark --configs=d2l,medium --cells=gru,lstm --layers=1 \
        --bidirectional=false --compare=flax,torch
    python -m experiments.benchmark --configs=tiny --config_spec=tiny:8:4:8 --iters=2
    python -m experiments.benchmark --compile_report       # compile-time targets only
    python -m experiments.benchmark --remat_report         # remat memory / time only

One step is the whole update: one-hot input -> recurrent network -> output layer ->
mean cross-entropy -> gradients -> ``clip_by_global_norm(1)`` -> SGD. Every
measurement runs in a fresh process (``experiments/bench_worker.py``), in
alternating rounds (rnn_jax, flax, torch, rnn_jax, flax, torch, ...), each of which
compiles / warms up and then times single steps; a round's number is its median
step, the reported number the median over rounds. Results go to ``--output``
(JSON) and to ``--markdown`` (a section per device, report and settings off their
defaults, replaced by a rerun that measured all its cases and peers).

Bad flags print one line and exit with code 2 before anything runs.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("rnn_jax", "flax", "torch")
PEERS = ("flax", "torch")
CELLS = ("rnn", "gru", "lstm")
BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Config:
    """A benchmark shape: hidden size H, batch size B, time steps T."""

    name: str
    hidden_size: int
    batch_size: int
    num_steps: int


CONFIGS = {
    c.name: c
    for c in (
        Config("d2l", 32, 1024, 32),  # the book's character model
        Config("medium", 256, 64, 64),
        Config("long", 128, 32, 1024),
        Config("large", 1024, 128, 128),
    )
}


@dataclasses.dataclass(frozen=True)
class Case:
    config: Config
    cell: str
    num_layers: int
    bidirectional: bool

    def label(self) -> str:
        bi = " bi" if self.bidirectional else ""
        return f"{self.config.name} {self.cell} L{self.num_layers}{bi}"

    def spec(self) -> dict[str, Any]:
        return {
            "hidden_size": self.config.hidden_size,
            "batch_size": self.config.batch_size,
            "num_steps": self.config.num_steps,
            "cell": self.cell,
            "num_layers": self.num_layers,
            "bidirectional": self.bidirectional,
        }

    def key(self) -> dict[str, Any]:
        return {"config": self.config.name, **self.spec()}


# --- flag values ---------------------------------------------------------------------


def parse_config_spec(text: str) -> Config:
    """``"name:hidden:batch:steps"`` -> :class:`Config`; ValueError on a bad one."""
    parts = text.split(":")
    if len(parts) != 4 or not parts[0]:
        raise ValueError(f"expected name:hidden:batch:steps, got {text!r}")
    try:
        sizes = [int(p) for p in parts[1:]]
    except ValueError:
        raise ValueError(f"expected integer hidden:batch:steps, got {text!r}") from None
    if min(sizes) < 1:
        raise ValueError(f"hidden, batch and steps must be >= 1, got {text!r}")
    return Config(parts[0], *sizes)


def all_configs(specs: Iterable[str]) -> dict[str, Config]:
    """The built-in configs plus the custom ``--config_spec`` ones."""
    configs = dict(CONFIGS)
    for text in specs:
        config = parse_config_spec(text)
        configs[config.name] = config
    return configs


def selected_configs(names: list[str], specs: list[str]) -> list[Config]:
    """``--configs`` in order, then custom configs not already named."""
    configs = all_configs(specs)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(f"unknown config {unknown[0]!r}; expected one of {', '.join(configs)}")
    custom = [parse_config_spec(s).name for s in specs]
    return [configs[n] for n in dict.fromkeys([*names, *custom])]


def parse_bools(values: list[str]) -> list[bool]:
    out = []
    for v in values:
        if v.lower() not in BOOLS:
            raise ValueError(f"expected true or false, got {v!r}")
        out.append(BOOLS[v.lower()])
    return list(dict.fromkeys(out))


def parse_layers(values: list[str]) -> list[int]:
    try:
        layers = [int(v) for v in values]
    except ValueError:
        raise ValueError(f"expected integers, got {','.join(values)!r}") from None
    if not layers or min(layers) < 1:
        raise ValueError(f"expected integers >= 1, got {','.join(values)!r}")
    return list(dict.fromkeys(layers))


def check_choices(values: list[str], allowed: Iterable[str], what: str) -> None:
    allowed = tuple(allowed)
    for v in values:
        if v not in allowed:
            raise ValueError(f"unknown {what} {v!r}; expected one of {', '.join(allowed)}")


def make_cases(configs, cells, layers, bidirectional) -> list[Case]:
    return [Case(*c) for c in itertools.product(configs, cells, layers, bidirectional)]


def parse_cases(values: list[str], specs: list[str]) -> list[Case]:
    """``--cases``: each ``"config:cell:layers:bidirectional"`` -> :class:`Case`, in
    order (duplicates dropped); ValueError naming the bad entry."""
    configs = all_configs(specs)
    cases = []
    for text in values:
        parts = text.split(":")
        if len(parts) != 4:
            raise ValueError(f"expected config:cell:layers:bidirectional, got {text!r}")
        name, cell, layers, bi = parts
        if name not in configs:
            raise ValueError(
                f"{text!r}: unknown config {name!r}; expected one of {', '.join(configs)}"
            )
        try:
            check_choices([cell], CELLS, "cell")
            (depth,) = parse_layers([layers])
            (both,) = parse_bools([bi])
        except ValueError as e:
            raise ValueError(f"{text!r}: {e}") from None
        cases.append(Case(configs[name], cell, depth, both))
    return list(dict.fromkeys(cases))


# --- running workers -----------------------------------------------------------------


def worker_env(threads: int, device: str) -> dict[str, str]:
    """The environment of every worker: the same thread settings for all implementations."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    return env


def run_worker(
    spec: dict[str, Any], threads: int, timeout_s: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Runs one ``experiments.bench_worker`` process; returns its JSON line's object.

    ``env`` adds to (or overrides) :func:`worker_env`'s variables.
    """
    cmd = [
        sys.executable,
        "-m",
        "experiments.bench_worker",
        json.dumps({**spec, "threads": threads}),
    ]
    try:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env={**worker_env(threads, spec.get("device", "auto")), **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "skip": False, "error": f"worker timed out after {timeout_s:g} s"}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"ok": False, "skip": False, "error": f"worker exited {proc.returncode}: {tail}"}


# A worker's run counts as disturbed when other processes (or, in a VM, the
# hypervisor's steal) took more than this share of the machine's CPU time meanwhile.
BUSY_LIMIT = 0.10


def _cpu_jiffies() -> tuple[int, int] | None:
    """``(busy, all)`` clock ticks since boot of the CPUs this process may run on (its
    affinity mask: other jobs on a big machine's other CPUs do not disturb it), from
    Linux's /proc/stat (busy: user, nice, system, irq, softirq and steal; guest time
    is inside user); None elsewhere."""
    try:
        with open("/proc/stat") as f:
            lines = [x.split() for x in f if x.startswith("cpu") and x[3:4].isdigit()]
        mine = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    except (OSError, ValueError, AttributeError):
        return None
    busy = total = 0
    for name, *fields in lines:
        if name not in mine or len(fields) < 8:
            continue
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        busy += user + nice + system + irq + softirq + steal
        total += user + nice + system + irq + softirq + steal + idle + iowait
    return (busy, total) if total else None


class ForeignLoad:
    """How busy the machine was with work other than this process and the children
    it waited for, between its creation and :meth:`share`: the other processes' (and
    the hypervisor's steal) share of the time of the CPUs this process may use, from
    /proc/stat's ticks less ``os.times()``'s own and waited children's CPU time. Call
    :meth:`share` after the worker was waited for (``subprocess.run`` does). None
    where /proc/stat is missing."""

    def __init__(self):
        self._jiffies, self._own = _cpu_jiffies(), self._own_cpu_s()

    @staticmethod
    def _own_cpu_s() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def share(self) -> float | None:
        now = _cpu_jiffies()
        if now is None or self._jiffies is None:
            return None
        busy, total = (b - a for a, b in zip(self._jiffies, now, strict=True))
        if total <= 0:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        own_ticks = (self._own_cpu_s() - self._own) * tick
        return min(1.0, max(0.0, (busy - own_ticks) / total))


def _median(values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def aggregate(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over rounds of each round's numbers (a round's step time is its median)."""
    ok = [r for r in rounds if r.get("ok")]
    if not ok:
        errors = [r.get("error", "?") for r in rounds]
        return {"ok": False, "error": errors[0] if errors else "not run", "rounds": rounds}
    steps = [r.get("step_s") for r in ok if r.get("step_s") is not None]
    out: dict[str, Any] = {
        "ok": True,
        "platform": ok[0].get("platform"),
        "device_name": ok[0].get("device_name"),
        "num_params": ok[0].get("num_params"),
        "rounds_ok": len(ok),
        "step_s": _median(steps),
        "step_s_min": min(steps) if steps else None,
        "step_s_max": max(steps) if steps else None,
        "tokens_per_s": None,
        "compile_s": _median([r.get("compile_s") for r in ok]),
        "first_step_s": _median([r.get("first_step_s") for r in ok]),
        "loss_first": ok[0].get("loss_first"),
        "loss_last": ok[0].get("loss_last"),
    }
    foreign = [r["foreign_cpu"] for r in ok if r.get("foreign_cpu") is not None]
    if foreign:
        out["foreign_cpu_max"] = max(foreign)
    tokens = ok[0].get("tokens_per_step")
    if tokens and out["step_s"]:
        out["tokens_per_s"] = tokens / out["step_s"]
    keys = sorted({k for r in ok for k in r.get("memory", {})})
    memory = {k: _median([r.get("memory", {}).get(k) for r in ok]) for k in keys}
    out["memory"] = {k: None if v is None else int(v) for k, v in memory.items()}
    for extra in (
        "hoist_input",
        "implementation",
        "unroll",
        "matmul_dtype",
        "tune_malloc",
        "torch_threads",
        "cudnn",
        "thread_info",
        "threads",
        "devices",
        "directions",
        "pallas_exchange",
    ):
        if extra in ok[0]:
            out[extra] = ok[0][extra]
    out["rounds"] = rounds
    return out


class Runner:
    """Runs worker processes, resolves the device, skips missing implementations."""

    def __init__(self, options: dict[str, Any], threads: int, timeout_s: float, echo, total: int):
        self.options = options  # spec keys shared by every worker
        self.threads = threads
        self.timeout_s = timeout_s
        self.echo = echo
        self.device = options.get("device", "auto")
        self.device_name: str | None = None  # JAX's device, as jax.devices() names it
        self.hoist_input: bool | None = None  # what hoist_input="auto" resolved to
        self.skipped: dict[str, str] = {}
        self.notes: list[str] = []
        self.done = 0
        self.total = total
        self.env: dict[str, str] = {}  # added to every worker's environment (cache_env)
        self.disturbed = 0  # timed workers during which other processes were busy

    def available(self, impl: str) -> bool:
        return impl not in self.skipped

    def spec(self, impl: str, spec: dict[str, Any]) -> dict[str, Any]:
        """A worker's whole spec: the shared options, the case's, the implementation."""
        return {**self.options, **spec, "impl": impl, "device": self.device}

    def run(self, impl: str, spec: dict[str, Any], label: str) -> dict[str, Any] | None:
        self.done += 1
        if not self.available(impl):
            return None
        load = ForeignLoad()
        result = run_worker(
            self.spec(impl, spec),
            self.threads,
            self.timeout_s,
            self.env,
        )
        busy = load.share()
        if busy is not None:
            result["foreign_cpu"] = busy
        where = f"[{self.done}/{self.total}] {label} {impl}"
        if result.get("skip"):
            self.skipped[impl] = result.get("error", "unavailable")
            self.notes.append(f"{impl} skipped: {self.skipped[impl]}")
            self.echo(f"{where}: skipped ({self.skipped[impl]})")
            return None
        if not result.get("ok"):
            self.echo(f"{where}: FAILED ({result.get('error')})")
            return result
        if self.device == "auto" and impl != "torch":  # later workers use JAX's platform
            self.device = result["platform"]
        if self.device_name is None and impl != "torch":
            self.device_name = result.get("device_name")
        if impl == "rnn_jax" and "hoist_input" in result:
            self.hoist_input = result["hoist_input"]
        msg = []
        if result.get("step_s") is not None:
            msg.append(f"{fmt_ms(result['step_s'])} ms/step")
        if result.get("compile_s") is not None:
            msg.append(f"compile {result['compile_s']:.2f} s")
        if result.get("memory", {}).get("temp_bytes") is not None:
            msg.append(f"temp {fmt_mib(result['memory']['temp_bytes'])} MiB")
        if busy is not None and busy > BUSY_LIMIT:
            self.disturbed += 1
            msg.append(
                f"WARNING: other processes used {busy:.0%} of the CPUs meanwhile: "
                "this time is not the machine's"
            )
        self.echo(f"{where}: {', '.join(msg)}")
        return result


def cache_env(path: str) -> dict[str, str]:
    """Worker environment that stores and loads every compiled program in ``path``
    (JAX's persistent compilation cache, read from these variables at import)."""
    return {
        "JAX_ENABLE_COMPILATION_CACHE": "true",
        "JAX_COMPILATION_CACHE_DIR": path,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def prewarm(cases: list[Case], impls: list[str], runner: Runner, jobs: int) -> dict[tuple, dict]:
    """Compiles each case's JAX steps, ``jobs`` worker processes at a time.

    The workers run with ``compile_only`` and ``runner.env`` (which must hold
    :func:`cache_env`), so their programs land in the compilation cache that the timed
    workers then load from. GPU memory is allocated on demand in these workers, since
    several share the device. XLA's GPU compiler times candidate kernels on the device
    while compiling, so those choices are made with other compiles running beside it,
    and the cached program keeps them (on the H100 the prewarmed steps ran as fast as
    unprewarmed runs earlier that day: long LSTM 9.05 vs 9.03 ms, GRU 8.31 vs 8.37).
    Returns ``{(case label, impl): worker result}``.
    """
    from concurrent.futures import ThreadPoolExecutor

    todo = [(c, i) for c in cases for i in impls if i != "torch" and runner.available(i)]
    env = {**runner.env, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}

    def one(item):
        case, impl = item
        spec = {**runner.spec(impl, case.spec()), "compile_only": True}
        return item, run_worker(spec, runner.threads, runner.timeout_s, env)

    out = {}
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        for n, ((case, impl), result) in enumerate(pool.map(one, todo), 1):
            out[(case.label(), impl)] = result
            if result.get("ok"):
                what = f"compile {result['compile_s']:.2f} s"
            elif result.get("skip"):
                what = f"skipped ({result.get('error')})"
            else:
                what = f"FAILED ({result.get('error')}); its timed workers compile cold"
            runner.echo(f"[prewarm {n}/{len(todo)}] {case.label()} {impl}: {what}")
    return out


def run_benchmark(
    cases: list[Case],
    impls: list[str],
    runner: Runner,
    rounds: int,
    prewarmed: dict[tuple, dict] | None = None,
    on_case: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Every case, implementations alternating within each round.

    ``prewarmed`` (from :func:`prewarm`): a case's ``compile_s`` becomes the prewarm's
    cold compile and the timed workers' cache loads go to ``compile_load_s``.
    ``on_case(results so far)`` runs after each case (the partial JSON file).
    """
    results = []
    for case in cases:
        per_impl: dict[str, list[dict]] = {impl: [] for impl in impls}
        for r in range(rounds):
            for impl in impls:
                result = runner.run(impl, case.spec(), f"{case.label()} round {r + 1}")
                if result is not None:
                    per_impl[impl].append(result)
        for impl in impls:
            if per_impl[impl]:
                row = {**case.key(), "impl": impl, **aggregate(per_impl[impl])}
                cold = (prewarmed or {}).get((case.label(), impl), {})
                loaded = row.get("compile_s")
                if row.get("ok") and cold.get("ok") and loaded is not None:
                    row["compile_load_s"] = loaded
                    if loaded < cold["compile_s"]:  # else a miss: keep the timed compile
                        row["compile_s"] = cold["compile_s"]
                results.append(row)
            elif impl in runner.skipped:
                results.append({**case.key(), "impl": impl, "ok": False, "skipped": True})
        if on_case is not None:
            on_case(results)
    return results


def compile_variants(base: Config) -> tuple[tuple[str, int, int], ...]:
    """``(key, num_steps, num_layers)`` of the compile-time measurements."""
    return (
        ("base", base.num_steps, 1),
        ("T32", 32, 1),
        ("T1024", 1024, 1),
        ("L4", base.num_steps, 4),
    )


def run_compile_report(base: Config, cells, impls, runner: Runner, rounds: int) -> dict:
    """Compile times (lowering + XLA) of ``base``'s step and how they scale with T and depth."""
    impls = [i for i in impls if i != "torch"]  # nothing to compile ahead of time
    variants = compile_variants(base)
    times: dict[tuple, list[dict]] = {}
    for r in range(rounds):
        for cell in cells:
            for impl in impls:
                for key, steps, layers in variants:
                    spec = {
                        "hidden_size": base.hidden_size,
                        "batch_size": base.batch_size,
                        "num_steps": steps,
                        "cell": cell,
                        "num_layers": layers,
                        "bidirectional": False,
                        "compile_only": True,
                    }
                    res = runner.run(impl, spec, f"compile {cell} {key} round {r + 1}")
                    if res is not None:
                        times.setdefault((cell, impl, key), []).append(res)
    report = []
    for cell in cells:
        for impl in impls:
            entry: dict[str, Any] = {"cell": cell, "impl": impl, "compile_s": {}, "temp_bytes": {}}
            for key, _, _ in variants:
                agg = aggregate(times.get((cell, impl, key), []))
                entry["compile_s"][key] = agg.get("compile_s")
                entry["temp_bytes"][key] = agg.get("memory", {}).get("temp_bytes")
            c = entry["compile_s"]
            entry["ratio_T1024_T32"] = _ratio(c.get("T1024"), c.get("T32"))
            entry["ratio_L4_L1"] = _ratio(c.get("L4"), c.get("base"))
            if any(v is not None for v in c.values()):
                report.append(entry)
    return {"config": dataclasses.asdict(base), "entries": report}


def run_remat_report(base: Config, cells, runner: Runner, rounds: int) -> dict:
    """rnn_jax on ``base`` (1 layer) without and with remat: temp memory and step time."""
    runs: dict[tuple, list[dict]] = {}
    for r in range(rounds):
        for cell in cells:
            for remat in (False, True):
                spec = {
                    "hidden_size": base.hidden_size,
                    "batch_size": base.batch_size,
                    "num_steps": base.num_steps,
                    "cell": cell,
                    "num_layers": 1,
                    "bidirectional": False,
                    "remat": remat,
                }
                label = f"remat={str(remat).lower()} {cell} round {r + 1}"
                res = runner.run("rnn_jax", spec, label)
                if res is not None:
                    runs.setdefault((cell, remat), []).append(res)
    report = []
    for cell in cells:
        off, on = aggregate(runs.get((cell, False), [])), aggregate(runs.get((cell, True), []))
        if not (off.get("ok") or on.get("ok")):
            continue
        entry = {
            "cell": cell,
            "temp_bytes_no_remat": off.get("memory", {}).get("temp_bytes"),
            "temp_bytes_remat": on.get("memory", {}).get("temp_bytes"),
            "step_s_no_remat": off.get("step_s"),
            "step_s_remat": on.get("step_s"),
        }
        entry["temp_ratio"] = _ratio(entry["temp_bytes_remat"], entry["temp_bytes_no_remat"])
        entry["time_ratio"] = _ratio(entry["step_s_remat"], entry["step_s_no_remat"])
        entry["runs"] = {"no_remat": off, "remat": on}
        report.append(entry)
    return {"config": dataclasses.asdict(base), "entries": report}


# --- machine, versions ---------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_vector_isa() -> str | None:
    """The widest vector instruction set the CPU offers of those that change which
    code runs (XLA's, the native kernels', PyTorch's): AVX-512, AVX2, NEON; None if
    unknown. The same "AMD EPYC" model name covers CPUs with and without AVX-512."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "NEON"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    flags = set(line.split(":", 1)[-1].split())
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2"
    return None


def machine_info(gpu_name: str | None = None) -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "vector": cpu_vector_isa(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "gpu": gpu_name,
        "os": platform.platform(),
    }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def device_label(meta: dict[str, Any]) -> str:
    m = meta["machine"]
    if meta.get("platform") == "gpu" and m.get("gpu"):
        return f"GPU {m['gpu']}"
    isa = f", {m['vector']}" if m.get("vector") else ""  # (absent from older reports)
    return f"CPU {m['cpu']}{isa} ({m['cores_usable']} cores)"


# --- tables and markdown -------------------------------------------------------------


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def fmt_mib(nbytes: float | None) -> str:
    if nbytes is None:
        return "–"
    mib = nbytes / MIB
    return f"{mib:.0f}" if mib >= 100 else f"{mib:.1f}" if mib >= 1 else f"{mib:.3f}"


def fmt_num(x: float | None, spec: str = ",.0f") -> str:
    return "–" if x is None else format(x, spec)


def fmt_ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}x"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


CASE_COLUMNS = ["config", "H", "B", "T", "cell", "layers", "bidir"]


def _case_cells(r: dict[str, Any]) -> list[str]:
    return [
        r["config"],
        str(r["hidden_size"]),
        str(r["batch_size"]),
        str(r["num_steps"]),
        r["cell"],
        str(r["num_layers"]),
        "yes" if r["bidirectional"] else "no",
    ]


def _case_id(r: dict[str, Any]) -> tuple:
    return tuple(r[k] for k in ("config", "cell", "num_layers", "bidirectional"))


def speed_table(results: list[dict[str, Any]], impls: list[str]) -> str:
    """Side by side: ms/step and tokens/s per implementation, rnn_jax's speedups.

    Speedup vs a peer = peer step time / rnn_jax step time (> 1: rnn_jax is faster).
    """
    peers = [i for i in impls if i != "rnn_jax"]
    header = list(CASE_COLUMNS)
    header.append("rnn_jax impl")
    for impl in impls:
        header += [f"{impl} ms/step", f"{impl} tokens/s"]
    header += [f"speedup vs {p}" for p in peers]
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in results:
        by_case.setdefault(_case_id(r), {})[r["impl"]] = r
    rows = []
    for group in by_case.values():
        first = next(iter(group.values()))
        row = _case_cells(first)
        ours = group.get("rnn_jax", {})
        impl_used = str(ours.get("implementation", "–"))
        if ours.get("unroll") and impl_used != "pallas":  # one kernel per loop: no unroll
            impl_used += f", unroll {ours['unroll']}"
        if ours.get("directions") == "separate":
            impl_used += ", directions as two calls"
        if ours.get("pallas_exchange"):
            impl_used += f", {ours['pallas_exchange']} exchange"
        if ours.get("matmul_dtype", "float32") != "float32":
            impl_used += f", {ours['matmul_dtype']} matmuls"
        if ours.get("devices", 1) > 1:
            impl_used += f", {ours['devices']} devices"
        row.append(impl_used)
        for impl in impls:
            r = group.get(impl)
            if r is None or not r.get("ok"):
                status = "skipped" if r is None or r.get("skipped") else "failed"
                row += [status, "–"]
            else:
                row += [fmt_ms(r["step_s"]), fmt_num(r["tokens_per_s"])]
        ours = group.get("rnn_jax", {})
        for p in peers:
            theirs = group.get(p, {})
            ok = ours.get("ok") and theirs.get("ok")
            row.append(fmt_ratio(_ratio(theirs.get("step_s"), ours.get("step_s")) if ok else None))
        rows.append(row)
    return _table(header, rows)


DETAIL_COLUMNS = [
    "impl",
    "compile s",
    "first step s",
    "XLA temp MiB",
    "XLA args+out MiB",
    "XLA total MiB",
    "peak device MiB",
    "max RSS MiB",
    "params",
]


def detail_table(results: list[dict[str, Any]]) -> str:
    """Compile time, first-step time and memory of each (case, implementation)."""
    rows = []
    for r in results:
        if not r.get("ok"):
            continue
        m = r.get("memory", {})
        args_out = None
        if m.get("argument_bytes") is not None:
            args_out = m["argument_bytes"] + m.get("output_bytes", 0)
        rows.append(
            _case_cells(r)
            + [
                r["impl"],
                fmt_num(r.get("compile_s"), ".2f"),
                fmt_num(r.get("first_step_s"), ".3f"),
                fmt_mib(m.get("temp_bytes")),
                fmt_mib(args_out),
                fmt_mib(m.get("xla_total_bytes")),
                fmt_mib(m.get("peak_device_bytes")),
                fmt_mib(m.get("max_rss_bytes")),
                fmt_num(r.get("num_params")),
            ]
        )
    return _table(CASE_COLUMNS + DETAIL_COLUMNS, rows)


def compile_table(report: dict[str, Any]) -> str:
    b = Config(**report["config"])
    header = [
        "cell",
        "impl",
        f"{b.name} compile s (H={b.hidden_size} B={b.batch_size} T={b.num_steps})",
        "T=32 s",
        "T=1024 s",
        "T=1024 / T=32",
        "4 layers s",
        "4 layers / 1 layer",
    ]
    rows = []
    for e in report["entries"]:
        c = e["compile_s"]
        rows.append(
            [
                e["cell"],
                e["impl"],
                fmt_num(c.get("base"), ".2f"),
                fmt_num(c.get("T32"), ".2f"),
                fmt_num(c.get("T1024"), ".2f"),
                fmt_ratio(e.get("ratio_T1024_T32")),
                fmt_num(c.get("L4"), ".2f"),
                fmt_ratio(e.get("ratio_L4_L1")),
            ]
        )
    return _table(header, rows)


def remat_table(report: dict[str, Any]) -> str:
    header = [
        "cell",
        "temp MiB, no remat",
        "temp MiB, remat",
        "temp remat / no remat",
        "ms/step, no remat",
        "ms/step, remat",
        "time remat / no remat",
    ]
    rows = [
        [
            e["cell"],
            fmt_mib(e.get("temp_bytes_no_remat")),
            fmt_mib(e.get("temp_bytes_remat")),
            fmt_ratio(e.get("temp_ratio")),
            fmt_ms(e.get("step_s_no_remat")),
            fmt_ms(e.get("step_s_remat")),
            fmt_ratio(e.get("time_ratio")),
        ]
        for e in report["entries"]
    ]
    return _table(header, rows)


GRU_NOTE = (
    "GRU: rnn_jax runs `cells.gru(H, reset_after={value})`{what}; flax.linen and PyTorch "
    "use the reset-after form."
)


def settings_notes(meta: dict[str, Any]) -> list[str]:
    o = meta["options"]
    ra = o["reset_after"]
    what = (
        " (the reset-after form of PyTorch / cuDNN / flax.linen, so all three compute the "
        "same function; rnn_jax's own default is the seed's reset-before form)"
        if ra
        else " (the seed's reset-before form: not the function the peers compute)"
    )
    prewarm = (
        [
            f"Compile (--prewarm={o['prewarm']}): every JAX step was first compiled in "
            f"{o['prewarm']} processes at a time into a persistent compilation cache, which "
            "the timed workers loaded from; the compile column is that prewarm compile (on a "
            "machine shared by the parallel compiles), the loads are compile_load_s in the JSON."
        ]
        if o.get("prewarm")
        else []
    )
    return [
        GRU_NOTE.format(value=ra, what=what),
        f"rnn_jax network options: unroll={o['unroll']}, remat={o['remat']}, "
        f"hoist_input={o['hoist_input']}"
        + (f" (used: {o['hoist_input_used']})" if o.get("hoist_input_used") is not None else "")
        + f", implementation={o.get('implementation', 'auto')}, "
        f"directions={o.get('directions', 'auto')} (the column rnn_jax impl says which "
        "implementation and unroll ran, and when a bidirectional layer's directions ran "
        "as two calls); flax.linen and PyTorch run with their defaults.",
        f"CPU devices: rnn_jax --cpu_devices={o.get('cpu_devices', '1')}, flax.linen "
        f"--flax_cpu_devices={o.get('flax_cpu_devices', '1')} (auto: one per core, "
        "rnn_jax.parallel.split_cpu, the default of experiments.train; on a CPU the batch "
        "is split over them and each device runs its share at once; the rnn_jax impl "
        "column says when there were several; GPU runs are not affected).",
        "Allocator: "
        + (
            "every worker, whatever its implementation, calls rnn_jax.allocator.tune_malloc() "
            "first (glibc: one arena, no mmap, no trimming; without it XLA:CPU and PyTorch "
            "page-fault on every step)."
            if o.get("tune_malloc")
            else "glibc defaults (--notune_malloc)."
        ),
        "Input is one-hot (vocabulary "
        f"{o['vocab_size']}); rnn_jax computes onehot(x) W_x as a row lookup, the peers "
        "multiply the one-hot matrix.",
        f"Each number: median over {o['rounds']} round(s) (fresh process each, implementations "
        f"alternating) of the round's median step; {o['warmup']} warm-up step(s), then up to "
        f"{o['iters']} timed steps (at least {o['min_iters']}, stopping after "
        f"{o['max_time_s']:g} s), each synchronised.",
        "Speedup vs a peer = peer ms/step / rnn_jax ms/step. JAX compile s = lowering + XLA "
        "compilation of the whole step; XLA memory from `compiled.memory_analysis()`; "
        "max RSS is the worker process's (runtime and imports included).",
        *prewarm,
    ]


# Flags that change what a run measures, not how precisely: a run with any of them
# off its default writes a section of its own (its key lists them) rather than
# replacing the default run's. The peers (--compare) are columns instead: a rerun
# without one keeps the section that has it (table_cases).
VARIANT_FLAGS = (
    "implementation",
    "unroll",
    "remat",
    "hoist_input",
    "matmul_dtype",
    "directions",
    "reset_after",
    "vocab_size",
    "cpu_devices",
    "flax_cpu_devices",
    "tune_malloc",
    "threads",
    "prewarm",
)


def variant(values: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """``["--implementation=scan", ...]``: the flags of ``values`` away from
    ``defaults``, in the order given, as written on a command line."""
    from experiments.common import as_flag

    return [as_flag(name, value) for name, value in values.items() if value != defaults.get(name)]


def section_key(meta: dict[str, Any]) -> str:
    """``"CPU <model> (2 cores): training step"``, then ``" [--flag=value, ...]"``
    for a run off the default settings (``meta["variant"]``)."""
    key = f"{device_label(meta)}: {meta['kind']}"
    return key + (f" [{', '.join(meta['variant'])}]" if meta.get("variant") else "")


def render_section(report: dict[str, Any]) -> tuple[str, str]:
    """``(key, markdown)`` of one run: the key names the device, the report kind and
    the settings off their defaults (:func:`section_key`)."""
    meta = report["meta"]
    key = section_key(meta)
    m, v = meta["machine"], meta["versions"]
    lines = [
        f"<!-- benchmark-section: {key} -->",
        f"## {key}",
        "",
        f"- Date: {meta['date']}",
        f"- Machine: {m['cpu']}"
        + (f" ({m['vector']})" if m.get("vector") else "")
        + f", {m['cores']} cores ({m['cores_usable']} usable)"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU used"),
        "- Versions: " + ", ".join(f"{k} {val or 'not installed'}" for k, val in v.items()),
        f"- Threads: {meta['threads']} per worker (OMP/MKL/OpenBLAS, torch.set_num_threads, "
        "XLA via the CPU affinity mask)",
        f"- Command: `{meta['command']}`",
    ]
    lines += [f"- {n}" for n in [*settings_notes(meta), *meta.get("notes", [])]]
    if report.get("results"):
        lines += [
            "",
            "### Training step",
            "",
            speed_table(report["results"], meta["impls"]),
            "",
            "### Compile time and memory",
            "",
            detail_table(report["results"]),
        ]
    if report.get("compile_report") is not None:
        lines += [
            "",
            "### Compile-time targets",
            "",
            "What to look for: with one `lax.scan` per layer the compile time should not "
            "grow with the sequence length (T=1024 / T=32 near 1) and at most linearly with "
            "depth (4 layers / 1 layer at most 4).",
            "",
            compile_table(report["compile_report"]),
        ]
    if report.get("remat_report") is not None:
        b = Config(**report["remat_report"]["config"])
        lines += [
            "",
            f"### Remat (rnn_jax, H={b.hidden_size} B={b.batch_size} T={b.num_steps}, 1 layer)",
            "",
            "XLA temp memory (`memory_analysis().temp_size_in_bytes`) and step time without "
            "and with `remat=True` (gradient checkpointing of the recurrent step).",
            "",
            remat_table(report["remat_report"]),
        ]
    lines.append(f"<!-- /benchmark-section: {key} -->")
    return key, "\n".join(lines) + "\n"


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Writes ``report`` to ``path`` through a temporary file (a reader never sees half)."""
    from rnn_jax.files import write_atomic

    write_atomic(path, json.dumps(report, indent=2) + "\n")


def partial_path(output: str) -> Path:
    """Where a run writes its results after every case: ``<output>.partial``. The
    output itself is written only when the run finishes (and the partial file then
    removed), so an interrupted run never replaces a complete file."""
    return Path(output + ".partial")


def table_cases(section: str) -> list[str]:
    """The cases a section's tables measured, one label per row: the cells up to the
    header's ``bidir`` column (training-step tables), or its ``impl`` column, else the
    first cell (compile and remat reports). A training-step table gives one label
    per implementation measured (``"<case>: torch"``, from its ``ms/step``
    columns), so a rerun without a peer keeps the section that has it. A row that
    says ``failed`` measured nothing, so a failed rerun never replaces a measured row."""
    cases: list[str] = []
    header: list[str] | None = None
    for line in section.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        if all(set(c) <= set("-: ") for c in cells):
            continue  # the separator row
        timed = [i for i, name in enumerate(header) if name.endswith(" ms/step")]
        if "bidir" in header and timed:
            case = " ".join(cells[: header.index("bidir") + 1])
            for i in timed:
                if i < len(cells) and cells[i] not in ("failed", "skipped", "–", ""):
                    cases.append(f"{case}: {header[i].removesuffix(' ms/step')}")
            continue
        if "failed" in cells:
            continue  # a case whose measurement failed
        for name in ("bidir", "impl"):
            if name in header:
                cases.append(" ".join(cells[: header.index(name) + 1]))
                break
        else:
            cases.append(cells[0])
    return cases


def update_markdown(
    path: Path, key: str, section: str, meta: dict[str, Any] | None = None
) -> tuple[str, list[str]]:
    """Replaces the section ``key`` of ``path`` (or appends it; creates the file), unless
    that section holds cases ``section`` lacks (a run of a subset): then it stays and
    this run goes into a new section, ``key`` with the run's date. Returns
    ``(the key written, the cases kept)``."""
    from rnn_jax.files import write_atomic

    text = path.read_text() if path.exists() else "# Benchmarks\n"

    def bounds(k: str) -> tuple[int, int]:
        begin, end = f"<!-- benchmark-section: {k} -->", f"<!-- /benchmark-section: {k} -->"
        i = text.find(begin)
        j = text.find(end, i) if i >= 0 else -1
        return (i, j + len(end)) if i >= 0 and j >= 0 else (-1, -1)

    i, j = bounds(key)
    kept: list[str] = []
    if i >= 0:
        new_cases = set(table_cases(section))
        kept = [c for c in dict.fromkeys(table_cases(text[i:j])) if c not in new_cases]
    written = key
    if kept:
        now = datetime.datetime.now(datetime.timezone.utc)
        stamp = (meta or {}).get("date") or now.strftime("%Y-%m-%d %H:%M UTC")
        written = f"{key} ({stamp})"
        section = section.replace(key, written)
        i, j = bounds(written)
    if i >= 0:
        text = text[:i] + section.rstrip("\n") + text[j:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    write_atomic(path, text)
    return written, kept


# --- main ----------------------------------------------------------------------------


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing is free)."""
    from absl import flags

    from experiments import common

    flags.DEFINE_list(
        "configs",
        ",".join(CONFIGS),
        "Shapes to run: "
        + "; ".join(
            f"{c.name} (H={c.hidden_size} B={c.batch_size} T={c.num_steps})"
            for c in CONFIGS.values()
        )
        + "; or a --config_spec name.",
    )
    flags.DEFINE_multi_string(
        "config_spec",
        [],
        'Custom shape "name:hidden:batch:steps" (repeatable); it is run in addition to '
        "--configs (which may name it; --configs= runs only the custom ones).",
    )
    flags.DEFINE_list(
        "cases",
        [],
        'Cases to run, in this order, each "config:cell:layers:bidirectional" (e.g. '
        "long:lstm:2:false); when given, instead of the product of --configs, --cells, "
        "--layers and --bidirectional.",
    )
    flags.DEFINE_list("cells", ",".join(CELLS), "Cells to run: rnn, gru, lstm.")
    flags.DEFINE_list("layers", "1,2", "Depths to run (stacked layers).")
    flags.DEFINE_list(
        "bidirectional",
        "false,true",
        "Directions to run: a list of false and true (the default runs both).",
    )
    flags.DEFINE_list(
        "compare",
        "",
        "Peers timed against rnn_jax in their own processes: flax (flax.linen nn.RNN), "
        "torch (nn.LSTM/GRU/RNN, cuDNN on a GPU). Missing packages are skipped with a note.",
    )
    flags.DEFINE_integer(
        "rounds", 3, "Alternating rounds (a fresh process each); median over them.", lower_bound=1
    )
    flags.DEFINE_integer(
        "warmup", 2, "Untimed steps after compiling (the first is reported).", lower_bound=1
    )
    flags.DEFINE_integer("iters", 10, "Timed steps per round (at most).", lower_bound=1)
    flags.DEFINE_integer("min_iters", 3, "Timed steps per round (at least).", lower_bound=1)
    flags.DEFINE_float(
        "max_time_s",
        20.0,
        "Stop a round's timed steps after this many seconds (once past --min_iters).",
        lower_bound=0,
    )
    flags.DEFINE_integer(
        "vocab_size", 28, "Vocabulary size V (the book's characters: 28).", lower_bound=2
    )
    flags.DEFINE_float("lr", 1.0, "SGD learning rate (does not change the timing).", lower_bound=0)
    flags.DEFINE_integer("seed", 0, "Seed of the initialisation and of the random batch.")
    flags.DEFINE_integer(
        "unroll",
        0,
        "rnn_jax: time steps per loop iteration; 0: the backend's default "
        "(networks.default_unroll).",
        lower_bound=0,
    )
    flags.DEFINE_bool("remat", False, "rnn_jax: gradient checkpointing of the recurrent step.")
    flags.DEFINE_enum(
        "hoist_input",
        "auto",
        ["auto", "true", "false"],
        "rnn_jax: input projection as one matmul outside the scan (auto: the backend's default).",
    )
    flags.DEFINE_enum(
        "implementation",
        "auto",
        ["auto", "fused", "scan", "wavefront", "pallas", "native"],
        "rnn_jax: recurrent layers (auto: networks.choose_implementation per shape; "
        "wavefront: unidirectional only).",
    )
    flags.DEFINE_enum(
        "matmul_dtype",
        "float32",
        ["float32", "bfloat16"],
        "rnn_jax: operand type of the recurrent layers' matmuls (float32 accumulation).",
    )
    flags.DEFINE_enum(
        "directions",
        "auto",
        ["auto", "vmap", "separate"],
        "rnn_jax, bidirectional cases: the fused layers' two directions in one vmapped "
        "call or two calls (auto: networks.separate_directions); unidirectional cases "
        "ignore it.",
    )
    common.define_cpu_devices_flag(
        "cpu_devices",
        "auto",
        "rnn_jax: " + common.CPU_DEVICES_HELP + " As experiments.train does by default.",
    )
    common.define_cpu_devices_flag(
        "flax_cpu_devices",
        "1",
        "flax.linen: CPU devices, the batch split over them the same way (default 1: "
        "one device, as a flax.linen user gets it).",
    )
    flags.DEFINE_bool(
        "tune_malloc",
        True,
        "Every worker (all implementations alike) first calls "
        "rnn_jax.allocator.tune_malloc(): glibc reuses memory instead of page-faulting.",
    )
    flags.DEFINE_bool(
        "reset_after",
        True,
        "rnn_jax GRU form: true = reset after the recurrent matmul (PyTorch, cuDNN, flax.linen: "
        "the same function as the peers); false = the seed's reset-before GRU.",
    )
    flags.DEFINE_integer(
        "threads",
        0,
        "CPU threads of every worker (0: all cores this process may use).",
        lower_bound=0,
    )
    flags.DEFINE_enum(
        "device",
        "auto",
        ["auto", "cpu", "gpu"],
        "auto: JAX's default backend, and the peers follow it; cpu or gpu to insist.",
    )
    flags.DEFINE_string("output", "benchmarks.json", "JSON file of all results; empty: none.")
    flags.DEFINE_string(
        "markdown",
        "BENCHMARKS.md",
        "Markdown file whose section for this device and report is replaced (or appended); "
        "empty: none.",
    )
    flags.DEFINE_bool(
        "compile_report",
        False,
        "Run only the compile-time targets: the medium step's compile time, T=1024 vs T=32 and "
        "4 layers vs 1 layer compile-time ratios (rnn_jax, and flax with --compare=flax).",
    )
    flags.DEFINE_bool(
        "remat_report",
        False,
        "Run only the remat target: rnn_jax temp memory and step time at T=1024 (long) "
        "without and with remat.",
    )
    flags.DEFINE_string(
        "compile_config",
        "medium",
        "--compile_report: the shape whose compile time is reported and varied (T=32, "
        "T=1024, 4 layers); a config name.",
    )
    flags.DEFINE_string(
        "remat_config", "long", "--remat_report: the shape (1 layer) timed without and with remat."
    )
    flags.DEFINE_integer(
        "worker_timeout_s", 3600, "Give up on one worker process after this long.", lower_bound=1
    )
    flags.DEFINE_integer(
        "prewarm",
        0,
        "Compile every case's JAX steps first, this many worker processes at a time, into a "
        "persistent compilation cache that the timed workers then load from (on a machine "
        "with many cores, a GPU host, the whole matrix then takes a fraction of the time). "
        "The compile column reports the prewarm's compiles (several sharing the machine); "
        "the timed workers' cache loads go to the JSON as compile_load_s. 0: off, every "
        "timed worker compiles cold. Not with --compile_report or --remat_report.",
        lower_bound=0,
    )
    flags.DEFINE_string(
        "compilation_cache_dir",
        "",
        "--prewarm: the compilation cache's directory (kept); empty: a temporary one, "
        "removed at the end.",
    )

    from experiments.common import flag_validator

    def validate(name: str, check: Callable[[Any], Any]) -> None:
        flags.register_validator(name, flag_validator(check))

    validate("cells", lambda v: check_choices(v, CELLS, "cell"))
    validate("compare", lambda v: check_choices(v, PEERS, "peer"))
    validate("layers", parse_layers)
    validate("bidirectional", parse_bools)
    validate("config_spec", lambda v: [parse_config_spec(s) for s in v])

    def cases_ok(d):
        try:
            parse_cases(d["cases"], d["config_spec"])
        except ValueError as e:
            raise flags.ValidationError(f"--cases: {e}") from None
        return True

    flags.register_multi_flags_validator(["cases", "config_spec"], cases_ok)

    def lr_ok(value):
        if not math.isfinite(value) or value <= 0:
            raise flags.ValidationError(f"expected a finite learning rate > 0, got {value}")
        return True

    flags.register_validator("lr", lr_ok)
    from experiments.common import finite_seconds_ok, output_path_ok

    flags.register_validator("max_time_s", finite_seconds_ok)
    flags.register_validator("output", output_path_ok)
    flags.register_validator("markdown", output_path_ok)

    def distinct_outputs(d):  # the section was appended to the JSON, which then broke
        if d["output"] and d["markdown"]:
            if os.path.abspath(d["output"]) == os.path.abspath(d["markdown"]):
                raise flags.ValidationError("--markdown: the same file as --output")
        if d["min_iters"] > d["iters"]:
            raise flags.ValidationError(
                f"--min_iters: {d['min_iters']} is more than --iters {d['iters']}"
            )
        return True

    flags.register_multi_flags_validator(
        ["output", "markdown", "min_iters", "iters"], distinct_outputs
    )

    def implementation_ok(d):
        """What train.py refuses at once, refused here before any worker starts."""
        impl = d["implementation"]
        if d["matmul_dtype"] != "float32" and impl == "scan":
            raise flags.ValidationError(
                f"--matmul_dtype: {d['matmul_dtype']} needs --implementation=fused, wavefront "
                "or auto; the reference scan computes in float32"
            )
        if impl in ("native", "pallas"):
            try:
                cases = parse_cases(d["cases"], d["config_spec"]) if d["cases"] else []
                cell_names = [c.cell for c in cases] or list(d["cells"])
                sizes = [c.config.hidden_size for c in cases] or [
                    c.hidden_size for c in selected_configs(d["configs"], d["config_spec"])
                ]
            except ValueError:
                return True  # the flags' own validators report it
            if impl == "native" and set(cell_names) - {"lstm"}:
                raise flags.ValidationError(
                    f"--implementation: 'native' runs the LSTM only; got the cells "
                    f"{sorted(set(cell_names) - {'lstm'})} (--cells=lstm)"
                )
            if impl == "native" and any(h % 16 for h in sizes):
                raise flags.ValidationError(
                    f"--implementation: 'native' needs hidden sizes that are multiples of 16; "
                    f"got {sorted({h for h in sizes if h % 16})}"
                )
            if impl == "pallas" and "gru" in cell_names and not d["reset_after"]:
                raise flags.ValidationError(
                    "--implementation: 'pallas' runs the reset-after GRU only; drop "
                    "--noreset_after or the GRU"
                )
        if impl == "wavefront":
            try:
                both = parse_bools(d["bidirectional"]) if not d["cases"] else []
                both += [case.bidirectional for case in parse_cases(d["cases"], d["config_spec"])]
            except ValueError:
                return True  # the flags' own validators report it
            if any(both):
                raise flags.ValidationError(
                    "--implementation: 'wavefront' runs unidirectional networks; drop the "
                    "bidirectional cases (--bidirectional=false) or choose another"
                )
        return True

    flags.register_multi_flags_validator(
        [
            "implementation",
            "matmul_dtype",
            "bidirectional",
            "cases",
            "config_spec",
            "cells",
            "configs",
            "reset_after",
        ],
        implementation_ok,
    )

    def configs_ok(d):
        try:
            selected = selected_configs(d["configs"], d["config_spec"])
        except ValueError as e:
            raise flags.ValidationError(f"--configs: {e}") from None
        if not selected and not (d["cases"] or d["compile_report"] or d["remat_report"]):
            raise flags.ValidationError("--configs: no configs selected")
        known = all_configs(d["config_spec"])
        for name in ("compile_config", "remat_config"):
            if d[name] not in known:
                raise flags.ValidationError(
                    f"--{name}: unknown config {d[name]!r}; expected one of {', '.join(known)}"
                )
        return True

    def reports_ok(d):
        report = d["compile_report"] or d["remat_report"]
        if d["prewarm"] and report:
            raise flags.ValidationError(
                "--prewarm: only for the training-step run; --compile_report and "
                "--remat_report measure cold compiles"
            )
        if d["cases"] and report:
            raise flags.ValidationError(
                "--cases: only for the training-step run; --compile_report and "
                "--remat_report choose their own shapes (--compile_config, --remat_config)"
            )
        if d["compilation_cache_dir"] and not d["prewarm"]:
            raise flags.ValidationError("--compilation_cache_dir: only with --prewarm=N, N >= 1")
        return True

    flags.register_multi_flags_validator(
        ["prewarm", "cases", "compilation_cache_dir", "compile_report", "remat_report"], reports_ok
    )

    flags.register_multi_flags_validator(
        [
            "configs",
            "cases",
            "config_spec",
            "compile_report",
            "remat_report",
            "compile_config",
            "remat_config",
        ],
        configs_ok,
    )


def main(argv: list[str]) -> None:
    from absl import flags

    from experiments.common import resolve_cpu_devices

    FLAGS = flags.FLAGS
    del argv  # positional arguments are refused by parse_flags_or_exit_2
    echo = lambda s: print(s, flush=True)
    impls = ["rnn_jax", *dict.fromkeys(FLAGS.compare)]
    usable = len(os.sched_getaffinity(0))
    threads = min(FLAGS.threads, usable) if FLAGS.threads else usable
    options = {
        "vocab_size": FLAGS.vocab_size,
        "reset_after": FLAGS.reset_after,
        "unroll": FLAGS.unroll or None,
        "remat": FLAGS.remat,
        "hoist_input": FLAGS.hoist_input,
        "implementation": FLAGS.implementation,
        "matmul_dtype": FLAGS.matmul_dtype,
        "directions": FLAGS.directions,
        "tune_malloc": FLAGS.tune_malloc,
        "cpu_devices": FLAGS.cpu_devices,
        "flax_cpu_devices": FLAGS.flax_cpu_devices,
        "lr": FLAGS.lr,
        "seed": FLAGS.seed,
        "warmup": FLAGS.warmup,
        "iters": FLAGS.iters,
        "min_iters": min(FLAGS.min_iters, FLAGS.iters),
        "max_time_s": FLAGS.max_time_s,
        "device": FLAGS.device,
    }
    notes = []
    for impl, module in (("flax", "flax"), ("torch", "torch")):
        if impl in impls and importlib.util.find_spec(module) is None:
            notes.append(f"{impl} skipped: not installed")
            impls.remove(impl)
    reports = FLAGS.compile_report or FLAGS.remat_report
    kinds = [
        k
        for k, on in (
            ("compile report", FLAGS.compile_report),
            ("remat report", FLAGS.remat_report),
        )
        if on
    ]
    kind = " + ".join(kinds) if reports else "training step"

    cases = []
    if not reports and FLAGS.cases:
        cases = parse_cases(FLAGS.cases, FLAGS.config_spec)
    elif not reports:
        configs = selected_configs(FLAGS.configs, FLAGS.config_spec)
        cases = make_cases(
            configs,
            list(dict.fromkeys(FLAGS.cells)),
            parse_layers(FLAGS.layers),
            parse_bools(FLAGS.bidirectional),
        )
    cells = list(dict.fromkeys(FLAGS.cells))
    known = all_configs(FLAGS.config_spec)
    batch_sizes = {c.config.batch_size for c in cases}
    if FLAGS.compile_report:
        batch_sizes.add(known[FLAGS.compile_config].batch_size)
    if FLAGS.remat_report:
        batch_sizes.add(known[FLAGS.remat_config].batch_size)
    try:  # a given device count must split every batch, before any worker runs
        for flag in ("cpu_devices", "flax_cpu_devices"):
            for b in sorted(batch_sizes):
                resolve_cpu_devices(FLAGS[flag].value, b, True, flag=flag, switch_off="")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    total = len(cases) * FLAGS.rounds * len(impls)
    if FLAGS.compile_report:
        total += (
            FLAGS.rounds
            * len(cells)
            * len([i for i in impls if i != "torch"])
            * len(compile_variants(CONFIGS["medium"]))
        )
    if FLAGS.remat_report:
        total += FLAGS.rounds * len(cells) * 2
    runner = Runner(
        {**options, "device": FLAGS.device}, threads, FLAGS.worker_timeout_s, echo, total
    )
    runner.notes.extend(notes)
    echo(
        f"{kind}: {total} worker processes, {threads} threads each, "
        f"implementations {', '.join(impls)}"
    )

    off_default = [*VARIANT_FLAGS]
    off_default += ["compile_config"] if FLAGS.compile_report else []
    off_default += ["remat_config"] if FLAGS.remat_report else []
    variant_flags = variant(
        {name: FLAGS[name].value for name in off_default},
        {name: FLAGS[name].default for name in off_default},
    )

    def full_report(body: dict[str, Any], partial: bool = False) -> dict[str, Any]:
        platform_used = runner.device if runner.device != "auto" else "cpu"
        gpu = runner.device_name if platform_used == "gpu" else None
        notes = list(runner.notes)
        for r in body.get("results", []):
            if r.get("ok") and r.get("platform") != platform_used:
                notes.append(
                    f"{r['impl']} ran on {r.get('platform')} while rnn_jax ran on {platform_used}"
                )
        if runner.disturbed:
            notes.append(
                f"WARNING: during {runner.disturbed} of the timed worker processes, other "
                f"processes (or the hypervisor's steal) used more than {BUSY_LIMIT:.0%} of "
                "the CPUs (foreign_cpu in the JSON): those times are slower and noisier "
                "than the machine's; rerun on an idle machine"
            )
        if partial:
            notes.append("partial: the run had not finished when this file was written")
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        meta = {
            "kind": kind,
            "variant": variant_flags,
            "date": date,
            "command": "python -m experiments.benchmark " + shlex.join(sys.argv[1:]),
            "machine": machine_info(gpu),
            "platform": platform_used,
            "versions": versions(),
            "threads": threads,
            "impls": impls,
            "options": {
                **options,
                "rounds": FLAGS.rounds,
                "hoist_input_used": runner.hoist_input,
                "prewarm": FLAGS.prewarm,
            },
            "notes": list(dict.fromkeys(notes)),
        }
        return {"meta": meta, **({"partial": True} if partial else {}), **body}

    def write_partial(results: list[dict]) -> None:  # a killed run keeps its finished cases
        if FLAGS.output:  # beside the output, which keeps the last complete run's results
            report = full_report({"results": results}, partial=True)
            write_json(partial_path(FLAGS.output), report)

    report: dict[str, Any] = {}
    cache_dir = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below
    try:
        if not reports:
            prewarmed = None
            if FLAGS.prewarm:
                cache_dir = FLAGS.compilation_cache_dir or tempfile.mkdtemp(
                    prefix="rnn_jax_bench_cache_"
                )
                if any(Path(cache_dir).glob("*")):
                    runner.notes.append(
                        f"--compilation_cache_dir={cache_dir} held programs before the run: "
                        "a prewarm compile of a program already there is a load"
                    )
                runner.env = cache_env(cache_dir)
                echo(f"prewarm: {FLAGS.prewarm} compiles at a time, cache {cache_dir}")
                prewarmed = prewarm(cases, impls, runner, FLAGS.prewarm)
            report["results"] = run_benchmark(
                cases, impls, runner, FLAGS.rounds, prewarmed, write_partial
            )
    finally:
        if cache_dir and not FLAGS.compilation_cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
    if FLAGS.compile_report:
        base = known[FLAGS.compile_config]
        report["compile_report"] = run_compile_report(base, cells, impls, runner, FLAGS.rounds)
    if FLAGS.remat_report:
        base = known[FLAGS.remat_config]
        report["remat_report"] = run_remat_report(base, cells, runner, FLAGS.rounds)
    if "rnn_jax" in runner.skipped:
        print(f"error: rnn_jax cannot run: {runner.skipped['rnn_jax']}", file=sys.stderr)
        sys.exit(1)

    failed = [r for r in report.get("results", []) if not r.get("ok") and not r.get("skipped")]
    if report.get("results") and len(failed) == len(report["results"]):
        print(  # nothing measured: the earlier JSON and section stay as they are
            f"error: all {len(failed)} measurement(s) failed (the errors above); "
            f"{FLAGS.output or 'no JSON'} and {FLAGS.markdown or 'no markdown'} left as they were",
            file=sys.stderr,
        )
        sys.exit(1)
    report = full_report(report)
    key, section = render_section(report)
    echo("")
    echo(section)
    if FLAGS.output:
        write_json(Path(FLAGS.output), report)
        partial_path(FLAGS.output).unlink(missing_ok=True)
        echo(f"wrote {FLAGS.output}")
    if FLAGS.markdown:
        written, kept = update_markdown(Path(FLAGS.markdown), key, section, report["meta"])
        if kept:
            more = f" and {len(kept) - 3} more" if len(kept) > 3 else ""
            echo(
                f"kept section {key!r} of {FLAGS.markdown}: it holds cases this run did "
                f"not measure ({', '.join(kept[:3])}{more}); this run is section {written!r}"
            )
        else:
            echo(f"updated section {written!r} of {FLAGS.markdown}")
    if failed:
        echo(f"{len(failed)} measurement(s) failed; see the errors above and in the JSON")
        sys.exit(1)


if __name__ == "__main__":
    from absl import app

    from experiments.common import parse_flags_or_exit_2

    define_flags()
    app.run(main, flags_parser=parse_flags_or_exit_2)
