"""Networks against references that share none of their machinery.

The reference (``loop_network``) runs every layer and direction with a Python loop
over the valid steps, calling ``cell.step`` directly; no scan, no masking, no
reversal trick, no vmap.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rnn_jax import BiCarry, cells, models, native, networks

I, H, T = 3, 4, 6
TOL = dict(rtol=1e-5, atol=1e-5)

CELLS = {
    "rnn": lambda: cells.rnn(H),
    "rnn_relu": lambda: cells.rnn(H, "relu"),
    "gru": lambda: cells.gru(H),
    "gru_after": lambda: cells.gru(H, reset_after=True),
    "lstm": lambda: cells.lstm(H),
}
GRID = list(itertools.product(CELLS, [1, 2], [False, True]))
GRID_IDS = [f"{c}-L{n}-{'bi' if b else 'uni'}" for c, n, b in GRID]
# rnn_relu differs from rnn only in the activation inside cell.step: the tests of how
# a network batches its inputs (vmap, token ids) leave it out (CI time)
BATCH_GRID = [g for g in GRID if g[0] != "rnn_relu"]
BATCH_IDS = [i for g, i in zip(GRID, GRID_IDS, strict=True) if g[0] != "rnn_relu"]
# token ids only reach the first layer's input projection: one layer, both ways
TOKEN_GRID = [g for g in BATCH_GRID if g[1] == 1]
TOKEN_IDS = [i for g, i in zip(BATCH_GRID, BATCH_IDS, strict=True) if g[1] == 1]


def make(cell_name, num_layers, bidirectional, **kw):
    net = networks.network(CELLS[cell_name](), num_layers, bidirectional, **kw)
    params = net.init(jax.random.key(0), I)
    # non-zero biases, so bias handling is exercised too
    params = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.key(1), v.shape), params)
    return net, params


def random_xs(seed, shape=(T, I)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def random_carry(net, seed):
    leaves, tree = jax.tree.flatten(net.initial_carry())
    rng = np.random.default_rng(seed)
    return tree.unflatten([jnp.asarray(rng.normal(size=v.shape), jnp.float32) for v in leaves])


def loop_network(net, params, xs, length=None, initial_carry=None):
    """Python-loop reference: each direction reads only its valid steps."""
    cell = net.cell
    step = jax.jit(cell.step)  # one compiled step, driven by the Python loop below
    xs = np.asarray(xs)
    n = xs.shape[0] if length is None else int(length)
    carry0 = net.initial_carry() if initial_carry is None else initial_carry
    finals, layer_in = [], xs
    for layer in range(net.num_layers):
        p = params[f"layer_{layer}"]
        dirs = [("forward", range(n)), ("backward", reversed(range(n)))]
        if not net.bidirectional:
            dirs = dirs[:1]
        outs, carries = [], []
        for name, order in dirs:
            pd = p[name] if net.bidirectional else p
            c = getattr(carry0[layer], name) if net.bidirectional else carry0[layer]
            ys = np.zeros((xs.shape[0], cell.hidden_size), np.float32)
            for t in order:
                c, y = step(pd, c, jnp.asarray(layer_in[t]))
                ys[t] = y
            outs.append(ys)
            carries.append(c)
        layer_in = np.concatenate(outs, axis=-1)
        finals.append(BiCarry(*carries) if net.bidirectional else carries[0])
    return layer_in, tuple(finals)


def assert_trees_close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **(tol or TOL)), a, b)


@pytest.mark.parametrize("cell_name,num_layers,bidirectional", GRID, ids=GRID_IDS)
def test_scan_equals_python_loop(cell_name, num_layers, bidirectional):
    net, params = make(cell_name, num_layers, bidirectional)
    xs = random_xs(2)
    carry = random_carry(net, 3)
    ys, final = net.apply(params, xs, initial_carry=carry)
    want_ys, want_final = loop_network(net, params, xs, initial_carry=carry)
    assert ys.shape == (T, net.output_size)
    np.testing.assert_allclose(ys, want_ys, **TOL)
    assert_trees_close(final, want_final)


@pytest.mark.parametrize("cell_name,num_layers,bidirectional", GRID, ids=GRID_IDS)
def test_padded_equals_trimmed_and_loop(cell_name, num_layers, bidirectional):
    net, params = make(cell_name, num_layers, bidirectional)
    xs = random_xs(4)
    carry = random_carry(net, 5)
    apply = jax.jit(net.apply)  # one compilation serves every length
    for length in [0, 1, 4, T]:
        garbage = jnp.full((T, I), 1e3).at[:length].set(xs[:length])  # huge values past length
        ys, final = apply(params, garbage, length, carry)
        want_ys, want_final = loop_network(net, params, xs, length, carry)
        np.testing.assert_allclose(ys, want_ys, **TOL)
        np.testing.assert_array_equal(ys[length:], 0.0)  # exactly zero
        assert_trees_close(final, want_final)
        if length == 0:  # the initial carry, untouched
            assert_trees_close(final, carry, rtol=0, atol=0)
        else:  # the same as running the trimmed sequence without a length
            ys_trim, final_trim = net.apply(params, xs[:length], None, carry)
            np.testing.assert_allclose(ys[:length], ys_trim, **TOL)
            assert_trees_close(final, final_trim)


@pytest.mark.parametrize("cell_name", list(CELLS))
def test_bidirectional_one_scan_equals_two_separate_scans(cell_name):
    bi, params = make(cell_name, 1, True)
    uni = networks.network(bi.cell, 1, False)
    xs, length = random_xs(6), 4
    ys, final = bi.apply(params, xs, length)
    f_ys, f_final = uni.apply({"layer_0": params["layer_0"]["forward"]}, xs, length)
    rev = jnp.concatenate([xs[:length][::-1], xs[length:]])  # valid part reversed
    b_ys, b_final = uni.apply({"layer_0": params["layer_0"]["backward"]}, rev, length)
    b_ys = jnp.concatenate([b_ys[:length][::-1], b_ys[length:]])
    np.testing.assert_allclose(ys, jnp.concatenate([f_ys, b_ys], axis=-1), **TOL)
    assert_trees_close(final[0].forward, f_final[0])
    assert_trees_close(final[0].backward, b_final[0])


def test_reverse_valid():
    xs = jnp.arange(6)
    np.testing.assert_array_equal(networks.reverse_valid(xs, 4), [3, 2, 1, 0, 4, 5])
    np.testing.assert_array_equal(networks.reverse_valid(xs, 0), xs)
    np.testing.assert_array_equal(networks.reverse_valid(xs, None), xs[::-1])


@pytest.mark.parametrize("cell_name,num_layers,bidirectional", BATCH_GRID, ids=BATCH_IDS)
def test_vmap_equals_per_example_loop_and_jit_equals_eager(cell_name, num_layers, bidirectional):
    net, params = make(cell_name, num_layers, bidirectional)
    xs = random_xs(7, (3, T, I))
    lengths = jnp.array([T, 2, 0], jnp.int32)
    ys, final = jax.jit(net.apply_batch)(params, xs, lengths)
    vys, vfinal = jax.vmap(net.apply, in_axes=(None, 0, 0))(params, xs, lengths)
    np.testing.assert_allclose(ys, vys, **TOL)
    for b in range(3):
        eys, efinal = net.apply(params, xs[b], lengths[b])  # eager, one example
        np.testing.assert_allclose(ys[b], eys, **TOL)
        assert_trees_close(jax.tree.map(lambda v, b=b: v[b], final), efinal)
        assert_trees_close(jax.tree.map(lambda v, b=b: v[b], vfinal), efinal)


OPTIONS = [dict(remat=True), dict(unroll=3), dict(hoist_input=True), dict(remat=True, unroll=2)]


# every cell one layer one way; two layers both ways for the two carry structures
# (an array, the LSTM's pair): the options act on the scan's step, the same for every
# layer and direction (CI time: the other cells' deep rows added ~45 s of compiles)
OPTION_GRID = [(c, 1, False) for c in CELLS] + [("gru_after", 2, True), ("lstm", 2, True)]


@pytest.mark.parametrize(
    "cell_name,num_layers,bidirectional",
    OPTION_GRID,
    ids=[f"{c}-L{n}-{'bi' if b else 'uni'}" for c, n, b in OPTION_GRID],
)
def test_options_leave_outputs_and_gradients_unchanged(cell_name, num_layers, bidirectional):
    """The reference scan's remat (``jax.checkpoint``), unroll and input hoisting against
    its plain form (hoist_input=False). (``"auto"`` would run the fused layers on this
    batch, whose options tests/test_fused.py checks against the scan.)"""
    ref_net, params = make(
        cell_name, num_layers, bidirectional, hoist_input=False, implementation="scan"
    )
    xs = random_xs(8, (2, T, I))
    lengths = jnp.array([T, 3], jnp.int32)

    def value_and_grad(n):
        def f(p):
            ys, final = n.apply_batch(p, xs, lengths)
            return jnp.sum(ys**2) + sum(jnp.sum(v) for v in jax.tree.leaves(final))

        return jax.jit(jax.value_and_grad(f))(params)

    l_ref, g_ref = value_and_grad(ref_net)
    for option in OPTIONS:
        net = networks.network(
            ref_net.cell,
            num_layers,
            bidirectional,
            implementation="scan",
            **{"hoist_input": False, **option},
        )
        l, g = value_and_grad(net)
        np.testing.assert_allclose(l, l_ref, rtol=1e-5, err_msg=str(option))
        assert_trees_close(g, g_ref)


@pytest.mark.parametrize("cell_name", list(CELLS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_check_grads(cell_name, bidirectional):
    """Reverse-mode gradients against finite differences, in float64."""
    with jax.enable_x64(True):
        net, params = make(cell_name, 2, bidirectional)
        params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), params)
        carry = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), random_carry(net, 9))
        xs = jnp.asarray(np.random.default_rng(10).normal(size=(4, I)))

        def f(p, x, c):
            ys, final = net.apply(p, x, 3, c)
            return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(v**2) for v in jax.tree.leaves(final))

        check_grads(jax.jit(f), (params, xs, carry), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cell_name,num_layers,bidirectional", TOKEN_GRID, ids=TOKEN_IDS)
def test_token_ids_equal_one_hot_inputs(cell_name, num_layers, bidirectional):
    """Integer inputs are one-hot vectors: same outputs, carries and gradients."""
    net, params = make(cell_name, num_layers, bidirectional)
    ids = jnp.asarray(np.random.default_rng(14).integers(0, I, (3, T)), jnp.int32)
    lengths = jnp.array([T, 2, 0], jnp.int32)

    def run(p, xs):
        ys, final = net.apply_batch(p, xs, lengths)
        return jnp.sum(ys * jnp.arange(ys.shape[-1])) + sum(
            jnp.sum(v) for v in jax.tree.leaves(final)
        ), (ys, final)

    (l1, out1), g1 = jax.value_and_grad(run, has_aux=True)(params, ids)
    (l2, out2), g2 = jax.value_and_grad(run, has_aux=True)(params, jax.nn.one_hot(ids, I))
    assert_trees_close(out1, out2)
    assert_trees_close(g1, g2)
    ys, _ = net.apply(params, ids[1], 2)  # one sequence of ids
    np.testing.assert_allclose(ys, out2[0][1], **TOL)


@pytest.mark.parametrize(
    "implementation,bidirectional",
    [("scan", True), ("fused", True), ("wavefront", False)],
)
def test_lengths_are_clipped_to_the_sequence(implementation, bidirectional):
    """A length above T counts as T and a negative one as 0 (the docstring's rule),
    on every implementation: the same outputs, final carries and gradients as the
    clipped lengths."""
    net, params = make("lstm", 2, bidirectional, implementation=implementation)
    xs = random_xs(21, (3, T, I))
    weights = random_xs(22, (3, T, net.output_size))

    def run(lengths):
        def loss(p, x):
            ys, final = net.apply_batch(p, x, jnp.asarray(lengths, jnp.int32))
            return jnp.sum(ys * weights) + sum(jnp.sum(c) for c in jax.tree.leaves(final))

        return net.apply_batch(params, xs, jnp.asarray(lengths, jnp.int32)), jax.grad(
            loss, argnums=(0, 1)
        )(params, xs)

    got, want = run([T + 3, -2, 4]), run([T, 0, 4])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, **TOL)
    (ys, _), _ = got
    np.testing.assert_array_equal(ys[1], 0.0)  # length 0: every output zero
    # 64-bit lengths beyond int32 clip too (JAX without x64 would wrap 2**32 + 3 to 3),
    # for a batch and for one sequence (a NumPy scalar, a 0-d array)
    big = np.array([2**32 + 3, -(2**40), 4], np.int64)
    for a, b in zip(
        jax.tree.leaves(net.apply_batch(params, xs, big)),
        jax.tree.leaves(got[0]),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, **TOL)
    for length in (np.int64(2**32 + 3), np.array(2**32 + 3, np.int64)):
        np.testing.assert_allclose(net.apply(params, xs[0], length)[0], ys[0], **TOL)


@pytest.mark.parametrize("implementation", ["scan", "fused"])
def test_dropout_spares_the_last_layer(implementation):
    """Dropout acts between layers only (PyTorch's rule): one layer with a key gives
    the outputs without one, and the top layer of two has no dropped (exactly
    zero) outputs in the valid steps."""
    with pytest.warns(UserWarning, match=r"dropout=0.5 with num_layers=1 does nothing"):
        net, params = make("gru", 1, True, dropout=0.5, implementation=implementation)
    xs = random_xs(14, (4, T, I))
    key = jax.random.key(15)
    np.testing.assert_array_equal(
        net.apply_batch(params, xs, dropout_key=key)[0], net.apply_batch(params, xs)[0]
    )
    net, params = make("gru", 2, True, dropout=0.5, implementation=implementation)
    dropped, _ = net.apply_batch(params, xs, dropout_key=key)
    assert np.abs(np.asarray(dropped - net.apply_batch(params, xs)[0])).max() > 1e-3
    assert np.count_nonzero(np.asarray(dropped) == 0.0) == 0


def test_a_language_model_of_one_layer_with_dropout_does_not_warn():
    """The language model applies dropout after its last layer itself, so one layer
    with dropout is meaningful there: it builds its network without the (ignored)
    between-layer rate, and no warning."""
    import warnings

    from rnn_jax import models

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = models.language_model(
            models.ModelConfig(vocab_size=7, cell="gru", hidden_size=4, dropout=0.5)
        )
    assert model.network.dropout == 0.0 and model.network.num_layers == 1
    params = model.init(jax.random.key(0))
    ids = jnp.zeros((2, 3), jnp.int32)
    dropped, _ = model.apply(params, ids, dropout_key=jax.random.key(1))
    assert np.count_nonzero(np.asarray(dropped - model.apply(params, ids)[0])) > 0


def test_dropout_between_layers():
    net, params = make("gru", 3, False, dropout=0.5)
    xs = random_xs(11, (8, T, I))
    lengths = jnp.full((8,), 4, jnp.int32)
    plain, _ = net.apply_batch(params, xs, lengths)
    nodrop, _ = networks.network(net.cell, 3).apply_batch(params, xs, lengths)
    np.testing.assert_allclose(plain, nodrop, **TOL)  # no key: off (eval)
    key = jax.random.key(12)
    a, _ = net.apply_batch(params, xs, lengths, dropout_key=key)
    b, _ = net.apply_batch(params, xs, lengths, dropout_key=key)
    c, _ = net.apply_batch(params, xs, lengths, dropout_key=jax.random.key(13))
    np.testing.assert_array_equal(a, b)  # deterministic given the key
    assert np.abs(np.asarray(a - c)).max() > 1e-3
    assert np.abs(np.asarray(a - plain)).max() > 1e-3
    np.testing.assert_array_equal(a[:, 4:], 0.0)  # padding stays exactly zero
    # examples of a batch draw different masks
    same_x = jnp.broadcast_to(xs[:1], xs.shape)
    d, _ = net.apply_batch(params, same_x, lengths, dropout_key=key)
    assert np.abs(np.asarray(d[0] - d[1])).max() > 1e-3


def test_dropout_is_inverted_with_the_right_rate():
    ys = jnp.ones((200, 50))
    out = networks.apply_dropout(jax.random.key(0), 0.3, ys)
    kept = np.asarray(out != 0)
    assert abs(kept.mean() - 0.7) < 0.02
    np.testing.assert_allclose(np.asarray(out)[kept], 1 / 0.7, rtol=1e-6)


def test_no_recompilation_for_a_new_batch_of_the_same_shape():
    net, params = make("lstm", 2, True)
    traces = []

    @jax.jit
    def f(p, x, n):
        traces.append(1)
        return net.apply_batch(p, x, n)[0].sum()

    for seed in range(3):
        f(params, random_xs(seed, (2, T, I)), jnp.array([seed + 1, T], jnp.int32))
    assert len(traces) == 1


def test_final_structure_is_named():
    net, params = make("lstm", 2, True)
    _, final = net.apply(params, random_xs(0))
    assert len(final) == 2
    assert isinstance(final[1], BiCarry)
    assert isinstance(final[1].backward, cells.LSTMCarry)
    assert final[1].forward.c.shape == (H,)
    assert jax.tree.structure(final) == jax.tree.structure(net.initial_carry())


# --- bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_layers=0), r"num_layers: expected an int >= 1, got 0"),
        (dict(num_layers=1.5), r"num_layers: expected an int >= 1, got 1.5"),
        (dict(dropout=1.0), r"dropout: expected a number in \[0, 1\), got 1.0"),
        (dict(dropout=-0.1), r"dropout: expected a number in \[0, 1\), got -0.1"),
        (dict(unroll=0), r"unroll: expected an int >= 1 or None \(the backend's default\), got 0"),
        (dict(unroll=2.0), r"unroll: expected an int >= 1 or None .*, got 2.0"),
        (dict(bidirectional="yes"), r"bidirectional: expected a bool, got 'yes'"),
    ],
)
def test_bad_network_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        networks.network(cells.gru(H), **kwargs)


def test_unroll_default_per_backend(monkeypatch):
    assert networks.default_unroll("cpu") == 1
    assert networks.default_unroll("gpu") == 8
    assert networks.default_unroll("tpu") == 8  # unmeasured accelerators: as the GPU
    assert networks.network(cells.gru(H)).unroll == networks.default_unroll()
    assert networks.network(cells.gru(H), unroll=3).unroll == 3
    monkeypatch.setattr(networks.jax, "default_backend", lambda: "gpu")
    net = networks.network(cells.gru(H))
    assert (net.unroll, net.hoist_input) == (8, True)


def test_bad_cell():
    with pytest.raises(ValueError, match=r"cell: expected a cells.Cell"):
        networks.network("lstm")


def test_bad_apply_inputs_raise_at_trace_time():
    net, params = make("lstm", 2, True)
    apply, batch = jax.jit(net.apply), jax.jit(net.apply_batch)
    with pytest.raises(
        ValueError, match=rf"xs: expected input_size {I} \(from params\), got shape \(6, 5\)"
    ):
        apply(params, jnp.zeros((T, 5)))
    with pytest.raises(ValueError, match=r"xs: expected one sequence .*got float32\[2, 6, 3\]"):
        apply(params, jnp.zeros((2, T, I)))
    with pytest.raises(ValueError, match=r"xs: expected a batch .*got float32\[6, 3\]"):
        batch(params, jnp.zeros((T, I)))
    with pytest.raises(
        ValueError, match=r"length: expected an integer array of shape \(\), got float32"
    ):
        apply(params, jnp.zeros((T, I)), jnp.float32(3))
    with pytest.raises(
        ValueError, match=r"lengths: expected an integer array of shape \(2,\), got int32\[3\]"
    ):
        batch(params, jnp.zeros((2, T, I)), jnp.array([1, 2, 3]))
    with pytest.raises(
        ValueError, match=r"lengths: expected an integer array of shape \(2,\), got float32\[2\]"
    ):
        batch(params, jnp.zeros((2, T, I)), jnp.array([1.0, 2.0]))
    with pytest.raises(
        ValueError, match=r"initial_carry: expected the structure of net.initial_carry"
    ):
        apply(params, jnp.zeros((T, I)), None, (jnp.zeros(H),))
    with pytest.raises(ValueError, match=r"params: expected keys \['layer_0', 'layer_1'\]"):
        apply({"layer_0": params["layer_0"]}, jnp.zeros((T, I)))
    # one PRNG key, typed or legacy (a split pair or an int failed inside JAX's code)
    xs = jnp.zeros((2, T, I))
    for key in (jax.random.split(jax.random.key(0), 2), 3, jnp.zeros(2)):
        with pytest.raises(ValueError, match=r"dropout_key: expected one PRNG key .*got "):
            batch(params, xs, dropout_key=key)
        with pytest.raises(ValueError, match=r"dropout_key: expected one PRNG key"):
            apply(params, xs[0], dropout_key=key)
    for key in (jax.random.key(0), jax.random.PRNGKey(0), jax.random.key(0, impl="rbg")):
        assert batch(params, xs, dropout_key=key)[0].shape == (2, T, 2 * H)
    previous = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")  # legacy keys are then uint32[4]
    try:
        key = jax.random.PRNGKey(0)
        assert key.shape == (4,)
        assert batch(params, xs, dropout_key=key)[0].shape == (2, T, 2 * H)
    finally:
        jax.config.update("jax_default_prng_impl", previous)


def test_float64_params_need_no_float64_carry():
    """Under ``jax.enable_x64``, float64 params with the default initial carry run in
    float64 on every implementation (the zero carry takes the params' type; a float32
    one made every scan refuse its carry's change of type) and agree with each other."""
    with jax.enable_x64(True):
        xs = np.random.default_rng(3).normal(size=(2, T, I))
        got = {}
        # apply: the scan's own default carry; apply_batch on fused: _apply_fused's
        # (wavefront and pallas share it; the pallas stack's fallback test runs float64)
        for impl in ("scan", "fused"):
            net = networks.network(cells.lstm(16), 2, False, implementation=impl)
            params = net.init(jax.random.key(0), I)
            params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), params)
            if impl == "scan":
                ys = jnp.stack(
                    [net.apply(params, x, n)[0] for x, n in zip(xs, (T, 2), strict=True)]
                )
                final = net.apply(params, xs[0])[1]
            else:
                ys, final = net.apply_batch(params, xs, jnp.array([T, 2]))
            assert ys.dtype == jnp.float64
            assert all(v.dtype == jnp.float64 for v in jax.tree.leaves(final))
            got[impl] = ys
        for impl, ys in got.items():
            np.testing.assert_allclose(ys, got["scan"], rtol=1e-12, atol=1e-12, err_msg=impl)


@pytest.mark.parametrize("implementation", ["scan", "fused"])
def test_token_ids_outside_the_vocabulary_are_zero_one_hot_vectors(implementation):
    """Ids outside ``[0, V)`` (negative ones too) follow ``jax.nn.one_hot``: a zero input
    vector, in the values and in the gradients, on the scan's per-step lookup and the
    fused projection (wavefront's and pallas' too) (they used to read row V-1 or wrap
    around forward, while the gradients left them out)."""
    net = networks.network(cells.lstm(8), 1, False, implementation=implementation)
    params = net.init(jax.random.key(0), 4)
    ids = jnp.array([[5, 1, -1], [0, -7, 3]], jnp.int32)

    def loss(p, xs):
        return jnp.sum(jnp.sin(net.apply_batch(p, xs)[0]))

    one_hot = jax.nn.one_hot(ids, 4)  # rows of zeros for 5, -1, -7
    for a, b in zip(
        jax.tree.leaves(jax.value_and_grad(loss)(params, ids)),
        jax.tree.leaves(jax.value_and_grad(loss)(params, one_hot)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", ["scan", "fused", "wavefront"])
def test_odd_but_valid_inputs_and_clear_errors_for_bad_carries(implementation):
    """Token ids with T = 0 or B = 0, lengths as a list, xs as nested lists run; an
    initial carry without its batch axis, of another batch size or an int type is
    refused by name."""
    net = networks.network(cells.gru(4), 1, False, implementation=implementation)
    params = net.init(jax.random.key(0), 6)
    assert net.apply_batch(params, jnp.zeros((2, 0), jnp.int32))[0].shape == (2, 0, 4)
    assert net.apply_batch(params, jnp.zeros((0, 3), jnp.int32))[0].shape == (0, 3, 4)
    xs = np.random.default_rng(0).normal(size=(3, 4, 6)).astype(np.float32)
    want = net.apply_batch(params, xs, jnp.array([1, 4, 0]))[0]
    np.testing.assert_allclose(net.apply_batch(params, xs, [1, 4, 0])[0], want, rtol=1e-6)
    # through jax.jit a list arrives as a list of tracers (NumPy cannot convert those)
    jitted = jax.jit(net.apply_batch)
    np.testing.assert_allclose(jitted(params, xs, [1, 4, 0])[0], want, rtol=1e-6)
    np.testing.assert_allclose(jitted(params, list(xs), (1, 4, 0))[0], want, rtol=1e-6)
    one = jax.jit(net.apply)(params, list(xs[1]), 3)[0]  # a list of [I] rows
    np.testing.assert_allclose(one, net.apply(params, xs[1], 3)[0], rtol=1e-6)
    np.testing.assert_allclose(
        net.apply_batch(params, xs.tolist())[0], net.apply_batch(params, xs)[0], rtol=1e-6
    )
    for carry, match in [
        ((jnp.zeros((4,)),), r"leading batch axis of 3 .*shapes \[\(3, 4\)\]\), got .*\(4,\)"),
        ((jnp.zeros((5, 4)),), r"leading batch axis of 3"),
        ((jnp.zeros((3, 4), jnp.int32),), r"expected float32 leaves .* got int32"),
    ]:
        with pytest.raises(ValueError, match=r"initial_carry: .*" + match):
            net.apply_batch(params, xs, None, carry)


def test_params_of_another_network_are_refused_by_path():
    """Params whose shapes are not this network's init (another hidden size, a missing
    leaf) name the leaf, on every implementation, instead of a matmul's shape error."""
    other = networks.network(cells.lstm(4), 2).init(jax.random.key(0), 2)
    for implementation in ("scan", "fused", "wavefront"):
        net = networks.network(cells.lstm(3), 2, implementation=implementation)
        with pytest.raises(ValueError, match=r"params\['layer_0'\]\['W_h'\]: expected shape"):
            net.apply_batch(other, jnp.ones((2, 3, 2)))
    params = net.init(jax.random.key(0), 2)
    del params["layer_1"]["b"]
    with pytest.raises(ValueError, match=r"params\['layer_1'\]\['b'\]: .* got no such leaf"):
        net.apply(params, jnp.ones((3, 2)))
    with pytest.raises(ValueError, match=r"vocab_size: expected an int >= 1, got 2.5"):
        models.language_model(models.ModelConfig(vocab_size=2.5))


def test_bfloat16_params_keep_a_float32_state():
    """bfloat16 params (e.g. cast for storage) run on the default implementation with
    float32 carries and outputs, as the fused layers compute."""
    net = networks.network(cells.lstm(8), 1, False)
    params = jax.tree.map(lambda v: v.astype(jnp.bfloat16), net.init(jax.random.key(0), 5))
    for xs in (jnp.ones((2, 4, 5), jnp.bfloat16), jnp.zeros((2, 4), jnp.int32)):
        ys, final = net.apply_batch(params, xs)
        assert ys.dtype == jnp.float32 and final[0].h.dtype == jnp.float32


@pytest.mark.parametrize("cell", [cells.lstm(8), cells.gru(8), cells.rnn(8)])
def test_bfloat16_params_compute_in_float32_on_every_implementation(cell):
    """bfloat16 params under the default ``matmul_dtype="float32"``: every
    implementation computes what the scan does, float32 matmuls of the widened
    weights (the kernels used to cast the activations to bfloat16 as well). The
    gradients, in bfloat16 (the params' type), are the float32 params' gradients
    rounded, within one unit in the last place."""
    scan = networks.network(cell, 2, implementation="scan")
    params = jax.tree.map(lambda v: v.astype(jnp.bfloat16), scan.init(jax.random.key(0), I))
    wide = jax.tree.map(lambda v: v.astype(jnp.float32), params)  # the same values
    xs = jax.random.normal(jax.random.key(1), (3, T, I))
    weights = jax.random.normal(jax.random.key(2), (3, T, 8))

    def loss(net, p):
        return jnp.sum(net.apply_batch(p, xs)[0] * weights)

    want = scan.apply_batch(wide, xs)[0]
    np.testing.assert_array_equal(scan.apply_batch(params, xs)[0], want)
    want_grad = jax.grad(functools.partial(loss, scan))(wide)
    for implementation in ("fused", "wavefront", "auto"):
        net = networks.network(cell, 2, implementation=implementation)
        np.testing.assert_allclose(net.apply_batch(params, xs)[0], want, rtol=1e-5, atol=1e-6)
        grad = jax.grad(functools.partial(loss, net))(params)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad), strict=True):
            assert a.dtype == jnp.bfloat16
            np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=2**-7, atol=1e-6)


IMPLEMENTATIONS = ("scan", "fused", "wavefront", "auto")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_empty_sequences_and_batches_have_gradients(implementation):
    """T = 0 and B = 0 on every implementation: the values and the gradients exist (the
    hand-written backward passes need a step and an example, so those run the scan),
    and nothing changes the params: their gradients are exactly zero."""
    net = networks.network(cells.lstm(4), 2, False, implementation=implementation)
    params = net.init(jax.random.key(0), I)

    def loss(p, xs):
        ys, final = net.apply_batch(p, xs)
        return jnp.sum(ys) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(final))

    for shape in ((3, 0, I), (0, 5, I)):
        xs = jnp.ones(shape)
        ys, final = net.apply_batch(params, xs)
        assert ys.shape == (*shape[:2], 4)
        assert all(c.shape == (shape[0], 4) for c in jax.tree.leaves(final))
        grads = jax.jit(jax.grad(loss))(params, xs)
        assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads)), shape


@pytest.mark.parametrize("implementation", ["scan", "fused", "wavefront"])
def test_nan_in_the_padding_reaches_neither_values_nor_gradients(implementation):
    """Past a sequence's length the inputs are ignored even when they hold NaN or inf:
    outputs, carries and all gradients equal those with zero padding (the steps past
    the length are zeroed before the input projection; a mask after it let
    ``0 * nan`` into the weight gradients)."""
    # the padding is zeroed at the first layer's input: one bidirectional layer shows
    # it (the wavefront runs one direction and needs two layers)
    bidirectional = implementation != "wavefront"
    layers = 2 if implementation == "wavefront" else 1
    net = networks.network(
        cells.gru(4, reset_after=True), layers, bidirectional, implementation=implementation
    )
    params = net.init(jax.random.key(1), I)
    lengths = jnp.array([T, 3, 0])
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(3, T, I)), jnp.float32)
    pad = jnp.arange(T)[None, :, None] >= lengths[:, None, None]
    clean = jnp.where(pad, 0.0, xs)
    dirty = jnp.where(pad, jnp.asarray([jnp.nan, jnp.inf, -jnp.inf])[:, None, None], xs)

    def loss(p, xs):
        ys, final = net.apply_batch(p, xs, lengths)
        return jnp.sum(ys**2) + sum(jnp.sum(c) for c in jax.tree.leaves(final))

    want = jax.value_and_grad(loss, argnums=(0, 1))(params, clean)
    got = jax.value_and_grad(loss, argnums=(0, 1))(params, dirty)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        np.testing.assert_allclose(g, jnp.where(jnp.isfinite(w), w, 0.0), rtol=1e-6, atol=1e-7)
    if implementation != "scan":
        return  # apply on one sequence runs the batch path of the others (a batch of one)
    # one sequence through apply (the scan's own entry): the same rule
    one = jax.grad(lambda p: jnp.sum(net.apply(p, dirty[1], 3)[0] ** 2))(params)
    ref = jax.grad(lambda p: jnp.sum(net.apply(p, clean[1], 3)[0] ** 2))(params)
    for g, w in zip(jax.tree.leaves(one), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "cell, implementation, remat",
    [
        ("lstm", "scan", False),
        ("lstm", "fused", False),
        ("lstm", "fused", True),
        ("lstm", "wavefront", False),
        ("gru_after", "fused", False),
        ("gru_after", "fused", True),
        ("gru_after", "wavefront", False),
        ("rnn", "fused", False),
    ],
)
def test_gradients_have_the_params_type(cell, implementation, remat):
    """bfloat16 params get bfloat16 gradients on every implementation (the custom VJPs
    computed them in float32), so a ``lax.scan`` training loop over the params keeps
    its carry's type; tokens and float inputs alike."""
    net = networks.network(CELLS[cell](), 2, False, implementation=implementation, remat=remat)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), net.init(jax.random.key(0), I))
    xs = jnp.ones((2, T, I), jnp.bfloat16)
    ids = jnp.ones((2, T), jnp.int32) % I

    def loss(p, x):
        return jnp.sum(net.apply_batch(p, x, jnp.array([T, 2]))[0].astype(jnp.float32))

    for x in (xs, ids):
        grads = jax.grad(loss)(params, x)
        assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))

    def sgd(p, _):
        g = jax.grad(loss)(p, xs)
        return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), None

    out, _ = jax.lax.scan(sgd, params, None, length=2)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(out))


def test_float64_inputs_give_float32_params_float32_gradients():
    """Under ``jax.enable_x64``, float32 params fed float64 inputs get float32
    gradients on every implementation, as autodiff of the scan gives."""
    with jax.enable_x64(True):
        xs = jnp.ones((2, T, I), jnp.float64)
        for implementation, layers in (("fused", 1), ("wavefront", 2)):  # the custom VJPs
            net = networks.network(cells.gru(4), layers, False, implementation=implementation)
            params = net.init(jax.random.key(0), I)
            grads = jax.grad(lambda p, net=net: jnp.sum(net.apply_batch(p, xs)[0]))(params)
            assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads)), implementation


@pytest.mark.parametrize("implementation", ["scan", "fused", "wavefront"])
def test_boolean_inputs_are_refused_by_name(implementation):
    net = networks.network(cells.lstm(4), 2, False, implementation=implementation)
    params = net.init(jax.random.key(0), I)
    with pytest.raises(
        ValueError, match="xs: expected float features or integer token ids, got bool"
    ):
        net.apply_batch(params, jnp.ones((2, T, I), bool))
    with pytest.raises(
        ValueError, match="xs: expected float features or integer token ids, got bool"
    ):
        net.apply(params, jnp.ones((T, I), bool))


def test_a_cell_with_replaced_functions_runs_its_own_functions():
    """The fused kernels hard-code the built-in equations: a cell changed with
    ``_replace`` makes ``auto`` run the scan (which calls the cell's functions), and
    the kernels refuse it by name."""
    base = cells.rnn(H)

    def step(p, h, x):
        return tuple(2 * v for v in base.step(p, h, x))

    def step_projected(p, h, xp):
        return tuple(2 * v for v in base.step_projected(p, h, xp))

    changed = base._replace(step=step, step_projected=step_projected)
    assert cells.is_builtin(base) and not cells.is_builtin(changed)
    xs = jnp.ones((3, T, I))
    net = networks.network(changed, implementation="auto")
    params = net.init(jax.random.key(0), I)
    want = networks.network(changed, implementation="scan").apply_batch(params, xs)[0]
    np.testing.assert_allclose(net.apply_batch(params, xs)[0], want, **TOL)
    assert not np.allclose(want, networks.network(base).apply_batch(params, xs)[0])
    for implementation, layers in (("fused", 1), ("wavefront", 2), ("pallas", 1)):
        with pytest.raises(ValueError, match="changed with _replace: its functions"):
            networks.network(changed, layers, implementation=implementation)


def test_a_cell_with_replaced_options_or_size_runs_the_scan():
    """The kernels read ``hidden_size`` and ``options``, the built functions the
    values they were built with: a cell whose options or size were replaced is not
    built-in, so ``auto`` runs its (unchanged) step and the kernels refuse it. The
    options cannot be changed in place."""
    relu = cells.rnn(H)._replace(options={"activation": "relu"})
    wider = cells.lstm(H)._replace(hidden_size=H + 1)
    assert cells.is_builtin(cells.rnn(H)) and not cells.is_builtin(relu)
    assert not cells.is_builtin(wider)
    xs = jax.random.normal(jax.random.key(1), (2, T, I))
    params = networks.network(relu).init(jax.random.key(0), I)
    want = networks.network(relu, implementation="scan").apply_batch(params, xs)[0]
    np.testing.assert_allclose(networks.network(relu).apply_batch(params, xs)[0], want, **TOL)
    assert float(want.min()) < 0  # the step built for tanh, as the scan runs it
    with pytest.raises(ValueError, match="changed with _replace"):
        networks.network(relu, implementation="fused")
    with pytest.raises(TypeError, match="does not support item assignment"):
        cells.rnn(H).options["activation"] = "relu"


def test_cells_and_networks_are_static_values_to_jax():
    """A cell, a network and a language model are hashable and have no pytree leaves:
    a network can be a static argument of jax.jit, or an ordinary one (it is then
    part of the tree structure), and a pytree holding one maps over its arrays."""
    net = networks.network(cells.gru(H, reset_after=True), 2, True)
    params = net.init(jax.random.key(0), I)
    xs = jnp.ones((2, T, I))
    want = net.apply_batch(params, xs)[0]
    static = jax.jit(lambda n, p, x: n.apply_batch(p, x)[0], static_argnums=0)
    plain = jax.jit(lambda n, p, x: n.apply_batch(p, x)[0])
    np.testing.assert_array_equal(static(net, params, xs), want)
    np.testing.assert_array_equal(plain(net, params, xs), want)
    assert hash(net) == hash(net) and hash(net.cell) == hash(net.cell)
    assert jax.tree.leaves({"net": net, "x": jnp.ones(2)})[0].shape == (2,)
    model = models.language_model(models.ModelConfig(vocab_size=5, hidden_size=4))
    assert jax.tree.leaves(model) == [] and hash(model) == hash(model)


def test_numpy_scalars_are_options():
    """NumPy scalars (e.g. drawn by a sweep) are accepted wherever a Python number or
    bool is, and kept as Python values."""
    net = networks.network(
        cells.lstm(np.int64(H), np.float32(0.5)),
        np.int64(2),
        np.bool_(True),
        dropout=np.float32(0.25),
        unroll=np.int32(2),
        chunk=np.int64(4),
        remat=np.bool_(False),
    )
    got = (net.num_layers, net.bidirectional, net.dropout, net.unroll, net.chunk, net.remat)
    assert got == (2, True, 0.25, 2, 4, False)
    assert [type(v) for v in got] == [int, bool, float, int, int, bool]
    assert net.cell.options["forget_bias"] == 0.5
    gru = cells.gru(H, np.bool_(True), pin_reset=np.float64(1.0))
    assert gru.options["reset_after"] is True and gru.options["pin_reset"] == 1.0
    for kw, message in (
        (dict(num_layers=np.float32(2)), "num_layers: expected an int >= 1"),
        (dict(num_layers=np.bool_(True)), "num_layers: expected an int >= 1"),
        (dict(dropout=np.bool_(True)), r"dropout: expected a number in \[0, 1\)"),
        (dict(unroll=np.int64(0)), "unroll: expected an int >= 1"),
        (dict(chunk=np.int64(-1)), "chunk: expected None or an int >= 0"),
        (dict(bidirectional=1), "bidirectional: expected a bool"),
    ):
        with pytest.raises(ValueError, match=message):
            networks.network(cells.lstm(H), **kw)


def test_unidirectional_params_on_a_bidirectional_network_are_named():
    uni = networks.network(cells.lstm(H), 2)
    bi = networks.network(cells.lstm(H), 2, True)
    with pytest.raises(ValueError, match=r"params\['layer_0'\]: expected the keys"):
        bi.apply_batch(uni.init(jax.random.key(0), I), jnp.ones((2, T, I)))


def test_numpy_integers_are_sizes():
    cell = cells.gru(np.int64(H))
    assert cell.hidden_size == H and type(cell.hidden_size) is int
    assert cell.init(jax.random.key(0), np.int32(I))["W_x"].shape == (I, 3, H)
    for bad in (np.bool_(True), np.float32(4.0), np.int64(0)):
        with pytest.raises(ValueError, match="hidden_size: expected a positive int"):
            cells.lstm(bad)


@pytest.mark.parametrize("implementation", ["scan", "fused"])
def test_an_eager_gradient_compiles_once(implementation, caplog):
    """Called eagerly, ``apply_batch`` and its gradient run as one jitted program: a
    second call with the same shapes compiles nothing (op by op, every call of the
    gradient had retraced and recompiled the loops), and gives the same values."""
    net = networks.network(cells.lstm(4), 2, True, implementation=implementation)
    params = net.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (3, T, I))

    def loss(p):
        return jnp.sum(net.apply_batch(p, xs, jnp.array([T, 2, 0]))[0] ** 2)

    first = jax.grad(loss)(params)
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        caplog.clear()
        second = jax.grad(loss)(params)
    compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiles == []
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(a, b)


VMAP_CASES = [
    ("lstm", 2, False, dict(implementation="wavefront")),
    ("gru", 2, False, dict(implementation="wavefront")),
    ("lstm", 2, True, dict(implementation="fused")),
    ("gru_after", 1, True, dict(implementation="fused", directions="vmap")),
    ("lstm", 2, True, dict(implementation="native")),
    ("lstm", 1, False, dict(implementation="fused", chunk=2)),
    ("gru", 1, False, dict(implementation="fused", remat=True)),
]


@pytest.mark.parametrize(
    "cell_name,num_layers,bidirectional,kw",
    VMAP_CASES,
    ids=[
        f"{c}-L{n}-{'bi' if b else 'uni'}-{'-'.join(map(str, k.values()))}"
        for c, n, b, k in VMAP_CASES
    ],
)
def test_grad_of_vmap_over_ensembles_equals_the_scan(cell_name, num_layers, bidirectional, kw):
    """Reverse mode through ``vmap`` over an ensemble of params and a batch of batches
    (``jit`` inside, as ``apply_batch`` is): the hand-written backward passes
    (custom_vjp) under batching give the scan's gradients. The wavefront's failed here
    (its forward rule's output was a slice where the primal's was a scan output)."""
    if kw["implementation"] == "native" and native.unavailable():
        pytest.skip(native.unavailable())
    size = 16  # the native kernels' unit
    cell = {"lstm": cells.lstm, "gru": cells.gru}.get(cell_name, lambda h: cells.gru(h, True))(size)
    fast = networks.network(cell, num_layers, bidirectional, **kw)
    ref = networks.network(cell, num_layers, bidirectional, implementation="scan")
    E, B, T_ = 3, 4, 5
    ps = jax.vmap(fast.init, in_axes=(0, None))(jax.random.split(jax.random.key(0), E), I)
    xs = random_xs(3, (E, B, T_, I))
    lengths = jnp.array([[5, 2, 0, 4], [1, 5, 5, 3], [0, 0, 2, 5]], jnp.int32)
    r = random_xs(4, (E, B, T_, fast.output_size))

    def loss(net):
        def f(ps, xs):
            ys, final = jax.vmap(net.apply_batch)(ps, xs, lengths)
            return jnp.sum(ys * r) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(final))

        return jax.value_and_grad(f, argnums=(0, 1))

    got, want = loss(fast)(ps, xs), loss(ref)(ps, xs)
    assert_trees_close(got, want)
