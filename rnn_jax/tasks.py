"""Synthetic long-range tasks: the adding problem and a copy (recall) task.

Both are pure JAX functions of ``(key, batch_size, length)``: the same key (or int
seed) always gives the same batch, they run inside ``jax.jit`` (``batch_size``,
``length`` and the task options are static Python ints), so a training loop can draw
a fresh batch every step on the device::

    xs, y = tasks.adding(key, batch_size=64, length=200)    # <f32>[64, 200, 2], <f32>[64]
    ids, symbols = tasks.copy(key, 64, 200)                  # <i32>[64, 200], <i32>[64, 5]

They measure how far back a recurrent network can carry information: the answer
depends on inputs ``~length`` steps before the step it must be given at.

* Adding problem (Hochreiter & Schmidhuber 1997; the form of Le et al. 2015): two
  input channels, random values ``U(0, 1)`` and a marker channel with exactly two
  ones, one in each half of the sequence; the target is the sum of the two marked
  values, read after the last step. Predicting the mean (1) scores an MSE of
  ``Var(U1 + U2) = 2/12 ~ 0.167`` (:data:`ADDING_BASELINE_MSE`).
* Copy task (after Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016): the first
  ``num_copy`` steps show symbols ``1..num_symbols``, then blanks (0), then a recall
  marker (``num_symbols + 1``) and ``num_copy`` more blanks during which the network
  must emit the symbols in order. Guessing scores an accuracy of ``1 / num_symbols``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

ADDING_BASELINE_MSE = 2.0 / 12.0  # MSE of always predicting E[target] = 1
BLANK = 0  # copy task: the blank / filler token


def _key(key_or_seed: Array | int) -> Array:
    """A JAX PRNG key from a key (typed, or raw ``uint32[K]``) or an integer seed: a
    Python, numpy or JAX integer scalar, traced too (a step counter under ``jit``).
    ValueError for anything else (a bool, a float, a batch of seeds)."""
    x = key_or_seed
    if isinstance(x, bool | np.bool_):
        raise ValueError(f"key: expected a PRNG key or an integer seed, got {x!r}")
    if isinstance(x, int | np.integer):
        return jax.random.key(int(x))
    if isinstance(x, jax.Array | np.ndarray):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return x
        if jnp.issubdtype(x.dtype, jnp.integer) and x.ndim == 0:
            return jax.random.key(x)
        if x.dtype == jnp.uint32 and x.ndim == 1:
            return x  # a raw key
    raise ValueError(
        f"key: expected a PRNG key or an integer seed, got "
        f"{getattr(x, 'dtype', type(x).__name__)}{list(getattr(x, 'shape', []))}"
    )


def _check(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def adding(key: Array | int, batch_size: int, length: int) -> tuple[Array, Array]:
    """A batch of the adding problem.

    Args:
      key: a ``jax.random`` key, or an int seed.
      batch_size: B >= 1.
      length: T >= 2 time steps.

    Returns:
      ``(xs <float32>[B, T, 2], target <float32>[B])``: channel 0 holds the values
      ``U(0, 1)``, channel 1 the markers (exactly two ones per sequence, one at a step
      in ``[0, T//2)`` and one in ``[T//2, T)``); ``target`` is the sum of the two
      values at the marked steps.
    """
    _check("batch_size", batch_size, 1)
    _check("length", length, 2)
    k_values, k_first, k_second = jax.random.split(_key(key), 3)
    values = jax.random.uniform(k_values, (batch_size, length), jnp.float32)
    half = length // 2
    first = jax.random.randint(k_first, (batch_size,), 0, half)
    second = jax.random.randint(k_second, (batch_size,), half, length)
    markers = jax.nn.one_hot(first, length) + jax.nn.one_hot(second, length)
    target = jnp.sum(values * markers, axis=1)
    return jnp.stack([values, markers], axis=-1), target


def copy_vocab_size(num_symbols: int = 8) -> int:
    """Input and output tokens of :func:`copy`: blank, the symbols, the recall marker."""
    return num_symbols + 2


def copy(
    key: Array | int,
    batch_size: int,
    length: int,
    *,
    num_symbols: int = 8,
    num_copy: int = 5,
) -> tuple[Array, Array]:
    """A batch of the copy (delayed recall) task.

    The sequence of ``length`` T tokens is::

        s_1 .. s_K   0 .. 0   M   0 .. 0
        <-- K -->  <T-2K-1>  1   <-- K -->   (the network answers s_1..s_K here)

    with K = ``num_copy`` symbols ``s_k`` drawn uniformly from ``1..num_symbols``,
    blank 0 and recall marker ``M = num_symbols + 1``. The delay between seeing
    ``s_k`` and having to emit it is ``T - K`` steps.

    Args:
      key: a ``jax.random`` key, or an int seed.
      batch_size: B >= 1.
      length: T >= 2K + 1.
      num_symbols: distinct symbols (>= 1); the vocabulary has
        :func:`copy_vocab_size` ``= num_symbols + 2`` tokens.
      num_copy: K >= 1 symbols to remember.

    Returns:
      ``(ids <int32>[B, T], symbols <int32>[B, K])``: the input token ids (one-hot
      inputs for :mod:`rnn_jax.networks`) and the targets, which are the first K
      inputs; the network's outputs at the last K steps, ``ys[:, -K:]``, are scored
      against them.
    """
    _check("batch_size", batch_size, 1)
    _check("num_symbols", num_symbols, 1)
    _check("num_copy", num_copy, 1)
    _check("length", length, 1)
    if length < 2 * num_copy + 1:
        raise ValueError(f"length: expected >= 2 * num_copy + 1 = {2 * num_copy + 1}, got {length}")
    symbols = jax.random.randint(
        _key(key), (batch_size, num_copy), 1, num_symbols + 1, dtype=jnp.int32
    )
    ids = jnp.zeros((batch_size, length), jnp.int32)
    ids = ids.at[:, :num_copy].set(symbols)
    ids = ids.at[:, length - num_copy - 1].set(num_symbols + 1)
    return ids, symbols
