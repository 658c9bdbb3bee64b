r"""Times rnn_jax's training step under several network options, in one process.

The lever sweep behind the defaults of :func:`rnn_jax.networks.choose_implementation`
and :func:`rnn_jax.networks.default_unroll`: for every shape it compiles the
benchmark's step (``experiments.bench_worker``, the real ``rnn_jax.train`` step)
once per variant and times it, then prints one row per shape with the median step
time of each variant and the fastest::

    python -m experiments.levers --configs=long,large --cells=gru,lstm \
        --variants=scan:1,scan:8,fused:1,fused:8,fused:32

A variant is ``implementation:unroll`` (implementation ``scan``, ``fused``,
``wavefront``, ``pallas`` or ``native``, the last two with unroll 1 and no hoist
part; ``native``, the C++ loops of :mod:`rnn_jax.native`, runs the LSTM on a CPU
in float32 only, and is skipped for the other cells) with optional
further parts: ``hoist`` or ``nohoist`` (the scan's input projection outside the
loop or not) and ``bf16`` (bfloat16 matmuls), e.g. ``fused:8:bf16``. All variants run in this
one process (only JAX is imported, so no foreign thread pool competes); the peers
and cold compile times are :mod:`experiments.benchmark`'s job. On a CPU every case
runs on one device count (``--cpu_devices``, default ``auto``: the benchmark's
per-case choice, which the cases must then share), since JAX fixes the count when
its backend starts.

``--rounds=N`` times every variant N times, alternating (the order reversed every
other round, so a drift of the machine's speed falls on all variants alike), and
reports each variant's median: on a noisy VM, the way to tell two variants apart.
A native-kernel A/B on the benchmark's LSTM shapes, for instance::

    python -m experiments.levers --configs=d2l,medium,long --cells=lstm \
        --variants=fused:1,native:1 --rounds=7

``--check`` first compares the ``fused``, ``wavefront``, ``pallas`` and (on a
CPU where its kernels run, for the LSTM) ``native`` implementations with ``scan``
on this device at ``highest`` matmul precision
(values and gradients with variable lengths, every cell: fused on a 2-layer
bidirectional network, wavefront on a 3-layer one, pallas on one layer) and exits
1 if they differ by more than 1e-5 relative: the checks of ``tests/test_fused.py``
and ``tests/test_wavefront.py``, on whatever accelerator runs this.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from absl import app, flags

from experiments import bench_worker, common
from experiments.benchmark import (
    CELLS,
    check_choices,
    fmt_ms,
    machine_info,
    make_cases,
    parse_bools,
    parse_layers,
    partial_path,
    selected_configs,
    versions,
    write_json,
)
from experiments.common import flag_validator, parse_flags_or_exit_2

IMPLEMENTATIONS = ("scan", "fused", "wavefront", "pallas", "native")
NO_UNROLL = ("pallas", "native")  # their own kernels: one step per loop iteration


def parse_variant(text: str) -> dict[str, Any]:
    """``"fused:8"`` / ``"scan:1:hoist"`` -> bench_worker spec keys; ValueError if bad."""
    parts = text.split(":")
    if len(parts) < 2 or parts[0] not in IMPLEMENTATIONS:
        raise ValueError(
            f"variant {text!r}: expected implementation:unroll[:hoist|:nohoist][:bf16] "
            f"with the implementation one of {list(IMPLEMENTATIONS)}"
        )
    try:
        unroll = int(parts[1])
    except ValueError:
        unroll = 0
    if unroll < 1:
        raise ValueError(f"variant {text!r}: unroll must be an integer >= 1")
    if parts[0] in NO_UNROLL and (unroll != 1 or any(p in ("hoist", "nohoist") for p in parts)):
        also = " (or pallas:1:bf16)" if parts[0] == "pallas" else ""
        raise ValueError(
            f"variant {text!r}: the {parts[0]} kernels have no unroll or hoist option; use "
            f"{parts[0]}:1{also}"
        )
    if parts[0] == "native" and "bf16" in parts:
        raise ValueError(
            f"variant {text!r}: the native kernels compute in float32 only (bfloat16 "
            f"matmuls would run the XLA loops, i.e. fused:1:bf16)"
        )
    spec: dict[str, Any] = {"implementation": parts[0], "unroll": unroll}
    for part in parts[2:]:
        if part in ("hoist", "nohoist") and "hoist_input" not in spec:
            spec["hoist_input"] = "true" if part == "hoist" else "false"
        elif part == "bf16" and "matmul_dtype" not in spec and parts[0] != "scan":
            spec["matmul_dtype"] = "bfloat16"
        else:
            raise ValueError(
                f"variant {text!r}: after the unroll, expected hoist or nohoist and/or "
                f"bf16 (not with scan), each at most once; got {part!r}"
            )
    return spec


CHECK_CELLS = ("rnn", "gru", "gru reset_after", "lstm")


def check_fused(tol: float = 1e-5, names=CHECK_CELLS) -> list[dict[str, Any]]:
    """Max relative difference of fused, wavefront, pallas and native vs scan
    (outputs, carries, all gradients) per cell of ``names`` (pallas and native: the
    cells they support; native: where its kernels run, i.e. on a CPU with a
    compiler)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rnn_jax import cells, native, networks, persistent

    I, H, T, B = 5, 32, 9, 4  # noqa: E741  (H=32: pallas splits the units on GPUs)
    lengths = jnp.asarray([T, 0, 4, 1], jnp.int32)
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(B, T, I)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(B, T, 2 * H)), jnp.float32)
    rows = []
    # (layers, bidirectional)
    shapes = {"fused": (2, True), "wavefront": (3, False), "pallas": (1, True), "native": (2, True)}
    every = {
        "rnn": cells.rnn(H),
        "gru": cells.gru(H),
        "gru reset_after": cells.gru(H, reset_after=True),
        "lstm": cells.lstm(H),
    }
    for name, cell in ((n, every[n]) for n in names):
        for impl, (layers, bidirectional) in shapes.items():
            if impl == "pallas" and persistent.unsupported(cell):
                continue
            if impl == "native" and (native.unsupported(cell) or native.unavailable()):
                continue
            out = {}
            for run in (impl, "scan"):
                net = networks.network(cell, layers, bidirectional, implementation=run)
                params = net.init(jax.random.key(1), I)

                def loss(params, xs, net=net):
                    ys, final = net.apply_batch(params, xs, lengths)
                    extra = sum(jnp.sum(jnp.sin(v)) for v in jax.tree.leaves(final))
                    return jnp.sum(ys * weights[..., : ys.shape[-1]]) + extra

                with jax.default_matmul_precision("highest"):
                    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, xs)
                out[run] = [value, *jax.tree.leaves(grads)]
            err = max(
                float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                for a, b in zip(out[impl], out["scan"], strict=True)
            )
            rows.append(
                {"cell": name, "implementation": impl, "max_rel_diff": err, "ok": err <= tol}
            )
    return rows


def cpu_devices_for(cases, value: str) -> int:
    """The one CPU device count all ``cases`` run on in this process: ``value``
    (``--cpu_devices``: a count, or ``auto``, the count :mod:`experiments.benchmark`'s
    rnn_jax worker picks per case). JAX fixes the count when its backend starts, so
    cases whose ``auto`` counts differ, or a count that does not divide a case's
    batch, raise ValueError naming the flag."""
    counts = {}
    for case in cases:
        spec = case.spec()
        macs = bench_worker.spec_macs(spec)
        counts[case.label()] = common.resolve_cpu_devices(
            value, spec["batch_size"], True, "cpu_devices", macs, switch_off=""
        )
    if len(set(counts.values())) > 1:
        each = ", ".join(f"{label}: {n}" for label, n in counts.items())
        raise ValueError(
            f"--cpu_devices={value}: the cases want different CPU device counts ({each}), "
            f"and one process has one count; pass --cpu_devices=N or run them separately"
        )
    return next(iter(counts.values()), 1)


def variant_skip(spec: dict[str, Any], variant: dict[str, Any]) -> str | None:
    """Why ``variant`` does not apply to the case ``spec`` (``None`` if it does):
    the native kernels run the LSTM with H a multiple of 16 only, where they run
    (:func:`rnn_jax.native.unavailable`: a CPU backend, a compiler)."""
    if variant["implementation"] != "native":
        return None
    from rnn_jax import cells, native

    return native.unsupported(cells.make(spec["cell"], spec["hidden_size"])) or (
        native.unavailable()
    )


def time_variants(
    spec: dict[str, Any],
    variants: dict[str, dict[str, Any]],
    rounds: int,
    timing: dict[str, Any],
    cpu_devices: str,
    run=None,
) -> dict[str, dict[str, Any]]:
    """Times each of ``variants`` (name -> bench_worker spec keys) on the case
    ``spec`` ``rounds`` times, alternating (every other round in reverse order), in
    this process. Returns name -> the median round's result, with ``round_step_s``
    (each round's step time, in the order run) and ``wall_s``; a variant that does
    not apply to the case (:func:`variant_skip`) gets ``ok: False, skip: True``."""
    run = run or bench_worker.run
    names = list(variants)
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    walls = dict.fromkeys(names, 0.0)
    skipped = {n: variant_skip(spec, v) for n, v in variants.items()}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            if skipped[name]:
                continue
            t = time.perf_counter()
            result = run({**spec, **variants[name], **timing, "cpu_devices": cpu_devices})
            walls[name] += time.perf_counter() - t
            result.pop("step_times_s", None)
            results[name].append(result)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        if skipped[name]:
            out[name] = {"ok": False, "skip": True, "error": skipped[name]}
            continue
        done = results[name]
        good = [x for x in done if x.get("ok") and x.get("step_s")]
        if len(good) < len(done) or not good:
            chosen = next(x for x in done if not (x.get("ok") and x.get("step_s")))
        else:  # the median round (the lower middle one of an even count)
            chosen = sorted(good, key=lambda x: x["step_s"])[(len(good) - 1) // 2]
        out[name] = {
            **chosen,
            "round_step_s": [x.get("step_s") for x in done],
            "wall_s": walls[name],
        }
    return out


def main(argv: list[str]) -> None:
    del argv
    FLAGS = flags.FLAGS
    from rnn_jax import allocator

    allocator.tune_malloc()  # as every benchmark worker does, before JAX allocates
    variants = [parse_variant(v) for v in FLAGS.variants]
    cases = make_cases(
        selected_configs(FLAGS.configs, FLAGS.config_spec),
        FLAGS.cells,
        parse_layers(FLAGS.layers),
        parse_bools(FLAGS.bidirectional),
    )
    try:
        num_cpu_devices = cpu_devices_for(cases, FLAGS.cpu_devices)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    import jax

    from rnn_jax import parallel

    parallel.split_cpu(num_cpu_devices)  # before the backends start: one count per process
    platform = jax.default_backend()
    device = jax.devices()[0].device_kind
    print(f"device: {platform} {device}; jax {jax.__version__}", flush=True)
    report: dict[str, Any] = {
        "platform": platform,
        "device": device,
        "machine": machine_info(device if platform == "gpu" else None),
        "versions": versions(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "check": None,
        "results": [],
    }
    failed = False
    if FLAGS.check:
        by_flag = {c.replace(" ", "_"): c for c in CHECK_CELLS}
        report["check"] = check_fused(names=[by_flag[c] for c in FLAGS.check_cells])
        for row in report["check"]:
            print(
                f"check {row['implementation']} vs scan {row['cell']}: "
                f"max rel diff {row['max_rel_diff']:.2e}"
            )
        failed = not all(row["ok"] for row in report["check"])
    report["cpu_devices"] = len(jax.devices("cpu"))
    report["rounds"] = FLAGS.rounds
    print("case | " + " | ".join(FLAGS.variants) + " | fastest (ms)", flush=True)
    for case in cases:
        row = {"case": case.label(), **case.key(), "variants": {}}
        row["variants"] = time_variants(
            case.spec(),
            dict(zip(FLAGS.variants, variants, strict=True)),
            FLAGS.rounds,
            {"iters": FLAGS.iters, "max_time_s": FLAGS.max_time_s},
            str(num_cpu_devices),
        )
        times = {
            n: r["step_s"] for n, r in row["variants"].items() if r.get("ok") and r.get("step_s")
        }
        row["fastest"] = min(times, key=times.get) if times else None
        report["results"].append(row)
        cells_ = [fmt_ms(times.get(n)) for n in FLAGS.variants]
        print(f"{case.label()} | " + " | ".join(cells_) + f" | {row['fastest']}", flush=True)
        if FLAGS.output:  # after every case (beside the output): a cut-off run keeps
            # what it measured, and never replaces a complete file from an earlier run
            write_json(partial_path(FLAGS.output), {**report, "partial": True})
    measured = any(r.get("ok") for row in report["results"] for r in row["variants"].values())
    if FLAGS.output and measured:  # (a run that measured nothing leaves the file alone)
        write_json(Path(FLAGS.output), report)
        partial_path(FLAGS.output).unlink(missing_ok=True)
    elif FLAGS.output:
        print(f"nothing measured: {FLAGS.output} left as it was", file=sys.stderr)
    broken = [
        f"{row['case']} {name}"
        for row in report["results"]
        for name, r in row["variants"].items()
        if not r.get("ok") and not r.get("skip")
    ]
    if broken:
        print(f"error: {len(broken)} variant(s) failed: {', '.join(broken)}", file=sys.stderr)
    if failed:
        print("error: an implementation and scan differ beyond 1e-5 here", file=sys.stderr)
    if failed or broken:
        sys.exit(1)


def define_flags() -> None:
    flags.DEFINE_list("configs", "long", "Shapes (experiments.benchmark's configs).")
    flags.DEFINE_multi_string(
        "config_spec", [], 'Custom shape "name:hidden:batch:steps" (repeatable), also run.'
    )
    flags.DEFINE_list("cells", "gru,lstm", "Cells to run: rnn, gru, lstm.")
    flags.DEFINE_list("layers", "1", "Depths to run.")
    flags.DEFINE_list("bidirectional", "false", "Directions to run: false, true or both.")
    flags.DEFINE_list(
        "variants",
        "scan:1,fused:1,fused:8",
        "Network options to time: implementation:unroll[:hoist|:nohoist][:bf16].",
    )
    flags.DEFINE_integer("iters", 20, "Timed steps per variant (at most).", lower_bound=1)
    flags.DEFINE_float("max_time_s", 3.0, "Stop timing a variant after this long.", lower_bound=0)
    flags.DEFINE_integer(
        "rounds",
        1,
        "Times each variant is timed, alternating (every other round in reverse order); "
        "the report gives each variant's median round.",
        lower_bound=1,
    )
    flags.DEFINE_bool(
        "check",
        False,
        "First check fused, wavefront, pallas and native == scan on this device (1e-5).",
    )
    flags.DEFINE_list(
        "check_cells",
        [c.replace(" ", "_") for c in CHECK_CELLS],
        "Cells --check compares: rnn, gru, gru_reset_after, lstm.",
    )
    flags.DEFINE_string("output", "levers.json", "JSON file of all results; empty: none.")
    common.define_cpu_devices_flag(
        "cpu_devices",
        "auto",
        "CPU devices for every case of this process (JAX fixes the count when it starts): "
        "a count that divides every batch, or auto, experiments.benchmark's per-case "
        "choice, which must then agree across the cases.",
    )

    flags.register_multi_flags_validator(
        ["configs", "config_spec"],
        flag_validator(lambda d: selected_configs(d["configs"], d["config_spec"])),
    )
    flags.register_validator("cells", flag_validator(lambda v: check_choices(v, CELLS, "cell")))
    flags.register_validator("layers", flag_validator(parse_layers))
    flags.register_validator(
        "check_cells",
        flag_validator(
            lambda v: check_choices(v, [c.replace(" ", "_") for c in CHECK_CELLS], "check cell")
        ),
    )
    flags.register_validator("bidirectional", flag_validator(parse_bools))
    flags.register_validator("variants", flag_validator(lambda v: [parse_variant(x) for x in v]))

    def wavefront_ok(d):
        variants = d["variants"] or []
        if any(v.split(":")[0] == "wavefront" for v in variants):
            try:
                both = parse_bools(d["bidirectional"])
            except ValueError:
                return True  # --bidirectional's own validator reports it
            if any(both):
                raise flags.ValidationError(
                    "--variants: wavefront runs unidirectional networks; use "
                    "--bidirectional=false or drop the wavefront variants"
                )
        return True

    flags.register_multi_flags_validator(["variants", "bidirectional"], wavefront_ok)

    def nonempty_ok(d):  # an empty list timed (or checked) nothing, and said ok
        empty = [n for n in ("configs", "variants", "cells", "layers") if not d[n]]
        if n := next((n for n in empty if n != "configs" or not d["config_spec"]), None):
            raise flags.ValidationError(f"--{n}: expected at least one value")
        if d["check"] and not d["check_cells"]:
            raise flags.ValidationError("--check_cells: expected at least one cell with --check")
        return True

    flags.register_multi_flags_validator(
        ["configs", "config_spec", "variants", "cells", "layers", "check", "check_cells"],
        nonempty_ok,
    )
    flags.register_validator("max_time_s", common.finite_seconds_ok)
    flags.register_validator("output", common.output_path_ok)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags_or_exit_2)
