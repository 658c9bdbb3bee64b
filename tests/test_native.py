"""The native CPU LSTM loops (``implementation="native"``, rnn_jax/csrc/lstm_loops.cc).

Three independent checks: the two kernels against the LSTM's equations written out
below in float64 NumPy (masks included); whole networks against the reference scan
(values, final carries, gradients of params, inputs and initial carries, with
lengths 0..T, token ids, deep and bidirectional); and second derivatives against the
fused XLA loops. Then the fallbacks (unsupported cells and types, no compiler) and
data parallelism on 2 devices.
"""

import ctypes
import functools
import json
import os
import platform
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import cells, native, networks

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-5, atol=1e-5)

pytestmark = pytest.mark.skipif(
    native.unavailable() is not None, reason=f"native kernels: {native.unavailable()}"
)


def random(seed, shape, scale=1.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def forward_by_hand(w, h0, c0, xp, valid, reverse=False, b=0.0):
    """The forward loop in float64: ys, h_T, c_T and the saves (``reverse``: the
    steps from the last to the first; ``b``: the bias, added to every step's xp)."""
    num_steps, batch, gates = xp.shape
    H = gates // 4
    h, c = h0.astype(np.float64), c0.astype(np.float64)
    ys = np.zeros((num_steps, batch, H))
    acts = np.zeros((num_steps, batch, gates))
    c_prev = np.zeros((num_steps, batch, H))
    tanh_c = np.zeros((num_steps, batch, H))
    h_prev = np.zeros((num_steps, batch, H))
    for t in reversed(range(num_steps)) if reverse else range(num_steps):
        h_prev[t] = h
        a = xp[t] + np.float64(b) + h @ w.astype(np.float64)
        i, f, o = sigmoid(a[:, :H]), sigmoid(a[:, H : 2 * H]), sigmoid(a[:, 2 * H : 3 * H])
        g = np.tanh(a[:, 3 * H :])
        c_new = f * c + i * g
        h_new = o * np.tanh(c_new)
        v = valid[t][:, None]
        c_prev[t] = c
        ys[t] = np.where(v, h_new, 0.0)
        acts[t] = np.where(v, np.concatenate([i, f, o, g], axis=1), 0.0)
        tanh_c[t] = np.where(v, np.tanh(c_new), 0.0)
        h, c = np.where(v, h_new, h), np.where(v, c_new, c)
    h_prev_t = h_prev.transpose(2, 0, 1).reshape(H, num_steps * batch)
    return ys, h, c, acts, c_prev, tanh_c, h_prev_t


def backward_by_hand(w, valid, acts, c_prev, tanh_c, dys, dh, dc, reverse=False):
    """The backward loop in float64: dA, dh_0, dc_0 and the bias gradient, dA summed
    over steps and rows (``reverse``: that of the forward loop run with ``reverse``,
    so its steps from the first to the last)."""
    num_steps, _, gates = acts.shape
    H = gates // 4
    dh, dc = dh.astype(np.float64), dc.astype(np.float64)
    da = np.zeros(acts.shape)
    for t in range(num_steps) if reverse else reversed(range(num_steps)):
        i, f, o, g = (acts[t][:, k * H : (k + 1) * H] for k in range(4))
        tc = tanh_c[t]
        d_h = dh + dys[t]
        d_c = dc + d_h * o * (1 - tc**2)
        da_t = np.concatenate(
            [d_c * g * i * (1 - i), d_c * c_prev[t] * f * (1 - f), d_h * tc * o * (1 - o)]
            + [d_c * i * (1 - g**2)],
            axis=1,
        )
        v = valid[t][:, None]
        da[t] = np.where(v, da_t, 0.0)
        dh = np.where(v, da_t @ w.T.astype(np.float64), dh)
        dc = np.where(v, d_c * f, dc)
    return da, dh, dc, da.sum(axis=(0, 1))


def check_kernels(H, B, T, forward=None, backward=None, reverse=False):
    """Both kernels against the equations written out, with random lengths;
    ``forward``/``backward``: other registered builds' target names (eager calls:
    each target compiles its own program); ``reverse``: the loops read the steps
    from the last to the first."""
    w = random(0, (H, 4 * H), 0.5)
    h0, c0 = random(1, (B, H)), random(2, (B, H))
    xp, b = random(3, (T, B, 4 * H), 2.0), random(8, (4 * H,))
    lengths = np.random.default_rng(4).integers(0, T + 1, B)
    valid = np.arange(T)[:, None] < lengths[None, :]
    run_forward = functools.partial(native._forward_call, target=forward, reverse=reverse, b=b)
    run_backward = functools.partial(native._backward_call, target=backward, reverse=reverse)
    if forward is None:
        run_forward = jax.jit(run_forward, static_argnums=5)
        run_backward = jax.jit(run_backward)
    got = run_forward(w, h0, c0, xp, valid, True)
    want = forward_by_hand(w, h0, c0, xp, valid, reverse, b)
    names = ("ys", "h_T", "c_T", "acts", "c_prev", "tanh_c", "h_prev_t")
    for name, g, e in zip(names, got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), e, **TOL, err_msg=name)
    dys, dh, dc = random(5, (T, B, H)), random(6, (B, H)), random(7, (B, H))
    saves = [np.asarray(a) for a in got[3:6]]
    got = run_backward(w, valid, *saves, dys, dh, dc)
    want = backward_by_hand(w, valid, *saves, dys, dh, dc, reverse)
    for name, g, e in zip(("dA", "dh_0", "dc_0", "db"), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), e, **TOL, err_msg=name)


@pytest.mark.parametrize(
    "H, B, T",
    [(16, 1, 1), (16, 7, 5), (32, 13, 4), (48, 6, 3), (64, 5, 3), (128, 8, 2), (32, 35, 9)],
)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_kernels_match_the_equations_written_out(H, B, T, reverse):
    # 7 and 13 rows leave partial row tiles; H = 16, 32, 48, 64 and 128 run the
    # backward matmul's 1-, 2- and 4-vector panels; 35 rows: h_prev_t's 16 x 16
    # register transposes twice and 3 rows one by one, in blocks of 7 steps (9 steps:
    # a full block and a partial one); reverse: the backward direction of a
    # bidirectional layer, read in place
    check_kernels(H, B, T, reverse=reverse)


def check_small_preactivations(H, B, T, forward=None):
    """The forward kernel where every pre-activation is tiny (weights, inputs and
    carries of 1e-4, as with a small initialisation): each output's largest error
    relative to its largest value stays at float32's level, against the equations
    in float64 (tanh computed as (1 - e^{-2x}) / (1 + e^{-2x}) lost 2e-4 here)."""
    scale = 1e-4
    w = random(0, (H, 4 * H), scale)
    h0, c0 = random(1, (B, H), scale), random(2, (B, H), scale)
    xp = random(3, (T, B, 4 * H), scale)
    valid = np.ones((T, B), bool)
    got = native._forward_call(w, h0, c0, xp, valid, True, forward)
    want = forward_by_hand(w, h0, c0, xp, valid)
    names = ("ys", "h_T", "c_T", "acts", "c_prev", "tanh_c", "h_prev_t")
    for name, g, e in zip(names, got, want, strict=True):
        error = np.max(np.abs(np.asarray(g, np.float64) - e)) / np.max(np.abs(e))
        assert error < 2e-6, (name, error)


def test_the_bias_gradient_keeps_its_precision_over_long_sequences():
    """db sums T*B rows of dA: against dA's float64 sum, its largest error relative
    to its largest value stays at float32's level for T=2048 (a plain running float32
    sum of the steps was 6e-7 off, XLA's reduce 1.6e-7 at T=1024)."""
    H, B, T = 16, 8, 2048
    w = random(0, (H, 4 * H), 0.25)
    acts = sigmoid(random(1, (T, B, 4 * H)))
    c_prev, tanh_c = random(2, (T, B, H)), np.tanh(random(3, (T, B, H)))
    dys = random(4, (T, B, H))
    dh, dc = random(5, (B, H)), random(6, (B, H))
    valid = np.ones((T, B), bool)
    da, _, _, db = native._backward_call(w, valid, acts, c_prev, tanh_c, dys, dh, dc)
    exact = np.asarray(da, np.float64).sum(axis=(0, 1))
    error = np.max(np.abs(np.asarray(db, np.float64) - exact)) / np.max(np.abs(exact))
    assert error < 1e-7, error


def test_small_preactivations_keep_their_precision():
    check_small_preactivations(32, 7, 6)


def test_nan_and_inf_spread_as_in_the_scan():
    """A NaN input at a valid step, or an infinite recurrent weight, makes the same
    outputs, final carries and gradients NaN as the reference scan: a diverged run
    must show (the kernels once clamped NaN to a finite sigmoid)."""
    cell = cells.lstm(16)
    params = networks.network(cell, implementation="scan").init(jax.random.key(0), 4)
    xs = jnp.ones((2, 3, 4)).at[0, 1, 0].set(jnp.nan)
    layer = params["layer_0"]
    bad_w = {"layer_0": {**layer, "W_h": layer["W_h"].at[3, 1, 5].set(jnp.inf)}}
    for p, x in ((params, xs), (bad_w, jnp.ones((2, 3, 4)))):
        results = {}
        for impl in ("scan", "native"):
            net = networks.network(cell, implementation=impl)

            def loss(p, x, net=net):
                ys, final = net.apply_batch(p, x)
                return jnp.sum(ys) + sum(jnp.sum(c) for c in jax.tree.leaves(final))

            value, grads = jax.value_and_grad(loss)(p, x)
            ys, final = net.apply_batch(p, x)
            results[impl] = [ys, *jax.tree.leaves(final), *jax.tree.leaves(grads)]
        assert jnp.isnan(results["scan"][0]).any()
        for got, want in zip(results["native"], results["scan"], strict=True):
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))


def _cpu_flags() -> frozenset[str]:
    return native.cpu_flags() or frozenset()


@pytest.mark.parametrize(
    "march, lanes, needs",
    [("x86-64-v3", 8, {"avx2", "fma"}), ("x86-64", 4, set())],
    ids=["avx2", "sse2"],
)
def test_builds_for_smaller_vector_units_match_the_equations(march, lanes, needs):
    """The kernels as compiled for CPUs without AVX-512 (AVX2: 8 floats per vector, 6
    rows per tile, two passes of 2 gates; baseline x86-64: 4 floats, the same tiles;
    the NEON branch shares the 4-float code with one pass of 4 gates), built here and
    run on this CPU."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86 builds")
    if not needs <= _cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(needs - _cpu_flags())}")
    path, why = native.build([f"-march={march}"])
    assert why is None, why
    lib, names = native.register(path, f"_{march.replace('-', '_')}")
    assert lib.RnnJaxLstmLanes() == lanes
    # batches of 6-row tiles and every remainder (1, 1, 0, 2, 5, 3, 4 rows)
    for H, B, T in [
        (16, 7, 5),
        (32, 13, 4),
        (48, 6, 3),
        (128, 8, 2),
        (64, 17, 3),
        (16, 9, 4),
        (32, 10, 2),
        (16, 19, 30),  # h_prev_t: 8 x 8 register transposes (AVX2), 3 rows, 13-step blocks
    ]:
        check_kernels(H, B, T, names["forward"], names["backward"])
    check_small_preactivations(32, 7, 6, names["forward"])


def test_the_arch_variable_replaces_the_native_build(monkeypatch):
    """``RNN_JAX_NATIVE_ARCH=-march=x86-64-v3`` builds the AVX2 kernels (the library
    the AVX2 test above builds, 8 floats per vector) instead of this CPU's own."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86 builds")
    if not {"avx2", "fma"} <= _cpu_flags():
        pytest.skip("this CPU lacks AVX2")
    monkeypatch.setenv("RNN_JAX_NATIVE_ARCH", " -march=x86-64-v3 ")
    assert native._arch_flags() == ["-march=x86-64-v3"]
    path, why = native.build()
    assert why is None, why
    assert path == native.build(["-march=x86-64-v3"])[0]
    assert ctypes.CDLL(str(path)).RnnJaxLstmLanes() == 8
    monkeypatch.setenv("RNN_JAX_NATIVE_ARCH", "")
    assert native._arch_flags() == ["-march=native"]


def test_forward_without_saves_gives_the_same_outputs():
    H, B, T = 32, 5, 6
    w, xp = random(0, (H, 4 * H), 0.5), random(1, (T, B, 4 * H))
    carry = cells.LSTMCarry(jnp.asarray(random(2, (B, H))), jnp.asarray(random(3, (B, H))))
    ys, final, saves = native.forward(w, carry, xp, None, save=True)
    ys2, final2, none = jax.jit(native.forward, static_argnums=4)(w, carry, xp, None, False)
    assert none is None and len(saves) == 4
    np.testing.assert_array_equal(np.asarray(ys), np.asarray(ys2))
    for a, b in zip(final, final2, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


I = 5  # noqa: E741


def loss_fn(net, weights):
    def loss(params, xs, carry, lengths):
        ys, final = net.apply_batch(params, xs, lengths, carry)
        return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(v)) for v in jax.tree.leaves(final))

    return loss


def setup(H, B, T, num_layers=1, bidirectional=False, tokens=False, **kw):
    cell = cells.lstm(H)
    ref = networks.network(cell, num_layers, bidirectional, implementation="scan")
    fast = networks.network(cell, num_layers, bidirectional, implementation="native", **kw)
    params = ref.init(jax.random.key(0), I)
    params = jax.tree.map(lambda v: 2.0 * v + 0.1 * random(1, v.shape), params)
    leaves, tree = jax.tree.flatten(ref.initial_carry())
    carry = tree.unflatten(
        [jnp.asarray(random(10 + i, (B, *v.shape))) for i, v in enumerate(leaves)]
    )
    if tokens:
        xs = jnp.asarray(np.random.default_rng(2).integers(0, I, (B, T)), jnp.int32)
    else:
        xs = jnp.asarray(random(2, (B, T, I)))
    weights = jnp.asarray(random(3, (B, T, H * (2 if bidirectional else 1))))
    return ref, fast, params, carry, xs, weights


def assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **(tol or TOL))


@pytest.mark.parametrize(
    "H, B, T, num_layers, bidirectional, tokens, directions",
    [
        (16, 9, 7, 1, False, False, "auto"),
        (32, 13, 5, 1, False, True, "auto"),
        (16, 6, 4, 2, True, False, "separate"),
        (16, 6, 4, 1, True, False, "vmap"),  # the kernels mapped over the directions
        (64, 4, 3, 2, False, True, "auto"),
    ],
)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_networks_match_the_scan(
    H, B, T, num_layers, bidirectional, tokens, directions, with_lengths
):
    kw = {"directions": directions} if bidirectional else {}
    ref, fast, params, carry, xs, weights = setup(H, B, T, num_layers, bidirectional, tokens, **kw)
    lengths = None
    if with_lengths:  # 0..T, a zero among them
        lengths = jnp.asarray(np.arange(B) % (T + 1), jnp.int32)
    argnums = (0, 2) if tokens else (0, 1, 2)
    # jitted, both: an eager grad of the scan compiles every op on its own (BUILD.md)
    want = jax.jit(jax.value_and_grad(loss_fn(ref, weights), argnums))(params, xs, carry, lengths)
    got = jax.jit(jax.value_and_grad(loss_fn(fast, weights), argnums))(params, xs, carry, lengths)
    assert_trees_close(got, want)
    ys_ref, final_ref = jax.jit(ref.apply_batch)(params, xs, lengths, carry)
    ys, final = jax.jit(fast.apply_batch)(params, xs, lengths, carry)
    assert_trees_close((ys, final), (ys_ref, final_ref))


def test_bidirectional_layers_read_the_backward_direction_in_place():
    """Two kernel calls per pass per bidirectional layer, the backward direction's
    reading the steps from the last to the first: no reversed copy of the inputs,
    the outputs or their gradients in the program (values: the test above)."""
    _, fast, params, carry, xs, weights = setup(16, 4, 5, 2, True, directions="separate")
    hlo = jax.jit(jax.grad(loss_fn(fast, weights))).lower(params, xs, carry, None).as_text()
    assert hlo.count("rnn_jax_lstm_forward") == hlo.count("rnn_jax_lstm_backward") == 4
    assert "stablehlo.reverse" not in hlo


@pytest.mark.parametrize("tokens", [False, True], ids=["inputs", "token_ids"])
def test_the_kernels_add_the_bias_and_sum_its_gradient(tokens):
    """The gradient program of a native layer has no pass of its own over the
    pre-activations <[T, B, 4H]> for the bias: no add of a broadcast bias, no sum to
    <[4H]> (the kernels do both; values: the tests above, with random biases)."""
    _, fast, params, carry, xs, weights = setup(16, 9, 7, tokens=tokens)
    hlo = jax.jit(jax.grad(loss_fn(fast, weights))).lower(params, xs, carry, None).as_text()
    assert "rnn_jax_lstm_backward" in hlo
    gates = re.compile(r"tensor<(7x9x64|7x9x4x16)xf32>")
    for line in hlo.splitlines():
        assert not ("stablehlo.add" in line and gates.search(line)), line
        assert not ("stablehlo.reduce" in line and gates.search(line)), line


def test_a_bias_of_another_type_is_added_outside_the_kernels():
    """The kernels take a float32 bias; a bfloat16 one is added to the projection in
    XLA as before (promoted to float32), values and gradients as the scan's."""
    ref, fast, params, carry, xs, weights = setup(16, 5, 4, 2)
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v.astype(jnp.bfloat16) if path[-1].key == "b" else v, params
    )
    want = jax.jit(jax.value_and_grad(loss_fn(ref, weights)))(params, xs, carry, None)
    got = jax.jit(jax.value_and_grad(loss_fn(fast, weights)))(params, xs, carry, None)
    assert got[1]["layer_0"]["b"].dtype == jnp.bfloat16
    assert_trees_close(got, want, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(got[0], want[0], **TOL)
    hlo = jax.jit(fast.apply_batch).lower(params, xs, None, carry).as_text()
    assert "rnn_jax_lstm_forward" in hlo


@pytest.mark.parametrize("kw", [{"chunk": 2}, {"remat": True}], ids=["chunk", "remat"])
def test_chunked_passes_match_the_scan(kw):
    """The kernels called once per chunk: an explicit ``chunk`` (the backward pass on
    saved gates, T=5 pads the last chunk) and remat (each chunk recomputed). By
    default the kernels run one call per pass, at every T."""
    ref, fast, params, carry, xs, weights = setup(16, 5, 5, **kw)
    lengths = jnp.asarray([5, 0, 3, 1, 4], jnp.int32)
    want = jax.jit(jax.value_and_grad(loss_fn(ref, weights), (0, 1, 2)))(params, xs, carry, lengths)
    got = jax.jit(jax.value_and_grad(loss_fn(fast, weights), (0, 1, 2)))(params, xs, carry, lengths)
    assert_trees_close(got, want)
    hlo = jax.jit(fast.apply_batch).lower(params, xs, lengths, carry).as_text()
    assert "rnn_jax_lstm_forward" in hlo


def test_long_sequences_run_one_backward_call():
    """No XLA-loop chunks around the kernels by default (fused.default_chunk would
    cut T=512 into chunks of 16): one backward kernel call, outside any loop."""
    ref, fast, params, carry, xs, weights = setup(16, 2, 512)
    grad = jax.jit(jax.grad(loss_fn(fast, weights)))
    hlo = grad.lower(params, xs, carry, None).as_text()
    assert hlo.count("rnn_jax_lstm_backward") == 1
    assert "stablehlo.while" not in hlo


@pytest.mark.parametrize("T, B", [(0, 3), (4, 0)])
def test_empty_sequences_and_batches_run_the_xla_loops(T, B):
    # the kernels need a step and an example; fused.layer called directly
    from rnn_jax import fused

    cell = cells.lstm(16)
    params = cell.init(jax.random.key(0), I)
    carry = cells.LSTMCarry(jnp.ones((B, 16)), jnp.ones((B, 16)))
    xs = jnp.ones((T, B, I))
    got = fused.layer(cell, params, carry, xs, kernel="native")
    want = fused.layer(cell, params, carry, xs, kernel="xla")
    assert_trees_close(got, want)


def test_vmap_over_a_batch_of_batches():
    ref, fast, params, carry, xs, weights = setup(16, 3, 4)
    stacked = jnp.stack([xs, 0.5 * xs])
    got = jax.jit(jax.vmap(lambda x: fast.apply_batch(params, x)[0]))(stacked)
    for k in range(2):
        np.testing.assert_allclose(
            np.asarray(got[k]), ref.apply_batch(params, stacked[k])[0], **TOL
        )


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_second_derivatives_match_the_fused_xla_loops(bidirectional):
    # grad of a function of the gradient: the kernels' custom JVPs (the XLA loops;
    # bidirectional: those of the loops read in reverse too), and autodiff of the scan
    cell = cells.lstm(16)
    nets = {
        i: networks.network(cell, bidirectional=bidirectional, implementation=i)
        for i in ("scan", "fused", "native")
    }
    _, _, params, carry, xs, weights = setup(16, 4, 5, bidirectional=bidirectional)

    def outer(net):
        inner = jax.grad(loss_fn(net, weights))
        return lambda p: sum(jnp.sum(g**2) for g in jax.tree.leaves(inner(p, xs, carry, None)))

    def close(x, y):
        # float32 sums whose largest terms reach hundreds (bidirectional: 446 in
        # W_h's leaf, elements off by 4e-4 between any two of the three, as with
        # the reversed copies before the loops read in reverse): 2e-6 of the scale
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
            scale = float(jnp.max(jnp.abs(b)))
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 + 2e-6 * scale)

    want = jax.jit(jax.grad(outer(nets["fused"])))(params)
    close(jax.jit(jax.grad(outer(nets["native"])))(params), want)
    close(want, jax.jit(jax.grad(outer(nets["scan"])))(params))


def test_other_types_run_the_xla_loops():
    # bfloat16 matmuls and float64 are not the kernels' float32: same results as fused
    cell = cells.lstm(16)
    _, _, params, carry, xs, weights = setup(16, 3, 4)
    for kw in ({"matmul_dtype": "bfloat16"},):
        a = networks.network(cell, implementation="native", **kw).apply_batch(params, xs)[0]
        b = networks.network(cell, implementation="fused", **kw).apply_batch(params, xs)[0]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    hlo = (
        jax.jit(networks.network(cell, implementation="native").apply_batch)
        .lower(params, xs)
        .as_text()
    )
    assert "rnn_jax_lstm_forward" in hlo


def test_auto_picks_native_for_the_lstm_on_cpus_with_avx512(monkeypatch):
    choose = networks.choose_implementation
    fast = "native" if native.runs_under_auto() else "fused"
    assert choose(cells.lstm(256), 64) == fast
    assert choose(cells.lstm(32), 1024, num_layers=2, bidirectional=True) == fast
    assert choose(cells.gru(256), 64) == "fused"  # no kernel for the GRU
    assert choose(cells.lstm(20), 64) == "fused"  # H not a multiple of 16
    assert choose(cells.lstm(256), 64, remat=True) == "fused"
    assert choose(cells.lstm(256), 64, backend="gpu") != "native"
    # builds with 16- or 8-float vectors (AVX-512, AVX2) run the kernels, which were
    # measured faster there; 4-float ones (NEON, SSE; not measured) keep the XLA loops
    monkeypatch.setattr(native, "_cpu_may_have_avx2", lambda: True)
    for lanes in (16, 8, 4):
        monkeypatch.setattr(native, "vector_lanes", lambda lanes=lanes: lanes)
        assert choose(cells.lstm(256), 64) == ("native" if lanes in (16, 8) else "fused")
    # a CPU without AVX2 is told apart before any build (the build is never asked)
    monkeypatch.setattr(native, "_cpu_may_have_avx2", lambda: False)
    monkeypatch.setattr(native, "vector_lanes", lambda: pytest.fail("built the kernels"))
    assert choose(cells.lstm(256), 64) == "fused"


def test_the_cpu_flags_decide_whether_auto_may_build(monkeypatch, tmp_path):
    """``_cpu_may_have_avx2`` reads /proc/cpuinfo's flags (``native.cpu_flags``, once
    per process); other machines: x86-64 only, and True (ask the build) where there
    is no cpuinfo."""
    import pathlib
    import platform

    flags = {
        "avx": "flags\t\t: fpu sse2 avx\n",  # (Sandy Bridge: no AVX2, no FMA)
        "avx2": "flags\t\t: fpu sse2 avx avx2 fma\n",
        "avx512": "flags\t: sse2 avx avx2 fma avx512f avx512bw\n",
    }
    real_read = pathlib.Path.read_text
    try:
        for name, line in flags.items():
            fake = tmp_path / name
            fake.write_text("processor\t: 0\n" + line)

            def read_text(self, *a, fake=fake, **k):
                return real_read(fake if str(self) == "/proc/cpuinfo" else self, *a, **k)

            monkeypatch.setattr(pathlib.Path, "read_text", read_text)
            native.cpu_flags.cache_clear()  # read once per process: read the fake
            monkeypatch.setattr(platform, "machine", lambda: "x86_64")
            assert native._cpu_may_have_avx2() == (name != "avx")
            monkeypatch.setattr(platform, "machine", lambda: "aarch64")
            assert native._cpu_may_have_avx2() is False
    finally:  # the next reader gets this CPU's flags again
        native.cpu_flags.cache_clear()


def test_unsupported_cells_are_refused_up_front():
    with pytest.raises(
        ValueError, match="implementation: 'native': no native kernel for the cell 'gru'"
    ):
        networks.network(cells.gru(32), implementation="native")
    with pytest.raises(ValueError, match="hidden_size must be a multiple of 16, got 20"):
        networks.network(cells.lstm(20), implementation="native")


def test_no_compiler_means_no_kernels_and_auto_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("RNN_JAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    native._library.cache_clear()
    try:
        reason = native.unavailable()
        assert reason is not None and "could not build" in reason, reason
        assert networks.choose_implementation(cells.lstm(32), 8) == "fused"
        net = networks.network(cells.lstm(32), implementation="native")
        params = net.init(jax.random.key(0), 3)
        with pytest.raises(ValueError, match="kernel: 'native': could not build"):
            net.apply_batch(params, jnp.ones((2, 3, 3)))
        monkeypatch.setenv("RNN_JAX_NATIVE", "0")
        native._library.cache_clear()
        assert native.unavailable() == "turned off by RNN_JAX_NATIVE=0"
    finally:
        monkeypatch.undo()
        native._library.cache_clear()
    assert native.unavailable() is None  # built again from the real cache


def test_a_failed_build_reports_the_compiler_error(monkeypatch, tmp_path):
    bad = tmp_path / "bad.cc"
    bad.write_text("this is not C++\n")
    monkeypatch.setenv("RNN_JAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "SOURCE", bad)
    native._library.cache_clear()
    try:
        reason = native.unavailable()
        assert reason is not None and "failed" in reason and "bad.cc" in reason, reason
        assert not list((tmp_path / "cache").rglob("*.so"))  # no partial library left
    finally:
        monkeypatch.undo()
        native._library.cache_clear()


DATA_PARALLEL = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from rnn_jax import cells, networks, parallel
    assert jax.device_count() == 2
    net = networks.network(cells.lstm(16), implementation="native")
    params = net.init(jax.random.key(0), 3)
    xs = jax.random.normal(jax.random.key(1), (8, 5, 3))
    lengths = jnp.array([5, 0, 3, 5, 1, 2, 4, 5])
    loss = lambda p, x: jnp.sum(jnp.sin(net.apply_batch(p, x, lengths)[0]))
    want = jax.jit(jax.value_and_grad(loss))(params, xs)
    mesh = parallel.data_mesh()
    sharded = jax.device_put(xs, parallel.batch_sharded(mesh))
    step = jax.jit(jax.value_and_grad(loss))
    with jax.set_mesh(mesh):  # as rnn_jax.train traces its step (parallel.in_mesh)
        hlo = step.lower(params, sharded).compile().as_text()
        got = step(params, sharded)
    # each device's kernel call gets its own 4 rows: the batch is not gathered
    calls = [line for line in hlo.splitlines() if "rnn_jax_lstm_forward" in line]
    assert calls and all("f32[5,4,64]" in line for line in calls), calls
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    print("ok")
    """
)


def test_data_parallel_runs_the_kernels_per_device():
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    done = subprocess.run(
        [sys.executable, "-c", DATA_PARALLEL],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


# --- experiments.native_probe: the kernels alone, one build against another ----------


def test_native_probe_times_each_build_and_checks_they_agree(tmp_path):
    from experiments import native_probe

    builds = native_probe.register_builds(["", ""])  # the same code under two names
    assert [b["forward"] for b in builds] == [
        "rnn_jax_lstm_forward_probe0",
        "rnn_jax_lstm_forward_probe1",
    ]
    assert builds[0]["flags"] == "(the library's)"
    shapes = native_probe.selected_shapes(["tiny"], ["tiny:16:7:5"])
    rows = native_probe.probe(shapes, builds, rounds=3, reps=2)
    assert [(r["shape"], r["H"], r["B"], r["T"]) for r in rows] == [("tiny", 16, 7, 5)] * 2
    for row in rows:
        assert len(row["forward_rounds_ms"]) == len(row["backward_rounds_ms"]) == 3
        assert row["forward_ms"] > 0 and row["backward_gflops"] > 0
        flops = native_probe.kernel_flops(16, 7, 5)
        assert row["forward_gflops"] == pytest.approx(flops / row["forward_ms"] / 1e6)
    assert native_probe.kernel_flops(16, 7, 5) == 2 * 5 * 7 * 16 * 64


def test_native_probe_builds_defines_alone_for_the_librarys_target(monkeypatch):
    """``--build=-DX`` keeps the library's -march (it built for the compiler's
    baseline CPU, slower for that alone); a build naming its target keeps it."""
    from experiments import native_probe

    asked = []

    def build(arch):
        asked.append(arch)
        return None, "stop here"

    monkeypatch.setattr(native, "build", build)
    monkeypatch.setattr(native, "_arch_flags", lambda: ["-march=native"])
    for text in ("-DRNN_JAX_KBLOCK=64", "-march=x86-64-v3 -O2", "-mcpu=native", ""):
        with pytest.raises(RuntimeError, match="stop here"):
            native_probe.register_builds([text])
    assert asked == [
        ["-march=native", "-DRNN_JAX_KBLOCK=64"],
        ["-march=x86-64-v3", "-O2"],
        ["-mcpu=native"],
        None,
    ]


@pytest.mark.parametrize(
    "names, specs, word",
    [
        (["huge"], [], "unknown"),
        ([], [], "at least one"),
        (["x"], ["x:15:2:2"], "multiple of 16"),
        (["x"], ["x:16:0:2"], "--shape_spec: hidden, batch and steps must be >= 1"),
        (["x"], ["x:16:2"], "--shape_spec: expected name:hidden:batch:steps"),
        (["x"], ["x:a:2:2"], "--shape_spec: expected integer hidden:batch:steps"),
    ],
)
def test_native_probe_bad_shapes(names, specs, word):
    from experiments import native_probe

    with pytest.raises(ValueError, match=word):
        native_probe.selected_shapes(names, specs)
    assert native_probe.selected_shapes(["medium"], []) == {"medium": (256, 32, 64)}


@pytest.mark.slow
def test_native_probe_command_line(tmp_path):
    out = tmp_path / "probe.json"
    cmd = [sys.executable, "-m", "experiments.native_probe", "--shapes=tiny", "--rounds=1"]
    proc = subprocess.run(
        [*cmd, "--shape_spec=tiny:16:3:2", "--reps=1", f"--output={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tiny | (the library's) |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] >= 1 and report["versions"]["jax"]
    assert [r["shape"] for r in report["results"]] == ["tiny"]
    bad = subprocess.run(
        [*cmd, "--shape_spec=tiny:15:3:2"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "multiple of 16" in bad.stderr
    assert bad.stderr.count("\n") <= 2, bad.stderr
