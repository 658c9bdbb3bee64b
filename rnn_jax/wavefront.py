r"""Deep unidirectional networks on a wavefront schedule (the ``"wavefront"`` implementation).

Layer by layer, an L-layer network runs L loops of T steps, one after another. On
the wavefront, one loop of S = T + L - 1 steps runs all layers: at step s, layer l
computes its time step t = s - l, reading layer l-1's output of step s-1 (its
time t). The L layer steps of one loop step do not depend on each other, so they run
as one batched operation over a layer axis: the recurrent matmuls
``<float32>[L, B, H] @ <float32>[L, H, G*H]`` and the input matmuls of layers 1..L-1
``<float32>[L-1, B, H] @ <float32>[L-1, H, G*H]`` are one batched dot each, and the
gates one elementwise fusion. Where a loop iteration costs launches and bookkeeping
more than arithmetic (a GPU at small batch), that is ~L times fewer iterations.

The backward pass runs the same schedule in reverse: at step s, layer l gets the
gradient of its output at time t from layer l+1's step s+1 (``dA_{l+1,t} W_x^{(l+1)ᵀ}``,
carried over one step), and all weight gradients are single matmuls after the loop,
as in :mod:`rnn_jax.fused`, whose per-cell kernels (equations there) both loops
``jax.vmap`` over the layer axis.

Steps with t outside [0, T) (the L-1 steps where the wave fills and drains) and
steps past ``lengths[b]`` are masked: the carry is frozen, the output is zero and no
gradient passes. Layer 0's input projection ``X W_x + b`` (or row lookup of token
ids) is one matmul before the loop; the other layers' inputs are computed in it.

Scope: unidirectional networks (a backward direction needs the whole lower layer
first), no dropout between layers, no remat; :mod:`rnn_jax.networks` checks.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from rnn_jax import fused
from rnn_jax.cells import Cell, LSTMCarry

Array = jax.Array


def _bmm(spec: str, a: Array, w: Array) -> Array:
    """A batched matmul; with bfloat16 ``w``, ``a`` is cast too and the product is
    accumulated in float32 (as :func:`rnn_jax.fused.layer`'s matmuls)."""
    if w.dtype != jnp.bfloat16:
        return jnp.einsum(spec, a, w)
    return jnp.einsum(spec, a.astype(w.dtype), w, preferred_element_type=jnp.float32)


def _upper_inputs(ys_prev: Array, wx: Array, b: Array) -> Array:
    """Gate pre-activations of layers 1..L-1 from the outputs below:
    ``<[L-1, B, H]> @ <[L-1, H, G*H]> + <[L-1, G*H]>``."""
    return _bmm("lbh,lhg->lbg", ys_prev, wx) + b[:, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _wave(cell, opts, rec, wx, b, carry0, xp0, wave_valid):
    top, final, _ = _wave_forward(cell, opts, False, rec, wx, b, carry0, xp0, wave_valid)
    return top, final


def _wave_forward(cell, opts, save, rec, wx, b, carry0, xp0, wave_valid):
    """``(top, final carries <[L, B, H]>, (ys, saved) or None)``: ``top`` is the top
    layer's outputs ``<[S, B, H]>``; with ``save``, also every layer's outputs ``ys
    <[S, L, B, H]>`` and the kernels' saves ``<[S, L, ...]>`` (the backward pass
    reads them).

    ``top`` is a scan output of its own in both modes, not a slice of ``ys``: under
    ``jit`` in ``vmap``, the primal function's and the forward rule's outputs must be
    computed alike, or reverse mode of the batched call fails (JAX 0.10 batches a
    scan output and a slice of one with the batch axis in different places, and
    linearizing then slices the wrong axis)."""
    prep = jax.vmap(lambda r: fused.prepare(cell, r, opts.matmul_dtype))(rec)
    wx = fused.cast(wx, opts.matmul_dtype)
    forward = jax.vmap(lambda p, c, u: fused.kernels(cell, p)[0](c, u))
    num_layers = wave_valid.shape[1]
    pad = jnp.zeros((num_layers - 1, *xp0.shape[1:]), xp0.dtype)
    inputs = jnp.concatenate([xp0, pad], axis=0)  # [S, B, G*H]: layer 0's steps

    def body(state, inp):
        carry, ys_prev = state
        xp_s, valid_s = inp
        u = jnp.concatenate([xp_s[None], _upper_inputs(ys_prev[:-1], wx, b)], axis=0)
        new, y, saved = forward(prep, carry, u)
        new = fused._where(valid_s, new, carry)
        y = fused._mask(valid_s, y)
        return (new, y), ((y[-1], y, saved) if save else (y[-1],))

    h0 = fused._hidden(carry0)  # the outputs have the carries' type (float32 for bfloat16)
    ys0 = jnp.zeros((num_layers, *h0.shape[1:]), h0.dtype)
    (final, _), out = jax.lax.scan(body, (carry0, ys0), (inputs, wave_valid), unroll=opts.unroll)
    return out[0], final, (out[1:] if save else None)


def _wave_fwd(cell, opts, rec, wx, b, carry0, xp0, wave_valid):
    top, final, (ys, saved) = _wave_forward(cell, opts, True, rec, wx, b, carry0, xp0, wave_valid)
    return (top, final), (rec, wx, b, carry0, wave_valid, ys, saved, fused.dtype_marker(xp0))


def _wave_bwd(cell, opts, res, cts):
    rec, wx, b, carry0, wave_valid, ys, saved, xp_type = res
    dys, dfinal = cts  # dys: the top layer's, <[S, B, H]>
    num_steps, num_layers = wave_valid.shape[:2]
    prep = jax.vmap(lambda r: fused.prepare(cell, r, opts.matmul_dtype))(rec)
    backward = jax.vmap(lambda p, *a: fused.kernels(cell, p)[1](*a))
    wx_t = fused.cast(jnp.swapaxes(wx, 1, 2), opts.matmul_dtype)  # [L-1, G*H, H]
    # The hidden state before each step: layer l starts (step s = l) from its initial
    # carry, and later reads its own output of step s-1; earlier steps are masked.
    shifted = jnp.concatenate([jnp.zeros_like(ys[:1]), ys[:-1]], axis=0)
    first = jnp.arange(num_steps)[:, None] == jnp.arange(num_layers)[None, :]
    h_prev = jnp.where(first[..., None, None], fused._hidden(carry0)[None], shifted)

    def body(state, inp):
        dcarry, da_above = state  # da_above: dA of every layer at step s+1
        dy_s, valid_s, h_prev_s, y_s, saved_s = inp
        # gradient reaching layer l's output at time t: from layer l+1's step s+1
        d_up = _bmm("lbg,lgh->lbh", da_above[1:], wx_t)
        dy = jnp.concatenate([d_up, dy_s[None]], axis=0)
        if isinstance(dcarry, LSTMCarry):
            d_in = LSTMCarry(dcarry.h + dy, dcarry.c)
        else:
            d_in = dcarry + dy
        d_prev, grads = backward(prep, saved_s, y_s, h_prev_s, d_in)
        d_prev = fused._where(valid_s, d_prev, dcarry)
        grads = tuple(fused._mask(valid_s, g) for g in grads)
        return (d_prev, fused.gate_gradient(cell, grads)), grads

    da0 = jnp.zeros((num_layers, *fused._hidden(carry0).shape[1:2], wx.shape[-1]), ys.dtype)
    inputs = (dys, wave_valid, h_prev, ys, saved)
    (dcarry0, _), stacked = jax.lax.scan(
        body, (dfinal, da0), inputs, reverse=True, unroll=opts.unroll
    )
    weight_grads = jax.vmap(lambda p, *a: fused.kernels(cell, p)[2](*a), in_axes=(0, 1, 1))
    grads = weight_grads(prep, h_prev, stacked)
    da = fused.gate_gradient(cell, stacked)  # <[S, L, B, G*H]>
    drec = {k: grads[k].reshape(rec[k].shape) for k in rec}
    # layer l >= 1 read, at step s, layer l-1's output of step s-1
    inputs_up = shifted[:, :-1]  # [S, L-1, B, H]
    dwx = _bmm("slbh,slbg->lhg", inputs_up, fused.cast(da[:, 1:], opts.matmul_dtype))
    db = jnp.sum(da[:, 1:], axis=(0, 2))
    dxp0 = da[: num_steps - num_layers + 1, 0]
    return (
        fused.cast_like(drec, rec),
        dwx.astype(wx.dtype),
        db.astype(b.dtype),
        fused.cast_like(dcarry0, carry0),
        dxp0.astype(xp_type.dtype),
        None,
    )


_wave.defvjp(_wave_fwd, _wave_bwd)


def network_layers(
    cell: Cell,
    params: list[dict[str, Array]],
    carries: list[Any],
    xs: Array,
    lengths: Array | None = None,
    *,
    unroll: int = 1,
    matmul_dtype: str = "float32",
    kernel: str = "xla",
) -> tuple[Array, list[Any]]:
    """All layers of a deep unidirectional network over a time-major batch.

    Args:
      cell: a cell with a fused kernel (``fused.supports(cell)``).
      params: the L layers' params (layer 0 reads ``I`` features, the others ``H``).
      carries: the L initial carries, each with a batch axis (``<float32>[B, H]`` or an
        ``LSTMCarry`` of two).
      xs: ``<float32>[T, B, I]`` inputs, or token ids ``<int32>[T, B]``.
      lengths: ``<int32>[B]`` valid steps per sequence (``None``: all ``T``).
      unroll: loop steps per iteration of both loops.
      matmul_dtype: the operand type of every matmul (``"float32"`` or
        ``"bfloat16"``; see :func:`rnn_jax.fused.layer`).
      kernel: ``"xla"`` (the loops above) or ``"pallas"``: both passes as one GPU
        kernel each with the layers on its grid (:mod:`rnn_jax.persistent_stack`;
        float32, cells :mod:`rnn_jax.persistent` runs).

    Returns:
      ``(ys <float32>[T, B, H], final carries)``: the top layer's outputs (zero past
      each length) and each layer's carry after its last valid step.
    """
    if not fused.supports(cell):
        raise ValueError(f"cell: no fused kernels for {cell.name!r}")
    if kernel not in fused.KERNELS:
        raise ValueError(f"kernel: expected 'xla' or 'pallas', got {kernel!r}")
    if matmul_dtype not in fused.MATMUL_DTYPES:
        raise ValueError(
            f"matmul_dtype: expected one of {list(fused.MATMUL_DTYPES)}, got {matmul_dtype!r}"
        )
    num_layers = len(params)
    if num_layers == 1:
        ys, final = fused.layer(
            cell,
            params[0],
            carries[0],
            xs,
            lengths,
            unroll=unroll,
            matmul_dtype=matmul_dtype,
            kernel=kernel,
        )
        return ys, [final]
    num_steps, batch = xs.shape[0], xs.shape[1]
    if kernel == "pallas":
        from rnn_jax import persistent_stack

        if matmul_dtype != "float32":
            raise ValueError(
                f"matmul_dtype: kernel='pallas' runs {num_layers} layers in float32 only "
                f"(rnn_jax.persistent_stack), got {matmul_dtype!r}"
            )
        dtypes = persistent_stack.input_dtypes(params, carries, xs)
        reason = persistent_stack.problem(cell, num_layers, num_steps, batch, dtypes)
        if reason is not None:
            raise ValueError(f"kernel='pallas': {reason}")
    fused.check_bfloat16_inputs(params, carries, matmul_dtype, xs)
    xp0 = fused._project(cell, params[0], xs, matmul_dtype)
    stack = lambda trees: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)  # noqa: E731
    rec = stack([fused._recurrent_params(p) for p in params])
    upper = params[1:]
    wx = jnp.stack([p["W_x"].reshape(p["W_x"].shape[0], -1) for p in upper])
    b = jnp.stack([p["b"].reshape(-1) for p in upper])
    # valid[s, l, b]: layer l's step s is time t = s - l of sequence b, inside [0, length)
    t = jnp.arange(num_steps + num_layers - 1)[:, None] - jnp.arange(num_layers)[None, :]
    limit = num_steps if lengths is None else lengths[None, None, :]
    wave_valid = (t[..., None] >= 0) & (t[..., None] < limit)
    wave_valid = jnp.broadcast_to(wave_valid, (*t.shape, batch))
    if kernel == "pallas":
        valid = None if lengths is None else jnp.arange(num_steps)[:, None] < lengths[None, :]
        top, final = persistent_stack.network_layers(cell, rec, wx, b, stack(carries), xp0, valid)
        finals = [jax.tree_util.tree_map(lambda c, i=i: c[i], final) for i in range(num_layers)]
        return top, finals
    opts = fused.LoopOptions(unroll, matmul_dtype)
    ys, final = _wave(cell, opts, rec, wx, b, stack(carries), xp0, wave_valid)
    top = ys[num_layers - 1 :]
    finals = [jax.tree_util.tree_map(lambda c, i=i: c[i], final) for i in range(num_layers)]
    return top, finals
