"""The synthetic long-range tasks: shapes, dtypes, determinism, labels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import tasks


@pytest.mark.parametrize("length", [2, 3, 10, 200, 257])
def test_adding_shapes_and_dtypes(length):
    xs, y = tasks.adding(0, 5, length)
    assert xs.shape == (5, length, 2) and xs.dtype == jnp.float32
    assert y.shape == (5,) and y.dtype == jnp.float32


def test_adding_exactly_two_markers_one_per_half_and_target_is_their_sum():
    length = 200
    xs, y = (np.asarray(a) for a in tasks.adding(jax.random.key(3), 64, length))
    values, markers = xs[..., 0], xs[..., 1]
    assert set(np.unique(markers)) == {0.0, 1.0}
    np.testing.assert_array_equal(markers.sum(axis=1), 2)
    np.testing.assert_array_equal(markers[:, : length // 2].sum(axis=1), 1)
    np.testing.assert_array_equal(markers[:, length // 2 :].sum(axis=1), 1)
    assert values.min() >= 0 and values.max() < 1
    for b in range(64):
        i, j = np.flatnonzero(markers[b])
        np.testing.assert_allclose(y[b], values[b, i] + values[b, j], rtol=1e-6)


def test_adding_marker_positions_cover_both_halves():
    xs, _ = tasks.adding(1, 2000, 10)
    first = np.argmax(np.asarray(xs[:, :5, 1]), axis=1)
    second = 5 + np.argmax(np.asarray(xs[:, 5:, 1]), axis=1)
    assert set(first) == set(range(5)) and set(second) == set(range(5, 10))
    # drawn independently: every (first, second) pair occurs (25 pairs, 2000 draws)
    assert len(set(zip(first.tolist(), second.tolist(), strict=True))) == 25


def test_adding_baseline_is_the_variance_of_the_target():
    _, y = tasks.adding(0, 20_000, 50)
    y = np.asarray(y)
    assert abs(y.mean() - 1.0) < 0.02
    assert abs(np.mean((y - 1.0) ** 2) - tasks.ADDING_BASELINE_MSE) < 0.01
    assert tasks.ADDING_BASELINE_MSE == pytest.approx(1 / 6)


def test_adding_is_deterministic_by_seed_and_key():
    a = tasks.adding(7, 8, 30)
    b = tasks.adding(jax.random.key(7), 8, 30)
    c = tasks.adding(8, 8, 30)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], c[0])


def test_seeds_of_any_integer_type_and_traced_ones_are_keys():
    """numpy and JAX integer seeds, and one traced under jit (a step counter), give the
    int seed's batch (they raised JAX's "invalid PRNG key data"); a bool, a float or
    a batch of seeds is refused by name."""
    want = tasks.adding(3, 2, 5)
    for seed in (np.int64(3), jnp.int32(3), jax.random.key(3)):
        got = tasks.adding(seed, 2, 5)
        np.testing.assert_array_equal(got[0], want[0])
    traced = jax.jit(lambda s: tasks.adding(s, 2, 5)[1])(jnp.int32(3))
    np.testing.assert_array_equal(traced, want[1])
    for bad in (True, 1.5, jnp.arange(3)):
        with pytest.raises(ValueError, match="key: expected a PRNG key or an integer seed"):
            tasks.adding(bad, 2, 5)


def test_adding_runs_under_jit():
    f = jax.jit(tasks.adding, static_argnums=(1, 2))
    xs, y = f(jax.random.key(0), 4, 12)
    ref = tasks.adding(0, 4, 12)
    np.testing.assert_array_equal(xs, ref[0])
    np.testing.assert_allclose(y, ref[1], rtol=1e-6)


@pytest.mark.parametrize("length,num_copy", [(7, 3), (10, 3), (200, 5), (3, 1)])
def test_copy_shapes_dtypes_and_layout(length, num_copy):
    ids, symbols = (
        np.asarray(a) for a in tasks.copy(0, 16, length, num_symbols=8, num_copy=num_copy)
    )
    assert ids.shape == (16, length) and ids.dtype == np.int32
    assert symbols.shape == (16, num_copy) and symbols.dtype == np.int32
    marker = 8 + 1
    # the target is the input symbols
    np.testing.assert_array_equal(ids[:, :num_copy], symbols)
    assert symbols.min() >= 1 and symbols.max() <= 8
    np.testing.assert_array_equal(ids[:, length - num_copy - 1], marker)
    blanks = np.delete(ids, [*range(num_copy), length - num_copy - 1], axis=1)
    np.testing.assert_array_equal(blanks, tasks.BLANK)
    assert ids.max() < tasks.copy_vocab_size(8)


def test_copy_hand_made_layout():
    ids, symbols = tasks.copy(5, 1, 9, num_symbols=3, num_copy=2)
    s = [int(v) for v in np.asarray(symbols)[0]]
    assert np.asarray(ids)[0].tolist() == [s[0], s[1], 0, 0, 0, 0, 4, 0, 0]


def test_copy_is_deterministic_by_seed_and_uses_every_symbol():
    a = tasks.copy(2, 100, 20)
    b = tasks.copy(jax.random.key(2), 100, 20)
    c = tasks.copy(3, 100, 20)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[1], c[1])
    assert set(np.unique(np.asarray(a[1]))) == set(range(1, 9))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: tasks.adding(0, 0, 10), "batch_size"),
        (lambda: tasks.adding(0, 2, 1), "length"),
        (lambda: tasks.copy(0, 2, 6, num_copy=3), r"length: expected >= 2 \* num_copy \+ 1 = 7"),
        (lambda: tasks.copy(0, 2, 20, num_symbols=0), "num_symbols"),
        (lambda: tasks.copy(0, 2, 20, num_copy=0), "num_copy"),
        (lambda: tasks.adding(0, 2.0, 10), "batch_size"),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
