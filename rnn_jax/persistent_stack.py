r"""A deep unidirectional network's loops as one GPU kernel per pass (experimental).

:mod:`rnn_jax.persistent` runs each layer's loop over time as one kernel, the layers
one after another: an L-layer network takes L times one layer's time. Here all
layers run in one kernel whose grid has a layer axis, as on the wavefront
(:mod:`rnn_jax.wavefront`): the programs of layer l compute their step t as soon as
layer l-1 has written its output of step t, so the layers run concurrently, one
step apart, each on its own multiprocessors.

Forward, program (l, row block, unit split), per step t and gate block k::

    A_k = XP_t[:, k] + H^(0)_{t-1} W_h^(0)[:, k]                          (l = 0)
    A_k = Y^(l-1)_t W_x^(l)[:, k] + b^(l)_k + H^(l)_{t-1} W_h^(l)[:, k]    (l > 0)

with ``XP <float32>[T, B, G*H]`` layer 0's input projection (computed before the
kernel, bias included). The outputs go to a buffer ``<float32>[L, T, B', H]``
filled with a sentinel before the kernel, so that layer l+1 knows which elements
layer l has written (:func:`rnn_jax.persistent._await`). Backward, layer l (the top
layer first) at step t gets the gradient of its output::

    dY^(L-1)_t = dY_t       dY^(l)_t = Σ_k dA^(l+1)_t[:, k] W_x^(l+1)[:, k]ᵀ  (l < L-1)

from a sentinel-filled buffer of gate gradients ``<float32>[L, T, B', G*H]``.
Everything else is the one-layer kernels' computation (:mod:`rnn_jax.persistent`,
equations in :mod:`rnn_jax.fused`): the same step functions, the "flag" exchange
between the programs of a row block, the weight gradients as XLA matmuls after the
loop: ``dW_h^(l) = Σ H^(l)_{t-1}ᵀ dA^(l)_t``, ``dW_x^(l) = Σ Y^(l-1)_tᵀ dA^(l)_t``,
``db^(l) = Σ dA^(l)_t`` (l > 0), and ``dXP = dA^(0)``.

Scope: what :mod:`rnn_jax.persistent` runs, unidirectional, without dropout between
layers, float32 matmuls; every program of the grid must be resident at once
(:func:`fits`). Off a GPU the kernels run in Pallas' interpreter, which runs the
programs one after another in grid order: the layers then run one after another
(layer 0 first forward, the top one first backward), so nobody waits for data not yet
written. Not measured on a GPU yet, so the networks run it only when asked
(``RNN_JAX_PALLAS_STACK=1``, see :func:`enabled`).
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from rnn_jax import fused, persistent

Array = jax.Array


def enabled() -> bool:
    """Whether deep unidirectional networks with ``implementation="pallas"`` run this
    kernel (``$RNN_JAX_PALLAS_STACK`` = 1) rather than one kernel per layer."""
    value = os.environ.get("RNN_JAX_PALLAS_STACK", "0")
    if value not in ("0", "1"):
        raise ValueError(f"RNN_JAX_PALLAS_STACK: expected '0' or '1', got {value!r}")
    return value == "1"


def _layout(num_layers: int, batch: int, hidden: int) -> tuple[int, int, int]:
    """``(rows per program, hidden units per program, padded batch)``: the one-layer
    kernels' layout (:func:`rnn_jax.persistent.layout`) sized for L copies of the
    batch's row blocks, since the L layers' programs must all be resident at once."""
    interpret = persistent._interpret()
    cores = None if interpret else persistent.device_cores()
    block, units = persistent.layout(batch, hidden, interpret, cores, copies=num_layers)
    return block, units, batch + (-batch % block)


def fits(num_layers: int, batch: int, hidden: int) -> bool:
    """Whether the stack's grid fits on the GPU at once with the units split over
    programs (always in the interpreter; where the units cannot be split, every
    program would re-read its weights each step, so the layers run one kernel each)."""
    if persistent._interpret():
        return True
    block, units, rows = _layout(num_layers, batch, hidden)
    if units == hidden and hidden > persistent.MIN_UNITS:
        return False
    programs = num_layers * (rows // block) * (hidden // units)
    return programs <= persistent._program_limit(persistent.device_cores())


def input_dtypes(params, carries, xs) -> list:
    """The dtypes :func:`problem` checks: of the params, the carries and float inputs
    (token ids are a row lookup before the kernel)."""
    leaves = jax.tree_util.tree_leaves((params, carries))
    leaves += [xs] if jnp.issubdtype(xs.dtype, jnp.floating) else []
    return [leaf.dtype for leaf in leaves]


def problem(cell, num_layers: int, num_steps: int, batch: int, dtypes=()) -> str | None:
    """Why the stacked kernels cannot run this network (``None`` if they can): a
    cell :mod:`rnn_jax.persistent` cannot run, fewer than two layers, no steps, any
    params or carries (``dtypes``) not float32, or a grid that does not fit at once
    (:func:`fits`)."""
    reason = persistent.unsupported(cell)
    if reason is not None:
        return reason
    if num_layers < 2:
        return f"{num_layers} layer(s): the stack needs at least 2 (one layer: fused.layer)"
    if num_steps < 1:
        return "no time steps (T = 0)"
    if batch < 1:
        return "an empty batch"
    odd = sorted({str(jnp.dtype(d)) for d in dtypes} - {"float32"})
    if odd:
        return f"params and carries must be float32, got {odd}"
    if not fits(num_layers, batch, cell.hidden_size):
        return (
            f"{num_layers} layers x batch {batch} x hidden {cell.hidden_size}: the grid does "
            "not fit on the GPU at once; run one kernel per layer"
        )
    return None


def _forward_kernel(cell, num_steps, num_layers, masked, save, block, units, *refs):
    hidden = cell.hidden_size
    nc = 2 if cell.name == "lstm" else 1
    ns = persistent._num_saved(cell) if save else 0
    num_gates = persistent._num_gates(cell)
    split = units < hidden
    gru = cell.name == "gru"
    refs = list(refs)
    xp_ref, w_ref, wx_ref, bx_ref = (refs.pop(0) for _ in range(4))
    carry_refs = [refs.pop(0) for _ in range(nc)]
    valid_ref = refs.pop(0) if masked else None
    extra_ref = refs.pop(0) if gru else None
    refs = refs[1 + split :]  # the sentinel-filled inputs aliased to the outputs below
    ys_ref = refs.pop(0)  # [L, T, B', H]: layer l's outputs, read by layer l+1
    hbuf_ref = refs.pop(0) if split else None  # [L, T, B', H]: the exchange
    final_refs = [refs.pop(0) for _ in range(nc)]
    save_refs = [refs.pop(0) for _ in range(ns)]
    forward, _ = persistent._step_fns(cell)
    layer, p, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows, own = pl.ds(p * block, block), pl.ds(j * units, units)
    extra = extra_ref[layer, own][None, :] if gru else None
    cols = [pl.ds(k * hidden + j * units, units) for k in range(num_gates)]
    ws = [w_ref[layer, :, c] for c in cols]
    wxs = [wx_ref[layer, :, c] for c in cols]
    bxs = [bx_ref[layer, c][None, :] for c in cols]

    def mm(a, k):
        return persistent._dot(a, ws[k])

    def projected(t):  # layer 0: the projection computed before the kernel
        return tuple(xp_ref[t, rows, c] for c in cols)

    def from_below(t):  # layers 1..L-1: from the layer below's output of step t
        below = persistent._await(ys_ref.at[layer - 1, t, rows, :])
        return tuple(persistent._dot(below, wxs[k]) + bxs[k] for k in range(num_gates))

    def load_inputs(t):  # step t's input, loaded (awaited) during step t-1
        t = jnp.asarray(t, jnp.int32)
        xs = jax.lax.cond(layer == 0, projected, from_below, t)
        return xs, (valid_ref[t, rows][:, None] != 0) if masked else None

    def body(t, state):
        carry, h, (xs, v) = state
        new, y, saved = forward(carry, h, lambda k: xs[k], mm, extra)
        if masked:
            new = tuple(jnp.where(v, n, o) for n, o in zip(new, carry, strict=True))
            y = jnp.where(v, y, 0.0)
        ys_ref[layer, t, rows, own] = persistent._canonical(y)
        for ref, s in zip(save_refs, saved, strict=False):  # none unless saving
            ref[layer, t, rows, own] = s
        if split:  # written before waiting for the layer below: peers need it now
            hbuf_ref[layer, t, rows, own] = persistent._canonical(new[0])
        following = load_inputs(jnp.minimum(t + 1, num_steps - 1))
        if not split:
            return new, new[0], following
        return new, persistent._await(hbuf_ref.at[layer, t, rows, :]), following

    carry0 = tuple(ref[layer, rows, own] for ref in carry_refs)
    h0 = carry_refs[0][layer, rows, :]
    final, _, _ = jax.lax.fori_loop(0, num_steps, body, (carry0, h0, load_inputs(0)))
    for ref, c in zip(final_refs, final, strict=True):
        ref[layer, rows, own] = c


def _backward_kernel(cell, num_steps, num_layers, masked, block, units, *refs):
    hidden = cell.hidden_size
    nc, ns = (2 if cell.name == "lstm" else 1), persistent._num_saved(cell)
    num_gates = persistent._num_gates(cell)
    split = units < hidden
    gru = cell.name == "gru"
    refs = list(refs)
    wt_ref, wxt_ref, dys_ref, hprev_ref = (refs.pop(0) for _ in range(4))
    save_refs = [refs.pop(0) for _ in range(ns)]
    dfinal_refs = [refs.pop(0) for _ in range(nc)]
    valid_ref = refs.pop(0) if masked else None
    refs = refs[1 + gru :]  # the sentinel-filled inputs aliased to the outputs below
    da_ref = refs.pop(0)  # [L, T, B', G*H]: layer l's dA, read by layer l-1
    dhn_ref = refs.pop(0) if gru else None  # [L, T, B', H]: the GRU's dA_n * R
    dcarry0_refs = [refs.pop(0) for _ in range(nc)]
    _, backward = persistent._step_fns(cell)
    layer = num_layers - 1 - pl.program_id(0)  # the top layer first
    p, j = pl.program_id(1), pl.program_id(2)
    rows, own = pl.ds(p * block, block), pl.ds(j * units, units)
    wts = [wt_ref[layer, pl.ds(k * hidden, hidden), own] for k in range(num_gates)]
    # W_x of the layer above, transposed, per gate block (Triton's blocks are powers
    # of two, G*H is not for the GRU): [H, U] each
    wxts = [wxt_ref[layer, pl.ds(k * hidden, hidden), own] for k in range(num_gates)]

    def given(t):  # the top layer: the gradient of the network's outputs
        return dys_ref[t, rows, own]

    def from_above(t):  # layers 0..L-2: dA of the layer above at step t, times W_xᵀ
        dy = jnp.zeros((block, units), jnp.float32)
        for k in range(num_gates):
            above = persistent._await(da_ref.at[layer + 1, t, rows, pl.ds(k * hidden, hidden)])
            dy = dy + persistent._dot(above, wxts[k])
        return dy

    def load_inputs(t):  # step t's inputs, loaded (awaited) during step t+1
        t = jnp.asarray(t, jnp.int32)
        dy = jax.lax.cond(layer == num_layers - 1, given, from_above, t)
        saved = tuple(ref[layer, t, rows, own] for ref in save_refs)
        h_prev = hprev_ref[layer, t, rows, own] if gru else None
        v = (valid_ref[t, rows][:, None] != 0) if masked else None
        return dy, saved, h_prev, v

    def body(s, state):
        dcarry, (dy, saved, h_prev, v) = state
        t = num_steps - 1 - s
        d_in = (dcarry[0] + dy, *dcarry[1:])
        da, operands, dh_direct, rest = backward(saved, h_prev, d_in)
        if masked:
            da = [jnp.where(v, d, 0.0) for d in da]
            operands = [jnp.where(v, d, 0.0) for d in operands]
        for k in range(num_gates):
            da_ref[layer, t, rows, pl.ds(k * hidden + j * units, units)] = persistent._canonical(
                da[k]
            )
        if gru:
            dhn_ref[layer, t, rows, own] = persistent._canonical(operands[2])
        following = load_inputs(jnp.maximum(t - 1, 0))
        if split:
            operands = [
                persistent._await(da_ref.at[layer, t, rows, pl.ds(k * hidden, hidden)])
                for k in range(2 if gru else num_gates)
            ]
            if gru:
                operands.append(persistent._await(dhn_ref.at[layer, t, rows, :]))
        dh_prev = sum(persistent._dot(a, w) for a, w in zip(operands, wts, strict=True))
        if dh_direct is not None:
            dh_prev = dh_prev + dh_direct
        d_prev = (dh_prev, *rest)
        if masked:
            d_prev = tuple(jnp.where(v, n, o) for n, o in zip(d_prev, dcarry, strict=True))
        return d_prev, following

    dfinal = tuple(ref[layer, rows, own] for ref in dfinal_refs)
    dcarry0, _ = jax.lax.fori_loop(0, num_steps, body, (dfinal, load_inputs(num_steps - 1)))
    for ref, d in zip(dcarry0_refs, dcarry0, strict=True):
        ref[layer, rows, own] = d


def _forward(cell, rec, wx, b, carry0, xp0, valid, save):
    """``(ys <[L, T, B, H]>, finals <[L, B, H]> leaves, saved <[L, T, B', H]> each)``;
    nothing saved (``()``) unless ``save``."""
    num_layers = rec["W_h"].shape[0]
    num_steps, batch = xp0.shape[:2]
    hidden = cell.hidden_size
    block, units, rows = _layout(num_layers, batch, hidden)
    pad = rows - batch
    width = wx.shape[-1]
    w = rec["W_h"].reshape(num_layers, hidden, width)  # [L, H, G*H]
    wx_all = jnp.concatenate([jnp.zeros((1, hidden, width), wx.dtype), wx], axis=0)
    bx_all = jnp.concatenate([jnp.zeros((1, width), b.dtype), b], axis=0)
    vmask = persistent._padded_valid(valid, num_steps, batch, pad)
    args = [persistent._pad_rows(xp0, pad, 1), w, wx_all, bx_all]
    args += [persistent._pad_rows(c, pad, 1) for c in persistent._carry_leaves(carry0)]
    if vmask is not None:
        args.append(vmask)
    if cell.name == "gru":
        args.append(rec["b_hn"].reshape(num_layers, hidden))
    seq = (num_steps, rows, hidden)
    ys_init = persistent._sentinel_filled((num_layers, *seq))
    split = units < hidden
    inits = [ys_init] + ([persistent._sentinel_filled((num_layers, *seq))] if split else [])
    aliases = {len(args) + i: i for i in range(len(inits))}
    args += inits
    nc = len(persistent._carry_leaves(carry0))
    ns = persistent._num_saved(cell) if save else 0
    shapes = [jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in inits]
    shapes += [jax.ShapeDtypeStruct((num_layers, rows, hidden), jnp.float32)] * nc
    shapes += [jax.ShapeDtypeStruct((num_layers, *seq), jnp.float32)] * ns
    kernel = functools.partial(
        _forward_kernel, cell, num_steps, num_layers, vmask is not None, save, block, units
    )
    grid = (num_layers, rows // block, hidden // units)
    out = persistent._call(kernel, grid, shapes, args, aliases, math.prod(grid))
    ys = out[0][:, :, :batch]
    finals = [f[:, :batch] for f in out[len(inits) : len(inits) + nc]]
    return ys, finals, tuple(out[len(inits) + nc :])


def _backward(cell, rec, wx, h_prev, saved, dys, dfinal, valid):
    """``(da <[L, T, B, G*H]>, dhn <[L, T, B, H]> or None, dcarry0 leaves <[L, B, H]>)``."""
    num_layers = rec["W_h"].shape[0]
    num_steps, batch = dys.shape[:2]
    hidden = cell.hidden_size
    block, units, rows = _layout(num_layers, batch, hidden)
    pad = rows - batch
    width = wx.shape[-1]
    wt = jnp.swapaxes(rec["W_h"].reshape(num_layers, hidden, width), 1, 2)  # [L, G*H, H]
    wxt = jnp.concatenate(
        [jnp.swapaxes(wx, 1, 2), jnp.zeros((1, width, hidden), wx.dtype)], axis=0
    )  # [L, G*H, H]: slot l is W_x of layer l+1, transposed; the top's zero
    vmask = persistent._padded_valid(valid, num_steps, batch, pad)
    args = [
        wt,
        wxt,
        persistent._pad_rows(dys, pad, 1),
        persistent._pad_rows(h_prev, pad, 2),
        *saved,
    ]
    args += [persistent._pad_rows(d, pad, 1) for d in persistent._carry_leaves(dfinal)]
    if vmask is not None:
        args.append(vmask)
    gru = cell.name == "gru"
    da_init = persistent._sentinel_filled((num_layers, num_steps, rows, width))
    inits = [da_init] + (
        [persistent._sentinel_filled((num_layers, num_steps, rows, hidden))] if gru else []
    )
    aliases = {len(args) + i: i for i in range(len(inits))}
    args += inits
    nc = len(persistent._carry_leaves(dfinal))
    shapes = [jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in inits]
    shapes += [jax.ShapeDtypeStruct((num_layers, rows, hidden), jnp.float32)] * nc
    kernel = functools.partial(
        _backward_kernel, cell, num_steps, num_layers, vmask is not None, block, units
    )
    grid = (num_layers, rows // block, hidden // units)
    out = persistent._call(kernel, grid, shapes, args, aliases, math.prod(grid))
    da = out[0][:, :, :batch]
    dhn = out[1][:, :, :batch] if gru else None
    dcarry0 = [d[:, :batch] for d in out[len(inits) :]]
    return da, dhn, dcarry0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stack(cell, rec, wx, b, carry0, xp0, valid):
    ys, finals, _ = _forward(cell, rec, wx, b, carry0, xp0, valid, save=False)
    return ys[-1], persistent._carry_tree(cell, finals)


def _stack_fwd(cell, rec, wx, b, carry0, xp0, valid):
    ys, finals, saved = _forward(cell, rec, wx, b, carry0, xp0, valid, save=True)
    return (ys[-1], persistent._carry_tree(cell, finals)), (rec, wx, carry0, valid, ys, saved)


def _stack_bwd(cell, res, cts):
    rec, wx, carry0, valid, ys, saved = res
    dys, dfinal = cts
    h0 = fused._hidden(carry0)  # [L, B, H]
    h_prev = jnp.concatenate([h0[:, None], ys[:, :-1]], axis=1)  # [L, T, B, H]
    if valid is not None:
        dys = fused._mask(valid, dys)
    da, dhn, dcarry0 = _backward(cell, rec, wx, h_prev, saved, dys, dfinal, valid)
    extras = (dhn,) if dhn is not None else ()
    prep = jax.vmap(lambda r: fused.prepare(cell, r))(rec)

    def layer_grads(p, hp, d, *e):
        return fused.kernels(cell, p)[2](hp, fused._grads_of(cell, d, e))

    grads = jax.vmap(layer_grads)(prep, h_prev, da, *extras)
    drec = {k: grads[k].reshape(rec[k].shape) for k in rec}
    # layer l >= 1 reads layer l-1's outputs: dW_x = Σ Y^{(l-1)ᵀ} dA^{(l)}, db = Σ dA^{(l)}
    dwx = jnp.einsum("ltbh,ltbg->lhg", ys[:-1], da[1:])
    db = jnp.sum(da[1:], axis=(1, 2))
    return drec, dwx, db, persistent._carry_tree(cell, dcarry0), da[0], None


_stack.defvjp(_stack_fwd, _stack_bwd)


def network_layers(cell, rec, wx, b, carry0, xp0, valid):
    """The top layer's outputs ``<[T, B, H]>`` and the stacked final carries
    ``<[L, B, H]>`` of an L-layer unidirectional network: ``rec`` the stacked
    recurrent params (``W_h``, the GRU's ``b_hn``), ``wx <[L-1, H, G*H]>`` and
    ``b <[L-1, G*H]>`` the input weights of layers 1..L-1, ``carry0`` the stacked
    initial carries, ``xp0 <[T, B, G*H]>`` layer 0's input projection and ``valid
    <bool>[T, B]`` (or ``None``)."""
    return _stack(cell, rec, wx, b, carry0, xp0, valid)
