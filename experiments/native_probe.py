r"""Times the native LSTM kernels alone (:mod:`rnn_jax.native`), one build against another.

The benchmark (:mod:`experiments.benchmark`) times whole training steps; this probe
times the two C++ loops by themselves, on one device, at the per-device shares of
the benchmark's shapes (its 2-core runs split the batch over one device per core),
so a change to ``rnn_jax/csrc/lstm_loops.cc`` or to its compiler flags can be told
apart from the XLA work around it::

    python -m experiments.native_probe                       # this CPU's build
    python -m experiments.native_probe --build= --build="-march=native -DRNN_JAX_KBLOCK=64"
    python -m experiments.native_probe --build="-march=x86-64-v3" --shapes=medium

Every ``--build`` is one set of compiler flags (empty: the flags the library
uses, ``-march=native`` on x86; flags without ``-march=``/``-mcpu=`` are added to
the library's); each is built (cached like the library's own) and
registered under a name of its own, checked to give the same outputs as the first
build (exits 1 if not: the probe compares speeds of the same function), then
timed. ``--rounds`` alternate the builds, every other round in reverse order; a
round times ``--reps`` calls of the forward kernel (with the saves a training step
makes) and of the backward kernel, after one untimed call. Printed per shape and
build: median ms per call and GFLOP/s (the recurrent matmul's ``2 T B H 4H``
FLOPs per pass; the kernels do nothing else of that order). Run it with
``taskset -c 0`` to keep it on one core, as a device of the benchmark runs.

Shapes (``H, B, T``): ``d2l`` 32, 512, 32; ``medium`` 256, 32, 64; ``long`` 128,
16, 1024; ``large`` 1024, 64, 128; ``--shape_spec=name:H:B:T`` adds more.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from absl import app, flags
from absl import logging as absl_logging

from experiments.common import flag_validator, output_path_ok, parse_flags_or_exit_2

SHAPES = {
    "d2l": (32, 512, 32),
    "medium": (256, 32, 64),
    "long": (128, 16, 1024),
    "large": (1024, 64, 128),
}


def parse_shape_spec(text: str) -> tuple[str, tuple[int, int, int]]:
    """``"name:H:B:T"`` -> ``(name, (H, B, T))`` (the benchmark's ``--config_spec``
    form, read by :func:`experiments.benchmark.parse_config_spec`); ValueError
    naming what is wrong."""
    from experiments.benchmark import parse_config_spec

    try:
        config = parse_config_spec(text)
    except ValueError as e:
        raise ValueError(f"--shape_spec: {e}") from None
    if config.hidden_size % 16:
        raise ValueError(
            f"--shape_spec {text!r}: expected H a multiple of 16 (the kernels' unit groups)"
        )
    return config.name, (config.hidden_size, config.batch_size, config.num_steps)


def selected_shapes(names: list[str], specs: list[str]) -> dict[str, tuple[int, int, int]]:
    """The shapes ``--shapes`` names, from :data:`SHAPES` and ``--shape_spec``."""
    known = dict(SHAPES)
    known.update(parse_shape_spec(s) for s in specs)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--shapes: unknown {unknown}; expected some of {sorted(known)}")
    if not names:
        raise ValueError("--shapes: name at least one shape")
    return {n: known[n] for n in names}


def kernel_flops(hidden: int, batch: int, steps: int) -> int:
    """FLOPs of one pass's recurrent matmul: ``2 T B H 4H``."""
    return 2 * steps * batch * hidden * 4 * hidden


def register_builds(builds: list[str]) -> list[dict[str, Any]]:
    """Builds and registers each flag set; ``[{"flags", "forward", "backward",
    "lanes"}]``. Raises RuntimeError with the compiler's words if one fails."""
    from rnn_jax import native

    out = []
    for i, text in enumerate(builds):
        arch = text.split() if text.strip() else None
        if arch and not any(f.startswith(("-march=", "-mcpu=")) for f in arch):
            # defines or -O flags alone: keep the library's target, or the build would
            # be for the compiler's baseline CPU and slower for that reason alone
            arch = [*native._arch_flags(), *arch]
        path, why = native.build(arch)
        if path is None:
            raise RuntimeError(f"--build {text!r}: {why}")
        lib, names = native.register(path, f"_probe{i}")
        out.append({"flags": text or "(the library's)", **names, "lanes": lib.RnnJaxLstmLanes()})
    return out


def probe(
    shapes: dict[str, tuple[int, int, int]],
    builds: list[dict[str, Any]],
    rounds: int,
    reps: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Times every build's kernels on every shape; a row per shape and build."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rnn_jax import native

    rng = np.random.default_rng(seed)
    rows = []
    for name, (hidden, batch, steps) in shapes.items():
        f32 = jnp.float32
        w = jnp.asarray(rng.normal(size=(hidden, 4 * hidden)) / np.sqrt(hidden), f32)
        xp = jnp.asarray(rng.normal(size=(steps, batch, 4 * hidden)), f32)
        h0 = jnp.asarray(rng.normal(size=(batch, hidden)), f32)
        c0 = jnp.asarray(rng.normal(size=(batch, hidden)), f32)
        valid = jnp.ones((steps, batch), bool)
        dys = jnp.asarray(rng.normal(size=(steps, batch, hidden)), f32)
        calls = []
        for b in builds:
            fwd = jax.jit(
                lambda w, h0, c0, xp, valid, t=b["forward"]: native._forward_call(
                    w, h0, c0, xp, valid, True, t
                )
            )
            bwd = jax.jit(
                lambda w, valid, a, cp, tc, dys, dh, dc, t=b["backward"]: native._backward_call(
                    w, valid, a, cp, tc, dys, dh, dc, t
                )
            )
            out = jax.block_until_ready(fwd(w, h0, c0, xp, valid))
            grads = jax.block_until_ready(bwd(w, valid, *out[3:6], dys, h0, c0))
            calls.append((fwd, bwd, out, grads))
        first = calls[0]
        for b, (_, _, out, grads) in zip(builds, calls, strict=True):
            same = all(
                float(jnp.max(jnp.abs(x - y))) <= 1e-5 * (1.0 + float(jnp.max(jnp.abs(y))))
                for x, y in zip((*out, *grads), (*first[2], *first[3]), strict=True)
            )
            if not same:
                raise RuntimeError(
                    f"build {b['flags']!r} gives other results than {builds[0]['flags']!r} "
                    f"at {name}: the probe compares the speed of the same function"
                )
        times: list[dict[str, list[float]]] = [{"forward": [], "backward": []} for _ in builds]
        order = list(range(len(builds)))
        for r in range(rounds):
            for i in order if r % 2 == 0 else order[::-1]:
                fwd, bwd, out, _ = calls[i]
                t = time.perf_counter()
                for _ in range(reps):
                    res = fwd(w, h0, c0, xp, valid)
                jax.block_until_ready(res)
                times[i]["forward"].append((time.perf_counter() - t) / reps)
                t = time.perf_counter()
                for _ in range(reps):
                    res = bwd(w, valid, *out[3:6], dys, h0, c0)
                jax.block_until_ready(res)
                times[i]["backward"].append((time.perf_counter() - t) / reps)
        flops = kernel_flops(hidden, batch, steps)
        for b, t in zip(builds, times, strict=True):
            row = {"shape": name, "H": hidden, "B": batch, "T": steps, "build": b["flags"]}
            row["lanes"] = b["lanes"]
            for p in ("forward", "backward"):
                med = statistics.median(t[p])
                row[f"{p}_ms"] = med * 1e3
                row[f"{p}_gflops"] = flops / med / 1e9
                row[f"{p}_rounds_ms"] = [x * 1e3 for x in t[p]]
            rows.append(row)
    return rows


def main(argv: list[str]) -> None:
    del argv
    FLAGS = flags.FLAGS
    absl_logging.set_verbosity(absl_logging.WARNING)  # not JAX's backend-probing INFO lines
    from rnn_jax import allocator

    allocator.tune_malloc()  # as the benchmark's workers do: no page faults per call
    shapes = selected_shapes(FLAGS.shapes, FLAGS.shape_spec)
    import jax

    from rnn_jax import native

    if (why := native.unavailable()) is not None:
        print(f"error: the native kernels cannot run here: {why}", file=sys.stderr)
        sys.exit(2)
    try:
        builds = register_builds(FLAGS.build or [""])
        rows = probe(shapes, builds, FLAGS.rounds, FLAGS.reps)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"jax {jax.__version__}; {FLAGS.rounds} rounds of {FLAGS.reps} calls; ms, GFLOP/s")
    print("shape | build | lanes | forward | backward")
    for row in rows:
        print(
            f"{row['shape']} | {row['build']} | {row['lanes']} | "
            f"{row['forward_ms']:.3f} ({row['forward_gflops']:.0f}) | "
            f"{row['backward_ms']:.3f} ({row['backward_gflops']:.0f})",
            flush=True,
        )
    if FLAGS.output:
        from experiments.benchmark import machine_info, versions

        report = {"machine": machine_info(), "versions": versions(), "results": rows}
        report["rounds"], report["reps"] = FLAGS.rounds, FLAGS.reps
        Path(FLAGS.output).write_text(json.dumps(report, indent=1) + "\n")


def define_flags() -> None:
    flags.DEFINE_list("shapes", "d2l,medium,long", "Shapes to time (see the module docstring).")
    flags.DEFINE_multi_string("shape_spec", [], 'Extra shape "name:H:B:T" (repeatable).')
    flags.DEFINE_multi_string(
        "build",
        [],
        "Compiler flags of one build (repeatable; empty: the library's own, "
        "-march=native); the first is the reference the others must equal.",
    )
    flags.DEFINE_integer(
        "rounds", 7, "Alternating rounds; each build's median is reported.", lower_bound=1
    )
    flags.DEFINE_integer("reps", 20, "Calls of each kernel per round.", lower_bound=1)
    flags.DEFINE_string("output", "", "JSON file of the results; empty: none.")
    flags.register_multi_flags_validator(
        ["shapes", "shape_spec"],
        flag_validator(lambda d: selected_shapes(d["shapes"], d["shape_spec"])),
    )
    flags.register_validator("output", output_path_ok)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags_or_exit_2)
