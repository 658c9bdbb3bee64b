"""One step of every cell against independent references.

* the seed's equations written out again in numpy, gate by gate;
* flax.linen's SimpleCell, GRUCell and LSTMCell / OptimizedLSTMCell with copied weights.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import cells

I, H = 5, 7
TOL = dict(rtol=1e-5, atol=1e-5)


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def random_params(cell, seed=0):
    """Params with non-zero biases everywhere, so every term of the equations counts."""
    params = cell.init(jax.random.key(seed), I)
    rng = np.random.default_rng(seed)
    return {
        k: np.asarray(v) + rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in params.items()
    }


def inputs(seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=I).astype(np.float32), rng.normal(size=H).astype(np.float32)


# --- the seed's equations, one gate at a time ----------------------------------


def numpy_rnn(p, h, x, phi):
    return phi(x @ p["W_x"] + h @ p["W_h"] + p["b"])


def numpy_gru(p, h, x, reset_after):
    W_xr, W_xz, W_xh = (p["W_x"][:, k] for k in range(3))
    W_hr, W_hz, W_hh = (p["W_h"][:, k] for k in range(3))
    b_r, b_z, b_h = p["b"]
    R = sigmoid(x @ W_xr + h @ W_hr + b_r)
    Z = sigmoid(x @ W_xz + h @ W_hz + b_z)
    if reset_after:
        H_tilde = np.tanh(x @ W_xh + b_h + R * (h @ W_hh + p["b_hn"]))
    else:
        H_tilde = np.tanh(x @ W_xh + (R * h) @ W_hh + b_h)
    return Z * h + (1 - Z) * H_tilde


def numpy_lstm(p, h, c, x):
    W_xi, W_xf, W_xo, W_xc = (p["W_x"][:, k] for k in range(4))
    W_hi, W_hf, W_ho, W_hc = (p["W_h"][:, k] for k in range(4))
    b_i, b_f, b_o, b_c = p["b"]
    I_t = sigmoid(x @ W_xi + h @ W_hi + b_i)
    F_t = sigmoid(x @ W_xf + h @ W_hf + b_f)
    O_t = sigmoid(x @ W_xo + h @ W_ho + b_o)
    C_tilde = np.tanh(x @ W_xc + h @ W_hc + b_c)
    C = F_t * c + I_t * C_tilde
    return O_t * np.tanh(C), C


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_rnn_step_equals_equations(activation):
    cell = cells.rnn(H, activation)
    p = random_params(cell)
    x, h = inputs()
    new_h, y = cell.step(p, jnp.asarray(h), jnp.asarray(x))
    phi = np.tanh if activation == "tanh" else (lambda v: np.maximum(v, 0))
    np.testing.assert_allclose(new_h, numpy_rnn(p, h, x, phi), **TOL)
    np.testing.assert_array_equal(new_h, y)


@pytest.mark.parametrize("reset_after", [False, True])
def test_gru_step_equals_equations(reset_after):
    cell = cells.gru(H, reset_after=reset_after)
    p = random_params(cell)
    assert ("b_hn" in p) == reset_after
    x, h = inputs()
    new_h, y = cell.step(p, jnp.asarray(h), jnp.asarray(x))
    np.testing.assert_allclose(new_h, numpy_gru(p, h, x, reset_after), **TOL)
    np.testing.assert_array_equal(new_h, y)


def test_gru_variants_differ():
    """The two GRU forms are different functions (so the tests above can tell them apart)."""
    p = random_params(cells.gru(H, reset_after=True))
    x, h = inputs()
    a = numpy_gru(p, h, x, reset_after=False)
    b = numpy_gru({**p, "b_hn": np.zeros(H, np.float32)}, h, x, reset_after=True)
    assert np.abs(a - b).max() > 1e-3


def test_lstm_step_equals_equations():
    cell = cells.lstm(H)
    p = random_params(cell)
    x, h = inputs()
    c = np.random.default_rng(2).normal(size=H).astype(np.float32)
    carry, y = cell.step(p, cells.LSTMCarry(jnp.asarray(h), jnp.asarray(c)), jnp.asarray(x))
    want_h, want_c = numpy_lstm(p, h, c, x)
    np.testing.assert_allclose(carry.h, want_h, **TOL)
    np.testing.assert_allclose(carry.c, want_c, **TOL)
    np.testing.assert_array_equal(y, carry.h)


@pytest.mark.parametrize(
    "cell",
    [cells.rnn(H), cells.gru(H), cells.gru(H, reset_after=True), cells.lstm(H)],
    ids=["rnn", "gru", "gru_after", "lstm"],
)
def test_step_projected_matches_step_and_scan_body(cell):
    p = random_params(cell)
    xs = jnp.asarray(np.random.default_rng(3).normal(size=(6, I)), jnp.float32)
    carry0 = cell.initial_carry()
    # a lax.scan body as it is
    final, ys = jax.lax.scan(functools.partial(cell.step, p), carry0, xs)
    carry, want = carry0, []
    xp = cell.project(p, xs)  # the whole sequence in one matmul
    for t in range(xs.shape[0]):
        carry, y = cell.step_projected(p, carry, xp[t])
        want.append(y)
    np.testing.assert_allclose(ys, np.stack(want), **TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), final, carry)


def test_init_shapes_names_and_forget_bias():
    p = cells.lstm(H, forget_bias=2.5).init(jax.random.key(0), I)
    assert {k: v.shape for k, v in p.items()} == {"W_x": (I, 4, H), "W_h": (H, 4, H), "b": (4, H)}
    assert all(v.dtype == jnp.float32 for v in p.values())
    np.testing.assert_array_equal(p["b"][cells.LSTM_GATES.index("f")], 2.5)
    np.testing.assert_array_equal(p["b"][0], 0.0)
    g = cells.gru(H, reset_after=True).init(jax.random.key(0), I)
    assert {k: v.shape for k, v in g.items()} == {
        "W_x": (I, 3, H),
        "W_h": (H, 3, H),
        "b": (3, H),
        "b_hn": (H,),
    }
    r = cells.rnn(H).init(jax.random.key(0), I)
    assert {k: v.shape for k, v in r.items()} == {"W_x": (I, H), "W_h": (H, H), "b": (H,)}
    # the recurrent block of each gate is orthogonal by default
    w = np.asarray(p["W_h"][:, 2])
    np.testing.assert_allclose(w.T @ w, np.eye(H), atol=1e-5)


def test_initialisers_are_configurable():
    ones = jax.nn.initializers.ones
    p = cells.gru(H, input_init=ones, recurrent_init=ones, bias_init=ones).init(
        jax.random.key(0), I
    )
    for v in p.values():
        np.testing.assert_array_equal(v, 1.0)


def test_initial_carry():
    assert cells.gru(H).initial_carry().shape == (H,)
    c = cells.lstm(H).initial_carry()
    assert isinstance(c, cells.LSTMCarry) and c.h.shape == c.c.shape == (H,)
    assert not np.any(np.asarray(c.c))


# --- flax.linen with copied weights --------------------------------------------


def _run_flax(module, flax_params, carry, x):
    return module.apply({"params": flax_params}, carry, x[None])


def test_rnn_equals_flax_simple_cell():
    cell = cells.rnn(H)
    p = random_params(cell)
    x, h = inputs()
    flax_params = {"i": {"kernel": p["W_x"], "bias": p["b"]}, "h": {"kernel": p["W_h"]}}
    (fh, fy) = _run_flax(nn.SimpleCell(H), flax_params, h[None], x)
    new_h, _ = cell.step(p, jnp.asarray(h), jnp.asarray(x))
    np.testing.assert_allclose(new_h, fh[0], **TOL)
    np.testing.assert_allclose(new_h, fy[0], **TOL)


def test_gru_reset_after_equals_flax_gru_cell():
    cell = cells.gru(H, reset_after=True)
    p = random_params(cell)
    x, h = inputs()
    flax_params = {
        "ir": {"kernel": p["W_x"][:, 0], "bias": p["b"][0]},
        "iz": {"kernel": p["W_x"][:, 1], "bias": p["b"][1]},
        "in": {"kernel": p["W_x"][:, 2], "bias": p["b"][2]},
        "hr": {"kernel": p["W_h"][:, 0]},
        "hz": {"kernel": p["W_h"][:, 1]},
        "hn": {"kernel": p["W_h"][:, 2], "bias": p["b_hn"]},
    }
    fh, _ = _run_flax(nn.GRUCell(H), flax_params, h[None], x)
    new_h, _ = cell.step(p, jnp.asarray(h), jnp.asarray(x))
    np.testing.assert_allclose(new_h, fh[0], **TOL)


@pytest.mark.parametrize("flax_cell", [nn.LSTMCell, nn.OptimizedLSTMCell])
def test_lstm_equals_flax_lstm_cell(flax_cell):
    cell = cells.lstm(H)
    p = random_params(cell)
    x, h = inputs()
    c = np.random.default_rng(2).normal(size=H).astype(np.float32)
    gate = dict(zip(cells.LSTM_GATES, range(4), strict=True))
    flax_params = {}
    for ours, theirs in [("i", "i"), ("f", "f"), ("o", "o"), ("c", "g")]:
        k = gate[ours]
        flax_params["i" + theirs] = {"kernel": p["W_x"][:, k]}
        flax_params["h" + theirs] = {"kernel": p["W_h"][:, k], "bias": p["b"][k]}
    (fc, fh), _ = _run_flax(flax_cell(H), flax_params, (c[None], h[None]), x)
    carry, _ = cell.step(p, cells.LSTMCarry(jnp.asarray(h), jnp.asarray(c)), jnp.asarray(x))
    np.testing.assert_allclose(carry.h, fh[0], **TOL)
    np.testing.assert_allclose(carry.c, fc[0], **TOL)


# --- bad input -------------------------------------------------------------------


@pytest.mark.parametrize("factory", [cells.rnn, cells.gru, cells.lstm])
@pytest.mark.parametrize("size", [0, -3, 2.5, True, "8"])
def test_bad_hidden_size(factory, size):
    with pytest.raises(ValueError, match=r"hidden_size: expected a positive int, got"):
        factory(size)


def test_bad_activation_and_cell_name():
    with pytest.raises(
        ValueError, match=r"activation: expected one of \['relu', 'tanh'\], got 'gelu'"
    ):
        cells.rnn(4, "gelu")
    with pytest.raises(
        ValueError, match=r"cell: expected one of \['gru', 'lstm', 'rnn'\], got 'tcn'"
    ):
        cells.make("tcn", 4)
    with pytest.raises(ValueError, match=r"reset_after: expected a bool"):
        cells.gru(4, reset_after="yes")
    with pytest.raises(ValueError, match=r"input_size: expected a positive int, got 0"):
        cells.lstm(4).init(jax.random.key(0), 0)


@pytest.mark.parametrize("factory", [cells.rnn, cells.gru, cells.lstm])
def test_wrong_input_size_is_named_at_trace_time(factory):
    cell = factory(H)
    p = cell.init(jax.random.key(0), I)
    with pytest.raises(ValueError, match=rf"x: expected last dimension {I} .*got shape \(4,\)"):
        jax.jit(cell.step)(p, cell.initial_carry(), jnp.zeros(4))
    # neither complex nor boolean features (networks refuse them alike): a complex x
    # gave a complex carry
    for dtype in (jnp.complex64, jnp.bool_):
        with pytest.raises(ValueError, match=rf"x: expected float features .*got {dtype.__name__}"):
            jax.jit(cell.step)(p, cell.initial_carry(), jnp.zeros(I, dtype))


def numpy_gru_gates(p, h, x, reset_after, pin_reset=None, pin_update=None):
    """``(R_t, Z_t, H~_t)`` written out gate by gate; a pin replaces its gate."""
    pre = [x @ p["W_x"][:, k] + p["b"][k] for k in range(3)]
    R = sigmoid(pre[0] + h @ p["W_h"][:, 0]) if pin_reset is None else np.full(H, pin_reset)
    Z = sigmoid(pre[1] + h @ p["W_h"][:, 1]) if pin_update is None else np.full(H, pin_update)
    if reset_after:
        H_tilde = np.tanh(pre[2] + R * (h @ p["W_h"][:, 2] + p["b_hn"]))
    else:
        H_tilde = np.tanh(pre[2] + (R * h) @ p["W_h"][:, 2])
    return R, Z, H_tilde


@pytest.mark.parametrize("reset_after", [False, True])
def test_gate_values_match_the_equations(reset_after):
    """Every gate and candidate of the GRU (both forms) and the LSTM, keyed by
    ``cell.gates`` in their order, against the equations written out."""
    x, h = inputs()
    gru = cells.gru(H, reset_after)
    p = random_params(gru)
    g = gru.gate_values(p, jnp.asarray(h), jnp.asarray(x))
    assert tuple(g) == gru.gates == ("r", "z", "h")
    for name, want in zip(gru.gates, numpy_gru_gates(p, h, x, reset_after), strict=True):
        np.testing.assert_allclose(g[name], want, **TOL, err_msg=name)
    lstm = cells.lstm(H)
    q = random_params(lstm)
    c = np.random.default_rng(2).normal(size=H).astype(np.float32)
    g = lstm.gate_values(q, cells.LSTMCarry(jnp.asarray(h), jnp.asarray(c)), jnp.asarray(x))
    assert tuple(g) == lstm.gates == ("i", "f", "o", "c")
    for k, name in enumerate(lstm.gates):
        act = np.tanh if name == "c" else sigmoid
        want = act(x @ q["W_x"][:, k] + h @ q["W_h"][:, k] + q["b"][k])
        np.testing.assert_allclose(g[name], want, **TOL, err_msg=name)
    assert cells.rnn(H).gate_values(None, None, None) == {}


@pytest.mark.parametrize("reset_after", [False, True])
def test_pinned_gates_of_both_gru_forms(reset_after):
    """Distinct pins (R = 0.3, Z = 0.8), each replacing its own gate, in the step and
    in gate_values, against the equations written out."""
    x, h = inputs()
    cell = cells.gru(H, reset_after, pin_reset=0.3, pin_update=0.8)
    p = random_params(cell)
    R, Z, H_tilde = numpy_gru_gates(p, h, x, reset_after, pin_reset=0.3, pin_update=0.8)
    new_h, _ = cell.step(p, jnp.asarray(h), jnp.asarray(x))
    np.testing.assert_allclose(new_h, Z * h + (1 - Z) * H_tilde, **TOL)
    g = cell.gate_values(p, jnp.asarray(h), jnp.asarray(x))
    np.testing.assert_allclose(g["r"], R, **TOL)
    np.testing.assert_allclose(g["z"], Z, **TOL)
    np.testing.assert_allclose(g["h"], H_tilde, **TOL)


def test_pinned_gru_gates():
    """R = 1, Z = 0: the GRU is a plain tanh RNN with W_xh, W_hh, b_h; Z = 1 copies the state."""
    x, h = inputs()
    p = random_params(cells.gru(H))
    as_rnn, _ = cells.gru(H, pin_reset=1.0, pin_update=0.0).step(p, jnp.asarray(h), jnp.asarray(x))
    rnn_p = {"W_x": p["W_x"][:, 2], "W_h": p["W_h"][:, 2], "b": p["b"][2]}
    np.testing.assert_allclose(as_rnn, numpy_rnn(rnn_p, h, x, np.tanh), **TOL)
    skip, _ = cells.gru(H, pin_update=1.0).step(p, jnp.asarray(h), jnp.asarray(x))
    np.testing.assert_array_equal(skip, h)
    with pytest.raises(
        ValueError, match=r"pin_reset: expected None or a number in \[0, 1\], got 2"
    ):
        cells.gru(H, pin_reset=2)


BATCH_CELLS = {
    "rnn": lambda: cells.rnn(H),
    "gru": lambda: cells.gru(H),
    "gru_after": lambda: cells.gru(H, reset_after=True),
    "lstm": lambda: cells.lstm(H),
}


@pytest.mark.parametrize("name", list(BATCH_CELLS))
def test_a_step_takes_leading_batch_axes(name):
    """``step`` on ``x <[*B, I]>`` (ids ``<[*B]>``) and carries ``<[*B, H]>`` gives, for
    every example, the one-example step's numbers (vmapped over each batch axis);
    ``gate_values`` too. A carry without x's batch axes is refused by name (it used to
    be read with the gates along the batch axis: wrong numbers, no error)."""
    cell = BATCH_CELLS[name]()
    p = random_params(cell)
    rng = np.random.default_rng(3)
    for batch in [(3,), (2, 3)]:
        carry = jax.tree.map(
            lambda c, batch=batch: jnp.asarray(rng.normal(size=(*batch, *c.shape)), jnp.float32),
            cell.initial_carry(),
        )
        for x in (
            jnp.asarray(rng.normal(size=(*batch, I)), jnp.float32),
            jnp.asarray(rng.integers(0, I, batch), jnp.int32),
        ):
            one = cell.step
            gates = cell.gate_values
            for _ in batch:  # one vmap per batch axis
                one = jax.vmap(one, in_axes=(None, 0, 0))
                gates = jax.vmap(gates, in_axes=(None, 0, 0))
            got, want = cell.step(p, carry, x), one(p, carry, x)
            assert jax.tree.map(jnp.shape, got) == jax.tree.map(jnp.shape, want)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), got, want)
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a, b, **TOL),
                cell.gate_values(p, carry, x),
                gates(p, carry, x),
            )
    single = cell.initial_carry()
    leaf = "carry.h" if name == "lstm" else "carry"
    with pytest.raises(ValueError, match=rf"{leaf}: expected shape \(4, 7\) \(the batch axes"):
        cell.step(p, single, jnp.ones((4, I)))
    with pytest.raises(ValueError, match=rf"{leaf}: expected shape \(2, 7\)"):
        cell.step(p, single, jnp.array([1, 2]))
    with pytest.raises(ValueError, match=rf"{leaf}: expected shape \(7,\)"):
        cell.step(p, jax.tree.map(lambda c: c[None], single), jnp.ones((I,)))
    block = r"7" if name == "rnn" else r"\d, 7"
    with pytest.raises(ValueError, match=rf"xp: expected shape \[\*B, {block}\]"):
        cell.step_projected(p, single, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"x: expected last dimension 5"):
        cell.step(p, single, jnp.float32(1.0))


def test_a_step_names_wrong_params_and_carries():
    """Params of another cell or size, params missing a key, and an LSTM carry that is
    not an LSTMCarry are refused by name (not a KeyError, an AttributeError or a shape
    error about the internal projection)."""
    lstm, gru, rnn = cells.lstm(4), cells.gru(4, reset_after=True), cells.rnn(4)
    p_lstm = lstm.init(jax.random.key(0), 3)
    p_gru = cells.gru(4).init(jax.random.key(0), 3)  # reset-before: no b_hn
    h, x = jnp.zeros(4), jnp.ones(3)
    cases = [
        (lambda: lstm.step(p_lstm, (h, h), x), "carry: expected an LSTMCarry"),
        (lambda: lstm.step(p_gru, lstm.initial_carry(), x), r"params: W_h of shape \(4, 4, 4\)"),
        (lambda: gru.step(p_gru, h, x), r"params: expected the gru cell's params .*b_hn"),
        (lambda: rnn.step(p_lstm, h, x), r"params: W_h of shape \(4, 4\)"),
        (lambda: cells.lstm(5).step(p_lstm, cells.lstm(5).initial_carry(), x), "hidden_size 5"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
