"""GPU probe of the Pallas recurrence (rnn_jax.persistent), one JSON line per result.

    python -m experiments.pallas_probe check    # equivalence, exits 1 on a mismatch
    python -m experiments.pallas_probe time     # forward+backward times
    python -m experiments.pallas_probe tune     # warps and rows per program
    python -m experiments.pallas_probe units    # warps and hidden units per program
    python -m experiments.pallas_probe stack    # deep networks: one kernel for all layers

``check``: a network's values and gradients (params, inputs, initial carries) with
``implementation="pallas"`` against the XLA loops (``"fused"``) at float32 "highest"
precision, H=128, B=37 (a padded row block), T=50, lengths 0..T, for each exchange
of ``EXCHANGES`` (``$RNN_JAX_PALLAS_EXCHANGE``: how the programs of a row block
pass each step's state) over the LSTM, the reset-after GRU and the RNN with one
direction, and the LSTM and GRU with two (one grid for both directions).

``time``: one training-like forward+backward (a weighted sum of the outputs) at the
long shape (H=128, B=32, T=1024, 28 float inputs), median of 15 after a warm-up:
the XLA loops against the kernels with each exchange, for one layer, one
bidirectional layer and two layers (XLA: the wavefront); and one layer at the
book's shape (H=32, B=1024, T=32). With ``$OUT``, the exchange that passed the
check and was faster on the long LSTM and GRU goes to ``$OUT/exchange.env`` as
``RNN_JAX_PALLAS_EXCHANGE=...`` (read by ``experiments/gpu_check.sh``).

``units``: the long shape's one layer (forward+backward) with 16, 32 and 64 hidden
units per program (fewer programs meeting every step, more weights each) and 4 or 8
warps. ``$UNITS`` sets the units per program of every split call (``check`` and
``time`` too); ``$CHECK_CELLS`` (e.g. ``lstm,gru``) limits ``check`` to those cells,
one direction.

``stack``: 2- and 3-layer networks at the long shape and 2 layers at the book's,
layer by layer (``"pallas"``) against all layers in one kernel per pass
(``RNN_JAX_PALLAS_STACK=1``, :mod:`rnn_jax.persistent_stack`), each checked first
against the XLA loops at "highest" precision (exits 1 on a mismatch).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax import cells, networks

EXCHANGES = os.environ.get("EXCHANGES", "flag,counter").split(",")
OUT = os.environ.get("OUT")
CELLS = {
    "lstm": lambda h: cells.lstm(h),
    "gru": lambda h: cells.gru(h, reset_after=True),
    "rnn": lambda h: cells.rnn(h),
}


def log(**row):
    print(json.dumps(row), flush=True)
    if OUT:
        with open(os.path.join(OUT, "pallas_probe.jsonl"), "a") as fh:
            fh.write(json.dumps(row) + "\n")


def setup(cell_name, hidden, layers, bi, batch, steps, inputs=28, seed=0):
    cell = CELLS[cell_name](hidden)
    net = networks.network(cell, layers, bi, implementation="fused")
    params = net.init(jax.random.key(seed), inputs)
    key = jax.random.key(seed + 1)
    xs = jax.random.normal(key, (batch, steps, inputs))
    carry = jax.tree.map(
        lambda c: 0.3 * jax.random.normal(jax.random.fold_in(key, 2), (batch, *c.shape)),
        net.initial_carry(),
    )
    weights = jax.random.normal(
        jax.random.fold_in(key, 3), (batch, steps, (2 if bi else 1) * hidden)
    )
    return cell, params, xs, carry, weights


def grad_fn(cell, layers, bi, weights, implementation, **kw):
    net = networks.network(cell, layers, bi, implementation=implementation, **kw)

    def loss(params, xs, carry, lengths):
        ys, final = net.apply_batch(params, xs, lengths, carry)
        return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(v)) for v in jax.tree.leaves(final))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def check() -> bool:
    ok = True
    cases = [(c, False) for c in CELLS] + [("lstm", True), ("gru", True)]
    if os.environ.get("CHECK_CELLS"):
        cases = [(c, False) for c in os.environ["CHECK_CELLS"].split(",")]
    with jax.default_matmul_precision("highest"):
        for exchange in EXCHANGES:
            os.environ["RNN_JAX_PALLAS_EXCHANGE"] = exchange
            for name, bi in cases:
                cell, params, xs, carry, weights = setup(name, 128, 1, bi, 37, 50)
                lengths = jnp.asarray([50, 0, 3, 1] + [49] * 33)
                args = (params, xs, carry, lengths)
                t = time.time()
                want = grad_fn(cell, 1, bi, weights, "fused")(*args)
                got = jax.block_until_ready(grad_fn(cell, 1, bi, weights, "pallas")(*args))
                errs = [
                    float(jnp.max(jnp.abs(a - b)) / (1e-6 + jnp.max(jnp.abs(a))))
                    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True)
                ]
                good = all(np.isfinite(e) and e < 1e-5 for e in errs)  # NaN fails
                err = max(errs, key=lambda e: np.inf if np.isnan(e) else e)
                ok &= good
                log(
                    check=name,
                    bi=bi,
                    exchange=exchange,
                    max_rel_err=err,
                    ok=good,
                    s=time.time() - t,
                )
    return ok


def median_ms(fn, args, reps=15):
    t = time.time()
    jax.block_until_ready(fn(*args))
    compile_s = time.time() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times)), compile_s


def time_variant(fn, args, **row):
    """Logs ``row`` with the median ms of ``fn(*args)`` (or the error) and returns
    the ms (``None`` on an error)."""
    try:
        ms, compile_s = median_ms(fn, args)
    except Exception as e:  # noqa: BLE001
        log(**row, error=f"{type(e).__name__}: {str(e)[:400]}")
        return None
    log(**row, ms=round(ms, 3), compile_s=round(compile_s, 1))
    return ms


def timing():
    best = {}
    long, d2l = (128, 32, 1024), (32, 1024, 32)
    if os.environ.get("QUICK") == "1":  # a dry run (the interpreter on a CPU)
        long, d2l = (32, 8, 16), (16, 32, 8)
    shapes = [
        ("long", *long, 1, False),
        ("long", *long, 1, True),
        ("long", *long, 2, False),
        ("d2l", *d2l, 1, False),
    ]
    for config, hidden, batch, steps, layers, bi in shapes:
        for name in ("lstm", "gru"):
            cell, params, xs, carry, weights = setup(name, hidden, layers, bi, batch, steps)
            args = (params, xs, carry, None)
            xla = "wavefront" if layers > 1 else "fused"
            variants = [(xla, None)] + [("pallas", e) for e in EXCHANGES]
            for implementation, exchange in variants:
                if exchange:
                    os.environ["RNN_JAX_PALLAS_EXCHANGE"] = exchange
                fn = grad_fn(cell, layers, bi, weights, implementation, unroll=8)
                ms = time_variant(
                    fn,
                    args,
                    config=config,
                    cell=name,
                    layers=layers,
                    bi=bi,
                    impl=implementation,
                    exchange=exchange,
                )
                if ms is not None and exchange and config == "long" and layers == 1 and not bi:
                    best.setdefault(exchange, []).append(ms)
    return best


def _tune_long_layer(layouts, warps_options):
    """The long shape's one layer (forward+backward), LSTM and GRU, for each
    ``(fields, layout)`` of ``layouts`` (``persistent.layout`` replaced by ``layout``,
    ``fields`` logged) and each of ``warps_options`` (``persistent.NUM_WARPS``)."""
    from rnn_jax import persistent

    base_layout = persistent.layout
    hidden, batch, steps = (32, 8, 16) if os.environ.get("QUICK") == "1" else (128, 32, 1024)
    for fields, layout in layouts:
        persistent.layout = layout
        for warps in warps_options:
            persistent.NUM_WARPS = warps
            for name in ("lstm", "gru"):
                cell, params, xs, carry, weights = setup(name, hidden, 1, False, batch, steps)
                fn = grad_fn(cell, 1, False, weights, "pallas")
                time_variant(fn, (params, xs, carry, None), tune=name, **fields, warps=warps)
    persistent.layout, persistent.NUM_WARPS = base_layout, 4


def with_rows(block: int):
    """``persistent.layout`` with at least ``block`` rows per program wherever it
    splits the units over programs."""
    from rnn_jax import persistent

    base = persistent.layout

    def layout(batch, hidden, interpret=False, cores=None):
        rows, units = base(batch, hidden, interpret, cores)
        return (max(rows, block), units) if units < hidden else (rows, units)

    return layout


def with_units(units: int):
    """``persistent.layout`` with ``units`` hidden units per program wherever it splits
    the units over programs (the rows it picks for 16 stay)."""
    from rnn_jax import persistent

    base = persistent.layout

    def layout(batch, hidden, interpret=False, cores=None, copies=1):
        rows, own = base(batch, hidden, interpret, cores, copies)
        return (rows, min(units, hidden)) if own < hidden else (rows, own)

    return layout


def tune():
    """The long shape's one layer over the kernels' warps per program and rows per
    program (``persistent.NUM_WARPS``, ``persistent.layout``)."""
    _tune_long_layer([({"block": b}, with_rows(b)) for b in (16, 32)], (1, 2, 4, 8))


def units_tune():
    """The long shape's one layer over hidden units per program and warps."""
    _tune_long_layer([({"units": u}, with_units(u)) for u in (16, 32, 64)], (4, 8))


def stack() -> bool:
    """Deep networks: the stacked kernels' equivalence, then their time."""
    ok = True
    long, d2l = (128, 32, 1024), (32, 1024, 32)
    if os.environ.get("QUICK") == "1":
        long, d2l = (32, 8, 16), (16, 32, 8)
    for name, layers in (("lstm", 2), ("gru", 3)):
        cell, params, xs, carry, weights = setup(name, 64, layers, False, 37, 50)
        lengths = jnp.asarray([50, 0, 3, 1] + [49] * 33)
        args = (params, xs, carry, lengths)
        with jax.default_matmul_precision("highest"):
            want = grad_fn(cell, layers, False, weights, "fused")(*args)
            os.environ["RNN_JAX_PALLAS_STACK"] = "1"
            got = jax.block_until_ready(grad_fn(cell, layers, False, weights, "pallas")(*args))
            os.environ["RNN_JAX_PALLAS_STACK"] = "0"
        errs = [
            float(jnp.max(jnp.abs(a - b)) / (1e-6 + jnp.max(jnp.abs(a))))
            for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True)
        ]
        good = all(np.isfinite(e) and e < 1e-5 for e in errs)
        ok &= good
        log(check_stack=name, layers=layers, max_rel_err=max(errs), ok=good)
    if not ok:
        return False
    for config, (hidden, batch, steps), layers in (
        ("long", long, 2),
        ("long", long, 3),
        ("d2l", d2l, 2),
    ):
        for name in ("lstm", "gru"):
            cell, params, xs, carry, weights = setup(name, hidden, layers, False, batch, steps)
            for stacked in ("0", "1"):
                os.environ["RNN_JAX_PALLAS_STACK"] = stacked
                fn = grad_fn(cell, layers, False, weights, "pallas")
                time_variant(
                    fn,
                    (params, xs, carry, None),
                    config=config,
                    cell=name,
                    layers=layers,
                    stacked=stacked == "1",
                )
    os.environ["RNN_JAX_PALLAS_STACK"] = "0"
    return ok


def main(argv):
    print(jax.devices(), jax.__version__, flush=True)
    what = argv[1] if len(argv) > 1 else "check"
    if os.environ.get("UNITS"):
        from rnn_jax import persistent

        persistent.layout = with_units(int(os.environ["UNITS"]))
    if what == "units":
        return units_tune()
    if what == "stack":
        sys.exit(0 if stack() else 1)
    if what == "check":
        sys.exit(0 if check() else 1)
    if what == "tune":
        return tune()
    best = timing()
    if OUT and best:
        fastest = min(best, key=lambda e: sum(best[e]))
        with open(os.path.join(OUT, "exchange.env"), "w") as fh:
            fh.write(f"RNN_JAX_PALLAS_EXCHANGE={fastest}\n")
        log(fastest_exchange=fastest, long_one_layer_ms=best)


if __name__ == "__main__":
    main(sys.argv)
