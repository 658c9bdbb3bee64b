"""One-off GPU probe of the Pallas recurrence (rnn_jax.persistent): equivalence with
the XLA loops at float32 'highest' precision, and the layer's forward+backward time
at the long shape for a few kernel variants. Prints one line per measurement."""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax import cells, fused, persistent

QUICK = os.environ.get("QUICK") == "1"
rows = []


def log(**kw):
    rows.append(kw)
    print(json.dumps(kw), flush=True)


def make(cell, T, B, I, seed=0):
    k = jax.random.PRNGKey(seed)
    p = cell.init(k, I)
    xs = jax.random.normal(jax.random.fold_in(k, 1), (T, B, I))
    c0 = jax.tree_util.tree_map(
        lambda a: 0.3 * jax.random.normal(jax.random.fold_in(k, 2), (B, *a.shape)),
        cell.initial_carry(),
    )
    return p, c0, xs


def loss_fn(cell, lengths, **kw):
    def loss(p, c0, xs):
        ys, fin = fused.layer(cell, p, c0, xs, lengths, **kw)
        w = (jnp.arange(ys.size).reshape(ys.shape) % 7) * 0.1
        return jnp.sum(ys * w) + sum(jnp.sum(jnp.sin(f)) for f in jax.tree_util.tree_leaves(fin))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


CELLS = {
    "lstm": lambda h: cells.lstm(h),
    "gru_ra": lambda h: cells.gru(h, reset_after=True),
    "rnn": lambda h: cells.rnn(h),
}

print(jax.devices(), jax.__version__, flush=True)
t_all = time.time()
# 1. equivalence at 'highest' precision (IEEE float32 dots in Triton and XLA)
with jax.default_matmul_precision("highest"):
    for name in ["lstm", "gru_ra"] if QUICK else list(CELLS):
        cell = CELLS[name](128)
        T, B, I = 50, 37, 28
        p, c0, xs = make(cell, T, B, I)
        lengths = jnp.array([T, 0, 3, 1] + [T - 1] * (B - 4))
        t = time.time()
        try:
            a = loss_fn(cell, lengths)(p, c0, xs)
            b = loss_fn(cell, lengths, kernel="pallas")(p, c0, xs)
            errs = jax.tree_util.tree_map(
                lambda u, v: float(jnp.max(jnp.abs(u - v)) / (1e-6 + jnp.max(jnp.abs(u)))), a, b
            )
            log(check=name, max_rel_err=max(jax.tree_util.tree_leaves(errs)), s=time.time() - t)
        except Exception as e:  # noqa: BLE001
            log(check=name, error=f"{type(e).__name__}: {str(e)[:1500]}")


# 2. timing at the long shape: forward+backward of one layer
def bench(name, label, **kw):
    cell = CELLS[name](128)
    p, c0, xs = make(cell, 1024, 32, 28)
    f = loss_fn(cell, None, **kw)
    t = time.time()
    try:
        jax.block_until_ready(f(p, c0, xs))
    except Exception as e:  # noqa: BLE001
        log(bench=name, variant=label, error=f"{type(e).__name__}: {str(e)[:600]}")
        return
    compile_s = time.time() - t
    times = []
    for _ in range(15):
        t = time.perf_counter()
        jax.block_until_ready(f(p, c0, xs))
        times.append(time.perf_counter() - t)
    log(bench=name, variant=label, ms=1e3 * float(np.median(times)), compile_s=compile_s)


for name in ["lstm", "gru_ra"]:
    bench(name, "xla_u8", unroll=8)
    for units, warps, dtype in [
        (16, 1, "float32"),
        (16, 2, "float32"),
        (16, 4, "float32"),
        (32, 1, "float32"),
        (16, 1, "bfloat16"),
    ]:
        if name == "gru_ra" and (warps == 2 or dtype != "float32"):
            continue
        persistent.MIN_UNITS, persistent.NUM_WARPS = units, warps
        bench(name, f"pallas_u{units}_w{warps}_{dtype}", kernel="pallas", matmul_dtype=dtype)
    persistent.MIN_UNITS, persistent.NUM_WARPS = 16, 4
print("total_s", time.time() - t_all)
out = os.environ.get("OUT")
if out:
    with open(os.path.join(out, "pallas_probe.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
