"""The flax.linen wrapper (rnn_jax.linen.RNN) against the pure network it wraps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nn = pytest.importorskip("flax.linen")
flax_core = pytest.importorskip("flax.core")

from rnn_jax import BiCarry, cells, networks  # noqa: E402
from rnn_jax.linen import RNN  # noqa: E402

I, H, T, OUT = 3, 4, 5, 2
LENGTHS = np.array([T, 2, 0], np.int32)
B = len(LENGTHS)
TOL = dict(rtol=1e-5, atol=1e-6)
DROPOUT = 0.5


class Model(nn.Module):
    """A bidirectional two-layer GRU with a dense head."""

    dropout: float = DROPOUT

    @nn.compact
    def __call__(self, xs, lengths=None, deterministic=True):
        ys, final = RNN(
            cell="gru",
            hidden_size=H,
            num_layers=2,
            bidirectional=True,
            dropout=self.dropout,
            cell_options=(("reset_after", True),),
            name="rnn",
        )(xs, lengths, deterministic=deterministic)
        return nn.Dense(OUT, name="head")(ys), ys, final


MODEL = Model()
# The same network, built without the wrapper.
NET = networks.network(cells.gru(H, reset_after=True), 2, True, dropout=DROPOUT)


def random_xs(seed, shape=(B, T, I)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def dropout_loss(params, key):
    """A masked squared error through the model with dropout on, and its outputs."""
    xs, target = random_xs(4), random_xs(5, (B, T, OUT))
    out = MODEL.apply({"params": params}, xs, LENGTHS, deterministic=False, rngs={"dropout": key})
    mask = (jnp.arange(T)[None, :] < LENGTHS[:, None])[..., None]
    return jnp.sum(mask * (out[0] - target) ** 2), out


# Compiled once, shared by the tests (compiling init's orthogonal initialiser alone
# would take seconds, so the tests take init's structure and draw the values).
# ``apply`` always gets a "dropout" stream: with deterministic=True (the default) the
# stream must be ignored, which every comparison with NET.apply_batch then shows.
apply = jax.jit(lambda v, xs, n: MODEL.apply(v, xs, n, rngs={"dropout": jax.random.key(9)}))
net_apply_batch = jax.jit(NET.apply_batch)
dropout_value_and_grad = jax.jit(jax.value_and_grad(dropout_loss, has_aux=True))


def init_shapes(xs=None, lengths=LENGTHS):
    xs = random_xs(0) if xs is None else xs
    return jax.eval_shape(MODEL.init, jax.random.key(0), xs, lengths)


@functools.cache
def variables():
    """Variables of ``MODEL.init``'s structure; every entry random (biases too)."""
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape), jnp.float32), init_shapes()
    )


def network_params():
    return variables()["params"]["rnn"]["network"]


def assert_trees_close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **(tol or TOL)), a, b)


def test_init_puts_the_network_params_under_params_rnn_network():
    v = init_shapes()
    assert set(v) == {"params"}
    assert set(v["params"]) == {"rnn", "head"}
    assert set(v["params"]["rnn"]) == {"network"}
    want = jax.eval_shape(lambda key: NET.init(key, I), jax.random.key(0))
    got = v["params"]["rnn"]["network"]
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert jax.tree.map(lambda s: (s.shape, s.dtype), got) == jax.tree.map(
        lambda s: (s.shape, s.dtype), want
    )
    assert jax.tree.map(lambda s: s.shape, v["params"]["head"]) == {
        "kernel": (2 * H, OUT),
        "bias": (OUT,),
    }
    # The module's own network() is the same network.
    wrapped = RNN(
        cell="gru",
        hidden_size=H,
        num_layers=2,
        bidirectional=True,
        cell_options=(("reset_after", True),),
    ).network()
    assert wrapped.cell.name == "gru" and wrapped.cell.options["reset_after"] is True
    assert (wrapped.num_layers, wrapped.bidirectional) == (2, True)


def test_outputs_equal_apply_batch_with_the_same_params():
    v = variables()
    xs = random_xs(1)
    valid = jnp.arange(T)[None, :, None] < LENGTHS[:, None, None]
    garbage = jnp.where(valid, xs, 1e3)  # padding must have no effect
    logits, ys, final = apply(v, garbage, LENGTHS)
    want_ys, want_final = net_apply_batch(network_params(), xs, LENGTHS)
    np.testing.assert_allclose(ys, want_ys, **TOL)
    assert_trees_close(final, want_final)
    assert isinstance(final[0], BiCarry) and len(final) == 2
    head = v["params"]["head"]
    np.testing.assert_allclose(logits, ys @ head["kernel"] + head["bias"], **TOL)
    # Lengths work: exact zeros past them, and a length-0 sequence keeps the zero carry.
    for b, n in enumerate(LENGTHS):
        np.testing.assert_array_equal(ys[b, n:], 0.0)
    assert_trees_close(jax.tree.map(lambda x: x[2], final), NET.initial_carry(), rtol=0, atol=0)
    # Without lengths every step counts: the same for the full-length sequence only.
    ys_full = apply(v, garbage, None)[1]
    np.testing.assert_allclose(ys_full[0], ys[0], **TOL)
    assert np.abs(ys_full[1:]).max() > 1e-3 and not np.allclose(ys_full[1], ys[1])


def test_frozen_variables_work():
    v = variables()
    xs = random_xs(2)
    want = apply(v, xs, LENGTHS)
    got = apply(flax_core.freeze(v), xs, LENGTHS)
    assert_trees_close(got, want, rtol=0, atol=0)


def test_dropout_only_when_not_deterministic_and_given_a_key():
    v = variables()
    xs = random_xs(4)  # the input of dropout_loss
    _, ys, final = apply(v, xs, LENGTHS)
    # deterministic=True (the default) ignores the dropout stream that ``apply`` gives.
    np.testing.assert_allclose(ys, net_apply_batch(network_params(), xs, LENGTHS)[0], **TOL)
    # deterministic=False needs the "dropout" stream.
    with pytest.raises(Exception, match="dropout"):
        MODEL.apply(v, xs, LENGTHS, deterministic=False)

    (_, (_, ys1, final1)), _ = dropout_value_and_grad(v["params"], jax.random.key(1))
    (_, (_, ys1_again, _)), _ = dropout_value_and_grad(v["params"], jax.random.key(1))
    (_, (_, ys2, _)), _ = dropout_value_and_grad(v["params"], jax.random.key(2))
    np.testing.assert_array_equal(ys1, ys1_again)  # the key decides the mask
    assert not np.allclose(ys1[0], ys[0])
    assert not np.allclose(ys1[0], ys2[0])
    # PyTorch-style: between layers only, so layer 0 is untouched and layer 1 changes.
    assert_trees_close(final1[0], final[0])
    assert not np.allclose(final1[1].forward[0], final[1].forward[0])
    # Padding stays exactly zero under dropout too.
    for b, n in enumerate(LENGTHS):
        np.testing.assert_array_equal(ys1[b, n:], 0.0)
    # With rate 0, deterministic=False needs no key and changes nothing.
    no_dropout = jax.jit(lambda v, xs, n: Model(dropout=0.0).apply(v, xs, n, deterministic=False))
    np.testing.assert_array_equal(no_dropout(v, xs, LENGTHS)[1], ys)


def test_jit_and_grad_through_the_module():
    v = variables()
    xs = random_xs(4)
    target = random_xs(5, (B, T, OUT))
    mask = (jnp.arange(T)[None, :] < LENGTHS[:, None])[..., None]

    def loss(params):
        logits = MODEL.apply({"params": params}, xs, LENGTHS)[0]
        return jnp.sum(mask * (logits - target) ** 2)

    def pure_loss(params):
        ys, _ = NET.apply_batch(params["rnn"]["network"], xs, LENGTHS)
        logits = ys @ params["head"]["kernel"] + params["head"]["bias"]
        return jnp.sum(mask * (logits - target) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss))(v["params"])
    want_value, want_grads = jax.jit(jax.value_and_grad(pure_loss))(v["params"])
    np.testing.assert_allclose(value, want_value, **TOL)
    assert_trees_close(grads, want_grads, rtol=1e-5, atol=1e-5)
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))

    # Through dropout: finite, and every parameter gets a gradient.
    (value, _), grads = dropout_value_and_grad(v["params"], jax.random.key(6))
    assert np.isfinite(value)
    assert jax.tree.structure(grads) == jax.tree.structure(v["params"])
    assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


def test_unbatched_input():
    v = variables()
    xs = random_xs(7)
    logits, ys, final = apply(v, xs, LENGTHS)
    for b in (0, 1):  # full length and a padded one
        got = apply(v, xs[b], LENGTHS[b])
        assert got[1].shape == (T, 2 * H)
        assert_trees_close(got, jax.tree.map(lambda x, b=b: x[b], (logits, ys, final)))
    # Init from one sequence gives the same parameters.
    shapes = jax.tree.map(lambda s: s.shape, init_shapes(xs[0], LENGTHS[0]))
    assert shapes == jax.tree.map(jnp.shape, variables())


def test_the_network_is_built_once_per_set_of_attributes():
    """``RNN.network()`` is cached by the module's attributes: its trace-time checks
    (params against ``init``'s shapes, an ``eval_shape``) run once, not on every call."""
    a, b = RNN("gru", 8, cell_options=(("reset_after", True),)), RNN("gru", 8)
    assert a.network() is a.network()
    assert a.network() is RNN("gru", 8, cell_options=(("reset_after", True),)).network()
    assert a.network() is not b.network()
    assert a.network().cell.options["reset_after"] and not b.network().cell.options["reset_after"]
    # an unhashable option value (an array) still works, built each time
    pinned = RNN("gru", 8, cell_options=(("pin_reset", jnp.asarray(1.0)),))
    assert pinned.network() is not pinned.network()
    assert float(pinned.network().cell.options["pin_reset"]) == 1.0
    # the cache tells 8.0 from 8 (they hash alike): a float size is checked, and refused
    with pytest.raises(ValueError, match="hidden_size: expected a positive int, got 8.0"):
        RNN("gru", 8.0).network()
    with pytest.raises(ValueError, match="cell_options: gru.* unexpected keyword .*reset_afterr"):
        RNN("gru", 8, cell_options={"reset_afterr": True}).network()


def test_matmul_dtype_and_directions_reach_the_network():
    xs = jnp.ones((2, 3, 4))
    fast = RNN("lstm", 8, bidirectional=True, matmul_dtype="bfloat16", directions="separate")
    assert (fast.network().matmul_dtype, fast.network().directions) == ("bfloat16", "separate")
    variables = fast.init(jax.random.key(0), xs)
    ys, _ = fast.apply(variables, xs)
    want, _ = fast.network().apply_batch(variables["params"]["network"], xs)
    np.testing.assert_array_equal(ys, want)


def test_cell_options_as_a_mapping_and_dropout_needs_two_layers():
    """``cell_options`` as a dict works like (name, value) pairs, anything else is
    refused by name; one layer applies no dropout, so it asks for no dropout RNG."""
    xs = jnp.ones((2, 3, 4))
    as_dict = RNN("gru", 5, cell_options={"reset_after": True})
    as_pairs = RNN("gru", 5, cell_options=(("reset_after", True),))
    assert as_dict.network().cell.options["reset_after"] is True
    variables = as_dict.init(jax.random.key(0), xs)
    np.testing.assert_array_equal(as_dict.apply(variables, xs)[0], as_pairs.apply(variables, xs)[0])
    with pytest.raises(ValueError, match=r"cell_options: expected a mapping"):
        RNN("gru", 5, cell_options=("reset_after",)).init(jax.random.key(0), xs)
    one = RNN("lstm", 5, dropout=0.5)
    with pytest.warns(UserWarning, match="num_layers=1 does nothing"):  # as PyTorch warns
        variables = one.init(jax.random.key(0), xs)
    np.testing.assert_array_equal(
        one.apply(variables, xs, deterministic=False)[0], one.apply(variables, xs)[0]
    )
