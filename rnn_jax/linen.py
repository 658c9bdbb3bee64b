"""A thin flax.linen wrapper, so rnn_jax networks drop into a Flax model.

::

    class Model(nn.Module):
        @nn.compact
        def __call__(self, xs, lengths):
            ys, _ = rnn_jax.linen.RNN("gru", 64, num_layers=2)(xs, lengths)
            return nn.Dense(10)(ys)

The network's params live in the Flax variable tree under ``params/<name>/network``
with the same structure as ``networks.network(...).init`` returns.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.core
import flax.linen as nn
import jax

from rnn_jax import cells, networks


class RNN(nn.Module):
    """Runs ``networks.network(cells.make(cell, hidden_size, **cell_options), ...)``.

    Attributes:
      cell: ``"rnn"``, ``"gru"`` or ``"lstm"``.
      hidden_size: H.
      num_layers, bidirectional, dropout, unroll, remat, hoist_input, implementation,
        matmul_dtype, directions: as in :func:`rnn_jax.networks.network`.
      input_size: needed only for integer token-id inputs (one-hot vectors of this
        size); float inputs give it by their last axis.
      cell_options: extra keyword options of the cell factory, as a mapping
        (``{"reset_after": True}``) or as ``(name, value)`` pairs
        (``(("reset_after", True),)``).

    Call with ``xs <float32>[B, T, I]`` (or one sequence ``[T, I]``), optional
    ``lengths <int32>[B]`` and initial carry; returns ``(ys, final)`` as
    ``Network.apply_batch``. Dropout (between layers, so only when ``num_layers >
    1``) is active when ``deterministic=False`` and draws from the ``"dropout"`` PRNG
    stream.
    """

    cell: str = "lstm"
    hidden_size: int = 128
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    unroll: int | None = None
    remat: bool = False
    hoist_input: bool | None = None
    implementation: str = "auto"
    matmul_dtype: str = "float32"
    directions: str = "auto"
    cell_options: Mapping[str, Any] | tuple[tuple[str, Any], ...] = ()
    input_size: int | None = None

    def network(self) -> networks.Network:
        """The :class:`rnn_jax.networks.Network` this module runs: one object per set
        of attributes (cached), so that its trace-time work (the check of the params
        against ``init``'s shapes) is done once, not on every call."""
        args = (
            self.cell,
            self.hidden_size,
            _option_pairs(self.cell_options),
            self.num_layers,
            self.bidirectional,
            self.dropout,
            self.unroll,
            self.remat,
            self.hoist_input,
            self.implementation,
            self.matmul_dtype,
            self.directions,
        )
        try:
            hash(args)
        except TypeError:  # an unhashable cell option (e.g. a list): built each time
            return _network.__wrapped__(*args)
        return _network(*args)

    @nn.compact
    def __call__(
        self,
        xs: jax.Array,
        lengths: jax.Array | None = None,
        initial_carry: Any = None,
        *,
        deterministic: bool = True,
    ) -> tuple[jax.Array, tuple]:
        net = self.network()
        tokens = cells.is_token_input(xs)
        if tokens and self.input_size is None:
            raise ValueError(
                "input_size: token-id inputs stand for one-hot vectors; set input_size to "
                "the vocabulary size"
            )
        size = self.input_size if tokens else xs.shape[-1]
        params = self.param("network", lambda key: net.init(key, size))
        if isinstance(params, flax.core.FrozenDict):  # variables passed through flax.core.freeze
            params = params.unfreeze()
        dropout = self.dropout > 0 and self.num_layers > 1  # between layers
        key = self.make_rng("dropout") if dropout and not deterministic else None
        if xs.ndim == (1 if tokens else 2):  # one sequence
            return net.apply(params, xs, lengths, initial_carry, dropout_key=key)
        return net.apply_batch(params, xs, lengths, initial_carry, dropout_key=key)


def _option_pairs(options: Any) -> tuple[tuple[str, Any], ...]:
    """``cell_options`` as sorted ``(name, value)`` pairs; ValueError naming it for
    anything but a mapping or such pairs."""
    if isinstance(options, Mapping):
        pairs = tuple(options.items())
    else:
        try:
            pairs = tuple(options)
        except TypeError:
            pairs = None
    ok = pairs is not None and all(
        isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str) for p in pairs
    )
    if not ok:
        raise ValueError(
            f"cell_options: expected a mapping {{name: value}} or (name, value) pairs of "
            f"the cell factory's options, e.g. {{'reset_after': True}}; got {options!r}"
        )
    return tuple(sorted((tuple(p) for p in pairs), key=lambda p: p[0]))


@functools.lru_cache(maxsize=64, typed=True)  # typed: 4.0 is checked, not taken for 4
def _network(
    cell,
    hidden_size,
    cell_options,
    num_layers,
    bidirectional,
    dropout,
    unroll,
    remat,
    hoist_input,
    implementation,
    matmul_dtype,
    directions,
) -> networks.Network:
    try:
        cell_obj = cells.make(cell, hidden_size, **dict(cell_options))
    except TypeError as e:  # an option the cell factory does not take
        raise ValueError(f"cell_options: {e}") from None
    return networks.network(
        cell_obj,
        num_layers,
        bidirectional,
        dropout=dropout,
        unroll=unroll,
        remat=remat,
        hoist_input=hoist_input,
        implementation=implementation,
        matmul_dtype=matmul_dtype,
        directions=directions,
    )
