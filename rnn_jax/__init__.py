"""rnn_jax: pure-function recurrent cells and scan-driven networks in JAX.

Modules:
  cells      the plain RNN, GRU and LSTM as ``step(params, carry, x) -> (carry, y)``.
  networks   deep, bidirectional, variable-length networks over ``lax.scan``.
  fused      the same layers with hand-written backward passes (what ``"auto"`` runs
             on batches, with its loops as kernels where native or persistent wins).
  wavefront  deep unidirectional networks with all layers in one loop.
  persistent the fused layers' loops as Pallas GPU kernels.
  native     the LSTM's fused loops as C++ CPU functions (XLA FFI; built on first use).
  allocator  ``tune_malloc()``: stops XLA:CPU's per-step page faults (glibc).
  memory     whether a compiled step fits in its devices' free memory.
  parallel   data parallelism (``jax.sharding``); ``split_cpu()``: a CPU device per core.
  interop    PyTorch state-dict conversion.
  text, data, models, generate   the character language model pipeline.
  sweeps     hyperparameter sweeps: plans, results tables, plots.
  tasks      synthetic long-range tasks (adding, copy) as pure JAX functions.
  linen, train, checkpoint, runs, config, autotune, sweeps, tasks   imported on
             first use (flax, orbax, optax).
"""

import importlib

from rnn_jax import (
    allocator,
    cells,
    data,
    fused,
    generate,
    interop,
    memory,
    models,
    networks,
    parallel,
    text,
)
from rnn_jax.cells import Cell, LSTMCarry
from rnn_jax.networks import BiCarry, Network

__version__ = "0.1.0"

__all__ = [
    "BiCarry",
    "Cell",
    "LSTMCarry",
    "Network",
    "allocator",
    "cells",
    "data",
    "fused",
    "generate",
    "interop",
    "memory",
    "models",
    "networks",
    "parallel",
    "text",
]

_LAZY = ("linen", "train", "checkpoint", "runs", "config", "autotune", "sweeps", "tasks")


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f"rnn_jax.{name}")
    raise AttributeError(f"module 'rnn_jax' has no attribute {name!r}")
