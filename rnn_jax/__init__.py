"""rnn_jax: pure-function recurrent cells and scan-driven networks in JAX.

Modules:
  cells     the plain RNN, GRU and LSTM as ``step(params, carry, x) -> (carry, y)``.
  networks  deep, bidirectional, variable-length networks over ``lax.scan``.
  interop   PyTorch state-dict conversion.
  linen     a flax.linen Module wrapper (imported on first use).
"""

from rnn_jax import cells, interop, networks
from rnn_jax.cells import Cell, LSTMCarry
from rnn_jax.networks import BiCarry, Network

__version__ = "0.1.0"

__all__ = ["BiCarry", "Cell", "LSTMCarry", "Network", "cells", "interop", "networks"]


def __getattr__(name):
    # flax is imported only by code that asks for the linen wrapper.
    if name == "linen":
        import importlib

        return importlib.import_module("rnn_jax.linen")
    raise AttributeError(f"module 'rnn_jax' has no attribute {name!r}")
