"""The stacked Pallas kernels (``RNN_JAX_PALLAS_STACK=1``: all layers of a deep
network in one kernel per pass) against the fused layers.

On this CPU the kernels run in Pallas' interpreter, one program per row block, the
layers one after another in grid order; the unit-split programs and the layers
waiting for each other run on GPUs only (the last test; on a CPU its CUDA lowering
is checked). Values, final carries and gradients (params, inputs, initial carries)
equal the fused network's within 1e-5, with lengths 0..T and a batch that is not a
multiple of the row block.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import cells, networks, persistent, persistent_stack

I, H, T, B = 3, 16, 6, 18  # noqa: E741  (B=18: two row blocks, the second padded)
TOL = dict(rtol=1e-5, atol=1e-5)
LENGTHS = np.array([T, 0, 3, 1, 5] + [T, 2] * 6 + [4], np.int32)


def random(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def value_and_grads(cell, num_layers, implementation, batch, lengths, seed=0, **kw):
    net = networks.network(cell, num_layers, False, implementation=implementation, **kw)
    params = net.init(jax.random.key(seed), I)
    params = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.key(1), v.shape), params)
    leaves, tree = jax.tree.flatten(net.initial_carry())
    carry = tree.unflatten([random(10 + i, (batch, *v.shape)) for i, v in enumerate(leaves)])
    xs, weights = random(8, (batch, T, I)), random(9, (batch, T, cell.hidden_size))

    def loss(params, xs, carry):
        ys, final = net.apply_batch(params, xs, lengths, carry)
        return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(v)) for v in jax.tree.leaves(final))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(params, xs, carry)


def assert_trees_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)


@pytest.mark.parametrize(
    "cell_name,num_layers,lengths",
    [("lstm", 3, LENGTHS), ("gru_after", 2, LENGTHS), ("rnn", 2, None)],
)
def test_stack_equals_fused_values_and_gradients(cell_name, num_layers, lengths, monkeypatch):
    cell = {
        "lstm": cells.lstm(H),
        "gru_after": cells.gru(H, reset_after=True),
        "rnn": cells.rnn(H),
    }[cell_name]
    monkeypatch.setenv("RNN_JAX_PALLAS_STACK", "1")
    runs = []
    monkeypatch.setattr(
        persistent_stack, "_stack", _recording(persistent_stack._stack, runs), raising=True
    )
    lengths = None if lengths is None else jnp.asarray(lengths)
    got = value_and_grads(cell, num_layers, "pallas", B, lengths)
    assert runs, "the stacked kernels did not run"
    want = value_and_grads(cell, num_layers, "fused", B, lengths)
    assert_trees_close(got, want)


def _recording(fn, runs):
    def wrapped(*args):
        runs.append(True)
        return fn(*args)

    return wrapped


def test_stack_is_opt_in_and_refuses_a_bad_switch(monkeypatch):
    """Off by default, and off for what it does not run (bidirectional, dropout between
    layers, remat): those run one kernel per layer."""
    monkeypatch.delenv("RNN_JAX_PALLAS_STACK", raising=False)
    assert not persistent_stack.enabled()
    monkeypatch.setenv("RNN_JAX_PALLAS_STACK", "yes")
    with pytest.raises(ValueError, match="RNN_JAX_PALLAS_STACK.*'yes'"):
        persistent_stack.enabled()
    monkeypatch.setenv("RNN_JAX_PALLAS_STACK", "1")
    runs = []
    monkeypatch.setattr(persistent_stack, "_stack", _recording(persistent_stack._stack, runs))
    cell = cells.gru(H, reset_after=True)
    for kw in (dict(remat=True), dict(dropout=0.5)):
        net = networks.network(cell, 2, False, implementation="pallas", **kw)
        params = net.init(jax.random.key(0), I)
        net.apply_batch(params, random(1, (2, T, I)), dropout_key=jax.random.key(1))
    assert not runs


def test_stack_lowering_for_a_gpu(monkeypatch):
    """Lowered for CUDA as an H100 would run it (132 multiprocessors; no GPU needed):
    one kernel per pass for 2 layers of H=64, B=37 (2 x 3 row blocks x 4 unit splits
    = 24 programs), unit-split programs exchanging through the flag buffers."""
    monkeypatch.setattr(persistent, "_interpret", lambda: False)
    monkeypatch.setattr(persistent, "device_cores", lambda: 132)
    monkeypatch.setenv("RNN_JAX_PALLAS_STACK", "1")
    assert persistent_stack.fits(2, 37, 64) and not persistent_stack.fits(2, 600, 64)
    # the book's shape (H=32, B=1024): 64 rows per program so that 2 layers fit
    assert persistent_stack._layout(2, 1024, 32) == (64, 16, 1024)
    assert persistent_stack.fits(2, 1024, 32) and not persistent_stack.fits(3, 1024, 32)
    for cell in (cells.lstm(64), cells.gru(64, reset_after=True)):
        net = networks.network(cell, 2, False, implementation="pallas")
        params = net.init(jax.random.key(0), I)

        def loss(params, xs, lengths, net=net):
            return jnp.sum(net.apply_batch(params, xs, lengths)[0])

        args = (params, jnp.zeros((37, T, I)), jnp.full((37,), T))
        text = jax.jit(jax.grad(loss)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 2  # the forward and the backward kernel


@pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="the layers wait for each other on GPUs only"
)
def test_stack_equals_fused_on_a_gpu(monkeypatch):
    """As GPUs run it: 2 and 3 layers of H=64 split over 4 programs per row block, all
    layers at once, a padded batch and lengths 0..T, at "highest" precision."""
    monkeypatch.setenv("RNN_JAX_PALLAS_STACK", "1")
    lengths = jnp.asarray([T, 0, 3, 1] + [T - 1] * 33)
    with jax.default_matmul_precision("highest"):
        for cell, layers in ((cells.lstm(64), 3), (cells.gru(64, reset_after=True), 2)):
            got = value_and_grads(cell, layers, "pallas", 37, lengths)
            want = value_and_grads(cell, layers, "fused", 37, lengths)
            assert_trees_close(got, want)


def _gru_before():
    return cells.gru(H, reset_after=False)


@pytest.mark.parametrize(
    "make,layers,kw,match",
    [
        (_gru_before, 2, {}, "reset-before"),
        (lambda: cells.gru(H, reset_after=True, pin_reset=1.0), 2, {}, "pinned"),
        (lambda: cells.lstm(H), 2, dict(kernel="cuda"), "kernel: expected 'xla' or 'pallas'"),
        (lambda: cells.lstm(H), 2, dict(matmul_dtype="bfloat16"), "matmul_dtype.*float32 only"),
    ],
)
def test_wavefront_pallas_refuses_what_the_stack_cannot_run(make, layers, kw, match):
    """``wavefront.network_layers(kernel="pallas")`` checks before any tracing: a cell
    the kernels do not run, a bad kernel name, bfloat16 matmuls."""
    from rnn_jax import wavefront

    cell = make()
    kw = dict(dict(kernel="pallas"), **kw)
    net = networks.network(cell, layers, False, implementation="fused")
    params = net.init(jax.random.key(0), I)
    carries = [jnp.zeros((2, H))] * layers if cell.name != "lstm" else None
    if carries is None:
        carries = [jax.tree.map(lambda v: jnp.zeros((2, *v.shape)), net.initial_carry()[0])]
        carries = carries * layers
    with pytest.raises(ValueError, match=match):
        wavefront.network_layers(
            cell, [params[f"layer_{i}"] for i in range(layers)], carries, random(0, (T, 2, I)), **kw
        )


def test_stack_problems_and_fallbacks(monkeypatch):
    """``problem`` names why the stack cannot run; the networks then run one kernel per
    layer: no steps (T = 0), float64 carries; one layer runs the one-layer kernels."""
    assert persistent_stack.problem(cells.lstm(H), 2, T, B) is None
    assert "at least 2" in persistent_stack.problem(cells.lstm(H), 1, T, B)
    assert "T = 0" in persistent_stack.problem(cells.lstm(H), 2, 0, B)
    assert "float32" in persistent_stack.problem(cells.lstm(H), 2, T, B, [jnp.float16])
    monkeypatch.setenv("RNN_JAX_PALLAS_STACK", "1")
    runs = []
    monkeypatch.setattr(persistent_stack, "_stack", _recording(persistent_stack._stack, runs))
    net = networks.network(cells.lstm(H), 2, False, implementation="pallas")
    params = net.init(jax.random.key(0), I)
    ys, final = net.apply_batch(params, jnp.zeros((3, 0, I)))
    assert ys.shape == (3, 0, H) and not runs
    np.testing.assert_array_equal(np.asarray(final[1].h), 0.0)
    with jax.enable_x64(True):  # float64 inputs: the XLA loops, in float64
        xs = np.random.default_rng(0).normal(size=(3, T, I))
        ys, _ = net.apply_batch(jax.tree.map(lambda v: v.astype(jnp.float64), params), xs)
        assert ys.dtype == jnp.float64 and not runs


def test_stack_saves_gates_only_for_a_gradient(monkeypatch):
    """A forward pass alone writes no saved gates: its kernel has the outputs and the
    final carries only (the interpreter does not split units: no exchange buffer)."""
    monkeypatch.setenv("RNN_JAX_PALLAS_STACK", "1")
    net = networks.network(cells.lstm(H), 2, False, implementation="pallas")
    params = net.init(jax.random.key(0), I)
    xs = random(1, (B, T, I))

    def outputs(fn, *args):
        jaxpr = jax.make_jaxpr(fn)(*args)
        found = []

        def walk(j):
            for eqn in j.eqns:
                if eqn.primitive.name == "pallas_call":
                    found.append(len(eqn.outvars))
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    walk(sub)

        walk(jaxpr.jaxpr)
        return found

    assert outputs(lambda p: net.apply_batch(p, xs)[0], params) == [3]  # ys, h, c
    grad = jax.grad(lambda p: jnp.sum(net.apply_batch(p, xs)[0]))
    forward, _ = outputs(grad, params)
    assert forward == 3 + persistent._num_saved(cells.lstm(H))
