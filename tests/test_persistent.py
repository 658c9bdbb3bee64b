"""The Pallas recurrence (``implementation="pallas"``) against the reference scan.

On this CPU the kernels run in Pallas' interpreter, one program per row block (the
unit-split programs and their barrier run on GPUs only: ``experiments/levers.py
--check`` and ``experiments/pallas_probe.py`` compare them there). Values, final
carries and gradients (params, inputs, initial carries) equal the ``"scan"``
network's within 1e-5 for every supported cell, one layer and two bidirectional
layers, with lengths 0..T and a batch that is not a multiple of the row block.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import cells, config, fused, networks, persistent

I, H, T, B = 3, 16, 6, 18  # noqa: E741  (B=18: two row blocks, the second padded)
TOL = dict(rtol=1e-5, atol=1e-5)
LENGTHS = np.array([T, 0, 3, 1, 5] + [T, 2] * 6 + [4], np.int32)

CELLS = {
    "rnn": lambda: cells.rnn(H),
    "rnn_relu": lambda: cells.rnn(H, "relu"),
    "gru_after": lambda: cells.gru(H, reset_after=True),
    "lstm": lambda: cells.lstm(H),
}
# every cell one layer forward-only; two directions (one vmapped kernel call per
# layer) for the LSTM (deeper layers only change the projection outside the kernels,
# which tests/test_fused.py covers)
GRID = [(c, 1, False) for c in CELLS] + [("lstm", 1, True)]


def random(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def setup(cell_name, num_layers, bidirectional, **kw):
    cell = CELLS[cell_name]()
    ref = networks.network(cell, num_layers, bidirectional, implementation="scan")
    fast = networks.network(cell, num_layers, bidirectional, implementation="pallas", **kw)
    params = ref.init(jax.random.key(0), I)
    params = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.key(1), v.shape), params)
    leaves, tree = jax.tree.flatten(ref.initial_carry())
    carry = tree.unflatten([random(10 + i, (B, *v.shape)) for i, v in enumerate(leaves)])
    return ref, fast, params, carry


def loss_fn(net, weights):
    def loss(params, xs, carry, lengths):
        ys, final = net.apply_batch(params, xs, lengths, carry)
        return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(v)) for v in jax.tree.leaves(final))

    return loss


def assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **(tol or TOL))


@pytest.mark.parametrize(
    "cell_name,num_layers,bidirectional",
    GRID,
    ids=[f"{c}-L{n}-{'bi' if b else 'uni'}" for c, n, b in GRID],
)
def test_pallas_equals_scan_values_and_gradients(cell_name, num_layers, bidirectional):
    ref, fast, params, carry = setup(cell_name, num_layers, bidirectional)
    xs = random(2, (B, T, I))
    weights = random(3, (B, T, (2 if bidirectional else 1) * H))
    for lengths in (jnp.asarray(LENGTHS), None) if not bidirectional else (jnp.asarray(LENGTHS),):
        args = (params, xs, carry, lengths)
        v_ref, g_ref = jax.jit(jax.value_and_grad(loss_fn(ref, weights), argnums=(0, 1, 2)))(*args)
        grad = jax.value_and_grad(loss_fn(fast, weights), argnums=(0, 1, 2))
        v_fast, g_fast = jax.jit(grad)(*args)
        np.testing.assert_allclose(float(v_fast), float(v_ref), **TOL)
        assert_trees_close(g_fast, g_ref)
    ys, final = jax.jit(fast.apply_batch)(params, xs, jnp.asarray(LENGTHS), carry)
    assert_trees_close((ys, final), ref.apply_batch(params, xs, jnp.asarray(LENGTHS), carry))
    assert np.all(np.asarray(ys)[1] == 0)  # length 0: zero outputs, carry unchanged
    for got, want in zip(jax.tree.leaves(final), jax.tree.leaves(carry), strict=True):
        np.testing.assert_array_equal(np.asarray(got)[1], np.asarray(want)[1])


def test_pallas_token_ids_remat_and_single_sequence():
    ref, fast, params, carry = setup("lstm", 2, False, remat=True)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, I, size=(B, T)), jnp.int32)
    weights = random(5, (B, T, H))
    args = (params, ids, carry, jnp.asarray(LENGTHS))
    v_ref, g_ref = jax.jit(jax.value_and_grad(loss_fn(ref, weights)))(*args)
    v_fast, g_fast = jax.jit(jax.value_and_grad(loss_fn(fast, weights)))(*args)
    np.testing.assert_allclose(float(v_fast), float(v_ref), **TOL)
    assert_trees_close(g_fast, g_ref)
    one = jax.tree.map(lambda c: c[0], carry)
    assert_trees_close(fast.apply(params, ids[0], 4, one), ref.apply(params, ids[0], 4, one))


def test_pallas_bfloat16_matches_the_xla_loops():
    """The same bfloat16 operands as the fused XLA loops: equal to float32 rounding in
    the interpreter. On a GPU the kernel's dots and cuBLAS's sum in other orders, and a
    last-bit difference in a carry can round it to the neighbouring bfloat16 in the next
    step's matmul, so there the two agree to bfloat16 precision only (the test failed
    at 1e-5 on an H100)."""
    cell = cells.gru(H, reset_after=True)
    params = cell.init(jax.random.key(0), I)
    carry, xs = random(6, (B, H)), random(7, (T, B, I))
    weights = random(8, (T, B, H))

    def loss(params, carry, xs, kernel):
        ys, final = fused.layer(
            cell, params, carry, xs, jnp.asarray(LENGTHS), matmul_dtype="bfloat16", kernel=kernel
        )
        return jnp.sum(ys * weights) + jnp.sum(jnp.sin(final))

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    fast, ref = grad(params, carry, xs, "pallas"), grad(params, carry, xs, "xla")
    if jax.default_backend() == "cpu":
        assert_trees_close(fast, ref)
    else:
        for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(ref), strict=True):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b)


def test_layout():
    assert persistent.layout(32, 128) == (16, 16)  # 2 row blocks x 8 unit splits
    assert persistent.layout(1024, 32) == (32, 16)  # 32 row blocks x 2 splits
    assert persistent.layout(64, 256) == (16, 16)  # 4 x 16
    assert persistent.layout(4096, 256) == (64, 256)  # would not fit: no split
    assert persistent.layout(32, 16) == (16, 16)  # one split: no barrier
    assert persistent.layout(32, 128, interpret=True) == (16, 128)
    assert persistent.layout(64, 256, cores=14) == (64, 256)  # 16 programs > 14 SMs
    assert persistent.layout(64, 256, cores=132) == (16, 16)
    assert persistent.splits(32, 128) and persistent.splits(4096, 16)
    assert not persistent.splits(4096, 128)


def test_pallas_first_derivatives_only():
    cell = cells.rnn(H)
    params = cell.init(jax.random.key(0), I)
    xs, carry = random(13, (T, B, I)), random(14, (B, H))

    def loss(params):
        return jnp.sum(fused.layer(cell, params, carry, xs, kernel="pallas")[0] ** 2)

    jax.grad(loss)(params)  # fine
    with pytest.raises(NotImplementedError, match="first derivatives only.*'fused'"):
        jax.hessian(lambda w: loss({**params, "W_h": w}))(params["W_h"])


def test_pallas_float64_inputs_run_the_xla_loops():
    """Under x64, float64 inputs or carries with float32 params take the XLA loops
    (the kernels are float32) in both passes, and still match them."""
    cell = cells.lstm(H)
    with jax.enable_x64(True):
        params = cell.init(jax.random.key(0), I)
        xs = jnp.asarray(np.random.default_rng(15).normal(size=(T, B, I)))  # float64
        carry = cells.LSTMCarry(*(jnp.asarray(random(s, (B, H)), jnp.float64) for s in (16, 17)))

        def loss(params, kernel):
            ys, final = fused.layer(cell, params, carry, xs, kernel=kernel)
            return jnp.sum(ys) + jnp.sum(final.c)

        got = jax.value_and_grad(loss)(params, "pallas")
        assert_trees_close(got, jax.value_and_grad(loss)(params, "xla"))


@pytest.mark.parametrize(
    "cell,needle",
    [
        (cells.gru(H), "reset-before"),
        (cells.gru(H, reset_after=True, pin_reset=1.0), "pinned"),
        (cells.lstm(24), "power of two"),
        (cells.lstm(512), "power of two"),
        (cells.lstm(8), "power of two"),
    ],
)
def test_pallas_refuses_what_it_cannot_run(cell, needle):
    with pytest.raises(ValueError, match=f"implementation: 'pallas': .*{needle}"):
        networks.network(cell, implementation="pallas")
    with pytest.raises(ValueError, match=f"kernel: 'pallas': .*{needle}"):
        fused.layer(
            cell, cell.init(jax.random.key(0), I), None, jnp.zeros((T, B, I)), kernel="pallas"
        )


def test_bad_kernel_and_config():
    cell = cells.lstm(H)
    with pytest.raises(ValueError, match="kernel: expected one of"):
        fused.layer(
            cell, cell.init(jax.random.key(0), I), None, jnp.zeros((T, B, I)), kernel="cuda"
        )
    with pytest.raises(config.ConfigError, match="implementation.*reset-before"):
        config.validate(config.TrainConfig(cell="gru", implementation="pallas", workdir="/tmp/x"))


def test_pallas_under_vmap_equals_each_member():
    """An ensemble vmapped over the layer: the same as each member on its own (in the
    interpreter nobody waits at a barrier, so the mapped calls are one grid)."""
    cell = cells.lstm(H)
    members = jax.vmap(lambda k: cell.init(k, I))(jax.random.split(jax.random.key(0), 2))
    xs, weights = random(9, (T, B, I)), random(10, (T, B, H))

    def loss(params, kernel):
        carry = cells.LSTMCarry(random(11, (B, H)), random(12, (B, H)))
        ys, final = fused.layer(cell, params, carry, xs, jnp.asarray(LENGTHS), kernel=kernel)
        return jnp.sum(ys * weights) + jnp.sum(jnp.sin(final.c))

    got = jax.jit(jax.vmap(jax.value_and_grad(lambda p: loss(p, "pallas"))))(members)
    want = jax.vmap(jax.value_and_grad(lambda p: loss(p, "xla")))(members)
    assert_trees_close(got, want)


def test_mapped_calls_share_a_grid_only_when_all_programs_fit():
    """The batching rule of the kernels: one call with the mapped axis in its grid
    when no program waits for another or when all of them fit at once; one call after
    another (a scan) when they would not (they would wait for programs that never
    start), also when vmaps nest."""
    kernel = lambda x_ref, o_ref: o_ref.__setitem__(..., 2.0 * x_ref[...])  # noqa: E731
    call = persistent.pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32), interpret=True
    )
    xs = jnp.arange(4 * 2 * 16, dtype=jnp.float32).reshape(4, 2, 16)

    def program(programs, limit, nest):
        fn = persistent._batched(call, programs, limit)
        f = jax.vmap(jax.vmap(fn)) if nest else jax.vmap(fn)
        x = xs if nest else xs[:, 0]
        np.testing.assert_array_equal(np.asarray(jax.jit(f)(x)), 2 * np.asarray(x))
        return str(jax.make_jaxpr(f)(x))

    for programs, limit in ((0, 4), (8, None), (8, 32), (8, 64)):
        assert "scan[" not in program(programs, limit, nest=False)
    assert "scan[" in program(8, 31, nest=False)  # 4 x 8 > 31
    assert "scan[" not in program(8, 64, nest=True)  # 2 x 4 x 8 = 64
    assert "scan[" in program(8, 63, nest=True)  # the outer map runs one by one


def test_exchange_sentinel(monkeypatch):
    """The "flag" exchange's empty-slot pattern, and the canonical NaN written instead
    of any NaN (so no computed value can look unwritten); a bad
    $RNN_JAX_PALLAS_EXCHANGE names itself."""
    bits = lambda x: np.asarray(jax.lax.bitcast_convert_type(x, jnp.int32))  # noqa: E731
    filled = persistent._sentinel_filled((3, 2))
    assert filled.dtype == jnp.float32 and np.all(bits(filled) == persistent.SENTINEL)
    x = jnp.asarray([1.0, -2.0, jnp.inf, 0.0])
    x = jnp.concatenate([x, filled[0]])
    out = jax.jit(persistent._canonical)(x)
    assert not np.any(bits(out) == persistent.SENTINEL)
    np.testing.assert_array_equal(np.asarray(out)[:4], [1.0, -2.0, np.inf, 0.0])
    assert np.all(np.isnan(np.asarray(out)[4:]))
    monkeypatch.delenv("RNN_JAX_PALLAS_EXCHANGE", raising=False)
    assert persistent.exchange(8) == "flag" and persistent.exchange(2) == "counter"
    monkeypatch.setattr(persistent, "_interpret", lambda: True)  # on any host
    assert persistent.plan_exchange(32, 128) is None  # the interpreter: nobody meets
    monkeypatch.setattr(persistent, "_interpret", lambda: False)
    monkeypatch.setattr(persistent, "device_cores", lambda: 132)
    assert persistent.plan_exchange(32, 128) == "flag"  # 8 programs per row block
    assert persistent.plan_exchange(1024, 32) == "counter"  # 2
    assert persistent.plan_exchange(32, 16) is None  # one program holds all units
    monkeypatch.setenv("RNN_JAX_PALLAS_EXCHANGE", "flag")
    assert persistent.exchange(2) == "flag"
    monkeypatch.setenv("RNN_JAX_PALLAS_EXCHANGE", "atomic")
    with pytest.raises(ValueError, match="RNN_JAX_PALLAS_EXCHANGE.*'atomic'"):
        persistent.exchange()


@pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="split programs meet at run time on a GPU only"
)
@pytest.mark.parametrize("exchange", ["counter", "flag"])
def test_split_programs_equal_scan_on_a_gpu(exchange, monkeypatch):
    """The kernels as GPUs run them: H=64 split over 4 programs per row block that
    exchange each step's state (``exchange``), both directions of a bidirectional
    layer as one grid, a padded batch and lengths 0..T, at "highest" precision."""
    monkeypatch.setenv("RNN_JAX_PALLAS_EXCHANGE", exchange)
    hidden, batch = 64, 37
    assert persistent.layout(batch, hidden, cores=persistent.device_cores())[1] < hidden
    lengths = jnp.asarray([T, 0, 3, 1] + [T - 1] * (batch - 4))
    for cell, bi in ((cells.lstm(hidden), True), (cells.gru(hidden, reset_after=True), False)):
        ref = networks.network(cell, 1, bi, implementation="fused")
        fast = networks.network(cell, 1, bi, implementation="pallas")
        params = ref.init(jax.random.key(0), I)
        leaves, tree = jax.tree.flatten(ref.initial_carry())
        carry = tree.unflatten([random(20 + i, (batch, *v.shape)) for i, v in enumerate(leaves)])
        xs = random(21, (batch, T, I))
        weights = random(22, (batch, T, (2 if bi else 1) * hidden))
        args = (params, xs, carry, lengths)
        with jax.default_matmul_precision("highest"):
            want = jax.jit(jax.value_and_grad(loss_fn(ref, weights), argnums=(0, 1, 2)))(*args)
            got = jax.jit(jax.value_and_grad(loss_fn(fast, weights), argnums=(0, 1, 2)))(*args)
        assert_trees_close(got, want)


@pytest.mark.parametrize("batch,one_grid", [(37, True), (200, False)])
def test_bidirectional_lowering_for_a_gpu(batch, one_grid, monkeypatch):
    """Lowered for CUDA as an H100 would run it (132 multiprocessors; no GPU needed):
    a bidirectional layer's two directions are one kernel call per pass when both
    grids fit at once (H=64, B=37: 2 x 12 programs), and a loop of one call per
    direction when they would not (B=200: 2 x 52 > 64)."""
    monkeypatch.setattr(persistent, "_interpret", lambda: False)
    monkeypatch.setattr(persistent, "device_cores", lambda: 132)
    cell = cells.lstm(64)
    net = networks.network(cell, 1, True, implementation="pallas")
    params = net.init(jax.random.key(0), I)

    def loss(params, xs, lengths):
        return jnp.sum(net.apply_batch(params, xs, lengths)[0])

    args = (params, jnp.zeros((batch, T, I)), jnp.full((batch,), T))
    text = jax.jit(jax.grad(loss)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2  # the forward and the backward kernel
    assert ("stablehlo.while" in text) is not one_grid
