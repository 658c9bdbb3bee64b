"""PyTorch weight conversion (rnn_jax.interop) against PyTorch itself.

Every cell PyTorch has (LSTM, the reset-after GRU, the tanh and relu RNN) at depth 1
and 2, one and two directions: PyTorch's module, converted with ``from_torch``, must
compute the same outputs and final states as rnn_jax on a batch of variable-length
sequences (PyTorch reads them packed), and ``to_torch`` must go the other way.

The largest absolute differences seen are printed at the end of the module (run
with ``-s``). Measured on CPU (float32, I=3, H=5, T=6, biases ~N(0, 0.5)): 6e-8 to
2.4e-7 for weights loaded from PyTorch, at most 4.8e-7 (relu RNN, 2 layers, both
directions) for weights exported with ``to_torch``; tolerance 1e-5.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import LSTMCarry, cells, interop, networks

torch = pytest.importorskip("torch")
tnn = torch.nn

torch.set_num_threads(1)

I, H, T = 3, 5, 6
LENGTHS = [T, 1, 3, T - 2]  # PyTorch refuses length 0 in a packed sequence
B = len(LENGTHS)
TOL = dict(rtol=1e-5, atol=1e-5)
GARBAGE = 1e3  # what our padding holds; it must have no effect

CELLS = {
    "lstm": lambda: cells.lstm(H),
    "gru": lambda: cells.gru(H, reset_after=True),
    "rnn_tanh": lambda: cells.rnn(H, "tanh"),
    "rnn_relu": lambda: cells.rnn(H, "relu"),
}
GRID = list(itertools.product(CELLS, [1, 2], [False, True]))
GRID_IDS = [f"{c}-L{n}-{'bi' if b else 'uni'}" for c, n, b in GRID]

# Largest absolute difference against PyTorch, per test id (printed at the end).
MAX_DIFFS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_max_diffs():
    yield
    if MAX_DIFFS:
        print("\nmax |rnn_jax - PyTorch| (outputs, final h and c):")
        for name, diff in MAX_DIFFS.items():
            print(f"  {name:40s} {diff:.3g}")
        print(f"  {'overall':40s} {max(MAX_DIFFS.values()):.3g}")


@functools.cache
def network(cell_name, num_layers, bidirectional, hoist_input=None):
    """The network and one compiled ``apply_batch``, shared by every test of a config."""
    net = networks.network(CELLS[cell_name](), num_layers, bidirectional, hoist_input=hoist_input)
    return net, jax.jit(net.apply_batch)


def torch_module(cell_name, num_layers, bidirectional, seed=0):
    torch.manual_seed(seed)
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=True)
    if cell_name == "lstm":
        module = tnn.LSTM(I, H, **kw)
    elif cell_name == "gru":
        module = tnn.GRU(I, H, **kw)
    else:
        module = tnn.RNN(I, H, nonlinearity=cell_name.removeprefix("rnn_"), **kw)
    with torch.no_grad():  # larger, distinct biases: bias handling must count
        for name, value in module.named_parameters():
            if name.startswith("bias"):
                value.normal_(0.0, 0.5)
    return module.eval()


def run_torch(module, xs, lengths, initial=None):
    """PyTorch on a packed batch: ``(ys <[B, T, D*H]>, h_n, c_n or None)``."""
    packed = tnn.utils.rnn.pack_padded_sequence(
        torch.from_numpy(np.asarray(xs)),
        torch.tensor(lengths, dtype=torch.int64),
        batch_first=True,
        enforce_sorted=False,
    )
    if initial is not None:
        h0, c0 = (None if v is None else torch.from_numpy(v) for v in initial)
        initial = h0 if c0 is None else (h0, c0)
    with torch.no_grad():
        out, state = module(packed, initial)
    ys, out_lengths = tnn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
    assert out_lengths.tolist() == list(lengths)
    h_n, c_n = state if isinstance(state, tuple) else (state, None)
    return ys.numpy(), h_n.numpy(), None if c_n is None else c_n.numpy()


def torch_layout(final, net):
    """Our per-layer carry as PyTorch's ``(h, c)`` ``<[L*D, B, H]>`` (c None if no LSTM).

    PyTorch orders the first axis layer-major, direction-minor: ``l * D + d``.
    """
    hs, cs = [], []
    for layer in final:
        for carry in (layer.forward, layer.backward) if net.bidirectional else (layer,):
            if isinstance(carry, LSTMCarry):
                hs.append(carry.h)
                cs.append(carry.c)
            else:
                hs.append(carry)
    return np.stack(hs), (np.stack(cs) if cs else None)


def from_torch_layout(h, c, net):
    """Inverse of :func:`torch_layout`: PyTorch's h0/c0 as our ``initial_carry``."""
    leaves = []
    for k in range(h.shape[0]):
        leaves += [h[k], c[k]] if c is not None else [h[k]]
    tree = jax.tree.structure(net.initial_carry())
    return tree.unflatten([jnp.asarray(v) for v in leaves])


def random_batch(seed):
    xs = np.random.default_rng(seed).normal(size=(B, T, I)).astype(np.float32)
    valid = np.arange(T)[None, :, None] < np.array(LENGTHS)[:, None, None]
    xs = np.where(valid, xs, 0.0).astype(np.float32)  # PyTorch never reads the padding
    garbage = np.where(valid, xs, GARBAGE).astype(np.float32)
    return xs, garbage


def compare(name, net, got, want):
    """Asserts ``(ys, final)`` equals PyTorch's ``(ys, h_n, c_n)``; records the max diff."""
    ys, final = got
    want_ys, want_h, want_c = want
    h, c = torch_layout(final, net)
    ys = np.asarray(ys)
    assert ys.shape == want_ys.shape == (B, T, net.output_size)
    for b, n in enumerate(LENGTHS):
        np.testing.assert_array_equal(ys[b, n:], 0.0)  # exactly zero past the length
    np.testing.assert_allclose(ys, want_ys, **TOL)
    np.testing.assert_allclose(h, want_h, **TOL)
    diffs = [np.abs(ys - want_ys).max(), np.abs(h - want_h).max()]
    assert (c is None) == (want_c is None)
    if c is not None:
        np.testing.assert_allclose(c, want_c, **TOL)
        diffs.append(np.abs(c - want_c).max())
    MAX_DIFFS[name] = max(MAX_DIFFS.get(name, 0.0), float(max(diffs)))


def state_dict_as(module, kind):
    """The module's weights as tensors, numpy arrays or a mix of both."""
    sd = module.state_dict()
    if kind == "tensor":
        return sd
    if kind == "numpy":
        return {k: v.numpy() for k, v in sd.items()}
    return {k: v.numpy() if k.startswith("bias") else v for k, v in sd.items()}


@pytest.mark.parametrize("cell_name,num_layers,bidirectional", GRID, ids=GRID_IDS)
def test_from_torch_matches_pytorch_on_packed_batch(cell_name, num_layers, bidirectional):
    net, apply_batch = network(cell_name, num_layers, bidirectional)
    module = torch_module(cell_name, num_layers, bidirectional)
    kind = ["tensor", "numpy", "mixed"][GRID.index((cell_name, num_layers, bidirectional)) % 3]
    params = interop.from_torch(state_dict_as(module, kind), net)
    xs, garbage = random_batch(1)
    lengths = jnp.asarray(LENGTHS, jnp.int32)

    got = apply_batch(params, garbage, lengths)
    compare(
        f"packed/{cell_name}-L{num_layers}-{bidirectional}",
        net,
        got,
        run_torch(module, xs, LENGTHS),
    )
    # The garbage in the padding changes nothing at all.
    clean = apply_batch(params, xs, lengths)
    jax.tree.map(np.testing.assert_array_equal, got, clean)


@pytest.mark.parametrize("cell_name", ["lstm", "gru"])
def test_from_torch_matches_pytorch_with_hoisted_input(cell_name):
    """The accelerators' default path (``X W_x + b`` before the scan), here on CPU."""
    net, apply_batch = network(cell_name, 2, True, hoist_input=True)
    assert net.hoist_input
    module = torch_module(cell_name, 2, True, seed=9)
    params = interop.from_torch(module.state_dict(), net)
    xs, garbage = random_batch(10)
    got = apply_batch(params, garbage, jnp.asarray(LENGTHS, jnp.int32))
    compare(f"hoisted/{cell_name}-L2-True", net, got, run_torch(module, xs, LENGTHS))


@pytest.mark.parametrize("cell_name,num_layers,bidirectional", GRID, ids=GRID_IDS)
def test_from_torch_matches_pytorch_with_initial_state(cell_name, num_layers, bidirectional):
    net, apply_batch = network(cell_name, num_layers, bidirectional)
    module = torch_module(cell_name, num_layers, bidirectional, seed=2)
    params = interop.from_torch(module.state_dict(), net)
    xs, garbage = random_batch(3)
    rng = np.random.default_rng(4)
    shape = (num_layers * (2 if bidirectional else 1), B, H)
    h0 = rng.normal(size=shape).astype(np.float32)
    c0 = rng.normal(size=shape).astype(np.float32) if cell_name == "lstm" else None
    carry = from_torch_layout(h0, c0, net)

    got = apply_batch(params, garbage, jnp.asarray(LENGTHS, jnp.int32), carry)
    want = run_torch(module, xs, LENGTHS, (h0, c0))
    compare(f"initial/{cell_name}-L{num_layers}-{bidirectional}", net, got, want)


def random_params(net, seed):
    """Params of ``net.init``'s structure, all entries (biases too) random and non-zero."""
    shapes = jax.eval_shape(lambda key: net.init(key, I), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0.0, 0.5, s.shape).astype(np.float32), shapes)


@pytest.mark.parametrize("cell_name,num_layers,bidirectional", GRID, ids=GRID_IDS)
def test_to_torch_round_trip_and_loads_into_pytorch(cell_name, num_layers, bidirectional):
    net, apply_batch = network(cell_name, num_layers, bidirectional)
    params = random_params(net, 5)
    sd = interop.to_torch(params, net)

    back = interop.from_torch(sd, net)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)  # exactly

    module = torch_module(cell_name, num_layers, bidirectional, seed=6)
    want_shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert {k: v.shape for k, v in sd.items()} == want_shapes
    assert all(v.dtype == np.float32 for v in sd.values())
    module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})

    xs, garbage = random_batch(7)
    got = apply_batch(params, garbage, jnp.asarray(LENGTHS, jnp.int32))
    compare(
        f"to_torch/{cell_name}-L{num_layers}-{bidirectional}",
        net,
        got,
        run_torch(module, xs, LENGTHS),
    )


# ---------------------------------------------------------------------------
# Bad input.


def test_missing_key_is_named():
    net, _ = network("lstm", 2, False)
    sd = torch_module("lstm", 2, False).state_dict()
    del sd["bias_hh_l1"]
    with pytest.raises(ValueError, match="missing key 'bias_hh_l1'"):
        interop.from_torch(sd, net)
    # A unidirectional state dict lacks the backward direction of a bidirectional net.
    net_bi, _ = network("lstm", 2, True)
    with pytest.raises(ValueError, match="missing key 'weight_ih_l0_reverse'"):
        interop.from_torch(torch_module("lstm", 2, False).state_dict(), net_bi)


def test_misshaped_key_is_named():
    net, _ = network("gru", 2, True)
    sd = torch_module("gru", 2, True).state_dict()
    bad = dict(sd, weight_hh_l1_reverse=sd["weight_hh_l1_reverse"][:, :-1])
    with pytest.raises(ValueError, match=r"'weight_hh_l1_reverse' has shape \(15, 4\)"):
        interop.from_torch(bad, net)
    # A different hidden size: the first key already disagrees.
    small = networks.network(cells.gru(H - 1, reset_after=True), 2, True)
    with pytest.raises(ValueError, match="'weight_ih_l0' has shape"):
        interop.from_torch(sd, small)
    # An LSTM's weights into a GRU network.
    with pytest.raises(ValueError, match="'weight_ih_l0' has shape"):
        interop.from_torch(torch_module("lstm", 2, True).state_dict(), net)


def test_unexpected_keys_are_named():
    net, _ = network("rnn_tanh", 2, False)
    sd3 = tnn.RNN(I, H, num_layers=3, batch_first=True).state_dict()
    with pytest.raises(ValueError, match="unexpected keys.*'weight_ih_l2'"):
        interop.from_torch(sd3, net)
    # A bidirectional state dict into a unidirectional net.
    net_1, _ = network("rnn_tanh", 1, False)
    sd_bi = torch_module("rnn_tanh", 1, True).state_dict()
    with pytest.raises(ValueError, match="unexpected keys.*'weight_ih_l0_reverse'"):
        interop.from_torch(sd_bi, net_1)
    # Deeper layers of a bidirectional net read 2H features: the shape says so.
    with pytest.raises(ValueError, match=r"'weight_ih_l1' has shape \(5, 10\)"):
        interop.from_torch(torch_module("rnn_tanh", 2, True).state_dict(), net)
    # An LSTM with a projection (proj_size) is refused by name: its h is not H wide.
    net_lstm, _ = network("lstm", 1, False)
    sd_proj = tnn.LSTM(I, H, proj_size=2, batch_first=True).state_dict()
    with pytest.raises(ValueError, match=r"weight_hr_l\* keys, an nn.LSTM with proj_size > 0"):
        interop.from_torch(sd_proj, net_lstm)
    del sd_proj["weight_hh_l0"]  # even one without the recurrent weights
    with pytest.raises(ValueError, match="proj_size > 0"):
        interop.from_torch(sd_proj, net_lstm)


def test_reset_before_gru_is_refused():
    sd = torch_module("gru", 1, False).state_dict()
    net = networks.network(cells.gru(H, reset_after=False))
    with pytest.raises(ValueError, match="reset_after=True"):
        interop.from_torch(sd, net)
    params = random_params(net, 0)
    with pytest.raises(ValueError, match="reset_after=True"):
        interop.to_torch(params, net)


def test_cells_computing_another_function_are_refused():
    """A pinned gate or a cell changed with _replace would take PyTorch's weights
    into another function (a pinned reset gate differed from nn.GRU by 0.2)."""
    sd = torch_module("gru", 1, False).state_dict()
    pinned = networks.network(cells.gru(H, reset_after=True, pin_update=0.5))
    gru = cells.gru(H, reset_after=True)
    changed = networks.network(gru._replace(step=lambda p, c, x: gru.step(p, c, 2 * x)))
    for net, match in ((pinned, "pin_update=0.5 fixes a gate"), (changed, "changed with _replace")):
        with pytest.raises(ValueError, match=match):
            interop.from_torch(sd, net)
        with pytest.raises(ValueError, match=match):
            interop.to_torch(random_params(net, 0), net)


def test_to_torch_names_params_of_another_structure():
    uni = networks.network(cells.lstm(H), 2)
    bi = networks.network(cells.lstm(H), 2, True)
    with pytest.raises(ValueError, match=r"params\['layer_0'\]\['forward'\]: missing.*bidir"):
        interop.to_torch(random_params(uni, 0), bi)
    with pytest.raises(ValueError, match=r"params\['layer_1'\]: missing"):
        interop.to_torch({"layer_0": random_params(uni, 0)["layer_0"]}, uni)


def test_prefix_selects_a_submodule():
    class Model(tnn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = tnn.GRU(I, H, num_layers=2, batch_first=True)
            self.head = tnn.Linear(H, 2)

    torch.manual_seed(8)
    model = Model()
    net, _ = network("gru", 2, False)
    params = interop.from_torch(model.state_dict(), net, prefix="rnn.")
    jax.tree.map(
        np.testing.assert_array_equal, params, interop.from_torch(model.rnn.state_dict(), net)
    )
    with pytest.raises(ValueError, match="missing key 'weight_ih_l0'"):
        interop.from_torch(model.state_dict(), net)


def test_conversions_copy_and_accept_low_precision():
    net, _ = network("rnn_tanh", 1, False)
    module = tnn.RNN(1, H, batch_first=True)  # I = 1: W_ih.T would be a contiguous view
    params = interop.from_torch(module.state_dict(keep_vars=True), net)  # requires_grad
    with torch.no_grad():
        module.weight_ih_l0.add_(1.0)  # in-place training must not reach our params
    np.testing.assert_array_equal(params["layer_0"]["W_x"] + 1.0, module.weight_ih_l0.T.detach())

    sd = interop.to_torch(params, net)
    sd["bias_ih_l0"] += 1.0  # nor may edits of the exported dict
    assert not np.array_equal(params["layer_0"]["b"], interop.from_torch(sd, net)["layer_0"]["b"])
    assert all(v.flags.writeable for v in sd.values())

    # bfloat16 and float64 modules convert to float32 params.
    for dtype in (torch.bfloat16, torch.float64):
        low = interop.from_torch(module.to(dtype).state_dict(), net)
        want = interop.from_torch({k: v.float() for k, v in module.state_dict().items()}, net)
        assert all(v.dtype == np.float32 for v in jax.tree.leaves(low))
        jax.tree.map(np.testing.assert_array_equal, low, want)


def test_to_torch_refuses_params_of_another_network():
    """Params of another hidden size, GRU form or direction count are refused by the
    path that differs, not turned into a state dict of the wrong sizes."""
    lstm7 = networks.network(cells.lstm(7)).init(jax.random.key(0), 5)
    gru_before = networks.network(cells.gru(4)).init(jax.random.key(0), 3)
    bi = networks.network(cells.lstm(7), bidirectional=True).init(jax.random.key(0), 5)
    cases = [
        (lstm7, networks.network(cells.lstm(6)), r"\['W_h'\]: expected shape \(6, 4, 6\)"),
        (gru_before, networks.network(cells.gru(4, reset_after=True)), r"\['b_hn'\]: missing"),
        (bi, networks.network(cells.lstm(7)), r"\['W_x'\]: missing.*unidirectional lstm"),
        (lstm7, networks.network(cells.lstm(7), bidirectional=True), r"forward'\]: missing"),
    ]
    for params, net, match in cases:
        with pytest.raises(ValueError, match=match):
            interop.to_torch(params, net)
    assert len(interop.to_torch(lstm7, networks.network(cells.lstm(7)))) == 4


def test_modules_without_biases_load_and_projections_are_refused():
    """nn.LSTM(bias=False) computes what zero biases compute; proj_size and a module
    passed for its state dict are refused by name (they gave shape or type errors)."""
    torch.manual_seed(0)
    module = torch.nn.LSTM(I, H, 2, bias=False, batch_first=True, bidirectional=True)
    net = networks.network(cells.lstm(H), 2, True)
    params = interop.from_torch(module.state_dict(), net)
    x = np.random.default_rng(0).normal(size=(2, 5, I)).astype(np.float32)
    want = module(torch.from_numpy(x))[0].detach().numpy()
    np.testing.assert_allclose(net.apply_batch(params, jnp.asarray(x))[0], want, atol=1e-5)
    assert all(
        not np.any(params[f"layer_{i}"][d]["b"]) for i in (0, 1) for d in ("forward", "backward")
    )
    with pytest.raises(ValueError, match="proj_size > 0"):
        interop.from_torch(
            torch.nn.LSTM(I, H, proj_size=2).state_dict(), networks.network(cells.lstm(H))
        )
    with pytest.raises(ValueError, match="got a LSTM module; pass module.state_dict"):
        interop.from_torch(torch.nn.LSTM(I, H), networks.network(cells.lstm(H)))


def test_to_torch_writes_into_a_submodule_and_a_module_without_biases():
    """``prefix`` and ``bias=False`` give state dicts that a strict load_state_dict
    takes; the module then computes what the rnn_jax network computes."""

    class Model(tnn.Module):
        def __init__(self, bias):
            super().__init__()
            self.rnn = tnn.GRU(I, H, num_layers=2, batch_first=True, bias=bias)
            self.head = tnn.Linear(H, 2)

    net, _ = network("gru", 2, False)
    params = random_params(net, 3)
    x = np.random.default_rng(1).normal(size=(2, 5, I)).astype(np.float32)
    want = np.asarray(net.apply_batch(params, jnp.asarray(x))[0])

    model = Model(bias=True)
    sd = interop.to_torch(params, net, prefix="rnn.")
    assert sorted(sd) == sorted(k for k in model.state_dict() if k.startswith("rnn."))
    model.load_state_dict(
        {**{k: torch.from_numpy(v) for k, v in sd.items()}, **model.head.state_dict(prefix="head.")}
    )
    np.testing.assert_allclose(model.rnn(torch.from_numpy(x))[0].detach(), want, atol=1e-5)

    # bias=False: only zero biases can be left out; the first nonzero one is named
    with pytest.raises(ValueError, match=r"params\['layer_0'\]\['b'\]: nonzero, but bias=False"):
        interop.to_torch(params, net, bias=False)
    zero = jax.tree_util.tree_map_with_path(
        lambda path, v: np.zeros_like(v) if path[-1].key in ("b", "b_hn") else v, params
    )
    unbiased = Model(bias=False).rnn
    sd = interop.to_torch(zero, net, bias=False)
    unbiased.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})  # strict
    want = np.asarray(net.apply_batch(zero, jnp.asarray(x))[0])
    np.testing.assert_allclose(unbiased(torch.from_numpy(x))[0].detach(), want, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, interop.from_torch(sd, net), zero)
    with pytest.raises(ValueError, match="prefix: expected a str"):
        interop.to_torch(params, net, prefix=None)
