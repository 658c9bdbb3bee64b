r"""Recurrent layers with hand-written backward passes (the ``"fused"`` implementation).

Autodiff of a ``lax.scan`` accumulates the recurrent weight gradient inside the
backward loop: one small ``[H, B] @ [B, G*H]`` matmul per step. The layers here do
what cuDNN and oneDNN do instead:

* forward: the input projection ``X W_x + b`` of all steps is one matmul (or a row
  lookup for token ids) before the loop; each step computes ``H_{t-1} W_h`` and the
  gates, and saves the activated gates;
* backward loop: from the saved gates, each step computes the gradient of the gate
  pre-activations ``dA_t <float32>[B, G, H]`` and passes ``dA_t W_hᵀ`` to step t-1:
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

and similarly for the GRU (both forms) and the plain RNN below. Every layer here
gives the same outputs and gradients as the autodiff path (``tests/test_fused.py``).

``remat=True`` saves only the carries in the forward pass and recomputes each step's
gates in the backward loop.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from rnn_jax.cells import Cell, LSTMCarry

Array = jax.Array


def supports(cell: Cell) -> bool:
    """Whether :func:`layer` has a hand-written backward pass for ``cell``."""
    return cell.name in ("rnn", "gru", "lstm")


def _flat(w: Array) -> Array:
    """``W_h <[H, G, H]> -> <[H, G*H]>`` (the plain RNN's ``[H, H]`` stays)."""
    return w.reshape(w.shape[0], -1)


def _mm(v: Array, w_flat: Array, gates: int) -> Array:
    """``v <[B, K]> @ w <[K, G*H]> -> <[B, G, H]>`` (``[B, H]`` when ``gates == 0``)."""
    out = v @ w_flat
    return out if gates == 0 else out.reshape(v.shape[0], gates, -1)


def _dsigmoid(s: Array) -> Array:
    return s * (1.0 - s)


# ---------------------------------------------------------------------------
# Per-cell steps: forward (carry, xp) -> (carry, y, saved) and its backward
# (saved, carry_prev, dcarry) -> (dcarry_prev, dxp, recurrent-matmul cotangents).
# ``xp`` is one step of the input projection: <[B, G, H]> (<[B, H]> for the RNN).


def _rnn_kernels(cell: Cell, params: dict[str, Array]):
    relu = cell.options["activation"] == "relu"
    phi = jax.nn.relu if relu else jnp.tanh
    w = params["W_h"]

    def forward(h, xp):
        h2 = phi(xp + h @ w)
        return h2, h2, h2

    def backward(h2, h, dh):
        da = dh * (h2 > 0) if relu else dh * (1.0 - h2 * h2)
        return da @ w.T, da, (da,)

    def weight_grads(hprev, dms):
        (da,) = dms
        return {"W_h": _contract(hprev, da)}

    return forward, backward, weight_grads


def _gru_kernels(cell: Cell, params: dict[str, Array]):
    reset_after = cell.options["reset_after"]
    pin_r, pin_z = cell.options["pin_reset"], cell.options["pin_update"]
    w = params["W_h"]  # [H, 3, H]
    w_flat = _flat(w)
    w_rz, w_n = _flat(w[:, :2]), w[:, 2]

    def gate(pre, pin):
        return jax.nn.sigmoid(pre) if pin is None else jnp.full_like(pre, pin)

    def forward(h, xp):
        if reset_after:
            hp = _mm(h, w_flat, 3)
            r = gate(xp[:, 0] + hp[:, 0], pin_r)
            z = gate(xp[:, 1] + hp[:, 1], pin_z)
            hn = hp[:, 2] + params["b_hn"]
            n = jnp.tanh(xp[:, 2] + r * hn)
            saved = (r, z, n, hn)
        else:
            rz = _mm(h, w_rz, 2)
            r = gate(xp[:, 0] + rz[:, 0], pin_r)
            z = gate(xp[:, 1] + rz[:, 1], pin_z)
            n = jnp.tanh(xp[:, 2] + (r * h) @ w_n)
            saved = (r, z, n)
        h2 = z * h + (1.0 - z) * n
        return h2, h2, saved

    def backward(saved, h, dh):
        r, z, n = saved[:3]
        dz = dh * (h - n)
        da_n = dh * (1.0 - z) * (1.0 - n * n)
        da_z = jnp.zeros_like(dz) if pin_z is not None else dz * _dsigmoid(z)
        if reset_after:
            hn = saved[3]
            da_r = jnp.zeros_like(dz) if pin_r is not None else da_n * hn * _dsigmoid(r)
            dhp = jnp.stack([da_r, da_z, da_n * r], axis=1)  # cotangent of H W_h + (0,0,b_hn)
            dh_prev = dh * z + (dhp.reshape(dhp.shape[0], -1) @ w_flat.T)
            dxp = jnp.stack([da_r, da_z, da_n], axis=1)
            return dh_prev, dxp, (dhp,)
        drh = da_n @ w_n.T  # cotangent of R_t * H_{t-1}
        da_r = jnp.zeros_like(dz) if pin_r is not None else drh * h * _dsigmoid(r)
        da_rz = jnp.stack([da_r, da_z], axis=1)
        dh_prev = dh * z + drh * r + da_rz.reshape(da_rz.shape[0], -1) @ w_rz.T
        dxp = jnp.stack([da_r, da_z, da_n], axis=1)
        return dh_prev, dxp, (da_rz, da_n, r * h)

    def weight_grads(hprev, dms):
        if reset_after:
            (dhp,) = dms
            return {
                "W_h": _contract(hprev, dhp),
                "b_hn": jnp.sum(dhp[:, :, 2], axis=(0, 1)),
            }
        da_rz, da_n, rh = dms
        d_rz = _contract(hprev, da_rz)
        d_n = _contract(rh, da_n)
        return {"W_h": jnp.concatenate([d_rz, d_n[:, None]], axis=1)}

    return forward, backward, weight_grads


def _lstm_kernels(cell: Cell, params: dict[str, Array]):
    w_flat = _flat(params["W_h"])  # [H, 4H]

    def forward(carry, xp):
        pre = xp + _mm(carry.h, w_flat, 4)
        ifo = jax.nn.sigmoid(pre[:, :3])
        g = jnp.tanh(pre[:, 3])
        c = ifo[:, 1] * carry.c + ifo[:, 0] * g
        tc = jnp.tanh(c)
        h = ifo[:, 2] * tc
        return LSTMCarry(h, c), h, (ifo, g, c, tc)

    def backward(saved, carry, dcarry):
        ifo, g, _, tc = saved
        i, f, o = ifo[:, 0], ifo[:, 1], ifo[:, 2]
        dh, dc = dcarry
        dc = dc + dh * o * (1.0 - tc * tc)
        da = jnp.stack(
            [
                dc * g * _dsigmoid(i),
                dc * carry.c * _dsigmoid(f),
                dh * tc * _dsigmoid(o),
                dc * i * (1.0 - g * g),
            ],
            axis=1,
        )
        dh_prev = da.reshape(da.shape[0], -1) @ w_flat.T
        return LSTMCarry(dh_prev, dc * f), da, (da,)

    def weight_grads(hprev, dms):
        (da,) = dms
        return {"W_h": _contract(hprev, da)}

    return forward, backward, weight_grads


_KERNELS = {"rnn": _rnn_kernels, "gru": _gru_kernels, "lstm": _lstm_kernels}


def _contract(v: Array, d: Array) -> Array:
    """``Σ_{t,b} v[t,b]ᵀ d[t,b]``: ``<[T, B, K]>, <[T, B, ...]> -> <[K, ...]>`` as one matmul."""
    k = v.shape[-1]
    rows = v.shape[0] * v.shape[1]
    out = v.reshape(rows, k).T @ d.reshape(rows, -1)
    return out.reshape(k, *d.shape[2:])


def _hidden(carry: Any) -> Array:
    return carry.h if isinstance(carry, LSTMCarry) else carry


def _mask(valid: Array, x: Array) -> Array:
    """``x <[B, ...]>`` with the rows of invalid examples set to zero."""
    return jnp.where(valid.reshape(-1, *([1] * (x.ndim - 1))), x, jnp.zeros_like(x))


def _where(valid: Array, new: Any, old: Any) -> Any:
    return jax.tree_util.tree_map(lambda n, o: jnp.where(valid[:, None], n, o), new, old)


# ---------------------------------------------------------------------------
# The recurrence with a custom VJP. ``rec`` holds the recurrent params (W_h, and
# b_hn for the reset-after GRU); the input projection stays outside, under autodiff.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _recurrence(cell, unroll, remat, rec, carry0, xp, valid):
    ys, final, _ = _forward(cell, unroll, False, rec, carry0, xp, valid)
    return ys, final


def _forward(cell, unroll, save, rec, carry0, xp, valid):
    forward, _, _ = _KERNELS[cell.name](cell, rec)

    def body(carry, inp):
        xp_t, valid_t = inp
        new, y, saved = forward(carry, xp_t)
        new = _where(valid_t, new, carry)
        y = jnp.where(valid_t[:, None], y, jnp.zeros_like(y))
        if save == "all":
            return new, (y, new, saved)
        if save == "carry":
            return new, (y, new)
        return new, y

    final, out = jax.lax.scan(body, carry0, (xp, valid), unroll=unroll)
    if save:
        return out[0], final, out[1:]
    return out, final, None


def _recurrence_fwd(cell, unroll, remat, rec, carry0, xp, valid):
    ys, final, extra = _forward(cell, unroll, "carry" if remat else "all", rec, carry0, xp, valid)
    return (ys, final), (rec, carry0, xp, valid, extra)


def _recurrence_bwd(cell, unroll, remat, res, cts):
    rec, carry0, xp, valid, extra = res
    dys, dfinal = cts
    forward, backward, weight_grads = _KERNELS[cell.name](cell, rec)
    carries = extra[0]  # carry after each step, <[T, B, ...]>
    prev = jax.tree_util.tree_map(
        lambda c0, cs: jnp.concatenate([c0[None], cs[:-1]], axis=0), carry0, carries
    )
    saved_all = None if remat else extra[1]

    def body(dcarry, inp):
        dy_t, valid_t, prev_t, xp_t, saved_t = inp
        if saved_t is None:  # remat: recompute this step's gates
            saved_t = forward(prev_t, xp_t)[2]
        if isinstance(dcarry, LSTMCarry):
            d_in = LSTMCarry(dcarry.h + dy_t, dcarry.c)
        else:
            d_in = dcarry + dy_t
        d_prev, dxp_t, dms_t = backward(saved_t, prev_t, d_in)
        d_prev = _where(valid_t, d_prev, dcarry)
        return d_prev, (_mask(valid_t, dxp_t), tuple(_mask(valid_t, d) for d in dms_t))

    dys = jnp.where(valid[..., None], dys, jnp.zeros_like(dys))
    dcarry0, out = jax.lax.scan(
        body, dfinal, (dys, valid, prev, xp, saved_all), reverse=True, unroll=unroll
    )
    dxp, dms = out
    grads = weight_grads(_hidden(prev), dms)
    drec = {k: grads[k] for k in rec}
    return drec, dcarry0, dxp, None


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def layer(
    cell: Cell,
    params: dict[str, Array],
    carry: Any,
    xs: Array,
    lengths: Array | None = None,
    *,
    unroll: int = 1,
    remat: bool = False,
) -> tuple[Array, Any]:
    """One direction of one layer over a time-major batch, with the fused backward pass.

    Args:
      cell: a cell from :mod:`rnn_jax.cells` (``supports(cell)`` must hold).
      params: the cell's params.
      carry: initial carry with a batch axis (``<float32>[B, H]``, or an
        ``LSTMCarry`` of two).
      xs: ``<float32>[T, B, I]`` inputs, or token ids ``<int32>[T, B]``.
      lengths: ``<int32>[B]`` valid steps per sequence (``None``: all ``T``).
      unroll: passed to both ``lax.scan`` loops.
      remat: recompute the gates in the backward loop instead of saving them.

    Returns:
      ``(ys <float32>[T, B, H], final carry)``: outputs are zero past each length and
      the final carry is the one after the last valid step.
    """
    if not supports(cell):
        raise ValueError(f"cell: no fused implementation for {cell.name!r}")
    num_steps, batch = xs.shape[0], xs.shape[1]
    xp = cell.project(params, xs)  # all steps at once: <[T, B, G, H]>
    if lengths is None:
        valid = jnp.ones((num_steps, batch), bool)
    else:
        valid = jnp.arange(num_steps)[:, None] < lengths[None, :]
    rec = {"W_h": params["W_h"]}
    if "b_hn" in params:
        rec["b_hn"] = params["b_hn"]
    return _recurrence(cell, unroll, remat, rec, carry, xp, valid)
