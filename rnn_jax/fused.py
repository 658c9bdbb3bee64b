r"""Recurrent layers with hand-written backward passes (the ``"fused"`` implementation).

Autodiff of a ``lax.scan`` accumulates the recurrent weight gradient inside the
backward loop: one small ``[H, B] @ [B, G*H]`` matmul per step. The layers here do
what cuDNN and oneDNN do instead:

* forward: the input projection ``X W_x + b`` of all steps is one matmul (or a row
  lookup for token ids) before the loop; each step computes ``H_{t-1} W_h`` and the
  gates, and saves the activated gates;
* backward loop: from the saved gates, each step computes the gradient of the gate
  pre-activations ``dA_t <float32>[B, G*H]`` and passes ``dA_t W_hᵀ`` to step t-1:
  one matmul per step, no weight gradient;
* after the loop, the weight gradients are single large matmuls over all T*B rows:
  ``dW_h = Σ_t H_{t-1}ᵀ dA_t``, ``dW_x = Xᵀ dA``, ``db = Σ dA``.

Layout is time-major and batch-explicit: ``xs <float32>[T, B, I]`` (or token ids
``<int32>[T, B]``), carries ``<float32>[B, H]``, outputs ``<float32>[T, B, H]``.
Variable lengths work as in :mod:`rnn_jax.networks`: past ``lengths[b]`` the carry is
frozen and the output is zero, and nothing there gets or passes gradient.

The backward passes follow from the cells' equations in :mod:`rnn_jax.cells`
(written ``σ' = σ(1-σ)``, ``tanh' = 1 - tanh²``). For the LSTM, with ``dh, dc`` the
gradients reaching ``H_t, C_t``::

    dC   = dc + dh * O * (1 - tanh(C_t)²)
    dA_i = dC * C~ * I(1-I)        dA_f = dC * C_{t-1} * F(1-F)
    dA_o = dh * tanh(C_t) * O(1-O) dA_c = dC * I * (1 - C~²)
    dc_{t-1} = dC * F              dh_{t-1} = dA W_hᵀ

For the GRU, with ``dh`` the gradient reaching ``H_t``::

    dA_z = dh * (H_{t-1} - H~) * Z(1-Z)       dA_h = dh * (1 - Z) * (1 - H~²)
    reset after:  dA_r = dA_h * (H_{t-1} W_hh + b_hn) * R(1-R)
                  dh_{t-1} = dh * Z + [dA_r, dA_z, dA_h * R] W_hᵀ
    reset before: d(R*H) = dA_h W_hhᵀ,  dA_r = d(R*H) * H_{t-1} * R(1-R)
                  dh_{t-1} = dh * Z + d(R*H) * R + [dA_r, dA_z] [W_hr, W_hz]ᵀ

and for the plain RNN ``dA = dh * phi'``, ``dh_{t-1} = dA W_hᵀ``. Every layer here
gives the same outputs and gradients as the autodiff path (``tests/test_fused.py``).

``remat=True`` runs the layer in chunks of K ~ sqrt(T) steps (:func:`chunk_size`)
with the input projection inside the custom VJP: the forward pass keeps only the
carry at the start of each chunk; the backward pass, chunk by chunk in reverse,
recomputes the chunk's projection and gates, runs the backward loop over it and
adds its weight gradients. Its temporary memory is the outputs plus O(K) buffers
(LSTM H=128 B=32 T=1024 on CPU: 56.5 vs 248 MiB, 1.01x the time). Without remat,
long sequences on CPU run the same chunked backward pass on the gates saved by
one forward loop (``chunk``, :func:`default_chunk`): the per-step gradient
buffers stay in cache. Under a data-parallel mesh the chunked forms run per
device (:func:`_per_device`).

What makes it fast on CPU (measured with the XLA profiler on the 2-core development
machine, LSTM H=128 B=32 T=1024): weight gradients outside the loop; gate blocks
side by side (``[B, G*H]``) rather than on an axis of their own, whose concatenation
cost 18-22 us per step; the four LSTM activations as one ``a*tanh(a*x)+b``; nothing
saved twice; no masking ops when there are no lengths; ``W_hᵀ`` materialised once;
and step fusions XLA:CPU can vectorise. It emits an elementwise fusion as scalar
code when it slices a column block out of a scan's per-step input (a dynamic slice
of the stacked array; seen in the optimised LLVM IR, ``--xla_dump_to``): so the
gates are saved one array per gate, and the GRU's forward-only loop loads its next
input through the carry (:func:`_scan`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax import cells, native, persistent
from rnn_jax.cells import Cell, LSTMCarry, _check_x
from rnn_jax.parallel import DATA_AXIS

Array = jax.Array


def supports(cell: Cell) -> bool:
    """Whether :func:`layer` has a hand-written backward pass for ``cell``: one of
    :mod:`rnn_jax.cells`' cells as built (a cell whose functions were replaced runs
    the scan, which calls them)."""
    return cell.name in ("rnn", "gru", "lstm") and cells.is_builtin(cell)


def _flat(w: Array) -> Array:
    """``W_h <[H, G, H]> -> <[H, G*H]>`` (the plain RNN's ``[H, H]`` stays)."""
    return w.reshape(w.shape[0], -1)


def _transposed(w: Array) -> Array:
    """``wᵀ`` materialised once before the loop: inside it, ``dA @ wᵀ`` then runs as a
    plain matmul (measured 22 vs 27 us per step for the LSTM at H=128, B=32), instead
    of XLA folding the transpose into every step's dot."""
    return jax.lax.optimization_barrier(w.T)


MATMUL_DTYPES = ("float32", "bfloat16")
KERNELS = ("xla", "pallas", "native")


class LoopOptions(NamedTuple):
    """Static options of the loops: ``unroll`` (steps per loop iteration),
    ``matmul_dtype`` (the operand type of every matmul; accumulation, gates and
    carries stay float32) and ``kernel``: ``"xla"`` (a ``lax.scan`` of XLA ops),
    ``"pallas"`` (each loop one GPU kernel, :mod:`rnn_jax.persistent`) or ``"native"``
    (each LSTM loop one C++ function on the CPU, :mod:`rnn_jax.native`); ``reverse``:
    the forward loop runs from the last step to the first (the XLA loops and the
    native kernels; every array stays in time order)."""

    unroll: int = 1
    matmul_dtype: str = "float32"
    kernel: str = "xla"
    reverse: bool = False


def cast(w: Array, dtype: str) -> Array:
    """``w`` in the matmul type: bfloat16 casts; ``"float32"`` computes in at least
    float32, as the scan does: bfloat16 / float16 params are widened to float32,
    float64 ones (under ``jax.enable_x64``) stay float64."""
    if dtype == "float32":
        return w if jnp.finfo(w.dtype).bits >= 32 else w.astype(jnp.float32)
    return w.astype(dtype)


def _mm(a: Array, w: Array) -> Array:
    """``a @ w``; with bfloat16 ``w`` (cast once by :func:`prepare`), ``a`` is cast to
    bfloat16 too and the product accumulated and returned in float32."""
    if w.dtype != jnp.bfloat16:
        return a @ w
    return jnp.matmul(a.astype(w.dtype), w, preferred_element_type=jnp.float32)


def _dsigmoid(s: Array) -> Array:
    return s * (1.0 - s)


# ---------------------------------------------------------------------------
# Per-cell kernels. Inside the loops the gate axis is flattened: one step of the
# input projection ``xp`` is <[B, G*H]> (<[B, H]> for the RNN) and gate k is the
# column block ``[:, k*H:(k+1)*H]`` (``_block``); measured on CPU, concatenating
# column blocks is several times cheaper than stacking on a gate axis.
#   forward(carry, xp) -> (carry, y, saved): one step, and what its backward needs
#     besides y and H_{t-1} (which are stacked anyway); the backward loop is bound by
#     reading these from memory, so they are kept few;
#   backward(saved, y, h_prev, dcarry) -> (dprev, grads): grads, a tuple of arrays
#     the backward loop stacks over time, from which gate_gradient gives dxp, the
#     gradient of the gate pre-activations <[B, G*H]>, and weight_grads the rest;
#     they are arrays the step computes anyway (the first is the input of the
#     step's matmul), so that stacking them is a plain copy: stacking dxp itself,
#     where it differs from the matmul's input (the GRU), made XLA:CPU recompute it
#     inside the write, as scalar code;
#   weight_grads(hprev, grads) -> {name: gradient} of the recurrent params, from
#     everything stacked over time, <[T, B, ...]>.


def _block(a: Array, k: int, hidden: int) -> Array:
    """Gate ``k``'s columns of ``a <[B, G*H]>``: ``<[B, H]>``."""
    return a[:, k * hidden : (k + 1) * hidden]


def _rnn_prepare(cell: Cell, rec: dict[str, Array], dtype: str) -> dict[str, Array]:
    w = cast(rec["W_h"], dtype)
    return {"w": w, "w_t": _transposed(w)}


def _rnn_kernels(cell: Cell, prep: dict[str, Array]):
    relu = cell.options["activation"] == "relu"
    phi = jax.nn.relu if relu else jnp.tanh
    w, w_t = prep["w"], prep["w_t"]

    def forward(h, xp):
        h2 = phi(xp + _mm(h, w))
        return h2, h2, ()

    def backward(saved, h2, h, dh):
        da = dh * (h2 > 0) if relu else dh * (1.0 - h2 * h2)
        return _mm(da, w_t), (da,)

    def weight_grads(hprev, grads):
        return {"W_h": _contract(hprev, grads[0], w.dtype)}

    return forward, backward, weight_grads


def _gru_prepare(cell: Cell, rec: dict[str, Array], dtype: str) -> dict[str, Array]:
    w = cast(rec["W_h"], dtype)  # [H, 3, H]
    prep = {"w_flat": _flat(w), "w_rz": _flat(w[:, :2]), "w_n": w[:, 2]}
    prep.update({k + "_t": _transposed(v) for k, v in list(prep.items())})
    if "b_hn" in rec:
        prep["b_hn"] = rec["b_hn"]
    return prep


def _gru_kernels(cell: Cell, prep: dict[str, Array]):
    reset_after = cell.options["reset_after"]
    pin_r, pin_z = cell.options["pin_reset"], cell.options["pin_update"]
    hidden = cell.hidden_size
    w_flat, w_rz, w_n = prep["w_flat"], prep["w_rz"], prep["w_n"]
    w_flat_t, w_rz_t, w_n_t = prep["w_flat_t"], prep["w_rz_t"], prep["w_n_t"]

    def gate(pre, pin):  # sigma(pre), or the pinned constant
        if pin is not None:
            return jnp.full_like(pre, pin)
        return jax.nn.sigmoid(pre)

    # R_t and Z_t are computed and saved as arrays of their own, so that the backward
    # step reads no column block of a stacked save (see the LSTM's forward).
    def forward(h, xp):
        if reset_after:
            hp = _mm(h, w_flat)
            r = gate(_block(xp, 0, hidden) + _block(hp, 0, hidden), pin_r)
            z = gate(_block(xp, 1, hidden) + _block(hp, 1, hidden), pin_z)
            hn = _block(hp, 2, hidden) + prep["b_hn"]
            n = jnp.tanh(_block(xp, 2, hidden) + r * hn)
            saved = (r, z, n, hn)
        else:
            pre = _mm(h, w_rz)
            r = gate(_block(xp, 0, hidden) + _block(pre, 0, hidden), pin_r)
            z = gate(_block(xp, 1, hidden) + _block(pre, 1, hidden), pin_z)
            n = jnp.tanh(_block(xp, 2, hidden) + _mm(r * h, w_n))
            saved = (r, z, n)
        h2 = z * h + (1.0 - z) * n
        return h2, h2, saved

    def backward(saved, h2, h, dh):
        r, z, n = saved[:3]
        dz = dh * (h - n)
        da_n = dh * (1.0 - z) * (1.0 - n * n)
        da_z = jnp.zeros_like(dz) if pin_z is not None else dz * _dsigmoid(z)
        # grads: (the matmul's input, dA_n[, R*H_{t-1}]); gate_gradient joins
        # [dA_r, dA_z] (the first block(s) of the matmul's input) and dA_n.
        if reset_after:
            hn = saved[3]
            da_r = jnp.zeros_like(dz) if pin_r is not None else da_n * hn * _dsigmoid(r)
            dhn = da_n * r  # cotangent of H W_hn + b_hn
            d_all = jnp.concatenate([da_r, da_z, dhn], axis=1)  # of H W_h (+ b_hn)
            return dh * z + _mm(d_all, w_flat_t), (d_all, da_n)
        drh = _mm(da_n, w_n_t)  # cotangent of R_t * H_{t-1}
        da_r = jnp.zeros_like(dz) if pin_r is not None else drh * h * _dsigmoid(r)
        d_rz = jnp.concatenate([da_r, da_z], axis=1)
        return dh * z + drh * r + _mm(d_rz, w_rz_t), (d_rz, da_n, r * h)

    def weight_grads(hprev, grads):
        if reset_after:  # one matmul for all three blocks: dHn is the third
            d_all = grads[0]
            d_w = _contract(hprev, d_all, w_flat.dtype).reshape(hidden, 3, hidden)
            return {"W_h": d_w, "b_hn": jnp.sum(d_all[:, :, 2 * hidden :], axis=(0, 1))}
        d_rz, da_n, rh = grads
        d_rz = _contract(hprev, d_rz, w_flat.dtype).reshape(hidden, 2, hidden)
        d_n = _contract(rh, da_n, w_flat.dtype)
        return {"W_h": jnp.concatenate([d_rz, d_n[:, None]], axis=1)}

    return forward, backward, weight_grads


def _lstm_prepare(cell: Cell, rec: dict[str, Array], dtype: str) -> dict[str, Array]:
    w_flat = cast(_flat(rec["W_h"]), dtype)  # [H, 4H]
    return {"w_flat": w_flat, "w_t": _transposed(w_flat)}


def _lstm_kernels(cell: Cell, prep: dict[str, Array]):
    hidden = cell.hidden_size
    w_flat, w_t = prep["w_flat"], prep["w_t"]
    # Per-column constants over the four gate blocks (i, f, o, c~): every gate is
    # a * tanh(a * pre) + b, with sigma(x) = tanh(x/2)/2 + 1/2 for i, f, o and plain
    # tanh for the input node, so all four are one elementwise op with no concatenate.
    is_node = np.arange(4 * hidden) >= 3 * hidden
    a = jnp.asarray(np.where(is_node, 1.0, 0.5), jnp.float32)
    b = jnp.asarray(np.where(is_node, 0.0, 0.5), jnp.float32)

    def forward(carry, xp):
        acts = a * jnp.tanh(a * (xp + _mm(carry.h, w_flat))) + b  # [I, F, O, C~]
        i, f, o, g = (_block(acts, k, hidden) for k in range(4))
        c = f * carry.c + i * g
        tc = jnp.tanh(c)
        h = o * tc
        # the gates saved one by one: the backward step's fusion reads them as
        # slices of the stacked saves, which XLA:CPU vectorises only when no column
        # offset is involved (one [B, 4H] save made that fusion scalar code)
        return LSTMCarry(h, c), h, (i, f, o, g, carry.c, tc)

    def backward(saved, h2, h_prev, dcarry):
        i, f, o, g, c_prev, tc = saved
        dh, dc = dcarry
        dc = dc + dh * o * (1.0 - tc * tc)
        da = jnp.concatenate(
            [
                dc * g * _dsigmoid(i),
                dc * c_prev * _dsigmoid(f),
                dh * tc * _dsigmoid(o),
                dc * i * (1.0 - g * g),
            ],
            axis=1,
        )
        return LSTMCarry(_mm(da, w_t), dc * f), (da,)

    def weight_grads(hprev, grads):
        return {"W_h": _contract(hprev, grads[0], w_flat.dtype)}

    return forward, backward, weight_grads


_KERNELS = {"rnn": _rnn_kernels, "gru": _gru_kernels, "lstm": _lstm_kernels}
_PREPARE = {"rnn": _rnn_prepare, "gru": _gru_prepare, "lstm": _lstm_prepare}


def lstm_forward_reference(w, h0, c0, xp, valid, reverse=False):
    """The forward loop of :mod:`rnn_jax.native`'s LSTM kernel, in XLA: ``(ys, h_T,
    c_T, acts, c_prev, tanh_c, h_prev_t)`` from ``W_h <[H, 4H]>``, the carry, ``xp
    <[T, B, 4H]>`` and ``valid <bool[T, B]>`` (steps not valid keep the carry and
    save zeros; ``h_prev_t <[H, T*B]>``: the hidden state before each step,
    transposed; ``reverse``: steps from the last to the first). The kernel's
    derivatives are this function's."""
    forward = _lstm_kernels(cells.lstm(w.shape[0]), {"w_flat": w, "w_t": w.T})[0]

    def body(carry, inp):
        xp_t, valid_t = inp
        new, y, (i, f, o, g, c_prev, tc) = forward(carry, xp_t)
        acts = jnp.concatenate([i, f, o, g], axis=-1)
        saves = (_mask(valid_t, y), _mask(valid_t, acts), c_prev, _mask(valid_t, tc), carry.h)
        return _where(valid_t, new, carry), saves

    final, (ys, acts, c_prev, tanh_c, h_prev) = jax.lax.scan(
        body, LSTMCarry(h0, c0), (xp, valid), reverse=reverse
    )
    h_prev_t = jnp.transpose(h_prev, (2, 0, 1)).reshape(h_prev.shape[2], -1)
    return ys, final.h, final.c, acts, c_prev, tanh_c, h_prev_t


def lstm_backward_reference(w, valid, acts, c_prev, tanh_c, dys, dh, dc, reverse=False):
    """The backward loop of :mod:`rnn_jax.native`'s LSTM kernel, in XLA: ``(dA <[T,
    B, 4H]>, dh_0, dc_0)`` from the forward loop's saves, the outputs' gradients
    and the final carry's (steps not valid pass the carry's gradient through;
    ``reverse``: that of a forward loop run with ``reverse``)."""
    hidden = w.shape[0]
    backward = _lstm_kernels(cells.lstm(hidden), {"w_flat": w, "w_t": w.T})[1]

    def body(dcarry, inp):
        dy_t, valid_t, acts_t, c_prev_t, tc_t = inp
        gates = tuple(_block(acts_t, k, hidden) for k in range(4))
        d_in = LSTMCarry(dcarry.h + dy_t, dcarry.c)
        d_prev, (da,) = backward((*gates, c_prev_t, tc_t), None, None, d_in)
        return _where(valid_t, d_prev, dcarry), _mask(valid_t, da)

    inputs = (dys, valid, acts, c_prev, tanh_c)
    dcarry0, da = jax.lax.scan(body, LSTMCarry(dh, dc), inputs, reverse=not reverse)
    return da, dcarry0.h, dcarry0.c


def prepare(cell: Cell, rec: dict[str, Array], dtype: str = "float32") -> dict[str, Array]:
    """The weights the kernels use, from the recurrent params ``rec`` (``W_h``, and
    ``b_hn`` for the reset-after GRU): flattened gate blocks and their transposes, in
    the matmul type ``dtype``, computed once before a loop (``jax.vmap``-able over a
    leading layer axis)."""
    return _PREPARE[cell.name](cell, rec, dtype)


def kernels(cell: Cell, prep: dict[str, Array]):
    """``(forward, backward, weight_grads)`` of ``cell`` (see above) on :func:`prepare`'s
    weights."""
    return _KERNELS[cell.name](cell, prep)


def gate_gradient(cell: Cell, grads: tuple[Array, ...]) -> Array:
    """``dxp <[..., G*H]>``, the gradient of the gate pre-activations, from the
    ``grads`` of the kernels' ``backward`` (one step's, or stacked over time)."""
    if cell.name != "gru":
        return grads[0]
    return jnp.concatenate([grads[0][..., : 2 * cell.hidden_size], grads[1]], axis=-1)


def _grads_of(cell: Cell, dxp: Array, extras: tuple[Array, ...]) -> tuple[Array, ...]:
    """The Pallas backward's ``(dxp, extras)`` as the kernels' ``grads`` (the GRU's
    ``extras`` is ``(dA_n * R,)``, the third block of its ``grads[0]``)."""
    if cell.name != "gru":
        return (dxp,)
    hidden = cell.hidden_size
    return (jnp.concatenate([dxp[..., : 2 * hidden], extras[0]], axis=-1), dxp[..., 2 * hidden :])


def _contract(v: Array, d: Array, dtype: Any = "float32") -> Array:
    """``Σ_{t,b} v[t,b]ᵀ d[t,b]``: ``<[T, B, K]>, <[T, B, ...]> -> <[K, ...]>`` as one
    matmul, operands in ``dtype``, result float32.

    Both leading axes are contracted as they are (no ``[T*B, K]`` reshape): under
    data parallelism the batch axis is sharded, and a reshape merging it with the
    time axis made the partitioner all-gather both operands onto every device
    (``[T, B, G*H]``: 64 MiB for the long LSTM) instead of summing partial products.
    """
    k = v.shape[-1]
    d2 = cast(d.reshape(*d.shape[:2], -1), dtype)
    low = d2.dtype == jnp.bfloat16
    out = jax.lax.dot_general(
        v.astype(d2.dtype) if low else v,
        d2,
        (((0, 1), (0, 1)), ((), ())),
        preferred_element_type=jnp.float32 if low else None,
    )
    return out.reshape(k, *d.shape[2:])


def _hidden(carry: Any) -> Array:
    return carry.h if isinstance(carry, LSTMCarry) else carry


def _expand(valid: Array, x: Array) -> Array:
    """``valid <bool>[*V]`` with trailing axes of size 1 to broadcast against ``x <[*V, ...]>``."""
    return valid.reshape(*valid.shape, *([1] * (x.ndim - valid.ndim)))


def _mask(valid: Array, x: Array) -> Array:
    """``x <[*V, ...]>`` set to zero where ``valid <bool>[*V]`` is false (``V``: the
    examples ``[B]``, or layers and examples ``[L, B]`` on the wavefront)."""
    return jnp.where(_expand(valid, x), x, jnp.zeros_like(x))


def _where(valid: Array, new: Any, old: Any) -> Any:
    """Per leaf: ``new`` where ``valid <bool>[*V]``, else ``old``."""
    return jax.tree_util.tree_map(lambda n, o: jnp.where(_expand(valid, n), n, o), new, old)


# ---------------------------------------------------------------------------
# The recurrence with a custom VJP. ``rec`` holds the recurrent params (W_h, and
# b_hn for the reset-after GRU); the input projection stays outside, under autodiff.


def _scan(body, carry, xs, *, unroll=1, prefetch=False, reverse=False):
    """``lax.scan(body, carry, xs, reverse=reverse)``; with ``prefetch`` on CPU, each
    step reads its inputs from the carry, loaded by the step before.

    XLA:CPU emitted the GRU's forward step (sigmoids and tanh over ``[B, H]``
    blocks) as scalar code when an operand was a dynamic slice of the stacked inputs
    (which is how a scan reads ``xs[t]``), and as AVX code without: loading
    ``xs[t + 1]`` into the carry keeps the slices out of the step's fusion. Measured
    on the 2-core CPU, forward pass at H=128, B=32, T=1024: GRU reset-after 71 ->
    30 ms, reset-before 42 -> 31 ms; but LSTM 33 -> 41 ms, RNN 11 -> 12 ms, and no
    gain beyond noise in the training step's loops; so only where it wins. Other
    backends run the plain scan (measured on a GPU that way).
    """
    leaves = jax.tree_util.tree_leaves(xs)
    num_steps = leaves[0].shape[0] if leaves else 0
    if not prefetch or jax.default_backend() != "cpu" or num_steps == 0:
        return jax.lax.scan(body, carry, xs, unroll=unroll, reverse=reverse)

    def load(t):
        return jax.tree_util.tree_map(
            lambda a: jax.lax.dynamic_index_in_dim(a, t, keepdims=False), xs
        )

    def step(c, t):
        inner, x_t = c
        inner, y = body(inner, x_t)
        following = jnp.maximum(t - 1, 0) if reverse else jnp.minimum(t + 1, num_steps - 1)
        return (inner, load(following)), y

    first = jax.tree_util.tree_map(lambda a: a[-1 if reverse else 0], xs)
    steps = jnp.arange(num_steps)
    (carry, _), ys = jax.lax.scan(step, (carry, first), steps, unroll=unroll, reverse=reverse)
    return carry, ys


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _recurrence(cell, opts, rec, carry0, xp, valid):
    ys, final, _ = _forward(cell, opts, False, rec, carry0, xp, valid)
    return ys, final


def _pallas(opts: LoopOptions, rec: dict[str, Array], carry0: Any, seq: Array) -> bool:
    """Whether the loops run as Pallas kernels: asked for, float32 params, carries and
    sequence (``xp`` or ``ys``: anything float64 runs the XLA loops) and at least one
    step. The forward and the backward pass decide alike."""
    arrays = [rec["W_h"], seq, *jax.tree_util.tree_leaves(carry0)]
    return (
        opts.kernel == "pallas" and all(a.dtype == jnp.float32 for a in arrays) and seq.shape[0] > 0
    )


def _native_types(kernel: str, matmul_dtype: str, arrays: Any) -> bool:
    """The native kernels asked for, with float32 matmuls and every leaf of
    ``arrays`` float32 (the kernels' only type)."""
    return (
        kernel == "native"
        and matmul_dtype == "float32"
        and all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(arrays))
    )


def _native(opts: LoopOptions, rec: dict[str, Array], carry0: Any, seq: Array) -> bool:
    """Whether the loops run as :mod:`rnn_jax.native` kernels: asked for, float32
    matmuls, params (``rec``: ``W_h``, and ``b`` where the kernels add it), carries
    and sequence, and at least one step and one example (else the XLA loops)."""
    arrays = (rec, seq, carry0)
    return (
        _native_types(opts.kernel, opts.matmul_dtype, arrays)
        and seq.shape[0] > 0
        and seq.shape[1] > 0
    )


def _pallas_weights(rec: dict[str, Array], dtype: str) -> Array:
    """``W_h`` as ``<[H, G*H]>`` in the matmul type."""
    return cast(_flat(rec["W_h"]), dtype)


def _forward(cell, opts, save, rec, carry0, xp, valid):
    """The forward loop: ``(ys, final, saved)``, ``saved`` stacked over time if ``save``."""
    if _pallas(opts, rec, carry0, xp):
        w = _pallas_weights(rec, opts.matmul_dtype)
        return persistent.forward(cell, w, rec.get("b_hn"), carry0, xp, valid, save)
    if _native(opts, rec, carry0, xp):
        b = rec["b"].reshape(-1) if "b" in rec else None  # folded in by layer
        return native.forward(_flat(rec["W_h"]), carry0, xp, valid, save, opts.reverse, b)
    forward = kernels(cell, prepare(cell, rec, opts.matmul_dtype))[0]

    def body(carry, inp):
        xp_t, valid_t = inp
        new, y, saved = forward(carry, xp_t)
        if valid_t is not None:  # no lengths: no masking ops in the loop at all
            new = _where(valid_t, new, carry)
            y = _mask(valid_t, y)
        return new, ((y, saved) if save else (y,))

    prefetch = cell.name == "gru" and not save  # measured: see _scan
    final, out = _scan(
        body, carry0, (xp, valid), unroll=opts.unroll, prefetch=prefetch, reverse=opts.reverse
    )
    return out[0], final, (out[1] if save else None)


def _recurrence_fwd(cell, opts, rec, carry0, xp, valid):
    ys, final, saved = _forward(cell, opts, True, rec, carry0, xp, valid)
    return (ys, final), (rec, carry0, valid, ys, saved, dtype_marker(xp))


def dtype_marker(x: Array) -> Array:
    """An empty array of ``x``'s type: a residual that carries only the type."""
    return jnp.zeros((0,), x.dtype)


def cast_like(grads: Any, primals: Any) -> Any:
    """Each gradient leaf in its primal's type (``None`` stays): a custom VJP's
    cotangents must have the primals' types, or a training loop's carry changes type
    (bfloat16 params, float32 params under float64 inputs)."""
    return jax.tree_util.tree_map(
        lambda g, p: None if g is None else g.astype(p.dtype),
        grads,
        primals,
        is_leaf=lambda x: x is None,
    )


def _shift(first: Array, stacked: Array, valid: Array | None = None, reverse=False) -> Array:
    """The hidden state before each step, from the initial one ``first <[B, H]>``
    and the outputs ``stacked <[T, B, H]>``: ``[first, stacked[0], ...,
    stacked[T-2]]``; with ``reverse`` (steps from the last to the first),
    ``stacked[t+1]``, or ``first`` where step ``t+1`` is padding (not ``valid``; a
    row's padding keeps the initial carry and outputs zeros) or past the end.

    Forward, past a length the shifted outputs are not the (frozen) state, but
    nothing there is used: those steps are masked."""
    if not reverse:
        return jnp.concatenate([first[None], stacked[:-1]], axis=0)
    after = jnp.concatenate([stacked[1:], first[None]], axis=0)
    if valid is None:
        return after
    read = jnp.concatenate([valid[1:], jnp.zeros_like(valid[:1])], axis=0)
    return jnp.where(_expand(read, after), after, first[None])


def _backward(cell, opts, rec, h_first, valid, ys, saved, dys, dfinal):
    """The backward loop and the recurrent weight gradients; ``h_first`` is the
    hidden state before the first step (the initial carry's).

    Returns ``(drec, dcarry0, dxp)``: gradients of the recurrent params, the initial
    carry and the input projection ``<[T, B, G*H]>``.
    """
    if valid is not None:
        dys = _mask(valid, dys)
    if _native(opts, rec, h_first, ys):
        w = _flat(rec["W_h"])
        dxp, dcarry0, db = native.backward(w, valid, saved, dys, dfinal, opts.reverse)
        if len(saved) > 3:  # h_prev_t <[H, T*B]>: the weight gradient as a plain matmul
            dw = jnp.dot(saved[3], dxp.reshape(-1, dxp.shape[-1]))
        else:  # saves cut into chunks (fused._chunked), h_prev_t left out
            dw = _contract(_shift(h_first, ys, valid, opts.reverse), dxp)
        drec = {"W_h": dw.reshape(rec["W_h"].shape)}
        if "b" in rec:
            drec["b"] = db.reshape(rec["b"].shape)
        return drec, dcarry0, dxp
    _, backward, weight_grads = kernels(cell, prepare(cell, rec, opts.matmul_dtype))
    h_prev = _shift(h_first, ys, valid, opts.reverse)  # the hidden state before each step
    if _pallas(opts, rec, h_first, ys):
        w_t = _pallas_weights(rec, opts.matmul_dtype).T
        dxp, dcarry0, extras = persistent.backward(cell, w_t, valid, h_prev, saved, dys, dfinal)
        grads = weight_grads(h_prev, _grads_of(cell, dxp, extras))
        return {k: grads[k].reshape(rec[k].shape) for k in rec}, dcarry0, dxp

    def body(dcarry, inp):
        dy_t, valid_t, h_prev_t, y_t, saved_t = inp
        if isinstance(dcarry, LSTMCarry):
            d_in = LSTMCarry(dcarry.h + dy_t, dcarry.c)
        else:
            d_in = dcarry + dy_t
        d_prev, grads_t = backward(saved_t, y_t, h_prev_t, d_in)
        if valid_t is None:
            return d_prev, grads_t
        return _where(valid_t, d_prev, dcarry), tuple(_mask(valid_t, d) for d in grads_t)

    inputs = (dys, valid, h_prev, ys, saved)
    dcarry0, stacked = jax.lax.scan(
        body, dfinal, inputs, reverse=not opts.reverse, unroll=opts.unroll
    )
    grads = weight_grads(h_prev, stacked)
    drec = {k: grads[k].reshape(rec[k].shape) for k in rec}
    return drec, dcarry0, gate_gradient(cell, stacked)


def _recurrence_bwd(cell, opts, res, cts):
    rec, carry0, valid, ys, saved, xp_type = res
    drec, dcarry0, dxp = _backward(cell, opts, rec, _hidden(carry0), valid, ys, saved, *cts)
    return cast_like(drec, rec), cast_like(dcarry0, carry0), dxp.astype(xp_type.dtype), None


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


# ---------------------------------------------------------------------------
# The layer in chunks of K steps, input projection included, under one custom VJP.
# The backward pass walks the chunks in reverse; for each it runs the backward loop
# above over the chunk and adds the chunk's weight gradients, so the gradient of
# the projection exists only for K steps at a time. Two uses:
#   remat (recompute=True): the forward pass keeps only the carry at the start of
#     each chunk (and the outputs, which the layer returns anyway); the backward
#     pass recomputes the chunk's projection and gates. Nothing of size T x (G*H)
#     is ever alive: the temporary memory is the outputs plus O(K) buffers.
#   long sequences on CPU (recompute=False): the forward pass is the unchunked
#     one (one loop, the gates saved); only the backward pass runs in chunks, so
#     its per-step buffers (``dA_t``, the projection's gradient) stay in cache
#     instead of streaming <[T, B, G*H]> arrays through memory. (Chunking the
#     forward pass too was 2-5% faster for the LSTM but compiled 0.2-0.4 s longer.)


def chunk_size(num_steps: int) -> int:
    """The remat chunk length K for T steps: the divisor of T nearest to sqrt(T)
    (between sqrt(T)/2 and 2 sqrt(T)), else ceil(sqrt(T)) and the last chunk padded."""
    root = math.sqrt(num_steps)
    divisors = [d for d in range(1, num_steps + 1) if num_steps % d == 0]
    near = [d for d in divisors if root / 2 <= d <= 2 * root]
    if near:
        return min(near, key=lambda d: (abs(d - root), d))
    return math.ceil(root)


CHUNK_MIN_STEPS = 256
"""``chunk=None`` chunks the backward pass on CPU from this many steps on."""


def default_chunk(num_steps: int, backend: str | None = None) -> int:
    """``layer``'s ``chunk=None``: on CPU, for ``T >= CHUNK_MIN_STEPS``, the divisor of
    T in [8, 32] nearest to 16 (0 if there is none); 0 (no chunks) otherwise.

    Measured on the 2-core CPU, training step of the language model at H=128, B=32,
    T=1024 (ms, three alternating rounds in one process): LSTM 107.5-116.0 in one
    loop vs 106.5-107.2 with K=16; GRU reset-after 88.3-91.3 vs 81.6-83.9 (the
    layer and loss gradient alone: K=8, 16, 32 within 5% of each other). At T=32
    and 64 (the d2l and medium shapes) chunks were level or slower (d2l LSTM
    16.5-17.1 vs 17.6-18.0 ms at K=4), so short sequences keep one loop.
    """
    backend = backend or jax.default_backend()
    if backend != "cpu" or num_steps < CHUNK_MIN_STEPS:
        return 0
    divisors = [d for d in range(8, 33) if num_steps % d == 0]
    return min(divisors, key=lambda d: (abs(d - 16), d)) if divisors else 0


def check_chunk(chunk: Any) -> int | None:
    """``chunk`` must be ``None`` or an int >= 0 (NumPy's included; ValueError naming
    it otherwise); returns it as a Python int."""
    if chunk is None:
        return None
    return cells._int_option(chunk, "chunk", 0, "None or an int >= 0")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear(xs: Array, w: Array, dtype: str) -> Array:
    """``xs <[T, B, I]> @ w <[I, N]>`` with operands in the matmul type ``dtype``,
    result float32 (or the inputs' type under ``"float32"``, float64 included).

    The backward is two matmuls in the same type, ``g wᵀ`` and ``Σ_{t,b} xs[t,b]ᵀ
    g[t,b]`` (:func:`_contract`, both leading axes contracted as they are). Autodiff
    of the casts would run them in float32 and round the gradients to bfloat16;
    autodiff of the float32 matmul computes the weight gradient as ``(Σ gᵀ xs)ᵀ``,
    which XLA:CPU ran 4x slower (2-core CPU, one core, T=32 B=512 I=32 N=128, the
    projection's forward+backward: 6.4 vs 1.5 ms; the book's 2-layer LSTM's second
    layer spent most of its extra time there).
    """
    return _mm(xs, cast(w, dtype))


def _linear_fwd(xs, w, dtype):
    return _linear(xs, w, dtype), (xs, w)


def _linear_bwd(dtype, res, g):
    xs, w = res
    dxs = _mm(g, cast(w.T, dtype))
    return dxs.astype(xs.dtype), _contract(xs, g, dtype).astype(w.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


def check_bfloat16_inputs(params: Any, carry: Any, matmul_dtype: str, xs: Any = None) -> None:
    """bfloat16 matmuls are defined for float32 params and carries (their results
    are float32) and float inputs of at most float32: anything else raises ValueError
    naming the offender (float64 ``xs`` first: the default carry takes their type)."""
    if matmul_dtype == "float32":
        return

    def check(name, tree):
        for leaf in jax.tree_util.tree_leaves(tree):
            if jnp.asarray(leaf).dtype != jnp.float32:
                raise ValueError(
                    f"matmul_dtype: {matmul_dtype!r} needs float32 {name}, got "
                    f"{jnp.asarray(leaf).dtype}"
                )

    check("params", params)
    if xs is not None and jnp.issubdtype(xs.dtype, jnp.floating):
        if jnp.finfo(xs.dtype).bits > 32:
            raise ValueError(
                f"matmul_dtype: {matmul_dtype!r} needs float32 or bfloat16 xs, got {xs.dtype}"
            )
    check("carry", carry)


def _project(
    cell: Cell, params: dict[str, Array], xs: Array, dtype: str = "float32", bias: bool = True
) -> Array:
    """``X W_x + b`` with the gate blocks side by side: ``<[T, B, G*H]>``; float
    inputs on bfloat16 operands when ``dtype`` is (token ids are a row lookup either
    way); without ``bias``, ``X W_x`` (the native kernels add ``b`` themselves)."""
    if not jnp.issubdtype(xs.dtype, jnp.floating):
        # token ids: a row gather of W_x, whose gradient (autodiff) is a scatter-add
        # of the T*B rows. cell.project's lookup_rows computes that gradient as a
        # dense one-hot matmul instead, which the scan's per-step lookup needs; for
        # all steps at once the scatter-add was faster. Measured on the 2-core Intel
        # Xeon, training step on 2 devices, A/B in one process, median ms (one-hot
        # vs scatter-add): d2l LSTM 42.6 vs 39.9, medium LSTM 85.9 vs 82.1 and
        # 109.6 vs 104.4, medium GRU 74.7 vs 72.0, long LSTM 245 vs 235. On the AMD
        # EPYC, the profiled scatter-add took 1.0-1.2 ms (d2l) and 5.9 ms (long),
        # the one-hot matmul 3.5 and 8.4 (BUILD.md).
        xp = cells.gather_rows(params["W_x"], xs)  # out-of-range ids: zeros
        xp = xp + params["b"] if bias else xp
        return xp.reshape(*xs.shape, math.prod(params["W_x"].shape[1:]))  # (T or B may be 0)
    _check_x(params, xs, "xs")
    w = params["W_x"].reshape(params["W_x"].shape[0], -1)
    xp = _linear(xs, w, dtype)
    return xp + params["b"].reshape(-1) if bias else xp


def reverse_valid(xs: Array, length: Array | None) -> Array:
    """Reverses the first ``length`` steps of ``xs <[T, ...]>``, keeping padding in place.

    The map ``t -> L-1-t`` for ``t < L``, ``t -> t`` otherwise, is its own inverse, so
    the same call puts a reversed sequence's outputs back in time order.
    """
    if length is None:  # a reverse, whose gradient is a reverse (a gather's is a scatter)
        return jnp.flip(xs, axis=0)
    t = jnp.arange(xs.shape[0])
    return xs[jnp.where(t < length, length - 1 - t, t)]


def reverse_valid_batch(xs: Array, lengths: Array | None) -> Array:
    """:func:`reverse_valid` of every sequence of a time-major ``xs <[T, B, ...]>``."""
    if lengths is None:
        return reverse_valid(xs, None)
    return jax.vmap(reverse_valid, in_axes=(1, 0), out_axes=1)(xs, lengths)


def _recurrent_params(params: dict[str, Array]) -> dict[str, Array]:
    return {k: params[k] for k in ("W_h", "b_hn") if k in params}


def _in_chunks(x: Array | None, num_chunks: int) -> Array | None:
    """``<[n*K, ...]> -> <[n, K, ...]>``."""
    return None if x is None else x.reshape(num_chunks, -1, *x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _chunked(cell, opts, num_chunks, recompute, params, carry0, xs, valid):
    if recompute:  # the projection a chunk at a time: no <[T, B, G*H]> array
        ys, final, _ = _remat_forward(cell, opts, num_chunks, params, carry0, xs, valid)
        return ys, final
    xp = _project(cell, params, xs, opts.matmul_dtype)
    ys, final, _ = _forward(cell, opts, False, _recurrent_params(params), carry0, xp, valid)
    return ys, final


def _remat_forward(cell, opts, num_chunks, params, carry0, xs, valid):
    """The forward pass a chunk at a time, keeping each chunk's starting carry."""
    rec = _recurrent_params(params)

    def body(carry, inp):
        xs_c, valid_c = inp
        xp_c = _project(cell, params, xs_c, opts.matmul_dtype)
        ys_c, new, _ = _forward(cell, opts, False, rec, carry, xp_c, valid_c)
        return new, (ys_c, carry)

    inputs = (_in_chunks(xs, num_chunks), _in_chunks(valid, num_chunks))
    final, (ys, starts) = jax.lax.scan(body, carry0, inputs)
    return ys.reshape(-1, *ys.shape[2:]), final, starts


def _chunked_fwd(cell, opts, num_chunks, recompute, params, carry0, xs, valid):
    if recompute:
        ys, final, starts = _remat_forward(cell, opts, num_chunks, params, carry0, xs, valid)
        return (ys, final), (params, xs, valid, ys, starts, None, _carry_types(carry0))
    # one forward loop as in the unchunked layer; the saves are read a chunk at a time
    xp = _project(cell, params, xs, opts.matmul_dtype)
    ys, final, saved = _forward(cell, opts, True, _recurrent_params(params), carry0, xp, valid)
    if _native(opts, _recurrent_params(params), carry0, xp):
        saved = saved[:3]  # h_prev_t <[H, T*B]> has no leading time axis to cut
    saved = jax.tree_util.tree_map(lambda a: _in_chunks(a, num_chunks), saved)
    return (ys, final), (params, xs, valid, ys, _hidden(carry0), saved, _carry_types(carry0))


def _carry_types(carry: Any) -> Any:
    return jax.tree_util.tree_map(dtype_marker, carry)


def _chunked_bwd(cell, opts, num_chunks, recompute, res, cts):
    params, xs, valid, ys, starts, saved_all, carry_types = res
    dys, dfinal = cts
    rec = _recurrent_params(params)
    tokens = not jnp.issubdtype(xs.dtype, jnp.floating)
    if not recompute:  # the hidden state before each chunk's first step
        chunk = xs.shape[0] // num_chunks
        starts = jnp.concatenate([starts[None], ys[chunk - 1 :: chunk][:-1]], axis=0)

    def body(acc, inp):
        dcarry, dparams = acc
        xs_c, valid_c, ys_c, dys_c, start, saved = inp
        project = functools.partial(_project, cell, dtype=opts.matmul_dtype)
        if tokens:  # integer ids get no gradient
            xp_c, project_vjp = jax.vjp(lambda p: project(p, xs_c), params)
        else:
            xp_c, project_vjp = jax.vjp(project, params, xs_c)
        if recompute:
            _, _, saved = _forward(cell, opts, True, rec, start, xp_c, valid_c)
            start = _hidden(start)
        drec, dstart, dxp_c = _backward(cell, opts, rec, start, valid_c, ys_c, saved, dys_c, dcarry)
        dproj = project_vjp(dxp_c.astype(xp_c.dtype))
        dparams = jax.tree_util.tree_map(lambda a, g: a + g.astype(a.dtype), dparams, dproj[0])
        dparams = {k: v + drec[k].astype(v.dtype) if k in drec else v for k, v in dparams.items()}
        return (dstart, dparams), (None if tokens else dproj[1])

    chunks = [_in_chunks(a, num_chunks) for a in (xs, valid, ys, dys)]
    # the sums over chunks in float32 at least (bfloat16 params: cast once at the end)
    zeros = jax.tree_util.tree_map(
        lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params
    )
    inputs = (*chunks, starts, saved_all)
    (dcarry0, dparams), dxs = jax.lax.scan(body, (dfinal, zeros), inputs, reverse=True)
    dxs = None if tokens else dxs.reshape(xs.shape).astype(xs.dtype)
    return cast_like(dparams, params), cast_like(dcarry0, carry_types), dxs, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _batch_mesh(batch: int):
    """The mesh in context (``jax.set_mesh``) when its ``"data"`` axis splits ``batch``
    over several devices and this code is not already per device; else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names or DATA_AXIS in mesh.manual_axes:
        return None
    n = mesh.shape[DATA_AXIS]
    return mesh if n > 1 and batch % n == 0 else None


def _per_device(mesh, run, params, carry, xs, lengths):
    """``run(params, carry, xs, lengths)`` on each device's rows of the batch
    (``jax.shard_map`` over the ``"data"`` axis; params replicated, so their
    gradients are summed over the devices once). :func:`layer` does this for the
    chunked layers (remat, long sequences on CPU) under a mesh set with
    ``jax.set_mesh`` (``rnn_jax.train`` sets its data-parallel mesh).

    Under ``jit`` with a batch-sharded input, XLA's partitioner splits the loops
    alike, but it keeps a gradient accumulated over a loop's iterations (the
    chunked backward pass's weight gradients) replicated: an all-reduce in every
    chunk, 64 per step for the long shape. Per device, each device sums its own
    and the shard_map's transpose adds them once. Measured on the 2-core CPU, 2
    devices, training step at H=128 B=32 T=1024, ms (3 alternating rounds): LSTM
    80-87 vs 70-93 (best steps 79-83 vs 67-74), GRU 72-92 vs 56-70. Unchunked
    layers compile to the same program either way (medium LSTM: same ops, same
    order), so they are left to the partitioner.
    """
    row, tb = jax.sharding.PartitionSpec(DATA_AXIS), jax.sharding.PartitionSpec(None, DATA_AXIS)
    carry_spec = jax.tree.map(lambda _: row, carry)
    specs = (jax.sharding.PartitionSpec(), carry_spec, tb)
    args = (params, carry, xs)
    if lengths is not None:  # else run's own default (None)
        specs, args = (*specs, row), (*args, lengths)
    return jax.shard_map(
        run, mesh=mesh, in_specs=specs, out_specs=(tb, carry_spec), check_vma=False
    )(*args)


def layer(
    cell: Cell,
    params: dict[str, Array],
    carry: Any,
    xs: Array,
    lengths: Array | None = None,
    *,
    unroll: int = 1,
    remat: bool = False,
    matmul_dtype: str = "float32",
    kernel: str = "xla",
    chunk: int | None = None,
    reverse: bool = False,
) -> tuple[Array, Any]:
    """One direction of one layer over a time-major batch, with the fused backward pass.

    Args:
      cell: a cell from :mod:`rnn_jax.cells` (``supports(cell)`` must hold).
      params: the cell's params.
      carry: initial carry with a batch axis (``<float32>[B, H]``, or an
        ``LSTMCarry`` of two).
      xs: ``<float32>[T, B, I]`` inputs, or token ids ``<int32>[T, B]``.
      lengths: ``<int32>[B]`` valid steps per sequence (``None``: all ``T``), clipped
        to ``[0, T]``.
      unroll: passed to both ``lax.scan`` loops.
      matmul_dtype: ``"float32"`` or ``"bfloat16"``: the operand type of every
        matmul (input projection, recurrent, backward and weight-gradient matmuls);
        they accumulate in float32, and the gates, carries and outputs are float32.
      kernel: ``"xla"`` (the loops as ``lax.scan``), ``"pallas"`` (each loop one
        GPU kernel, :mod:`rnn_jax.persistent`; interpreted off a GPU) or
        ``"native"`` (each LSTM loop one C++ function on the CPU,
        :mod:`rnn_jax.native`; per chunk when ``chunk`` or remat chunks it).
      remat: keep only the carry at the start of every chunk of :func:`chunk_size`
        steps and recompute each chunk (input projection, gates) in the backward
        pass, instead of saving ``<[T, B, G*H]>`` gates and projections.
      chunk: without remat, run the backward pass in chunks of this many steps
        (the gates are saved, nothing is recomputed; the last chunk padded);
        0: one loop; ``None``: :func:`default_chunk` (chunks on CPU for long
        sequences, where they were measured faster for the XLA loops; 0 with
        ``kernel="pallas"`` or ``"native"``, one kernel call per pass).
        Outputs and gradients are the same either way. Ignored with ``remat``,
        which chunks by :func:`chunk_size`. Traced under a mesh with a ``"data"``
        axis that splits the batch (``jax.set_mesh``; ``rnn_jax.train`` does this
        for data parallelism), the chunked forms run per device
        (``jax.shard_map``): each device accumulates its own weight gradients
        over the chunks and they are summed once.
      reverse: the backward direction of a bidirectional layer: each sequence
        reads its valid steps from the last to the first, and ``ys`` and the
        arrays stay in time order (``ys[t]`` is the output after reading steps
        ``L-1, ..., t``). The same as :func:`reverse_valid_batch` of the layer
        run on :func:`reverse_valid_batch` of ``xs``, which is how the chunked
        loops and the Pallas kernels run it; the unchunked XLA loops and the
        native kernels read the steps in place, without the two reversed copies.

    Returns:
      ``(ys <float32>[T, B, H], final carry)``: outputs are zero past each length and
      the final carry is the one after the last valid step.
    """
    if not supports(cell):
        raise ValueError(f"cell: no fused implementation for {cell.name!r}")
    if matmul_dtype not in MATMUL_DTYPES:
        raise ValueError(
            f"matmul_dtype: expected one of {list(MATMUL_DTYPES)}, got {matmul_dtype!r}"
        )
    check_bfloat16_inputs(params, carry, matmul_dtype, xs)
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {list(KERNELS)}, got {kernel!r}")
    if kernel == "pallas" and (reason := persistent.unsupported(cell)):
        raise ValueError(f"kernel: 'pallas': {reason}")
    if kernel == "native" and (reason := native.unsupported(cell) or native.unavailable()):
        raise ValueError(f"kernel: 'native': {reason}")
    chunk = check_chunk(chunk)
    num_steps = xs.shape[0]
    if lengths is not None:  # as the networks do: the chunked and reversed forms index by it
        lengths = jnp.clip(lengths, 0, num_steps)
    if chunk is None:
        # one kernel call per pass where a kernel runs the loops: the native
        # kernels' chunked backward pass was no faster and compiled slower (LSTM,
        # CPU, T=1024, grad of one layer: H=128 B=16 91.7 vs 97.8 ms, 0.20 vs 0.39 s;
        # H=256 B=32 538 vs 594 ms, 0.21 vs 0.33 s), for 9% more temporary memory
        native_loops = _native_types(kernel, matmul_dtype, (params, carry))
        chunk = 0 if kernel == "pallas" or native_loops else default_chunk(num_steps)
    if remat:
        chunk = chunk_size(num_steps)
    # a kernel call cannot be partitioned over a sharded batch: XLA would gather the
    # batch onto every device; so per device, as the chunked forms
    if (chunk or kernel == "native") and (mesh := _batch_mesh(xs.shape[1])) is not None:
        return _per_device(
            mesh,
            functools.partial(
                layer,
                cell,
                unroll=unroll,
                remat=remat,
                matmul_dtype=matmul_dtype,
                kernel=kernel,
                chunk=chunk,
                reverse=reverse,
            ),
            params,
            carry,
            xs,
            lengths,
        )
    if reverse and (chunk or kernel == "pallas"):  # these read time forward only
        ys, final = layer(
            cell,
            params,
            carry,
            reverse_valid_batch(xs, lengths),
            lengths,
            unroll=unroll,
            remat=remat,
            matmul_dtype=matmul_dtype,
            kernel=kernel,
            chunk=chunk,
        )
        return reverse_valid_batch(ys, lengths), final
    opts = LoopOptions(unroll, matmul_dtype, kernel, bool(reverse))
    valid = None if lengths is None else jnp.arange(num_steps)[:, None] < lengths[None, :]
    if not chunk:
        # all steps at once; the native kernels add the bias and sum its gradient
        fold = kernel == "native"
        xp = _project(cell, params, xs, matmul_dtype, bias=not fold)
        rec = _recurrent_params(params)
        if fold and _native(opts, {**rec, "b": params["b"]}, carry, xp):
            rec = {**rec, "b": params["b"]}
        elif fold:  # the XLA loops after all (another type somewhere, an empty T or B)
            xp = xp + params["b"].reshape(-1)
        return _recurrence(cell, opts, rec, carry, xp, valid)
    pad = -num_steps % chunk
    if pad:  # padded steps are invalid: the carry stays, outputs are zero
        if valid is None:
            valid = jnp.ones((num_steps, xs.shape[1]), bool)
        valid = jnp.pad(valid, ((0, pad), (0, 0)))
        xs = jnp.pad(xs, ((0, pad),) + ((0, 0),) * (xs.ndim - 1))
    num_chunks = (num_steps + pad) // chunk
    ys, final = _chunked(cell, opts, num_chunks, remat, params, carry, xs, valid)
    return ys[:num_steps], final
