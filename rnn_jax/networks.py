"""Networks composed from cells: scan over time, deep stacks, bidirectional layers.

``network(cell, num_layers, bidirectional)`` returns a :class:`Network`, a NamedTuple
of pure functions. Its ``apply`` runs *one* sequence; ``jax.vmap`` (or
``apply_batch``) adds the batch axis::

    net = networks.network(cells.gru(32), num_layers=2, bidirectional=True)
    params = net.init(key, input_size)
    ys, final = net.apply(params, xs, length)      # xs: <float32>[T, I]
    ys, final = net.apply_batch(params, xs_batch, lengths)   # <float32>[B, T, I]

Deep networks (seed section 3): layer l reads layer l-1's outputs,
H_t^(l) = cell(H_t^(l-1), H_{t-1}^(l)) with H_t^(0) = X_t. Bidirectional layers
(seed section 4) run a forward cell over X_1..X_L and a backward cell over
X_L..X_1 and concatenate, H_t = [H->_t, H<-_t]; layer k > 0 then reads 2H features.

How it computes:

* one ``jax.lax.scan`` per layer, never a Python loop over time;
* both directions of a bidirectional layer in the same scan: their parameters are
  stacked along a direction axis and the step is ``vmap``-ed over it; the backward
  direction reads the valid part of the sequence reversed (``xs[L-1-t]`` for
  ``t < L``) and its outputs are put back in time order (the fused layers do the
  same, except on CPU, where two calls were faster: :func:`separate_directions`;
  there the backward direction's loop runs from the last step to the first over
  the sequence in place, ``fused.layer(..., reverse=True)``, without the reversed
  copies);
* variable length: at steps ``t >= length`` the carry is frozen (``jnp.where``) and
  the output is exactly zero, so padding has no effect on anything;
* optionally, the input projection ``X W_x + b`` of all steps is one matmul
  outside the scan (``hoist_input``), leaving only ``H W_h`` inside;
* integer ``xs`` are token ids standing for one-hot vectors (``input_size`` is the
  vocabulary size): layer 0 looks up rows of ``W_x`` instead of multiplying.

Five implementations compute the same function (tests compare outputs and gradients):

* ``"scan"``, the reference: ``apply`` runs one sequence in a ``lax.scan`` over the
  cell's ``step`` and autodiff derives the backward pass; ``apply_batch`` is
  ``jax.vmap`` of ``apply``;
* ``"fused"`` (:mod:`rnn_jax.fused`): time-major and batch-explicit, with
  hand-written backward passes that compute the weight gradients as one matmul
  after the backward loop (as cuDNN does);
* ``"wavefront"`` (:mod:`rnn_jax.wavefront`): the fused kernels with all layers of
  a deep unidirectional network in one loop of T+L-1 steps, layer l at time step
  t-l, the L layer steps batched into one operation;
* ``"pallas"`` (:mod:`rnn_jax.persistent`, GPUs): the fused layers with each
  loop over time one Pallas kernel instead of a ``lax.scan`` of XLA ops; with
  ``RNN_JAX_PALLAS_STACK=1`` a deep unidirectional network (no dropout, no remat)
  runs all its layers in one kernel per pass, concurrently
  (:mod:`rnn_jax.persistent_stack`, experimental: not yet measured on a GPU);
* ``"native"`` (:mod:`rnn_jax.native`, CPUs, LSTM): the fused layers with each loop
  over time one C++ function (XLA FFI), the gates computed on the recurrent matmul's
  register tiles; compiled for the machine's CPU on first use.

``implementation="auto"`` (the default) picks per call of ``apply_batch`` from the
backend and the shapes, by measurement (see :func:`choose_implementation`).

Parameters: ``{"layer_0": p, "layer_1": p, ...}`` with ``p`` the cell's params, or
``{"forward": p, "backward": p}`` per layer when bidirectional.

Final carry (``final``): a tuple with one entry per layer, each the cell's carry
(e.g. ``LSTMCarry(h, c)``) or, when bidirectional, ``BiCarry(forward, backward)``.
The forward carry is the one after the last valid step; the backward carry is the
one after reading X_1, i.e. its last step. With ``length == 0`` both are the
initial carry. ``apply`` accepts an initial carry in the same structure.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax import cells, fused, native, persistent, persistent_stack, wavefront
from rnn_jax.cells import Cell
from rnn_jax.fused import reverse_valid, reverse_valid_batch

Array = jax.Array


class BiCarry(NamedTuple):
    """Carries of the two directions of a bidirectional layer."""

    forward: Any
    backward: Any


class Network(NamedTuple):
    """A (deep, optionally bidirectional) recurrent network built from one cell.

    Attributes:
      cell, num_layers, bidirectional, dropout, unroll, remat, hoist_input,
        implementation, matmul_dtype, chunk, directions: the options given to
        :func:`network`.
      output_size: features of ``ys``: H, or 2H when bidirectional.
      init: ``(key, input_size) -> params``.
      initial_carry: ``() -> final``-structured zeros for one sequence.
      apply: ``(params, xs <float32>[T, I], length=None, initial_carry=None, *,
        dropout_key=None) -> (ys <float32>[T, output_size], final)``.
      apply_batch: the same over a batch: ``xs <float32>[B, T, I]``,
        ``lengths <int32>[B]``, initial carry with a leading batch axis; one dropout
        key is split per example.
      check_params: ``(params) -> None``; ValueError naming the first path where
        ``params`` differ from ``init``'s keys and shapes (for the input size of
        layer 0's ``W_x``). ``apply`` and ``apply_batch`` run it.

    A network is a static value to JAX (hashable, no pytree leaves), like its cell:
    close over it or pass it to ``jax.jit`` as a static argument.

    ``apply`` and ``apply_batch`` check their arguments in Python, then run one
    ``jax.jit`` program (compiled once per network and argument shapes): called
    eagerly, a forward pass or ``jax.grad`` of one compiles as a whole instead of
    op by op (an eager gradient of a 2-layer bidirectional LSTM, H=64, B=16, T=50:
    1.3-1.5 s per call op by op, 0.01-0.03 s jitted, on the 2-core CPU); inside the
    caller's ``jax.jit`` the program is inlined.

    Derivatives: reverse mode (``jax.grad``, ``jax.vjp``, and grad of grad, so a
    Hessian-vector product as ``jax.grad(lambda p: vdot(jax.grad(f)(p), v))``) works
    with every implementation but pallas (first derivatives). Forward mode
    (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) needs ``implementation="scan"``:
    the other implementations define their backward passes with ``jax.custom_vjp``,
    which has no forward mode, and ``"auto"`` runs them on any batch of more than
    one sequence (JAX then raises "can't apply forward-mode autodiff (jvp) to a
    custom_vjp function").

    Lengths are clipped to ``[0, T]`` (a negative one is 0: all outputs zero, the
    initial carry returned). Token ids ``<int32>`` stand for one-hot vectors of size
    ``input_size``; ids outside ``[0, input_size)`` are zero vectors, as in
    ``jax.nn.one_hot``.
    """

    cell: Cell
    num_layers: int
    bidirectional: bool
    dropout: float
    unroll: int
    remat: bool
    hoist_input: bool
    implementation: str
    matmul_dtype: str
    output_size: int
    init: Callable[..., Any]
    initial_carry: Callable[[], tuple]
    apply: Callable[..., tuple[Array, tuple]]
    apply_batch: Callable[..., tuple[Array, tuple]]
    chunk: int | None = None
    directions: str = "auto"
    check_params: Callable[[Any], None] | None = None


jax.tree_util.register_static(Network)  # a static value to JAX, as cells.Cell


# Measured on a 2-core CPU (see BUILD.md): computing X W_x + b inside the scan
# is at least as fast there; accelerators favour the hoisted matmul.
def _default_hoist_input() -> bool:
    return jax.default_backend() != "cpu"


# The backends' measured unroll factors (BENCHMARKS.md, experiments.levers).
DEFAULT_UNROLL = {"cpu": 1, "gpu": 8}
_ACCELERATOR_UNROLL = 8  # backends not measured (TPU): as the GPU


def default_unroll(backend: str | None = None) -> int:
    """The ``unroll`` that ``network(unroll=None)`` uses on ``backend`` (default: JAX's).

    Measured (BENCHMARKS.md): on the 2-core CPU any unrolling slowed the training
    step (LSTM H=128 B=32 T=1024: 151 ms at 4, 290 ms at 16 vs 131 ms at 1), so 1; on
    an H100 (``experiments/levers.py``) each loop iteration costs kernel launches and
    XLA's loop bookkeeping, and unrolling 8 steps halves the step (fused LSTM: 11.3
    ms vs 19.9 ms at 1; 32 gives 11.3 ms and compiles 2.7x longer), so 8.
    """
    backend = jax.default_backend() if backend is None else backend
    return DEFAULT_UNROLL.get(backend, _ACCELERATOR_UNROLL)


DIRECTIONS = ("auto", "vmap", "separate")
"""``network(directions=...)``: how a bidirectional fused layer runs its two
directions: ``"vmap"`` (one call of :func:`rnn_jax.fused.layer` ``vmap``-ed over a
direction axis), ``"separate"`` (two calls) or ``"auto"`` (:func:`separate_directions`)."""


def directions_problem(directions: str, bidirectional: bool, implementation: str) -> str | None:
    """Why ``directions`` does not fit a network (``None`` if it does): an unknown
    value, a layout for a unidirectional network, or one for the scan implementation
    (which always maps its step over both directions). :func:`network` raises it as a
    ValueError, ``rnn_jax.config.validate`` as a ConfigError naming the flag."""
    if directions not in DIRECTIONS:
        return f"expected one of {list(DIRECTIONS)}, got {directions!r}"
    if directions != "auto" and not bidirectional:
        return f"{directions!r} is for bidirectional networks; leave it at 'auto' for this one"
    if directions != "auto" and implementation == "scan":
        return (
            f"{directions!r} applies to the fused and pallas layers; the scan "
            f"implementation always maps its step over both directions"
        )
    return None


def separate_directions(kernel: str, backend: str | None = None, directions: str = "auto") -> bool:
    """Whether a bidirectional fused layer runs its two directions as two calls of
    :func:`rnn_jax.fused.layer` instead of one call ``vmap``-ed over a direction axis.

    ``directions`` other than ``"auto"`` decides (``"separate"``: two calls).
    ``"auto"``: two calls on CPU, the vmap elsewhere; ``rnn_jax.autotune`` times both
    on the machine at hand.

    Never for the Pallas kernels: ``vmap``-ed, the two directions run as one kernel
    whose grid has a direction axis when all its programs fit on the GPU at once
    (else one after another; ``rnn_jax.persistent._batched``). On CPU two calls were
    faster on every shape measured, on both 2-core CPUs of the development VMs
    (training step of the language model, one bidirectional layer unless said,
    alternating rounds in one process, ms, vmap vs two calls). AMD EPYC with
    AVX-512 (2026-11-29): medium (H=256 B=64 T=64) LSTM 108 vs 101, GRU 86 vs 83,
    LSTM 2 layers 354 vs 328; H=512 B=64 T=64 LSTM 421 vs 340. Intel Xeon: medium
    LSTM 156 vs 142 and 165 vs 146, GRU 149 vs 133. An earlier AMD EPYC VM
    (2026-11-27, before later changes to the loops): d2l (H=32 B=1024 T=32) LSTM
    41-45 vs 35-38, GRU 37 vs 33-35; long (H=128 B=32 T=1024) LSTM 231-233 vs
    213-217, GRU 195-221 vs 171-174 (the vmapped chunked loop transposed every
    chunk's arrays to put the direction axis inside); only there did the vmap win at
    H=256 (medium LSTM 64-65 vs 69-70, GRU 55-57 vs 60-63). Accelerators keep the
    vmap (one loop for both directions; measured there that way).
    """
    if directions not in DIRECTIONS:
        raise ValueError(f"directions: expected one of {list(DIRECTIONS)}, got {directions!r}")
    if directions != "auto":
        return directions == "separate"
    if kernel == "pallas":
        return False
    backend = jax.default_backend() if backend is None else backend
    return backend == "cpu"


IMPLEMENTATIONS = ("auto", "fused", "scan", "wavefront", "pallas", "native")
# the implementations with the fused layers' time-major batch path
FUSED_FAMILY = ("fused", "wavefront", "pallas", "native")


def loop_kernel(implementation: str) -> str:
    """The ``kernel`` of :func:`rnn_jax.fused.layer` that a fused-family
    ``implementation`` runs: its own for ``"pallas"`` and ``"native"``, else the XLA
    loops."""
    return implementation if implementation in ("pallas", "native") else "xla"


PALLAS_MAX_AUTO_HIDDEN = 128  # measured: slower than the XLA loops at H=256 (LSTM)
# B * H up to which deep networks run the wavefront on accelerators: it won where each
# step is a few small kernels (H100, B*H = 4096) and lost at B*H = 131072 (see
# choose_implementation); the shapes between (d2l, medium) met the targets with it
WAVEFRONT_MAX_BATCH_UNITS = 32768


def choose_implementation(
    cell: Cell,
    batch_size: int,
    backend: str | None = None,
    *,
    remat: bool = False,
    num_layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
    num_devices: int | None = None,
    cores: int | None = None,
    matmul_dtype: str = "float32",
) -> str:
    """The implementation ``"auto"`` runs for ``cell`` on a batch of ``batch_size``.

    Measured (BENCHMARKS.md): on the 2-core development CPU the fused backward pass
    is faster than the scan on the long and medium shapes (LSTM H=128 B=32 T=1024:
    ~140 vs ~175 ms per training step) and level on the book's (H=32 B=1024 T=32:
    21.6-23.4 vs 21.5-31.0 ms); on an H100 it is faster at every unroll (long
    LSTM: 11.3 vs 14.6 ms at unroll 8, 19.9 vs 32.7 ms at 1). So it is the default
    on every backend. ``batch_size == 1`` (one sequence, as in generation) runs the
    reference.

    ``remat=True`` runs the fused layers too: they recompute chunks of ~sqrt(T)
    steps (:func:`rnn_jax.fused.chunk_size`), and on the CPU at H=128 B=32 T=1024
    cut the step's temporary memory to 0.23-0.26x in 1.01-1.22x the time, where the
    scan under ``jax.checkpoint`` kept 0.29-0.30x in 1.64-1.83x the fused step's time.

    Otherwise, deep unidirectional networks without dropout or remat run
    ``"wavefront"`` on accelerators when each step is small (``batch_size * H <=``
    :data:`WAVEFRONT_MAX_BATCH_UNITS`): on the H100, 2 layers at H=128 B=32 T=1024,
    21.4-22.1 vs 23.4 ms (LSTM) and 17.5-18.3 vs 20.2 ms (GRU) per training step at
    unroll 8-16, since the layers' small kernels run side by side. At H=1024 B=128
    T=128 the wavefront's 2-layer step took 18.7 (LSTM) and 14.9 ms (GRU), over twice
    the 1-layer step (7.23, 6.45 ms), while layer by layer adds one more loop of the
    same cost plus the second layer's input projection as one large matmul (the
    wavefront computes it step by step inside the loop); so such shapes keep the
    layer-by-layer loops (inferred from those two measurements, not timed side by
    side). On the 2-core CPU the two were level within the machine's noise over d2l,
    medium and long at 2 and 3 layers (wavefront 0.84-1.20x the fused step's time),
    so the CPU keeps the layer-by-layer fused loops.

    Without remat, GPUs run ``"pallas"`` for the cells it supports up to H=128
    (H100, training step of one layer, fused unroll 8 vs pallas: long GRU 10.4 vs
    8.60 ms, LSTM 12.4 vs 9.36; d2l GRU 0.88 vs 0.62, LSTM 0.88 vs 0.76; but
    medium, H=256: GRU 1.41 vs 1.42, LSTM 1.43 vs 3.21). Deep networks run it layer
    by layer (rather than the wavefront), and a bidirectional layer runs its two
    directions as one grid, so only where twice the programs of one direction fit
    the GPU at once (long: 2 x 16; not d2l's 2 x 64, which would run one direction
    after the other). H100, forward+backward at H=128 B=32 T=1024, ms: 2 layers,
    wavefront vs pallas, LSTM 23.3 vs 16.5, GRU 19.1 vs 14.6; bidirectional, fused
    vs pallas, LSTM 12.7 vs 9.22, GRU 11.7 vs 8.29. The XLA loops stay for runs over several devices
    (``num_devices``, default ``jax.device_count()``: XLA cannot partition a
    kernel over a sharded batch and would replicate it), AMD GPUs (the kernels'
    exchange is written for NVIDIA's memory model) and shapes whose grid would not
    fit the GPU at once (``cores``: its multiprocessors, default the device's; see
    :func:`rnn_jax.persistent.layout`), where the kernels fall back to a slow form
    (one program holding every unit) or, for the two directions, run one after the
    other.

    On a CPU the LSTM (H a multiple of 16, no remat, float32 matmuls: the kernels
    have no other type, so bfloat16 matmuls run the XLA loops) runs ``"native"`` where its
    kernels build with AVX-512 or AVX2 (:func:`rnn_jax.native.runs_under_auto`; ARM
    and x86 CPUs without AVX2 build nothing here and keep the XLA loops). Measured
    on one core, ms, fused vs native: on the 2-core AMD EPYC with AVX-512 (one layer
    forward+backward, 2026-12-07, 15 alternating rounds), d2l per
    device (H=32 B=512 T=32) 11.7 vs 8.8, medium per device (H=256 B=32 T=64) 40.7
    vs 36.7, long per device (H=128 B=16 T=1024, both in the XLA loops' chunked
    backward pass) 92.2 vs 92.8; the native layer now runs one call per pass, which
    was faster than its chunks (BUILD.md). On a 2-core AMD EPYC with AVX2 only (Zen
    3 class; the whole training step of the 1-layer language model on one device's
    share of the batch, 2026-12-07, 8 alternating rounds; the AVX2 build's tiles of
    6 rows and two passes of 2 gates): d2l 27.9 vs 23.1, medium 68.0 vs 55.1, long 148.2 vs
    149.0. On a 2-core Intel Xeon with AVX-512 and AMX (the training step on 2
    devices, 2026-12-07, 7 alternating rounds, ``experiments.levers``): d2l 25.6 vs
    16.0, medium 48.0 vs 37.8, long 127 vs 113. The training steps are in
    BENCHMARKS.md.
    """
    backend = jax.default_backend() if backend is None else backend
    if not fused.supports(cell) or batch_size <= 1:
        return "scan"
    if (
        backend == "gpu"
        and not remat
        and cell.hidden_size <= PALLAS_MAX_AUTO_HIDDEN
        and persistent.unsupported(cell) is None
        and persistent.splits(
            batch_size,
            cell.hidden_size,
            persistent.device_cores() if cores is None else cores,
            copies=2 if bidirectional else 1,
        )
        and (jax.device_count() if num_devices is None else num_devices) == 1
        and not persistent.on_rocm()
    ):
        return "pallas"
    if (
        backend == "cpu"
        and not remat
        and matmul_dtype == "float32"
        and native.unsupported(cell) is None
        and native.runs_under_auto()
    ):
        return "native"
    wavefront_ok = num_layers > 1 and not (bidirectional or remat or dropout)
    small_steps = batch_size * cell.hidden_size <= WAVEFRONT_MAX_BATCH_UNITS
    if wavefront_ok and small_steps and backend != "cpu":
        return "wavefront"
    return "fused"


def _check_options(cell, num_layers, dropout, unroll) -> tuple[int, float, int | None]:
    """The options as Python numbers (NumPy scalars accepted); ValueError naming the
    first bad one."""
    if not isinstance(cell, Cell):
        raise ValueError(f"cell: expected a cells.Cell (e.g. cells.lstm(32)), got {cell!r}")
    num_layers = cells._int_option(num_layers, "num_layers", 1, "an int >= 1")
    in_range = "a number in [0, 1)"
    if not 0 <= (dropout := cells._number_option(dropout, "dropout", in_range)) < 1:
        raise ValueError(f"dropout: expected {in_range}, got {dropout!r}")
    if unroll is not None:
        expected = "an int >= 1 or None (the backend's default)"
        unroll = cells._int_option(unroll, "unroll", 1, expected)
    return num_layers, dropout, unroll


def _as_array(x: Any) -> Any:
    """``x`` as an array: an array as it is; numbers and (nested) lists as NumPy's, or
    JAX's when they hold tracers (a list passed through ``jax.jit`` arrives as a list
    of tracers, which NumPy cannot convert)."""
    if hasattr(x, "shape"):
        return x
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x)):
        return jnp.asarray(x)
    return np.asarray(x)


def _check_key(key: Any) -> None:
    """``dropout_key`` is None or one PRNG key: a typed key of shape ``()``
    (``jax.random.key``) or a legacy ``<uint32>[K]`` (``jax.random.PRNGKey``: K = 2 for
    the default threefry, 4 for rbg); ValueError naming it else."""
    if key is None:
        return
    dtype, shape = getattr(key, "dtype", None), tuple(getattr(key, "shape", ()))
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    if (typed and shape == ()) or (dtype == jnp.uint32 and len(shape) == 1):
        return
    got = f"{dtype}{list(shape)}" if dtype is not None else repr(key)
    raise ValueError(
        f"dropout_key: expected one PRNG key (jax.random.key(seed), or a legacy "
        f"jax.random.PRNGKey <uint32>[2]), got {got}"
    )


def _check_xs_dtype(xs: Any) -> None:
    """Inputs (an array or ``np.asarray`` of one) are real floats (features) or
    integers (token ids): anything else (bool, complex) raises ValueError naming ``xs``."""
    if not (jnp.issubdtype(xs.dtype, jnp.floating) or jnp.issubdtype(xs.dtype, jnp.integer)):
        raise ValueError(
            f"xs: expected float features or integer token ids, got {xs.dtype}; cast boolean "
            f"features with xs.astype(jnp.float32)"
        )


def _zero_padding(xs: Array, length: Array) -> Array:
    """``xs <[T, ...]>`` (one sequence) with the steps from ``length`` on set to zero,
    so that padding holding NaN or inf reaches no gradient (``0 * nan`` is NaN in a
    matmul's backward pass even where a mask drops the result). Token ids stay:
    their lookup multiplies nothing."""
    if cells.is_token_input(xs):
        return xs
    valid = jnp.arange(xs.shape[0]) < length
    return jnp.where(valid.reshape(-1, *([1] * (xs.ndim - 1))), xs, jnp.zeros_like(xs))


def _check_length(length: Any, name: str, shape: tuple[int, ...]) -> Array:
    """``length`` (an int, list, numpy or JAX array) as a JAX integer array of
    ``shape``; values outside ``[0, T]`` are clipped later."""
    length = _as_array(length)
    if tuple(jnp.shape(length)) != shape or not jnp.issubdtype(length.dtype, jnp.integer):
        raise ValueError(
            f"{name}: expected an integer array of shape {shape}, got "
            f"{length.dtype}{list(jnp.shape(length))}"
        )
    if isinstance(length, (np.ndarray, np.generic)) and length.dtype.itemsize > 4:
        # without x64 JAX would wrap 64-bit values to 32 bits (2**32 + 3 -> 3): clip
        # first, to the same effect as the clip to [0, T] later
        info = np.iinfo(np.int32)
        length = np.clip(length, 0 if length.dtype.kind == "u" else info.min, info.max)
    return jnp.asarray(length)


def _check_carry(carry: Any, expected: Any, name: str, batch: int | None = None) -> None:
    """``carry`` has ``expected``'s structure and leaf shapes (with a leading batch
    axis of ``batch`` when given) and a float type the steps keep (that of
    ``expected``'s leaves or wider; an int or narrower carry would change type)."""
    got = jax.tree_util.tree_structure(carry)
    want = jax.tree_util.tree_structure(expected)
    lead = () if batch is None else (batch,)
    shapes = [tuple(jnp.shape(x)) for x in jax.tree_util.tree_leaves(carry)]
    want_shapes = [lead + tuple(jnp.shape(x)) for x in jax.tree_util.tree_leaves(expected)]
    if got != want or shapes != want_shapes:
        axis = "" if batch is None else f" stacked on a leading batch axis of {batch}"
        raise ValueError(
            f"{name}: expected the structure of net.initial_carry(){axis} "
            f"({want} with shapes {want_shapes}), got {got} with shapes {shapes}"
        )
    for leaf, ref in zip(
        jax.tree_util.tree_leaves(carry), jax.tree_util.tree_leaves(expected), strict=True
    ):
        dtype, compute = jnp.asarray(leaf).dtype, jnp.asarray(ref).dtype
        if jnp.result_type(dtype, compute) != dtype:
            raise ValueError(
                f"{name}: expected {compute} leaves (the type the layers compute in), got {dtype}"
            )


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{"['layer_0']['W_x']": shape, ...}`` of a params tree (arrays or ShapeDtypeStructs)."""
    return {
        jax.tree_util.keystr(path): tuple(getattr(leaf, "shape", None) or np.shape(leaf))
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _stack(trees: list[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree: Any, n: int) -> list[Any]:
    return [jax.tree_util.tree_map(lambda x, i=i: x[i], tree) for i in range(n)]


def _scan_layer(cell, params, carry, xs, length, *, both_directions, hoist_input, unroll, remat):
    """Runs one layer (both its directions, when bidirectional) in one scan.

    One direction: ``params``, ``carry`` as the cell's, ``xs <float32>[T, I]``;
    returns ``(ys <float32>[T, H], carry)``. Both directions: every leaf has a leading
    direction axis of 2 (``xs <float32>[2, T, I]``, each in its direction's reading
    order) and the step is ``vmap``-ed over it; returns ``ys <float32>[2, T, H]``.
    """
    project, step = cell.project, cell.step_projected if hoist_input else cell.step
    if both_directions:
        project, step = jax.vmap(project), jax.vmap(step)
    inputs = project(params, xs) if hoist_input else xs  # all steps in one matmul
    if both_directions:
        inputs = jnp.swapaxes(inputs, 0, 1)  # time leading: [T, 2, ...]
    num_steps = inputs.shape[0]

    def body(carry, inp):
        x_t, t = inp
        new_carry, y = step(params, carry, x_t)
        if length is not None:
            valid = t < length
            new_carry = jax.tree_util.tree_map(
                lambda n, o: jnp.where(valid, n, o), new_carry, carry
            )
            y = jnp.where(valid, y, jnp.zeros_like(y))
        return new_carry, y

    if remat:
        body = jax.checkpoint(body)
    carry, ys = jax.lax.scan(body, carry, (inputs, jnp.arange(num_steps)), unroll=unroll)
    return (jnp.swapaxes(ys, 0, 1) if both_directions else ys), carry


def apply_dropout(key: Array, rate: float, ys: Array) -> Array:
    keep = jax.random.bernoulli(key, 1.0 - rate, ys.shape)
    return jnp.where(keep, ys / (1.0 - rate), jnp.zeros_like(ys))


def network(
    cell: Cell,
    num_layers: int = 1,
    bidirectional: bool = False,
    *,
    dropout: float = 0.0,
    unroll: int | None = None,
    remat: bool = False,
    hoist_input: bool | None = None,
    implementation: str = "auto",
    matmul_dtype: str = "float32",
    chunk: int | None = None,
    directions: str = "auto",
) -> Network:
    """Builds a deep, optionally bidirectional network from ``cell``.

    Args:
      cell: a :class:`rnn_jax.cells.Cell`; every layer and direction uses it.
      num_layers: depth L >= 1.
      bidirectional: run a backward direction in every layer and concatenate.
      dropout: rate in [0, 1) of the dropout applied to every layer's outputs but the
        last (as PyTorch's ``nn.LSTM(dropout=...)``); active only when ``apply`` gets
        a ``dropout_key``.
      unroll: time steps per loop iteration, passed to ``jax.lax.scan``. ``None``
        picks the measured default of the backend (:func:`default_unroll`: 1 on CPU,
        8 on GPU).
      remat: recompute instead of saving: the scan runs its step under
        ``jax.checkpoint`` (the backward pass recomputes each step's gates from the
        saved carries), the fused layers keep one carry per chunk of ~sqrt(T) steps
        and recompute a chunk at a time (:func:`rnn_jax.fused.chunk_size`).
      hoist_input: compute ``X W_x + b`` for all steps before the scan. ``None``
        picks the measured default of the backend (off on CPU, on elsewhere). The
        fused implementation always does.
      implementation: ``"scan"`` (autodiff of the scan), ``"fused"`` (hand-written
        backward pass, :mod:`rnn_jax.fused`), ``"wavefront"`` (the fused kernels, all
        layers in one loop, :mod:`rnn_jax.wavefront`; unidirectional, no dropout or
        remat), ``"pallas"`` (the fused layers with each loop one GPU kernel,
        :mod:`rnn_jax.persistent`; LSTM, reset-after GRU, RNN; interpreted, slowly,
        off a GPU), ``"native"`` (the fused layers with each loop one C++ function
        on the CPU, :mod:`rnn_jax.native`; LSTM with H a multiple of 16) or
        ``"auto"`` (see :func:`choose_implementation`); all give the same values
        and gradients.
      matmul_dtype: ``"float32"`` (the default) or ``"bfloat16"``: the operand type
        of every matmul of the fused and wavefront implementations, accumulated in
        float32; gates, carries, outputs and gradients stay float32. The reference
        ``"scan"`` (which ``"auto"`` runs for a batch of one) always computes in
        float32, so ``implementation="scan"`` with ``"bfloat16"`` is an error. The
        native kernels are float32 only: ``"native"`` with ``"bfloat16"`` runs the
        fused XLA loops (as ``"fused"``), and ``"pallas"`` its kernels' bfloat16 form.
      chunk: the fused layers' backward pass in chunks of this many steps
        (:func:`rnn_jax.fused.layer`); ``None``: the measured rule
        (:func:`rnn_jax.fused.default_chunk`: on CPU from T=256), 0: one loop.
        Values and gradients are the same either way; the scan and wavefront
        implementations ignore it, and ``remat`` chunks by its own rule.
      directions: how a bidirectional layer of the fused or pallas implementation
        runs its two directions: ``"vmap"`` (one call over a direction axis),
        ``"separate"`` (two calls) or ``"auto"`` (:func:`separate_directions`: the
        measured rule). Values and gradients are the same either way; the scan
        implementation always maps its step over the two directions.
    """
    chunk = fused.check_chunk(chunk)
    num_layers, dropout, unroll = _check_options(cell, num_layers, dropout, unroll)
    if num_layers == 1 and dropout > 0:
        warnings.warn(
            f"dropout={dropout} with num_layers=1 does nothing: it acts between layers "
            "(after every layer but the last, as PyTorch's nn.LSTM); apply "
            "networks.apply_dropout to the outputs for dropout after the last layer",
            UserWarning,
            stacklevel=2,
        )
    bidirectional = cells._bool_option(bidirectional, "bidirectional")
    remat = cells._bool_option(remat, "remat")
    if problem := directions_problem(directions, bidirectional, implementation):
        raise ValueError(f"directions: {problem}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation: expected one of {list(IMPLEMENTATIONS)}, got {implementation!r}"
        )
    if implementation in ("fused", "wavefront") and not fused.supports(cell):
        what = "" if cells.is_builtin(cell) else f" ({cells.CHANGED_CELL})"
        raise ValueError(
            f"implementation: {implementation!r} does not support the cell {cell.name!r}{what}"
        )
    if implementation == "pallas" and (reason := persistent.unsupported(cell)):
        raise ValueError(f"implementation: 'pallas': {reason}")
    if implementation == "native" and (reason := native.unsupported(cell)):
        raise ValueError(f"implementation: 'native': {reason}")
    if implementation == "wavefront":
        for name, value, ok in (
            ("bidirectional", bidirectional, not bidirectional),
            ("remat", remat, not remat),
            ("dropout", dropout, dropout == 0),
        ):
            if not ok:
                raise ValueError(
                    f"implementation: 'wavefront' runs unidirectional networks without "
                    f"dropout or remat; got {name}={value!r}"
                )
    if matmul_dtype not in fused.MATMUL_DTYPES:
        raise ValueError(
            f"matmul_dtype: expected one of {list(fused.MATMUL_DTYPES)}, got {matmul_dtype!r}"
        )
    if matmul_dtype != "float32" and not fused.supports(cell):
        raise ValueError(
            f"matmul_dtype: {matmul_dtype!r} needs the fused kernels, which do not "
            f"support the cell {cell.name!r}"
        )
    if matmul_dtype != "float32" and implementation == "scan":
        raise ValueError(
            f"matmul_dtype: {matmul_dtype!r} needs implementation 'fused', 'wavefront', "
            f"'pallas', 'native' (which then runs the fused XLA loops) or 'auto'; the "
            f"reference 'scan' computes in float32"
        )
    hoist = _default_hoist_input() if hoist_input is None else bool(hoist_input)
    unroll = default_unroll() if unroll is None else unroll
    num_dirs = 2 if bidirectional else 1
    output_size = num_dirs * cell.hidden_size

    def init(key: Array, input_size: int) -> dict[str, Any]:
        params = {}
        for layer in range(num_layers):
            size = input_size if layer == 0 else output_size
            k = jax.random.fold_in(key, layer)
            if bidirectional:
                kf, kb = jax.random.split(k)
                params[f"layer_{layer}"] = {
                    "forward": cell.init(kf, size),
                    "backward": cell.init(kb, size),
                }
            else:
                params[f"layer_{layer}"] = cell.init(k, size)
        return params

    def zero_carry() -> tuple:
        c = cell.initial_carry
        return tuple(BiCarry(c(), c()) if bidirectional else c() for _ in range(num_layers))

    def default_carry(params, xs) -> tuple:
        """:func:`zero_carry` in the type the layers compute in: the result type of
        the params and of float inputs, at least float32 (float64 under
        ``jax.enable_x64`` with float64 params; float32 for bfloat16 params, as the
        fused layers compute), so that no scan's carry changes type."""
        leaves = jax.tree_util.tree_leaves(params)
        leaves += [] if cells.is_token_input(xs) else [xs]
        dtype = jnp.result_type(*leaves) if leaves else jnp.float32
        dtype = jnp.promote_types(dtype, jnp.float32)  # bfloat16 params: float32 state
        return jax.tree_util.tree_map(lambda c: c.astype(dtype), zero_carry())

    def apply(params, xs, length=None, initial_carry=None, *, dropout_key=None):
        xs = _as_array(xs)  # nested lists too
        _check_xs_dtype(xs)
        tokens = cells.is_token_input(xs)
        if jnp.ndim(xs) != (1 if tokens else 2):
            raise ValueError(
                f"xs: expected one sequence <float32>[T, input_size] (or token ids "
                f"<int32>[T]), got {jnp.asarray(xs).dtype}{list(jnp.shape(xs))}; use "
                f"net.apply_batch or jax.vmap for batches"
            )
        if length is not None:  # before jit, which would wrap a 64-bit length to 32 bits
            length = _check_length(length, "length", ())
        _check_key(dropout_key)
        if implementation in FUSED_FAMILY:  # a batch of one
            if length is not None:
                length = length[None]
            if initial_carry is not None:
                _check_carry(initial_carry, default_carry(params, xs), "initial_carry")
                initial_carry = jax.tree_util.tree_map(lambda c: c[None], initial_carry)
            keys = None if dropout_key is None else dropout_key[None]
            ys, final = _fused_jit(params, xs[None], length, initial_carry, keys, implementation)
            return ys[0], jax.tree_util.tree_map(lambda c: c[0], final)
        return _scan_jit(params, xs, length, initial_carry, dropout_key)

    def _apply_scan(params, xs, length, initial_carry, dropout_key):
        """The reference path on one sequence: a ``lax.scan`` per layer."""
        _check_params(params)
        _check_input_size(params, xs)
        if length is not None:
            length = jnp.clip(length, 0, xs.shape[0])  # checked by apply / apply_batch
            xs = _zero_padding(xs, length)
        if initial_carry is None:
            initial_carry = default_carry(params, xs)
        else:
            _check_carry(initial_carry, default_carry(params, xs), "initial_carry")

        finals = []
        ys = xs
        for layer in range(num_layers):
            p = params[f"layer_{layer}"]
            if bidirectional:
                p = _stack([p["forward"], p["backward"]])
                carry = _stack([initial_carry[layer].forward, initial_carry[layer].backward])
                inputs = jnp.stack([ys, reverse_valid(ys, length)])
            else:
                carry = initial_carry[layer]
                inputs = ys
            outs, carry = _scan_layer(
                cell,
                p,
                carry,
                inputs,
                length,
                both_directions=bidirectional,
                hoist_input=hoist,
                unroll=unroll,
                remat=remat,
            )
            if bidirectional:
                ys = jnp.concatenate([outs[0], reverse_valid(outs[1], length)], axis=-1)
                finals.append(BiCarry(*_unstack(carry, 2)))
            else:
                ys = outs
                finals.append(carry)
            if dropout_key is not None and dropout > 0 and layer < num_layers - 1:
                ys = apply_dropout(jax.random.fold_in(dropout_key, layer), dropout, ys)
        return ys, tuple(finals)

    def apply_batch(params, xs, lengths=None, initial_carry=None, *, dropout_key=None):
        xs = _as_array(xs)  # nested lists too
        _check_xs_dtype(xs)
        if jnp.ndim(xs) != (2 if cells.is_token_input(xs) else 3):
            raise ValueError(
                f"xs: expected a batch <float32>[B, T, input_size] (or token ids "
                f"<int32>[B, T]), got {jnp.asarray(xs).dtype}{list(jnp.shape(xs))}"
            )
        batch = xs.shape[0]
        if lengths is not None:
            lengths = _check_length(lengths, "lengths", (batch,))
        if initial_carry is not None:
            _check_params(params)
            _check_carry(initial_carry, default_carry(params, xs), "initial_carry", batch)
        _check_key(dropout_key)
        keys = None if dropout_key is None else jax.random.split(dropout_key, batch)
        impl = implementation
        if impl == "auto":
            impl = choose_implementation(
                cell,
                batch,
                remat=remat,
                num_layers=num_layers,
                bidirectional=bidirectional,
                dropout=dropout,
                matmul_dtype=matmul_dtype,
            )
        if impl in FUSED_FAMILY:
            return _fused_jit(params, xs, lengths, initial_carry, keys, impl)
        return _scan_batch_jit(params, xs, lengths, initial_carry, keys)

    def _scan_batch(params, xs, lengths, initial_carry, keys):
        """:func:`_apply_scan` vmapped over the examples of ``xs <[B, T, ...]>``."""
        in_axes = (
            None,
            0,
            None if lengths is None else 0,
            None if initial_carry is None else 0,
            None if keys is None else 0,
        )
        return jax.vmap(_apply_scan, in_axes=in_axes)(params, xs, lengths, initial_carry, keys)

    def _apply_fused(params, xs, lengths, initial_carry, keys, impl):
        """The fused, pallas or wavefront path on a batch ``xs <[B, T, ...]>``; ``keys``: one
        per example."""
        _check_params(params)
        _check_input_size(params, xs)
        batch, num_steps = xs.shape[0], xs.shape[1]
        if batch == 0 or num_steps == 0:
            # nothing to loop over: the hand-written backward passes assume a step
            # and an example; the scan path gives the empty outputs and carries
            return _scan_batch(params, xs, lengths, initial_carry, keys)
        if lengths is not None:
            lengths = jnp.clip(lengths, 0, num_steps)
            xs = jax.vmap(_zero_padding)(xs, lengths)
        if initial_carry is None:
            initial_carry = jax.tree_util.tree_map(
                lambda c: jnp.broadcast_to(c, (batch, *c.shape)), default_carry(params, xs)
            )
        ys = jnp.swapaxes(xs, 0, 1)  # time-major from here on: [T, B, ...]
        kernel = loop_kernel(impl)
        if impl == "wavefront" or (impl == "pallas" and _stacked(params, initial_carry, xs, keys)):
            ys, finals = wavefront.network_layers(
                cell,
                [params[f"layer_{i}"] for i in range(num_layers)],
                list(initial_carry),
                ys,
                lengths,
                unroll=unroll,
                matmul_dtype=matmul_dtype,
                kernel=kernel,
            )
            return jnp.swapaxes(ys, 0, 1), tuple(finals)
        run = functools.partial(
            fused.layer,
            cell,
            unroll=unroll,
            remat=remat,
            matmul_dtype=matmul_dtype,
            kernel=kernel,
            chunk=chunk,
        )
        finals = []
        for layer in range(num_layers):
            p = params[f"layer_{layer}"]
            if bidirectional and separate_directions(kernel, directions=directions):
                c = initial_carry[layer]
                out_f, carry_f = run(p["forward"], c.forward, ys, lengths)
                out_b, carry_b = run(p["backward"], c.backward, ys, lengths, reverse=True)
                ys = jnp.concatenate([out_f, out_b], axis=-1)
                finals.append(BiCarry(carry_f, carry_b))
            elif bidirectional:
                c = initial_carry[layer]
                outs, carry = jax.vmap(run, in_axes=(0, 0, 0, None))(
                    _stack([p["forward"], p["backward"]]),
                    _stack([c.forward, c.backward]),
                    jnp.stack([ys, reverse_valid_batch(ys, lengths)]),
                    lengths,
                )
                ys = jnp.concatenate([outs[0], reverse_valid_batch(outs[1], lengths)], axis=-1)
                finals.append(BiCarry(*_unstack(carry, 2)))
            else:
                ys, carry = run(p, initial_carry[layer], ys, lengths)
                finals.append(carry)
            if keys is not None and dropout > 0 and layer < num_layers - 1:
                # the masks of the scan path: example b's key, folded with the layer
                ys = jax.vmap(
                    lambda k, y, layer=layer: apply_dropout(
                        jax.random.fold_in(k, layer), dropout, y
                    ),
                    in_axes=(0, 1),
                    out_axes=1,
                )(keys, ys)
        return jnp.swapaxes(ys, 0, 1), tuple(finals)

    # apply's and apply_batch's programs (see Network): the checks ran in Python
    _scan_jit = jax.jit(_apply_scan)
    _scan_batch_jit = jax.jit(_scan_batch)
    _fused_jit = jax.jit(_apply_fused, static_argnums=5)  # impl: static

    def _stacked(params, initial_carry, xs, keys) -> bool:
        """Whether a deep pallas network runs all its layers as one kernel per pass
        (:mod:`rnn_jax.persistent_stack`, opt-in until measured on a GPU)."""
        if bidirectional or remat or matmul_dtype != "float32":
            return False
        if keys is not None and dropout > 0:
            return False
        if not persistent_stack.enabled():
            return False
        dtypes = persistent_stack.input_dtypes(params, initial_carry, xs)
        batch, num_steps = xs.shape[0], xs.shape[1]
        return persistent_stack.problem(cell, num_layers, num_steps, batch, dtypes) is None

    def _check_input_size(params, xs) -> None:
        """Float inputs ``<[..., I]>`` must have the params' input size (token ids any)."""
        layer0 = params["layer_0"]["forward"] if bidirectional else params["layer_0"]
        expected_in = cell.input_size(layer0)
        if not cells.is_token_input(xs) and xs.shape[-1] != expected_in:
            raise ValueError(
                f"xs: expected input_size {expected_in} (from params), got shape {tuple(xs.shape)}"
            )

    @functools.lru_cache(maxsize=8)
    def _param_shapes(input_size: int) -> dict[str, tuple[int, ...]]:
        """``{path: shape}`` of ``init``'s params for ``input_size`` (not computed)."""
        tree = jax.eval_shape(lambda: init(jax.random.key(0), input_size))
        return {
            jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(tree)
        }

    def _check_params(params) -> None:
        want = {f"layer_{i}" for i in range(num_layers)}
        if not isinstance(params, dict) or set(params) != want:
            got = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(f"params: expected keys {sorted(want)} from net.init, got {got}")
        layer0 = params["layer_0"]
        if bidirectional:
            if not (isinstance(layer0, dict) and set(layer0) == {"forward", "backward"}):
                got = sorted(layer0) if isinstance(layer0, dict) else type(layer0).__name__
                raise ValueError(
                    f"params['layer_0']: expected the keys ['backward', 'forward'] of a "
                    f"bidirectional network's net.init, got {got}"
                )
            layer0 = layer0["forward"]
        w_x = layer0.get("W_x") if isinstance(layer0, dict) else None
        if w_x is None or jnp.ndim(w_x) < 2:
            raise ValueError("params: expected layer_0's W_x <[input_size, ...]> from net.init")
        expected = _param_shapes(int(jnp.shape(w_x)[0]))
        got = {
            jax.tree_util.keystr(k): jnp.shape(v)
            for k, v in jax.tree_util.tree_leaves_with_path(params)
        }
        if got != expected:
            diff = sorted(set(got.items()) ^ set(expected.items()))
            path = diff[0][0]
            missing = "missing: " if path not in got else ""
            raise ValueError(
                f"params{path}: {missing}expected shape {expected.get(path, 'no such leaf')} "
                f"(net.init of this {cell.name} network, hidden_size {cell.hidden_size}), got "
                f"{got.get(path, 'no such leaf')}"
            )

    return Network(
        cell=cell,
        num_layers=num_layers,
        bidirectional=bidirectional,
        dropout=float(dropout),
        unroll=unroll,
        remat=remat,
        hoist_input=hoist,
        implementation=implementation,
        matmul_dtype=matmul_dtype,
        output_size=output_size,
        init=init,
        initial_carry=zero_carry,
        apply=apply,
        apply_batch=apply_batch,
        chunk=chunk,
        directions=directions,
        check_params=_check_params,
    )
