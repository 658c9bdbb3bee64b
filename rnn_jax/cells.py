"""Recurrent cells as pure functions: the plain RNN, the GRU and the LSTM.

A cell is a factory returning a :class:`Cell`, a NamedTuple of pure functions::

    cell = cells.lstm(hidden_size=32)
    params = cell.init(key, input_size)       # dict of float32 arrays
    carry = cell.initial_carry()              # zeros for one sequence
    carry, y = cell.step(params, carry, x)    # x: <float32>[input_size]

``step`` uses carry-first order, so ``functools.partial(cell.step, params)`` is a
``jax.lax.scan`` body as it is. It is written for one example and also takes
leading batch axes: ``x <float32>[*B, I]`` (token ids ``<int32>[*B]``) with carry
leaves ``<float32>[*B, H]`` gives outputs ``<float32>[*B, H]``, the same numbers as
``jax.vmap`` over the examples.

Notation follows the seed (Dive into Deep Learning, "modern" RNNs): ``x`` is X_t,
``h`` is H_{t-1}, sigma the logistic sigmoid, ``*`` the elementwise product.
Weights are applied from the right (row-vector convention, ``x @ W``). Gated cells
keep the weights of all their gates in one array with an explicit gate axis, in the
order of ``cell.gates``: ``W_x: <float32>[I, G, H]``, ``W_h: <float32>[H, G, H]``,
``b: <float32>[G, H]``, so ``W_x[:, k]`` is the seed's W_x<gate k> and one matmul
computes every gate. The split of a step into the input projection
``x @ W_x + b`` (``cell.project``, which also works on a whole ``[T, I]`` sequence)
and the recurrent part (``cell.step_projected``) lets networks hoist the input
projection out of the time loop.

Initialisation (configurable through each factory's arguments): input weights
``W_x`` LeCun-normal per gate (variance 1/I), recurrent weights ``W_h`` orthogonal
per gate (Saxe et al. 2014), biases zero, and the LSTM forget-gate bias
``forget_bias`` (default 1.0, Gers et al. 2000; Jozefowicz et al. 2015).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# The step functions the factories below build, each with the facts (name, hidden
# size, gates, options) of the cell it was built for, and their projections (the
# gated cells share one): a cell whose step and step_projected were built for its
# own facts and whose project is one of these computes the built-in equations,
# which the hand-written fused kernels may then replace (:func:`is_builtin`).
_BUILT_FOR: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROJECTS: weakref.WeakSet = weakref.WeakSet()

# why the kernels refuse a cell that is_builtin rejects
CHANGED_CELL = (
    "changed with _replace: its functions, size or options differ from those "
    "rnn_jax.cells built; use 'scan'"
)


def _facts(cell: Cell) -> tuple:
    return (cell.name, cell.hidden_size, cell.gates, dict(cell.options))


def _builtin(cell: Cell) -> Cell:
    _BUILT_FOR[cell.step] = _BUILT_FOR[cell.step_projected] = _facts(cell)
    _PROJECTS.add(cell.project)
    return cell


class Options(Mapping):
    """A cell's factory options: a read-only, hashable mapping (so a :class:`Cell`,
    and a network built from it, can be a static argument of ``jax.jit``)."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._items = dict(*args, **kwargs)

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._items.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and self._items == dict(other.items())

    def __repr__(self) -> str:
        return repr(self._items)


def is_builtin(cell: Cell) -> bool:
    """Whether ``cell`` is one of this module's cells as built: its ``step``,
    ``step_projected`` and ``project`` are this module's, and its name, hidden size,
    gates and options those they were built for (not changed with ``_replace``).
    Only then do the fused, wavefront and Pallas kernels, which hard-code the
    equations and read ``hidden_size`` and ``options``, compute the same function as
    ``cell.step``."""
    try:
        facts = _facts(cell)
        return (
            cell.project in _PROJECTS
            and _BUILT_FOR.get(cell.step) == facts
            and _BUILT_FOR.get(cell.step_projected) == facts
        )
    except TypeError:  # an unhashable function or options that are not a mapping
        return False


Params = dict[str, Array]
Initializer = Callable[..., Array]

ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


class LSTMCarry(NamedTuple):
    """State of an LSTM: ``h`` goes to the output, ``c`` stays inside the cell."""

    h: Array  # <float32>[H] hidden state H_t
    c: Array  # <float32>[H] memory cell C_t


class Cell(NamedTuple):
    """A recurrent cell: pure functions plus the facts networks need.

    Attributes:
      name: ``"rnn"``, ``"gru"`` or ``"lstm"``.
      hidden_size: H.
      gates: names of the blocks along the gate axis of ``W_x``, ``W_h``, ``b``
        (``()`` for the plain RNN, whose weights have no gate axis).
      options: the factory's keyword options (``activation``, ``reset_after``, ...), a
        read-only :class:`Options` mapping.
      init: ``(key, input_size) -> params``.
      initial_carry: ``() -> carry``, zeros for one sequence.
      step: ``(params, carry, x <float32>[I]) -> (carry, y <float32>[H])``; with
        leading batch axes ``B``, ``x <[*B, I]>`` (ids ``<[*B]>``), carry leaves and
        ``y`` ``<[*B, H]>``.
      project: ``(params, xs <float32>[..., I]) -> <float32>[..., G, H]``, the input
        projection ``xs @ W_x + b`` (``[..., H]`` for the plain RNN).
      step_projected: ``(params, carry, xp) -> (carry, y)`` where ``xp`` is
        ``project``'s output for one step (``<[*B, G, H]>``, the plain RNN's
        ``<[*B, H]>``); ``step(p, c, x) == step_projected(p, c, project(p, x))``.
      gate_values: ``(params, carry, x) -> {gate name: <float32>[*B, H]}``, keyed by
        ``gates``: the activated gates and (the last key) the candidate of the step
        ``step(params, carry, x)`` takes (``{}`` for the plain RNN); for inspecting
        what the gates do.
    """

    name: str
    hidden_size: int
    gates: tuple[str, ...]
    options: Mapping[str, Any]
    init: Callable[[Array, int], Params]
    initial_carry: Callable[[], Any]
    step: Callable[[Params, Any, Array], tuple[Any, Array]]
    project: Callable[[Params, Array], Array]
    step_projected: Callable[[Params, Any, Array], tuple[Any, Array]]
    gate_values: Callable[[Params, Any, Array], dict[str, Array]]

    def input_size(self, params: Params) -> int:
        """The input size ``params`` were initialised for."""
        return params["W_x"].shape[0]


# A cell is a static value to JAX, not a container of arrays: no leaves (its fields
# are names and functions), hashable, so it can be a static argument of jax.jit or
# sit in a pytree of arrays that is mapped over.
jax.tree_util.register_static(Cell)


# ---------------------------------------------------------------------------
# Validation and initialisation helpers.


def _bool_option(value: Any, name: str) -> bool:
    """``value`` as a Python bool if it is a bool (NumPy's included), else ValueError
    naming ``name``."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: expected a bool, got {value!r}")
    return bool(value)


def _number_option(value: Any, name: str, expected: str = "a number") -> float:
    """``value`` as a Python float if it is a real number (NumPy's and concrete 0-d
    arrays included, not a bool), else ValueError naming ``name`` and ``expected``."""
    is_number = isinstance(value, (int, float, np.integer, np.floating)) or (
        not isinstance(value, jax.core.Tracer)
        and isinstance(value, (np.ndarray, jax.Array))
        and value.shape == ()
        and (jnp.issubdtype(value.dtype, jnp.integer) or jnp.issubdtype(value.dtype, jnp.floating))
    )
    if not is_number or isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return float(value)


def _int_option(value: Any, name: str, minimum: int, expected: str) -> int:
    """``value`` as a Python int if it is an integer >= ``minimum`` (NumPy's
    included, not a bool), else ValueError naming ``name`` and ``expected``."""
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not is_int or value < minimum:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return int(value)


def _check_hidden_size(hidden_size: Any) -> int:
    return _int_option(hidden_size, "hidden_size", 1, "a positive int")


def _check_input_size(input_size: Any) -> int:
    return _int_option(input_size, "input_size", 1, "a positive int")


def _check_x(params: Params, x: Array, name: str = "x") -> None:
    """Raises at trace time when ``x`` is not real floats (integers are token ids and
    never get here) or its last axis is not the params' input size."""
    dtype = x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{name}: expected float features or integer token ids, got {dtype}; cast "
            f"boolean features with x.astype(jnp.float32)"
        )
    expected = params["W_x"].shape[0]
    shape = jnp.shape(x)
    if len(shape) == 0 or shape[-1] != expected:
        raise ValueError(
            f"{name}: expected last dimension {expected} (the input_size the params "
            f"were initialised with), got shape {tuple(shape)}"
        )


def _step_batch(xp: Array, block: tuple[int, ...]) -> tuple[int, ...]:
    """The leading batch axes ``B`` of one step's projected input ``xp <[*B, *block]>``
    (``block``: ``(H,)`` or ``(G, H)``); ValueError naming ``xp`` for another shape."""
    shape = tuple(jnp.shape(xp))
    cut = len(shape) - len(block)
    if cut < 0 or shape[cut:] != block:
        raise ValueError(
            f"xp: expected shape [*B, {', '.join(map(str, block))}] (this cell's projected "
            f"input of one step), got {shape}"
        )
    return shape[:cut]


def _check_carry(name: str, value: Array, batch: tuple[int, ...], hidden: int) -> None:
    """A step's carry leaf must be ``<float32>[*B, H]``, with the batch axes of ``x``."""
    want = (*batch, hidden)
    if tuple(jnp.shape(value)) != want:
        raise ValueError(
            f"{name}: expected shape {want} (the batch axes {batch} of x, then "
            f"hidden_size), got {tuple(jnp.shape(value))}"
        )


def _check_params(params: Any, name: str, hidden: int, gates: int, extra: tuple = ()) -> None:
    """A step's params must be this cell's (``init``'s keys, ``W_h`` of
    ``[H, G, H]``, or ``[H, H]`` for the plain RNN): ValueError naming ``params``
    otherwise, rather than a KeyError or a shape error about an internal array."""
    want = ("W_x", "W_h", "b", *extra)
    if not isinstance(params, dict) or any(k not in params for k in want):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(
            f"params: expected the {name} cell's params (keys {list(want)} from "
            f"cell.init), got {got}"
        )
    shape = (hidden, gates, hidden) if gates else (hidden, hidden)
    if tuple(jnp.shape(params["W_h"])) != shape:
        raise ValueError(
            f"params: W_h of shape {shape} expected for this {name} cell (hidden_size "
            f"{hidden}), got {tuple(jnp.shape(params['W_h']))}: params of another cell or size"
        )


def _gate_stack(init: Initializer, key: Array, rows: int, gates: int, hidden: int) -> Array:
    """``<float32>[rows, gates, hidden]``, each gate's block drawn on its own."""
    keys = jax.random.split(key, gates)
    return jnp.stack([init(k, (rows, hidden), jnp.float32) for k in keys], axis=1)


def _gated_init(
    gates: tuple[str, ...],
    hidden_size: int,
    input_init: Initializer,
    recurrent_init: Initializer,
    bias_init: Initializer,
) -> Callable[[Array, int], Params]:
    def init(key: Array, input_size: int) -> Params:
        input_size = _check_input_size(input_size)
        kx, kh, kb = jax.random.split(key, 3)
        g = len(gates)
        return {
            "W_x": _gate_stack(input_init, kx, input_size, g, hidden_size),
            "W_h": _gate_stack(recurrent_init, kh, hidden_size, g, hidden_size),
            "b": bias_init(kb, (g, hidden_size), jnp.float32),
        }

    return init


def _matmul_gates(v: Array, w: Array) -> Array:
    """``v <[..., K]> @ w <[K, G, H]> -> <[..., G, H]>`` as one matmul."""
    k, g, h = w.shape
    out = v @ w.reshape(k, g * h)
    return out.reshape(*out.shape[:-1], g, h)


def gather_rows(w: Array, ids: Array) -> Array:
    """``onehot(ids) @ w`` as a row gather ``<[*ids.shape, *w.shape[1:]]>``, with
    ``jax.nn.one_hot``'s rule for ids outside ``[0, V)`` (negative ones included): a
    zero row, and no gradient. (A plain ``w[ids]`` would clamp them to row V-1 or
    wrap negative ones around, while the one-hot gradient left them out.) Autodiff
    gives it a scatter-add gradient."""
    ids = jnp.where(ids < 0, w.shape[0], ids)  # out of range, not wrapped around
    return jnp.take(w, ids, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def lookup_rows(w: Array, ids: Array) -> Array:
    """``onehot(ids) @ w`` as the row gather :func:`gather_rows` (out-of-range ids: zero
    rows): ``<[*ids.shape, *w.shape[1:]]>``.

    The gradient is the dense ``onehot(ids)ᵀ @ g`` rather than the scatter-add XLA
    derives for a gather, which is several times slower on CPU when ids repeat.
    """
    return gather_rows(w, ids)


def _lookup_rows_fwd(w: Array, ids: Array) -> tuple[Array, tuple[Array, Array]]:
    return gather_rows(w, ids), (ids, jnp.zeros((w.shape[0], 0), w.dtype))


def _lookup_rows_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, None]:
    ids, rows = res
    one_hot = jax.nn.one_hot(ids, rows.shape[0], dtype=g.dtype)  # <[*ids.shape, V]>
    # contracting the id axes as they are (no flattening reshape) keeps a sharded
    # batch axis sharded: each device sums its rows, then one all-reduce
    axes = tuple(range(ids.ndim))
    return jax.lax.dot_general(one_hot, g, ((axes, axes), ((), ()))).astype(rows.dtype), None


lookup_rows.defvjp(_lookup_rows_fwd, _lookup_rows_bwd)


def is_token_input(xs: Array) -> bool:
    """Integer inputs are token ids standing for one-hot vectors of size ``input_size``."""
    return jnp.issubdtype(jnp.asarray(xs).dtype, jnp.integer)


def _project_gated(params: Params, xs: Array) -> Array:
    if is_token_input(xs):  # onehot(x) @ W_x is row x of W_x: a lookup, not a matmul
        return lookup_rows(params["W_x"], xs) + params["b"]
    _check_x(params, xs)
    return _matmul_gates(xs, params["W_x"]) + params["b"]


_DEFAULT_INPUT_INIT = jax.nn.initializers.lecun_normal()
_DEFAULT_RECURRENT_INIT = jax.nn.initializers.orthogonal()
_DEFAULT_BIAS_INIT = jax.nn.initializers.zeros


# ---------------------------------------------------------------------------
# Plain RNN.


def rnn(
    hidden_size: int,
    activation: str = "tanh",
    *,
    input_init: Initializer = _DEFAULT_INPUT_INIT,
    recurrent_init: Initializer = _DEFAULT_RECURRENT_INIT,
    bias_init: Initializer = _DEFAULT_BIAS_INIT,
) -> Cell:
    r"""The plain (Elman) RNN cell.

    .. math:: H_t = \phi(X_t W_{xh} + H_{t-1} W_{hh} + b_h)

    Params: ``W_x <float32>[I, H]`` (W_xh), ``W_h <float32>[H, H]`` (W_hh),
    ``b <float32>[H]`` (b_h). Carry and output: ``<float32>[H]``.

    Args:
      hidden_size: H > 0.
      activation: phi, ``"tanh"`` or ``"relu"`` (PyTorch's ``nonlinearity``).
      input_init, recurrent_init, bias_init: ``jax.nn.initializers``-style functions
        ``(key, shape, dtype) -> array``.
    """
    hidden_size = _check_hidden_size(hidden_size)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    phi = ACTIVATIONS[activation]

    def init(key: Array, input_size: int) -> Params:
        input_size = _check_input_size(input_size)
        kx, kh, kb = jax.random.split(key, 3)
        return {
            "W_x": input_init(kx, (input_size, hidden_size), jnp.float32),
            "W_h": recurrent_init(kh, (hidden_size, hidden_size), jnp.float32),
            "b": bias_init(kb, (hidden_size,), jnp.float32),
        }

    def project(params: Params, xs: Array) -> Array:
        if is_token_input(xs):
            return lookup_rows(params["W_x"], xs) + params["b"]
        _check_x(params, xs)
        return xs @ params["W_x"] + params["b"]

    def step_projected(params: Params, h: Array, xp: Array) -> tuple[Array, Array]:
        _check_params(params, "rnn", hidden_size, 0)
        _check_carry("carry", h, _step_batch(xp, (hidden_size,)), hidden_size)
        h = phi(xp + h @ params["W_h"])
        return h, h

    def step(params: Params, h: Array, x: Array) -> tuple[Array, Array]:
        _check_params(params, "rnn", hidden_size, 0)
        return step_projected(params, h, project(params, x))

    return _builtin(
        Cell(
            name="rnn",
            hidden_size=hidden_size,
            gates=(),
            options=Options(activation=activation),
            init=init,
            initial_carry=lambda: jnp.zeros((hidden_size,), jnp.float32),
            step=step,
            project=project,
            step_projected=step_projected,
            gate_values=lambda params, h, x: {},
        )
    )


# ---------------------------------------------------------------------------
# GRU.

GRU_GATES = ("r", "z", "h")


def gru(
    hidden_size: int,
    reset_after: bool = False,
    *,
    pin_reset: float | None = None,
    pin_update: float | None = None,
    input_init: Initializer = _DEFAULT_INPUT_INIT,
    recurrent_init: Initializer = _DEFAULT_RECURRENT_INIT,
    bias_init: Initializer = _DEFAULT_BIAS_INIT,
) -> Cell:
    r"""The gated recurrent unit (Cho et al. 2014).

    With ``reset_after=False`` (the default, the seed's equations; Keras
    ``reset_after=False``)::

        R_t  = sigma(X_t W_xr + H_{t-1} W_hr + b_r)            reset gate
        Z_t  = sigma(X_t W_xz + H_{t-1} W_hz + b_z)            update gate
        H~_t = tanh(X_t W_xh + (R_t * H_{t-1}) W_hh + b_h)     candidate state
        H_t  = Z_t * H_{t-1} + (1 - Z_t) * H~_t

    With ``reset_after=True`` (PyTorch, cuDNN, flax.linen) the reset gate acts after
    the recurrent matmul, which has a bias of its own, ``b_hn``::

        H~_t = tanh(X_t W_xh + b_h + R_t * (H_{t-1} W_hh + b_hn))

    Params: ``W_x <float32>[I, 3, H]``, ``W_h <float32>[H, 3, H]``,
    ``b <float32>[3, H]`` with gate axis ``(r, z, h)`` (``h`` is the candidate), and
    for ``reset_after=True`` also ``b_hn <float32>[H]``. Carry, output: ``<float32>[H]``.

    Args:
      pin_reset, pin_update: fix R_t or Z_t to a constant in [0, 1] (ablations: an
        open reset gate, R_t = 1, and Z_t = 0 make the GRU a plain tanh RNN; Z_t = 1
        copies the state and skips the input). ``None``: learned, as usual.
    """
    hidden_size = _check_hidden_size(hidden_size)
    reset_after = _bool_option(reset_after, "reset_after")
    pins = []
    for name, pin in (("pin_reset", pin_reset), ("pin_update", pin_update)):
        expected = "None or a number in [0, 1]"
        if pin is not None and not 0 <= (pin := _number_option(pin, name, expected)) <= 1:
            raise ValueError(f"{name}: expected {expected}, got {pin!r}")
        pins.append(pin)
    pin_reset, pin_update = pins
    gated_init = _gated_init(GRU_GATES, hidden_size, input_init, recurrent_init, bias_init)

    def init(key: Array, input_size: int) -> Params:
        params = gated_init(key, input_size)
        if reset_after:
            params["b_hn"] = bias_init(jax.random.fold_in(key, 3), (hidden_size,), jnp.float32)
        return params

    def pinned(gate: Array, pin: float | None) -> Array:
        return gate if pin is None else jnp.full_like(gate, pin)

    def gates(params: Params, h: Array, xp: Array) -> tuple[Array, Array, Array]:
        """``(R_t, Z_t, H~_t)``."""
        _check_params(params, "gru", hidden_size, 3, ("b_hn",) if reset_after else ())
        _check_carry("carry", h, _step_batch(xp, (3, hidden_size)), hidden_size)
        w_h = params["W_h"]
        if reset_after:
            hp = _matmul_gates(h, w_h)  # all three recurrent products at once
            r = pinned(jax.nn.sigmoid(xp[..., 0, :] + hp[..., 0, :]), pin_reset)
            z = pinned(jax.nn.sigmoid(xp[..., 1, :] + hp[..., 1, :]), pin_update)
            h_tilde = jnp.tanh(xp[..., 2, :] + r * (hp[..., 2, :] + params["b_hn"]))
        else:
            rz = jax.nn.sigmoid(xp[..., :2, :] + _matmul_gates(h, w_h[:, :2]))
            r, z = pinned(rz[..., 0, :], pin_reset), pinned(rz[..., 1, :], pin_update)
            h_tilde = jnp.tanh(xp[..., 2, :] + (r * h) @ w_h[:, 2])
        return r, z, h_tilde

    def step_projected(params: Params, h: Array, xp: Array) -> tuple[Array, Array]:
        r, z, h_tilde = gates(params, h, xp)
        h = z * h + (1.0 - z) * h_tilde
        return h, h

    def step(params: Params, h: Array, x: Array) -> tuple[Array, Array]:
        _check_params(params, "gru", hidden_size, 3, ("b_hn",) if reset_after else ())
        return step_projected(params, h, _project_gated(params, x))

    def gate_values(params: Params, h: Array, x: Array) -> dict[str, Array]:
        return dict(zip(GRU_GATES, gates(params, h, _project_gated(params, x)), strict=True))

    return _builtin(
        Cell(
            name="gru",
            hidden_size=hidden_size,
            gates=GRU_GATES,
            options=Options(reset_after=reset_after, pin_reset=pin_reset, pin_update=pin_update),
            init=init,
            initial_carry=lambda: jnp.zeros((hidden_size,), jnp.float32),
            step=step,
            project=_project_gated,
            step_projected=step_projected,
            gate_values=gate_values,
        )
    )


# ---------------------------------------------------------------------------
# LSTM.

LSTM_GATES = ("i", "f", "o", "c")


def lstm(
    hidden_size: int,
    forget_bias: float = 1.0,
    *,
    input_init: Initializer = _DEFAULT_INPUT_INIT,
    recurrent_init: Initializer = _DEFAULT_RECURRENT_INIT,
    bias_init: Initializer = _DEFAULT_BIAS_INIT,
) -> Cell:
    r"""Long short-term memory (Hochreiter & Schmidhuber 1997, with forget gate)::

        I_t  = sigma(X_t W_xi + H_{t-1} W_hi + b_i)     input gate
        F_t  = sigma(X_t W_xf + H_{t-1} W_hf + b_f)     forget gate
        O_t  = sigma(X_t W_xo + H_{t-1} W_ho + b_o)     output gate
        C~_t = tanh(X_t W_xc + H_{t-1} W_hc + b_c)      input node
        C_t  = F_t * C_{t-1} + I_t * C~_t               memory cell
        H_t  = O_t * tanh(C_t)

    Params: ``W_x <float32>[I, 4, H]``, ``W_h <float32>[H, 4, H]``,
    ``b <float32>[4, H]`` with gate axis ``(i, f, o, c)``. Carry:
    ``LSTMCarry(h <float32>[H], c <float32>[H])``; output: ``h`` only (the memory
    cell stays internal). Same function as PyTorch's ``nn.LSTM`` and flax.linen's
    ``LSTMCell``.

    Args:
      forget_bias: initial value of ``b_f`` (added to ``bias_init``'s draw).
    """
    hidden_size = _check_hidden_size(hidden_size)
    forget_bias = _number_option(forget_bias, "forget_bias")
    gated_init = _gated_init(LSTM_GATES, hidden_size, input_init, recurrent_init, bias_init)

    def init(key: Array, input_size: int) -> Params:
        params = gated_init(key, input_size)
        params["b"] = params["b"].at[1].add(float(forget_bias))
        return params

    def gates(params: Params, carry: LSTMCarry, xp: Array) -> tuple[Array, ...]:
        """``(I_t, F_t, O_t, C~_t)``."""
        _check_params(params, "lstm", hidden_size, 4)
        if not isinstance(carry, LSTMCarry):
            raise ValueError(
                f"carry: expected an LSTMCarry(h, c) (cell.initial_carry(), or "
                f"LSTMCarry(h, c) of your arrays), got {type(carry).__name__}"
            )
        batch = _step_batch(xp, (4, hidden_size))
        _check_carry("carry.h", carry.h, batch, hidden_size)
        _check_carry("carry.c", carry.c, batch, hidden_size)
        pre = xp + _matmul_gates(carry.h, params["W_h"])
        i, f, o = (jax.nn.sigmoid(pre[..., k, :]) for k in range(3))
        return i, f, o, jnp.tanh(pre[..., 3, :])

    def step_projected(params: Params, carry: LSTMCarry, xp: Array) -> tuple[LSTMCarry, Array]:
        i, f, o, c_tilde = gates(params, carry, xp)
        c = f * carry.c + i * c_tilde
        h = o * jnp.tanh(c)
        return LSTMCarry(h, c), h

    def gate_values(params: Params, carry: LSTMCarry, x: Array) -> dict[str, Array]:
        values = gates(params, carry, _project_gated(params, x))
        return dict(zip(LSTM_GATES, values, strict=True))

    def step(params: Params, carry: LSTMCarry, x: Array) -> tuple[LSTMCarry, Array]:
        _check_params(params, "lstm", hidden_size, 4)
        return step_projected(params, carry, _project_gated(params, x))

    return _builtin(
        Cell(
            name="lstm",
            hidden_size=hidden_size,
            gates=LSTM_GATES,
            options=Options(forget_bias=forget_bias),
            init=init,
            initial_carry=lambda: LSTMCarry(
                jnp.zeros((hidden_size,), jnp.float32), jnp.zeros((hidden_size,), jnp.float32)
            ),
            step=step,
            project=_project_gated,
            step_projected=step_projected,
            gate_values=gate_values,
        )
    )


CELLS = {"rnn": rnn, "gru": gru, "lstm": lstm}


def uniform_init(hidden_size: int) -> Initializer:
    """PyTorch's default for recurrent layers: every weight and bias ~ U(-k, k), k = 1/sqrt(H)."""
    k = 1.0 / float(hidden_size) ** 0.5

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -k, k)

    return init


INIT_SCHEMES = ("default", "uniform")


def init_options(scheme: str, hidden_size: int) -> dict[str, Initializer]:
    """Initialiser keyword options of a named scheme.

    ``"default"``: LeCun-normal input weights, orthogonal recurrent weights, zero
    biases (the factories' defaults). ``"uniform"``: PyTorch's ``nn.RNN/GRU/LSTM``
    initialisation, :func:`uniform_init` for weights and biases alike. The LSTM's
    ``forget_bias`` (default 1.0) is added to ``b_f``'s draw under either scheme:
    PyTorch's exact initialisation is ``"uniform"`` with ``forget_bias=0``.
    """
    if scheme == "default":
        return {}
    if scheme == "uniform":
        u = uniform_init(hidden_size)
        return {"input_init": u, "recurrent_init": u, "bias_init": u}
    raise ValueError(f"init: expected one of {list(INIT_SCHEMES)}, got {scheme!r}")


def make(name: str, hidden_size: int, init: str = "default", **options: Any) -> Cell:
    """A cell by name (``"rnn"``, ``"gru"``, ``"lstm"``) and initialisation scheme name."""
    if name not in CELLS:
        raise ValueError(f"cell: expected one of {sorted(CELLS)}, got {name!r}")
    return CELLS[name](hidden_size, **options, **init_options(init, hidden_size))
