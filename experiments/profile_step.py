r"""Where the benchmark's training step spends its time, one XLA operation at a time.

The benchmark (:mod:`experiments.benchmark`) says how long a step takes; this says
where the time goes: the matmuls, the native kernels, the copies, the all-reduce.
It builds the same step (the language model's, on the same devices), runs a few
steps under ``jax.profiler.trace`` with a Perfetto trace, and sums the trace's
events per operation of the compiled program, next to what each one is (its
result type and the JAX operation it came from, read from the optimized HLO)::

    python -m experiments.profile_step --config=long --cell=lstm --layers=2 --bidirectional
    python -m experiments.profile_step --config_spec=mine:192:48:256 --config=mine --top=40

Each row: ms per step summed over the devices (with 2 CPU devices, each runs its
half of the batch at the same time, so the step's wall time is about half the
sum), its share of the summed time, calls per step, the operation's name, result
type and origin. Operations of the runtime (waits, rendezvous, the Python
dispatch) are left out of the rows; the line before them gives the step's wall
time. Run nothing else meanwhile: the numbers are one process's, on a shared
machine.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from absl import app, flags
from absl import logging as absl_logging

from experiments.common import (
    define_cpu_devices_flag,
    flag_validator,
    output_path_ok,
    parse_flags_or_exit_2,
)

# rnn_jax.networks.IMPLEMENTATIONS, without importing JAX to define the flags
IMPLEMENTATIONS = ("auto", "fused", "scan", "wavefront", "pallas", "native")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\(")
_ORIGIN = re.compile(r'op_name="([^"]*)"')


def hlo_operations(hlo_text: str) -> dict[str, dict[str, str]]:
    """``{instruction name: {"type", "opcode", "origin"}}`` of an optimized HLO module's
    text (every computation's instructions; ``origin``: the JAX operation's name
    from the metadata, ``""`` without)."""
    ops = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        origin = _ORIGIN.search(line)
        ops[m.group(1)] = {
            "type": m.group(2),
            "opcode": m.group(3),
            "origin": origin.group(1) if origin else "",
        }
    return ops


def trace_totals(events: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, int]]:
    """Microseconds and counts per event name of a trace's complete events."""
    total: dict[str, float] = collections.Counter()
    count: dict[str, int] = collections.Counter()
    for e in events:
        if e.get("ph") == "X":
            total[e["name"]] += float(e.get("dur", 0.0))
            count[e["name"]] += 1
    return total, count


def _read_trace(directory: str) -> list[dict[str, Any]]:
    files = glob.glob(f"{directory}/**/*.trace.json.gz", recursive=True) or glob.glob(
        f"{directory}/**/*.json.gz", recursive=True
    )
    if not files:
        raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {directory}")
    with gzip.open(files[0]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def spec_of(config, cell: str, layers: int, bidirectional: bool, implementation: str):
    """The benchmark worker's spec of one case (its defaults otherwise)."""
    from experiments import bench_worker

    return {
        **bench_worker.DEFAULTS,
        "hidden_size": config.hidden_size,
        "batch_size": config.batch_size,
        "num_steps": config.num_steps,
        "cell": cell,
        "num_layers": layers,
        "bidirectional": bidirectional,
        "implementation": implementation,
    }


def profile(spec: dict[str, Any], steps: int, cpu_devices: str = "auto") -> dict[str, Any]:
    """Profiles ``steps`` training steps of ``spec`` (after 2 warm-up steps) in this
    process: ``{"step_s", "devices", "implementation", "rows"}``, rows sorted by
    time, each ``{"name", "ms_per_step", "calls_per_step", "type", "opcode",
    "origin"}``. The CPU devices are split here, so call it before JAX starts its
    backends (as :func:`main` does), or get the devices there are."""
    from experiments import bench_worker
    from rnn_jax import parallel

    bench_worker.split_devices({**spec, "cpu_devices": cpu_devices})
    import jax

    train_step, state, batch, _, _, info = bench_worker._rnn_jax_step(spec)
    mesh, state, batch = bench_worker.on_mesh(state, batch)
    compiled = parallel.in_mesh(mesh, train_step.lower)(state, batch).compile()
    ops = hlo_operations(compiled.as_text())

    def run(n):
        nonlocal state
        times = []
        for _ in range(n):
            t = time.perf_counter()
            state, out = compiled(state, batch)
            jax.block_until_ready((state, out))
            times.append(time.perf_counter() - t)
        return times

    run(2)
    step_s = statistics.median(run(steps))
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            run(steps)
        total, count = trace_totals(_read_trace(directory))
    rows = [
        {
            "name": name,
            "ms_per_step": us / steps / 1e3,
            "calls_per_step": count[name] / steps,
            **ops[name],
        }
        for name, us in total.items()
        if name in ops
    ]
    rows.sort(key=lambda r: -r["ms_per_step"])
    devices = 1 if mesh is None else mesh.size
    return {
        "step_s": step_s,
        "devices": devices,
        "implementation": info["implementation"],
        "rows": rows,
    }


def _cut(text: str, width: int, tail: bool = False) -> str:
    """``text``, or its first (``tail``: last) ``width - 1`` characters with an ellipsis
    where they were cut."""
    if len(text) <= width:
        return text
    return "…" + text[1 - width :] if tail else text[: width - 1] + "…"


def format_report(title: str, report: dict[str, Any], top: int) -> str:
    rows = report["rows"]
    summed = sum(r["ms_per_step"] for r in rows) or 1.0
    lines = [
        f"{title}: {report['implementation']}, {report['devices']} device(s), "
        f"{report['step_s'] * 1e3:.1f} ms per step (wall, median)",
        f"operations of the program: {summed:.1f} ms per step summed over the devices",
        "ms/step | share | calls | operation | result | from",
    ]
    for r in rows[:top]:
        lines.append(
            f"{r['ms_per_step']:8.2f} | {100 * r['ms_per_step'] / summed:4.1f}% | "
            f"{r['calls_per_step']:g} | {r['name']} | {_cut(r['type'], 60)} | "
            f"{_cut(r['origin'], 70, tail=True)}"
        )
    if len(rows) > top:
        rest = sum(r["ms_per_step"] for r in rows[top:])
        lines.append(f"{rest:8.2f} | {100 * rest / summed:4.1f}% | the other {len(rows) - top}")
    return "\n".join(lines)


def check_config(name: str, specs: list[str]):
    """The config called ``name`` among the benchmark's and ``--config_spec``'s;
    ValueError naming ``--config`` (or ``--config_spec``) otherwise."""
    from experiments.benchmark import all_configs

    try:
        configs = all_configs(specs)
    except ValueError as e:
        raise ValueError(f"--config_spec: {e}") from None
    if name not in configs:
        raise ValueError(f"--config: expected one of {', '.join(configs)}, got {name!r}")
    return configs[name]


def main(argv: list[str]) -> None:
    del argv
    FLAGS = flags.FLAGS
    absl_logging.set_verbosity(absl_logging.WARNING)  # not JAX's backend-probing INFO lines
    from rnn_jax import allocator

    allocator.tune_malloc()  # as the benchmark's workers do
    config = check_config(FLAGS.config, FLAGS.config_spec)
    spec = spec_of(config, FLAGS.cell, FLAGS.layers, FLAGS.bidirectional, FLAGS.implementation)
    try:
        report = profile(spec, FLAGS.steps, FLAGS.cpu_devices)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    kind = "bidirectional " if FLAGS.bidirectional else ""
    title = (
        f"{config.name} (H={config.hidden_size} B={config.batch_size} T={config.num_steps}) "
        f"{FLAGS.cell}, {FLAGS.layers} {kind}layer(s)"
    )
    print(format_report(title, report, FLAGS.top), flush=True)
    if FLAGS.output:
        from experiments.benchmark import machine_info, versions

        out = {"machine": machine_info(), "versions": versions(), "case": spec, **report}
        Path(FLAGS.output).write_text(json.dumps(out, indent=1) + "\n")


def define_flags() -> None:
    from experiments.benchmark import CELLS

    flags.DEFINE_string("config", "d2l", "The shape: d2l, medium, long, large or a --config_spec.")
    flags.DEFINE_multi_string("config_spec", [], 'Extra shape "name:H:B:T" (repeatable).')
    flags.DEFINE_enum("cell", "lstm", list(CELLS), "The cell.")
    flags.DEFINE_integer("layers", 1, "Stacked layers.", lower_bound=1)
    flags.DEFINE_bool("bidirectional", False, "Bidirectional layers.")
    flags.DEFINE_enum(
        "implementation",
        "auto",
        list(IMPLEMENTATIONS),
        "rnn_jax's implementation (auto: what the benchmark and experiments.train run).",
    )
    define_cpu_devices_flag(  # (checked: an unparsable count exited 1 without the flag)
        "cpu_devices", "auto", "CPU devices (auto: as the benchmark's workers)."
    )
    flags.DEFINE_integer("steps", 3, "Steps timed, and steps traced.", lower_bound=1)
    flags.DEFINE_integer("top", 30, "Operations printed.", lower_bound=1)
    flags.DEFINE_string("output", "", "JSON file of every row; empty: none.")
    flags.register_multi_flags_validator(
        ["config", "config_spec"],
        flag_validator(lambda d: check_config(d["config"], d["config_spec"])),
    )
    flags.register_validator("output", output_path_ok)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags_or_exit_2)
