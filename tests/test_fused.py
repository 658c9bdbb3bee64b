"""The fused implementation (hand-written backward passes) against the autodiff scan.

Two independent checks: finite differences of the fused layer in float64
(``check_grads``, which never looks at autodiff of the scan), and equality of values
and gradients with the reference ``"scan"`` network in float32 (1e-5) over every
cell, depth, direction, variable lengths, initial carries, token ids, dropout,
remat and unroll.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rnn_jax import cells, fused, models, native, networks
from rnn_jax.config import ConfigError, TrainConfig, validate

I, H, T, B = 3, 4, 6, 4
TOL = dict(rtol=1e-5, atol=1e-5)
LENGTHS = np.array([T, 0, 3, 1], np.int32)

CELLS = {
    "rnn": lambda: cells.rnn(H),
    "rnn_relu": lambda: cells.rnn(H, "relu"),
    "gru": lambda: cells.gru(H),
    "gru_after": lambda: cells.gru(H, reset_after=True),
    "gru_pinned": lambda: cells.gru(H, pin_reset=1.0, pin_update=0.25),
    "gru_after_pinned": lambda: cells.gru(H, reset_after=True, pin_reset=0.3, pin_update=0.8),
    "lstm": lambda: cells.lstm(H),
}
# every cell one layer forward-only and two layers bidirectional (layer 1 then reads
# 2H features, and both directions run under vmap); the other mixes add no new path
# (the pinned reset-after GRU, whose pins act in the loop as in one step: one layer)
GRID = [(c, n, b) for c in CELLS if c != "gru_after_pinned" for n, b in ((1, False), (2, True))] + [
    ("gru_after_pinned", 1, False),
    ("lstm", 2, False),
]
GRID_IDS = [f"{c}-L{n}-{'bi' if b else 'uni'}" for c, n, b in GRID]


def nets(cell_name, num_layers, bidirectional, **kw):
    cell = CELLS[cell_name]()
    ref = networks.network(cell, num_layers, bidirectional, implementation="scan", **kw)
    fast = networks.network(cell, num_layers, bidirectional, implementation="fused", **kw)
    params = ref.init(jax.random.key(0), I)
    params = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.key(1), v.shape), params)
    return ref, fast, params


def random(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def batch_carry(net, seed):
    leaves, tree = jax.tree.flatten(net.initial_carry())
    rng = np.random.default_rng(seed)
    return tree.unflatten(
        [jnp.asarray(rng.normal(size=(B, *v.shape)), jnp.float32) for v in leaves]
    )


def loss_fn(net, weights):
    """A loss that reads every output and every final carry with distinct weights."""

    def loss(params, xs, carry, lengths, key=None):
        ys, final = net.apply_batch(params, xs, lengths, carry, dropout_key=key)
        extra = sum(jnp.sum(jnp.sin(v)) for v in jax.tree.leaves(final))
        return jnp.sum(ys * weights) + extra

    return loss


def assert_trees_close(a, b):
    """Leaf by leaf within TOL, plus 1e-6 of the leaf's largest magnitude: a gradient
    element is a float32 sum over time and batch whose rounding follows the sum's
    largest terms (the ReLU RNN, 2 bidirectional layers, on an AVX2 CPU: 0.21083 vs
    0.21082 in a leaf reaching 31.5, 4e-7 of it, over TOL by 1e-6)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        y = np.asarray(y)
        scale = float(np.max(np.abs(y))) if y.size else 0.0
        np.testing.assert_allclose(
            np.asarray(x), y, rtol=TOL["rtol"], atol=TOL["atol"] + 1e-6 * scale
        )


def assert_matches_scan(ref, fast, params, seed):
    """Loss value and gradients (params, inputs, initial carry) of ``fast`` (jitted)
    equal the reference ``ref`` on random inputs with LENGTHS."""
    xs, carry = random(seed, (B, T, I)), batch_carry(ref, seed + 1)
    weights = random(seed + 2, (B, T, ref.output_size))
    args = (params, xs, carry, jnp.asarray(LENGTHS))
    want = jax.jit(jax.value_and_grad(loss_fn(ref, weights), argnums=(0, 1, 2)))(*args)
    got = jax.jit(jax.value_and_grad(loss_fn(fast, weights), argnums=(0, 1, 2)))(*args)
    assert_trees_close(got, want)


@pytest.mark.parametrize("cell_name,num_layers,bidirectional", GRID, ids=GRID_IDS)
def test_fused_equals_scan_values_and_gradients(cell_name, num_layers, bidirectional):
    ref, fast, params = nets(cell_name, num_layers, bidirectional)
    xs = random(2, (B, T, I))
    carry = batch_carry(ref, 3)
    weights = random(4, (B, T, ref.output_size))
    lengths = jnp.asarray(LENGTHS)
    args = (params, xs, carry, lengths)
    v_ref, g_ref = jax.jit(jax.value_and_grad(loss_fn(ref, weights), argnums=(0, 1, 2)))(*args)
    v_fast, g_fast = jax.jit(jax.value_and_grad(loss_fn(fast, weights), argnums=(0, 1, 2)))(*args)
    np.testing.assert_allclose(float(v_fast), float(v_ref), **TOL)
    assert_trees_close(g_fast, g_ref)
    ys, final = fast.apply_batch(params, xs, lengths, carry)
    ys_ref, final_ref = ref.apply_batch(params, xs, lengths, carry)
    assert_trees_close((ys, final), (ys_ref, final_ref))
    assert np.all(np.asarray(ys)[1] == 0)  # length 0: no output
    assert np.all(np.asarray(ys)[3, 1:] == 0)  # past the length: exactly zero
    # length 0 keeps the initial carry bit for bit
    for got, want in zip(jax.tree.leaves(final), jax.tree.leaves(carry), strict=True):
        np.testing.assert_array_equal(np.asarray(got)[1], np.asarray(want)[1])


@pytest.mark.parametrize("cell_name", [c for c in CELLS if c != "gru_after_pinned"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_fused_token_ids_and_no_lengths(cell_name, bidirectional):
    ref, fast, params = nets(cell_name, 2, bidirectional)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, I, (B, T)), jnp.int32)
    weights = random(6, (B, T, ref.output_size))

    def loss(net):
        return lambda p: jnp.sum(net.apply_batch(p, ids)[0] * weights)

    assert_trees_close(jax.jit(jax.grad(loss(fast)))(params), jax.jit(jax.grad(loss(ref)))(params))


# every cell with both options at once; each option alone for the LSTM (the options
# act on the loop, the same code for every cell; CI time)
OPTION_CASES = [(c, dict(remat=True, unroll=2)) for c in ("gru", "gru_after", "lstm", "rnn")] + [
    ("lstm", dict(remat=True)),
    ("lstm", dict(unroll=3)),
]


@pytest.mark.parametrize("cell_name,option", OPTION_CASES)
def test_fused_options_match_scan(cell_name, option):
    ref, _, params = nets(cell_name, 2, True)
    fast = networks.network(ref.cell, 2, True, implementation="fused", **option)
    xs, carry, weights = random(7, (B, T, I)), batch_carry(ref, 8), random(9, (B, T, 2 * H))
    args = (params, xs, carry, jnp.asarray(LENGTHS))
    g_ref = jax.jit(jax.grad(loss_fn(ref, weights), argnums=(0, 1, 2)))(*args)
    g_fast = jax.jit(jax.grad(loss_fn(fast, weights), argnums=(0, 1, 2)))(*args)
    assert_trees_close(g_fast, g_ref)


@pytest.mark.parametrize("cell_name", list(CELLS))
def test_fused_forward_pass_alone_equals_scan(cell_name):
    """Outputs and final carries without differentiation: the loops that save nothing
    (the GRU's loads its inputs through the carry on CPU)."""
    ref, fast, params = nets(cell_name, 2, True)
    xs, carry = random(30, (B, T, I)), batch_carry(ref, 31)
    for lengths in (None, jnp.asarray(LENGTHS)):
        got = jax.jit(fast.apply_batch)(params, xs, lengths, carry)
        assert_trees_close(got, ref.apply_batch(params, xs, lengths, carry))


def test_fused_dropout_draws_the_same_masks_as_scan():
    ref, fast, params = nets("lstm", 3, True, dropout=0.5)
    xs, weights = random(10, (B, T, I)), random(11, (B, T, 2 * H))
    key = jax.random.key(12)
    args = (params, xs, None, jnp.asarray(LENGTHS), key)
    v_ref, g_ref = jax.jit(jax.value_and_grad(loss_fn(ref, weights)))(*args)
    v_fast, g_fast = jax.jit(jax.value_and_grad(loss_fn(fast, weights)))(*args)
    np.testing.assert_allclose(float(v_fast), float(v_ref), **TOL)
    assert_trees_close(g_fast, g_ref)
    assert float(v_fast) != pytest.approx(float(loss_fn(fast, weights)(*args[:4])))  # active


def test_fused_single_sequence_apply_equals_scan():
    ref, fast, params = nets("gru_after", 2, True, dropout=0.3)
    xs, key = random(13, (T, I)), jax.random.key(14)
    carry = jax.tree.map(lambda v: v[0], batch_carry(ref, 15))
    for length in (None, jnp.int32(4), jnp.int32(0)):
        got = fast.apply(params, xs, length, carry, dropout_key=key)
        want = ref.apply(params, xs, length, carry, dropout_key=key)
        assert_trees_close(got, want)


# every cell's backward pass as it runs by default; remat and the chunked backward
# pass (the same kernels, in chunks; equal to the scan in the tests below) for two
# cells each
FD_CASES = [(c, False, 0) for c in CELLS] + [
    ("lstm", True, None),
    ("gru_after", True, None),
    ("gru", False, 4),
    ("rnn", False, 4),
]


@pytest.mark.parametrize("cell_name,remat,chunk", FD_CASES)
def test_fused_layer_matches_finite_differences(cell_name, remat, chunk):
    """Numerical gradients in float64: independent of any autodiff rule. chunk=4: the
    backward pass in chunks of 4 of the 6 steps (the last one padded)."""
    cell = CELLS[cell_name]()
    with jax.enable_x64(True):
        params = cell.init(jax.random.key(0), I)
        params = jax.tree.map(
            lambda v: (v + 0.2 * jax.random.normal(jax.random.key(1), v.shape)).astype(jnp.float64),
            params,
        )
        xs = jnp.asarray(np.random.default_rng(2).normal(size=(T, B, I)))
        carry = jax.tree.map(
            lambda v: jnp.asarray(np.random.default_rng(3).normal(size=(B, *v.shape))),
            cell.initial_carry(),
        )
        lengths = jnp.asarray(LENGTHS)

        def f(p, x, c):
            ys, final = fused.layer(cell, p, c, x, lengths, remat=remat, chunk=chunk)
            return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(v * v) for v in jax.tree.leaves(final))

        check_grads(f, (params, xs, carry), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("remat", [False, True])
def test_language_model_step_is_the_same_with_either_implementation(remat):
    """Token ids into layer 0 (their projection is a row lookup with no input gradient)."""
    config = dict(vocab_size=11, cell="gru", hidden_size=8, num_layers=2, dropout=0.2)
    ref = models.language_model(models.ModelConfig(**config, implementation="scan"))
    fast = models.language_model(models.ModelConfig(**config, implementation="fused", remat=remat))
    params = ref.init(jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 11, (5, 7)), jnp.int32)

    def loss(model):
        def f(p):
            logits, _ = model.apply(p, ids, dropout_key=jax.random.key(2))
            return jnp.mean(models.token_losses(logits, ids))

        return jax.value_and_grad(f)

    assert_trees_close(jax.jit(loss(fast))(params), loss(ref)(params))


@pytest.mark.parametrize("implementation", ["fused", "scan"])
def test_time_major_logits_are_the_batch_major_ones_transposed(implementation):
    """What the training loss uses: the same logits (dropout masks included) and the
    same gradients, only with the time axis first."""
    config = dict(vocab_size=11, cell="lstm", hidden_size=8, num_layers=2, dropout=0.2)
    model = models.language_model(models.ModelConfig(**config, implementation=implementation))
    params = model.init(jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 11, (5, 7)), jnp.int32)
    lengths = jnp.asarray([7, 0, 3, 6, 7], jnp.int32)
    weights = random(3, (5, 7, 11))

    def loss(time_major):
        def f(p):
            logits, final = model.apply(
                p, ids, lengths=lengths, dropout_key=jax.random.key(2), time_major_logits=time_major
            )
            if time_major:
                assert logits.shape == (7, 5, 11)
                logits = jnp.swapaxes(logits, 0, 1)
            return jnp.sum(jnp.sin(logits) * weights), (logits, final)

        return jax.jit(jax.value_and_grad(f, has_aux=True))

    assert_trees_close(loss(True)(params), loss(False)(params))


def test_remat_chunk_size():
    assert fused.chunk_size(1024) == 32 and fused.chunk_size(1000) == 25
    assert fused.chunk_size(32) == 4 and fused.chunk_size(6) == 2
    assert fused.chunk_size(7) == 3 and fused.chunk_size(1) == 1  # 7: the last chunk padded
    for t in range(1, 300):
        k = fused.chunk_size(t)
        assert 1 <= k <= t and k <= 2 * np.sqrt(t) + 1


@pytest.mark.parametrize("cell_name", ["lstm"])
def test_fused_remat_with_a_padded_last_chunk_equals_scan(cell_name, num_steps=7):
    """T prime: the chunks do not divide T, the padded steps must change nothing (the
    chunking and padding are the same code for every cell, so one cell;
    test_fused_options_match_scan runs remat over all of them)."""
    ref, _, params = nets(cell_name, 1, True)
    fast = networks.network(ref.cell, 1, True, implementation="fused", remat=True)
    xs, carry = random(20, (B, num_steps, I)), batch_carry(ref, 21)
    weights = random(22, (B, num_steps, 2 * H))
    for lengths in (None, jnp.asarray([num_steps, 0, 3, num_steps - 1], jnp.int32)):
        args = (params, xs, carry, lengths)
        v_ref, g_ref = jax.jit(jax.value_and_grad(loss_fn(ref, weights), argnums=(0, 1, 2)))(*args)
        grad = jax.jit(jax.value_and_grad(loss_fn(fast, weights), argnums=(0, 1, 2)))
        v_fast, g_fast = grad(*args)
        np.testing.assert_allclose(float(v_fast), float(v_ref), **TOL)
        assert_trees_close(g_fast, g_ref)
        ys_ref, final_ref = ref.apply_batch(params, xs, lengths, carry)
        ys_fast, final_fast = jax.jit(fast.apply_batch)(params, xs, lengths, carry)
        assert ys_fast.shape == (B, num_steps, 2 * H)
        assert_trees_close((ys_fast, final_fast), (ys_ref, final_ref))


def test_network_chunk_option_equals_scan():
    """``network(chunk=K)`` reaches the fused layers: a bidirectional LSTM with its
    backward pass in chunks of 4 (T=6, lengths) against the scan; bad values raise."""
    ref, _, params = nets("lstm", 1, True)
    fast = networks.network(ref.cell, 1, True, implementation="fused", chunk=4)
    assert fast.chunk == 4
    assert_matches_scan(ref, fast, params, 70)
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="chunk"):
            networks.network(ref.cell, chunk=bad)


def test_default_chunk():
    assert fused.default_chunk(1024, "cpu") == 16 and fused.default_chunk(1000, "cpu") == 20
    assert fused.default_chunk(257, "cpu") == 0  # prime: no divisor in [8, 32]
    assert fused.default_chunk(255, "cpu") == 0  # short: one loop
    assert fused.default_chunk(1024, "gpu") == 0 and fused.default_chunk(1024, "tpu") == 0
    for t in range(fused.CHUNK_MIN_STEPS, 2000):
        k = fused.default_chunk(t, "cpu")
        assert k == 0 or (8 <= k <= 32 and t % k == 0)


@pytest.mark.parametrize("cell_name,chunk", [("rnn", 2), ("gru", 2), ("gru_after", 4), ("lstm", 4)])
def test_chunked_backward_equals_scan(cell_name, chunk):
    """The layer with its backward pass in chunks (saved gates, nothing recomputed;
    chunk=4 pads the last of T=6 steps) against the reference scan network: values,
    final carries and gradients of params, inputs and initial carries, with lengths
    and without, float inputs and token ids. The chunking is the same code for every
    cell (only the saved arrays differ): four cells cover both chunk cases, and
    test_fused_layer_matches_finite_differences runs chunk=4 over all six."""
    ref, _, params = nets(cell_name, 1, False)
    cell = ref.cell
    (carry,) = batch_carry(ref, 31)
    weights = random(32, (B, T, H))

    def loss(apply):
        def f(p, xs, c, lengths):
            ys, final = apply(p, xs, c, lengths)
            return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(v)) for v in jax.tree.leaves(final))

        return f

    def fast(p, xs, c, lengths):
        tm = jnp.swapaxes(xs, 0, 1)
        ys, final = fused.layer(cell, p, c, tm, lengths, chunk=chunk)
        return jnp.swapaxes(ys, 0, 1), final

    def slow(p, xs, c, lengths):
        return ref.apply_batch({"layer_0": p}, xs, lengths, (c,))

    for lengths in (jnp.asarray(LENGTHS), None):
        args = (params["layer_0"], random(33, (B, T, I)), carry, lengths)
        want = jax.jit(jax.value_and_grad(loss(slow), argnums=(0, 1, 2)))(*args)
        got = jax.jit(jax.value_and_grad(loss(fast), argnums=(0, 1, 2)))(*args)
        assert_trees_close(got, want)
    vocab = 5
    ids = jnp.asarray(np.random.default_rng(34).integers(0, vocab, (B, T)), jnp.int32)
    token_params = cell.init(jax.random.key(5), vocab)

    def fast_ids(p, c):
        ys, final = fused.layer(cell, p, c, ids.T, chunk=chunk)
        return jnp.sum(jnp.swapaxes(ys, 0, 1) * weights) + jnp.sum(jax.tree.leaves(final)[0])

    def slow_ids(p, c):
        ys, final = ref.apply_batch({"layer_0": p}, ids, None, (c,))
        return jnp.sum(ys * weights) + jnp.sum(jax.tree.leaves(final)[0])

    want = jax.jit(jax.value_and_grad(slow_ids, argnums=(0, 1)))(token_params, carry)
    got = jax.jit(jax.value_and_grad(fast_ids, argnums=(0, 1)))(token_params, carry)
    assert_trees_close(got, want)


def test_long_sequences_chunk_by_default_on_cpu():
    """chunk=None at T=256 on CPU takes the chunked path (K=16) and equals one loop."""
    cell = cells.lstm(3)
    params = cell.init(jax.random.key(0), 2)
    xs = random(40, (256, 2, 2))
    c0 = jax.tree.map(lambda v: jnp.zeros((2, *v.shape)), cell.initial_carry())
    lengths = jnp.asarray([256, 100], jnp.int32)

    def loss(chunk):
        def f(p, x):
            ys, final = fused.layer(cell, p, c0, x, lengths, chunk=chunk)
            return jnp.sum(jnp.sin(ys)) + jnp.sum(final.c)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

    assert fused.default_chunk(256) == (16 if jax.default_backend() == "cpu" else 0)
    text = loss(None).lower(params, xs).as_text()
    assert ("16x2x12" in text) == (jax.default_backend() == "cpu")  # a [n, K, B, G*H] chunk
    assert_trees_close(loss(None)(params, xs), loss(0)(params, xs))
    with pytest.raises(ValueError, match="chunk"):
        fused.layer(cell, params, c0, xs, chunk=-1)
    # the same through a network: a bidirectional layer
    ref = networks.network(cell, 1, True, implementation="scan")
    fast = networks.network(cell, 1, True, implementation="fused")
    net_params = ref.init(jax.random.key(1), 2)
    xs_b = jnp.swapaxes(xs, 0, 1)

    def net_loss(net):
        def f(p, x):
            ys, final = net.apply_batch(p, x, lengths)
            return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(v) for v in jax.tree.leaves(final))

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

    assert_trees_close(net_loss(fast)(net_params, xs_b), net_loss(ref)(net_params, xs_b))


@pytest.mark.parametrize("cell_name", ["gru_after", "lstm"])
def test_bidirectional_directions_under_vmap_equal_scan(cell_name):
    """The fused bidirectional layer with its directions vmapped (``directions="vmap"``;
    what "auto" runs on accelerators): a layer vs the scan. The two calls ("auto" on
    CPU) are in the GRID test above."""
    assert networks.separate_directions("xla", "cpu")
    cell = CELLS[cell_name]()
    ref, _, params = nets(cell_name, 1, True)
    fast = networks.network(cell, 1, True, implementation="fused", directions="vmap")
    assert fast.directions == "vmap"
    assert_matches_scan(ref, fast, params, 60)


def reversed_by_hand(xs, lengths):
    """Each sequence's first L steps of a time-major ``xs`` in reverse order, the
    padding in place: numpy indices, independent of networks.reverse_valid."""
    num_steps, batch = xs.shape[:2]
    lengths = np.full(batch, num_steps) if lengths is None else np.asarray(lengths)
    t = np.arange(num_steps)[:, None]
    index = np.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)
    index = index.reshape(num_steps, batch, *([1] * (xs.ndim - 2)))
    return jnp.take_along_axis(xs, jnp.asarray(index), axis=0)


_REVERSED_BY_HAND: dict = {}  # (cell, no lengths) -> the reference's results


@pytest.mark.parametrize("cell_name", ["rnn", "gru", "gru_after", "lstm"])
@pytest.mark.parametrize(
    "kw",
    [{}, {"chunk": 4}, {"remat": True}, {"unroll": 2}],
    ids=["loop", "chunk", "remat", "unroll"],
)
def test_reverse_layer_reads_the_valid_steps_backwards(cell_name, kw):
    """``fused.layer(reverse=True)``, the backward direction of a bidirectional layer,
    against the forward layer run on each sequence's valid steps reversed and its
    outputs put back in time order: values, final carries and gradients of params,
    inputs and initial carries, with lengths (a 0 among them) and without. One
    loop reads the steps in place; the chunked forms (chunk, remat) reverse copies."""
    ref, _, params = nets(cell_name, 1, False)
    cell, p = ref.cell, params["layer_0"]
    (carry,) = batch_carry(ref, 71)
    xs = jnp.swapaxes(random(72, (B, T, I)), 0, 1)
    weights = random(73, (T, B, H))

    def loss(run, lengths):
        def f(p, xs, c):
            ys, final = run(p, xs, c, lengths)
            return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(v)) for v in jax.tree.leaves(final))

        return f

    def in_place(p, xs, c, lengths):
        return fused.layer(cell, p, c, xs, lengths, reverse=True, **kw)

    def by_hand(p, xs, c, lengths):  # lengths: not traced, numpy indices
        ys, final = fused.layer(cell, p, c, reversed_by_hand(xs, lengths), lengths, chunk=0)
        return reversed_by_hand(ys, lengths), final

    for lengths in (LENGTHS, None):
        args = (p, xs, carry)
        key = (cell_name, lengths is None)  # the reference is the same for every kw
        if key not in _REVERSED_BY_HAND:
            grads = jax.jit(jax.value_and_grad(loss(by_hand, lengths), argnums=(0, 1, 2)))
            _REVERSED_BY_HAND[key] = (
                grads(*args),
                jax.jit(lambda *a, n=lengths: by_hand(*a, n))(*args),
            )
        want, want_forward = _REVERSED_BY_HAND[key]
        got = jax.jit(jax.value_and_grad(loss(in_place, lengths), argnums=(0, 1, 2)))(*args)
        assert_trees_close(got, want)
        # the forward pass alone (no saves: the GRU's prefetching loop)
        lens = None if lengths is None else jnp.asarray(lengths)
        assert_trees_close(jax.jit(in_place)(*args, lens), want_forward)
    hlo = jax.jit(jax.grad(loss(in_place, None))).lower(p, xs, carry).as_text()
    assert ("stablehlo.reverse" in hlo) == bool(kw.get("chunk") or kw.get("remat"))


@pytest.mark.parametrize("kw", [{}, {"chunk": 2}, {"remat": True}], ids=["loop", "chunk", "remat"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_layer_clips_lengths_to_the_sequence(kw, reverse):
    """``fused.layer`` called directly clips lengths to ``[0, T]`` as the networks
    do (the chunked reversal once indexed past the end with a length above T)."""
    ref, _, params = nets("lstm", 1, False)
    cell, p = ref.cell, params["layer_0"]
    (carry,) = batch_carry(ref, 74)
    xs = jnp.swapaxes(random(75, (B, T, I)), 0, 1)
    over = np.array([T + 2, -1, *LENGTHS[2:]], np.int32)
    clipped = np.clip(over, 0, T)

    def run(lengths):
        return fused.layer(cell, p, carry, xs, jnp.asarray(lengths), reverse=reverse, **kw)

    assert_trees_close(jax.jit(run)(over), jax.jit(run)(clipped))


def test_separate_directions():
    assert networks.separate_directions("xla", "cpu")
    assert not networks.separate_directions("xla", "gpu")
    assert not networks.separate_directions("xla", "tpu")
    # the kernels: vmapped, so both directions can run as one grid
    assert not networks.separate_directions("pallas", "gpu")
    assert not networks.separate_directions("pallas", "cpu")
    # an explicit layout wins over the rule, on every backend and kernel
    assert networks.separate_directions("xla", "cpu", directions="separate")
    assert networks.separate_directions("pallas", "gpu", directions="separate")
    assert not networks.separate_directions("xla", "cpu", directions="vmap")
    with pytest.raises(ValueError, match=r"directions: expected one of .*got 'both'"):
        networks.separate_directions("xla", "cpu", directions="both")


@pytest.mark.parametrize("directions,calls", [("vmap", 1), ("separate", 2), ("auto", 2)])
def test_directions_run_one_call_or_two(directions, calls):
    """How many forward loops (the fused layer's scan) one bidirectional layer traces
    to: the option is honoured (auto: two calls on CPU, at any H)."""
    if directions == "auto" and jax.default_backend() != "cpu":
        calls = 1
    for hidden in (8, 256):
        cell = cells.lstm(hidden)
        net = networks.network(cell, 1, True, implementation="fused", directions=directions)
        params = net.init(jax.random.key(0), 3)
        jaxpr = str(jax.make_jaxpr(net.apply_batch)(params, jnp.ones((4, 5, 3))))
        assert jaxpr.count("= scan[") == calls


def test_directions_option_errors():
    for kwargs, match in (
        (dict(bidirectional=False, directions="separate"), "for bidirectional networks"),
        (dict(bidirectional=True, implementation="scan", directions="vmap"), "fused and pallas"),
        (dict(bidirectional=True, directions="both"), "expected one of"),
    ):
        with pytest.raises(ValueError, match=f"directions: .*{match}"):
            networks.network(cells.gru(8), **kwargs)
    for kwargs, match in (
        (dict(directions="vmap"), "for bidirectional networks"),
        (dict(bidirectional=True, implementation="scan", directions="separate"), "fused and"),
        (dict(bidirectional=True, directions="both"), "expected one of"),
    ):
        with pytest.raises(ConfigError, match=f"--directions: .*{match}"):
            validate(TrainConfig(workdir="/tmp/x", **kwargs))
    # auto, or any layout of a bidirectional fused network, passes
    validate(TrainConfig(workdir="/tmp/x", bidirectional=True, directions="vmap"))


def test_choose_implementation():
    # the LSTM on a CPU: its native kernels built for AVX-512 or AVX2 (tests/test_native.py),
    # else the XLA loops
    lstm_cpu = "native" if native.runs_under_auto() else "fused"
    assert networks.choose_implementation(cells.lstm(32), 1024, "cpu") == lstm_cpu
    assert networks.choose_implementation(cells.lstm(256), 64, "cpu") == lstm_cpu
    assert networks.choose_implementation(cells.lstm(20), 64, "cpu") == "fused"
    # the native kernels are float32 only: bfloat16 matmuls run the XLA loops
    bf16 = networks.choose_implementation(cells.lstm(32), 1024, "cpu", matmul_dtype="bfloat16")
    assert bf16 == "fused"
    assert networks.choose_implementation(cells.gru(32), 1024, "cpu") == "fused"
    assert networks.choose_implementation(cells.gru(128), 32, "cpu") == "fused"
    # one unidirectional layer on a GPU: the Pallas kernels where they won (H <= 128)
    assert networks.choose_implementation(cells.lstm(32), 1024, "gpu") == "pallas"
    assert networks.choose_implementation(cells.gru(128, reset_after=True), 32, "gpu") == "pallas"
    assert networks.choose_implementation(cells.gru(128), 32, "gpu") == "fused"  # reset before
    assert networks.choose_implementation(cells.lstm(256), 64, "gpu") == "fused"
    assert networks.choose_implementation(cells.lstm(32), 1024, "tpu") == "fused"
    # bidirectional: both directions' programs must fit at once (2 x 64 for d2l do not)
    bi = dict(bidirectional=True, cores=132)  # an H100's multiprocessors
    assert networks.choose_implementation(cells.lstm(32), 64, "gpu", **bi) == "pallas"
    assert networks.choose_implementation(cells.lstm(128), 32, "gpu", **bi) == "pallas"
    assert networks.choose_implementation(cells.lstm(32), 1024, "gpu", **bi) == "fused"
    assert (
        networks.choose_implementation(cells.lstm(128), 32, "gpu", **bi | {"cores": 31}) == "fused"
    )
    assert networks.choose_implementation(cells.lstm(32), 64, "gpu", num_devices=4) == "fused"
    # a grid that would not fit the GPU at once: the slow unsplit form, so not auto
    assert networks.choose_implementation(cells.lstm(128), 4096, "gpu") == "fused"
    assert networks.choose_implementation(cells.lstm(128), 32, "gpu", cores=4) == "fused"
    assert networks.choose_implementation(cells.lstm(256), 1, "gpu") == "scan"
    assert networks.choose_implementation(cells.lstm(256), 64, "gpu", remat=True) == "fused"
    assert networks.choose_implementation(cells.gru(128), 32, "cpu", remat=True) == "fused"
    # deep networks: the Pallas kernels layer by layer on a GPU where they fit, else
    # the wavefront on accelerators when unidirectional, never on the CPU
    deep = dict(num_layers=2, cores=132)
    assert networks.choose_implementation(cells.lstm(128), 32, "gpu", **deep) == "pallas"
    gru_after = cells.gru(32, reset_after=True)
    assert networks.choose_implementation(gru_after, 1024, "gpu", **deep) == "pallas"
    assert networks.choose_implementation(cells.gru(128), 32, "gpu", **deep) == "wavefront"
    assert networks.choose_implementation(cells.gru(128), 32, "tpu", **deep) == "wavefront"
    assert networks.choose_implementation(cells.gru(128), 32, "cpu", **deep) == "fused"
    assert networks.choose_implementation(cells.lstm(128), 32, "cpu", **deep) == lstm_cpu
    small_gpu = deep | {"cores": 4}
    assert networks.choose_implementation(cells.lstm(128), 32, "gpu", **small_gpu) == "wavefront"
    assert networks.choose_implementation(cells.lstm(1024), 128, "gpu", **deep) == "fused"
    assert networks.choose_implementation(cells.lstm(16), 4, "gpu", **deep, dropout=0.1) == "pallas"
    for other in (dict(bidirectional=True), dict(remat=True), dict(dropout=0.1)):
        assert networks.choose_implementation(cells.lstm(8), 4, "tpu", **deep, **other) == "fused"
    assert networks.choose_implementation(cells.lstm(8), 1, "gpu", **deep) == "scan"


def test_bad_implementation():
    with pytest.raises(ValueError, match="implementation: expected one of"):
        networks.network(cells.lstm(4), implementation="cudnn")


@pytest.mark.parametrize(
    "cell_name,implementation,num_layers",
    [
        ("lstm", "fused", 2),
        ("gru", "fused", 2),
        ("gru_after", "wavefront", 2),
        ("rnn", "wavefront", 2),
    ],
)
def test_bfloat16_matmuls_stay_close_to_float32(cell_name, implementation, num_layers):
    """bfloat16 operands (8-bit mantissa), float32 accumulation: values and gradients
    within a few 1e-3 of float32 here, float32 outputs, and really rounded (not equal)."""
    ref, _, params = nets(cell_name, num_layers, False)
    low = networks.network(
        ref.cell, num_layers, implementation=implementation, matmul_dtype="bfloat16"
    )
    xs, carry, weights = random(40, (B, T, I)), batch_carry(ref, 41), random(42, (B, T, H))
    args = (params, xs, carry, jnp.asarray(LENGTHS))
    v_ref, g_ref = jax.jit(jax.value_and_grad(loss_fn(ref, weights), argnums=(0, 1, 2)))(*args)
    v_low, g_low = jax.jit(jax.value_and_grad(loss_fn(low, weights), argnums=(0, 1, 2)))(*args)
    assert low.apply_batch(params, xs, jnp.asarray(LENGTHS), carry)[0].dtype == jnp.float32
    np.testing.assert_allclose(float(v_low), float(v_ref), rtol=2e-2)
    diffs = []
    for a, b in zip(jax.tree.leaves(g_low), jax.tree.leaves(g_ref), strict=True):
        assert a.dtype == jnp.float32
        diffs.append(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12)))
    assert max(diffs) < 3e-2 and max(diffs) > 1e-6  # close, and rounded
    # float32 gradients, not bfloat16 ones widened: the input weights' gradient
    # (a bfloat16 matmul accumulated in float32) has bits bfloat16 cannot hold
    g = np.asarray(g_low[0]["layer_0"]["W_x"])
    assert np.any(g != np.asarray(jnp.asarray(g).astype(jnp.bfloat16).astype(jnp.float32)))


def test_bad_matmul_dtype():
    with pytest.raises(ValueError, match="matmul_dtype: expected one of"):
        networks.network(cells.lstm(4), matmul_dtype="float16")
    with pytest.raises(ValueError, match="matmul_dtype: 'bfloat16' needs implementation"):
        networks.network(cells.lstm(4), implementation="scan", matmul_dtype="bfloat16")
    with pytest.raises(ValueError, match="matmul_dtype"):
        fused.layer(cells.lstm(4), {}, None, jnp.zeros((2, 1, 3)), matmul_dtype="int8")
    with jax.enable_x64(True):  # bfloat16 matmuls give float32: float64 params refused
        cell = cells.lstm(4)
        params = jax.tree.map(lambda v: v.astype(jnp.float64), cell.init(jax.random.key(0), 3))
        carry = jax.tree.map(lambda v: jnp.zeros((2, *v.shape)), cell.initial_carry())
        with pytest.raises(ValueError, match="needs float32 params, got float64"):
            fused.layer(cell, params, carry, jnp.zeros((5, 2, 3)), matmul_dtype="bfloat16")
        # float64 inputs are named as such (the default carry takes their type)
        net = networks.network(cell, 1, matmul_dtype="bfloat16")
        with pytest.raises(ValueError, match="needs float32 or bfloat16 xs, got float64"):
            net.apply_batch(net.init(jax.random.key(0), 3), jnp.zeros((2, 5, 3), jnp.float64))
