r"""The fused layers' loops as single GPU kernels (the ``"pallas"`` implementation).

:mod:`rnn_jax.fused` runs each time step as a few XLA kernels: on a GPU, a step of
the long shape (H=128, B=32) costs ~10 us of launches and bookkeeping while its
arithmetic (``[32, 128] @ [128, 512]``) takes well under one. Here the whole loop
over time is one Pallas (Triton) kernel: each program owns a block of batch rows
and a group of hidden units, keeps its carry and weight columns in registers,
runs the T steps in an ``scf.for`` loop, reads each step's input projection and
writes its outputs and saved gates to memory, so a step costs its matmuls, its
gate arithmetic and one exchange of the row block's state between its programs
(see :func:`layout`). Batch rows do not interact, so row blocks run independently
on as many streaming multiprocessors.

The computation is the fused layer's, equation for equation (see
:mod:`rnn_jax.fused` for the backward passes): the forward kernel computes, per
step and gate block k, ``A_k = XP_t[:, k] + H_{t-1} W_h[:, k]`` with
``W_h[:, k] <float32>[H, H]`` (gate blocks as separate matmuls: Triton has no
slicing of register tensors), the gates and the new carry, and saves the gates
(``<float32>[T, B, H]`` each); the backward kernel walks the steps in reverse and
writes ``dA_t <float32>[T, B, G*H]``, passing ``Σ_k dA_k W_h[:, k]ᵀ`` to step t-1.
The weight gradients stay single large XLA matmuls after the loop
(:func:`rnn_jax.fused.kernels`' ``weight_grads``), the input projection stays
outside as well. Variable lengths: past ``lengths[b]`` the carry is frozen, the
output zero and nothing passes gradient, as everywhere.

Scope: the ``rnn`` (tanh, relu), ``gru`` (the reset-after form, gates not
pinned) and ``lstm`` cells, float32 params, hidden sizes that are powers of two
from 16 to 256 (Triton's block shapes; the per-gate weights are read by one
program). Matmuls follow JAX's float32 matmul precision like XLA's (TF32 on
recent GPUs unless ``jax_default_matmul_precision`` says otherwise), or bfloat16
operands with ``matmul_dtype="bfloat16"``. Off a GPU, the kernels run in Pallas'
interpreter: exact but slow, meant for the tests. First derivatives only (the
backward kernel has no derivative of its own). Under ``jax.vmap`` (the two
directions of a bidirectional layer) the mapped calls run as one kernel with the
mapped axis in the grid where all its programs fit on the GPU at once, else one
after another (:func:`_batched`). Interpretation is chosen by
``jax.default_backend()``: on a GPU host, computing on a CPU device needs
``implementation="fused"``.

The programs of a row block meet every step (see :func:`layout`); how they pass
the state is :data:`EXCHANGE`: an atomic counter they all add to and spin on, or
sentinel-filled buffers in which every element is its own flag (:func:`_await`).
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import jax
import jax.custom_batching
import jax.numpy as jnp
from jax.experimental import pallas as pl

from rnn_jax import cells
from rnn_jax.cells import Cell, LSTMCarry

Array = jax.Array

BLOCK = 16  # batch rows per program: Triton's dot needs at least 16
MIN_HIDDEN, MAX_HIDDEN = 16, 256
NUM_WARPS = 4
NUM_STAGES = 1  # no software pipelining: 3 stages asked for 520 KiB of shared memory
MIN_UNITS = 16  # hidden units per program when the units are split
MAX_PROGRAMS = 64  # programs that wait for each other must all be resident
EXCHANGE = "auto"
"""How the programs of a row block pass each step's hidden state (forward) or gate
gradients (backward) to each other (see :func:`exchange`): ``"counter"`` (write,
barrier on an atomic counter, read back), ``"flag"`` (every element is its own
flag: the buffer starts filled with :data:`SENTINEL` and readers reload until no
element of their tile is the sentinel: no atomics, one read instead of an atomic
add, a spin on the counter and a read) or ``"auto"``: ``"flag"`` when a row block
has more than :data:`FLAG_MIN_SPLITS` - 1 programs. The flags cost memory: the
forward fills and keeps a ``[T, B, H]`` buffer beside its outputs (also when only
the values are wanted), the backward fills its ``dA`` output before the loop."""
FLAG_MIN_SPLITS = 3
"""Measured on an H100 (one layer's forward+backward, ms, counter vs flag): H=128
B=32 T=1024 (8 programs per row block) LSTM 9.11 vs 8.60, GRU 8.42 vs 7.29, and
bidirectional 9.75 vs 9.22, 8.82 vs 8.29; but H=32 B=1024 T=32 (2 per row block)
LSTM 0.543 vs 0.611, GRU 0.499 vs 0.498."""
SENTINEL = 0x7FE0DEAD
"""The float32 bit pattern (a quiet NaN with a payload) of a not yet written element
of a ``"flag"`` exchange buffer. Arithmetic never produces it (NVIDIA GPUs return the
canonical NaN) and written values are canonicalised, so a NaN passed through from an
input cannot be mistaken for it."""


def unsupported(cell: Cell) -> str | None:
    """Why the kernels cannot run ``cell`` (``None`` if they can)."""
    if cell.name not in ("rnn", "gru", "lstm"):
        return f"no kernel for the cell {cell.name!r}"
    if not cells.is_builtin(cell):
        return f"the {cell.name!r} cell was {cells.CHANGED_CELL}"
    if cell.name == "gru" and not cell.options["reset_after"]:
        return (
            "no kernel for the reset-before GRU (its R_t * H_{t-1} would need a second "
            "exchange between programs per step); use reset_after=True"
        )
    if cell.name == "gru" and (
        cell.options["pin_reset"] is not None or cell.options["pin_update"] is not None
    ):
        return "no kernel for a GRU with pinned gates"
    h = cell.hidden_size
    if not MIN_HIDDEN <= h <= MAX_HIDDEN or h & (h - 1):
        return f"hidden_size {h}: the kernels need a power of two from {MIN_HIDDEN} to {MAX_HIDDEN}"
    return None


def _interpret() -> bool:
    return jax.default_backend() not in ("gpu", "cuda", "rocm")


def _compiler_params():
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _dot(a: Array, w: Array) -> Array:
    """``a @ w`` accumulated in float32 (bfloat16 ``w``: ``a`` cast to bfloat16)."""
    if w.dtype == jnp.bfloat16:
        a = a.astype(jnp.bfloat16)
    return jnp.dot(a, w, preferred_element_type=jnp.float32)


def _sigmoid(x: Array) -> Array:
    return 1.0 / (1.0 + jnp.exp(-x))


def _dsigmoid(s: Array) -> Array:
    return s * (1.0 - s)


# ---------------------------------------------------------------------------
# Per-cell step math on tiles. A program owns U hidden units of BLOCK rows:
# ``x(k)`` is its [BLOCK, U] tile of gate block k of the step's input projection,
# ``mm(a, k)`` is ``a <[BLOCK, H]> @ W_h[:, k, units] <[H, U]>``; ``h`` is the whole
# hidden state [BLOCK, H] (the matmul operand), everything else is the program's
# own units.
#   forward(carry, h, x, mm, extra) -> (carry, y, saved)
#   backward(saved, h_prev, dcarry) -> (da, mm_operands, dh_direct, dcarry_rest)
# where ``da`` are the gate pre-activation gradients (written as dxp), the
# gradient reaching H_{t-1} is ``dh_direct + Σ_k mm_operands[k] W_h[:, k]ᵀ``
# (with the whole [BLOCK, H] operand rows, gathered from all programs), and
# ``dcarry_rest`` the gradient of the rest of the carry (the LSTM's C_{t-1}).
# ``extra`` holds b_hn for the reset-after GRU.


def _num_gates(cell: Cell) -> int:
    return {"rnn": 1, "gru": 3, "lstm": 4}[cell.name]


def _num_saved(cell: Cell) -> int:
    if cell.name == "lstm":
        return 6
    if cell.name == "gru":
        return 4
    return 1


def _step_fns(cell: Cell):
    if cell.name == "lstm":

        def forward(carry, h, x, mm, extra):
            _, c = carry
            i, f, o = (_sigmoid(x(k) + mm(h, k)) for k in range(3))
            g = jnp.tanh(x(3) + mm(h, 3))
            c2 = f * c + i * g
            tc = jnp.tanh(c2)
            h2 = o * tc
            return (h2, c2), h2, (i, f, o, g, c, tc)

        def backward(saved, h_prev, dcarry):
            i, f, o, g, c_prev, tc = saved
            dh, dc = dcarry
            dc = dc + dh * o * (1.0 - tc * tc)
            da = [
                dc * g * _dsigmoid(i),
                dc * c_prev * _dsigmoid(f),
                dh * tc * _dsigmoid(o),
                dc * i * (1.0 - g * g),
            ]
            return da, da, None, (dc * f,)

        return forward, backward

    if cell.name == "gru":

        def forward(carry, h, x, mm, extra):
            (h_own,) = carry
            r = _sigmoid(x(0) + mm(h, 0))
            z = _sigmoid(x(1) + mm(h, 1))
            hn = mm(h, 2) + extra
            n = jnp.tanh(x(2) + r * hn)
            h2 = z * h_own + (1.0 - z) * n
            return (h2,), h2, (r, z, n, hn)

        def backward(saved, h_prev, dcarry):
            r, z, n, hn = saved
            (dh,) = dcarry
            da_n = dh * (1.0 - z) * (1.0 - n * n)
            da_z = dh * (h_prev - n) * _dsigmoid(z)
            da_r = da_n * hn * _dsigmoid(r)
            return [da_r, da_z, da_n], [da_r, da_z, da_n * r], dh * z, ()

        return forward, backward

    relu = cell.options["activation"] == "relu"

    def forward(carry, h, x, mm, extra):
        pre = x(0) + mm(h, 0)
        h2 = jnp.maximum(pre, 0.0) if relu else jnp.tanh(pre)
        return (h2,), h2, (h2,)

    def backward(saved, h_prev, dcarry):
        (h2,) = saved
        (dh,) = dcarry
        da = jnp.where(h2 > 0, dh, 0.0) if relu else dh * (1.0 - h2 * h2)
        return [da], [da], None, ()

    return forward, backward


# ---------------------------------------------------------------------------
# The kernels. Arrays are time-major with the batch padded to a multiple of the
# row block. The grid is (row blocks, unit splits): program (p, j) owns rows
# [p*BLOCK, (p+1)*BLOCK) and hidden units [j*U, (j+1)*U) of every gate, whose
# weight columns it loads once. Each step it needs the whole hidden state of its
# rows (forward) or the whole gate gradients (backward): the programs of a row
# block write their tiles and read the full rows back from L2 once all have
# written (see :func:`exchange`: a barrier on an atomic counter per row block, or
# sentinel-filled buffers); either way they wait for each other, so they must be
# resident together (see :func:`layout`). With one split (U = H) nobody waits.


def _program_limit(cores: int | None) -> int:
    """How many programs that wait for each other may share a grid: MAX_PROGRAMS,
    and at most one per multiprocessor (``cores``, when known)."""
    return MAX_PROGRAMS if cores is None else min(MAX_PROGRAMS, cores)


def layout(
    batch: int, hidden: int, interpret: bool = False, cores: int | None = None, copies: int = 1
) -> tuple[int, int]:
    """``(rows per program, hidden units per program)`` for a batch and hidden size,
    with ``copies`` grids of it resident at once (the layers of
    :mod:`rnn_jax.persistent_stack`: L copies of the batch's row blocks).

    Units: 16 per program (the smallest Triton dot), so S = H/16 programs share a row
    block's steps and wait for each other at its barrier. They must all be resident
    at once, and the GPU starts a grid's programs in no order it promises, so the
    whole grid must fit: rows are the smallest power of two from 16 to 64 that
    keeps the grid within MAX_PROGRAMS and the device's multiprocessors (``cores``,
    one program each). Otherwise, and when the interpreter runs the programs one
    after another, and for H <= 16: one program per row block holding all units
    (no barrier; slower, see :func:`splits`).
    """
    if interpret or hidden <= MIN_UNITS:
        return BLOCK, hidden
    limit = _program_limit(cores)
    splits = hidden // MIN_UNITS
    for block in (16, 32, 64):
        if copies * -(-batch // block) * splits <= limit:
            return block, MIN_UNITS
    return 64, hidden


def splits(batch: int, hidden: int, cores: int | None = None, copies: int = 1) -> bool:
    """Whether the kernels split the units over programs for this shape on a GPU
    (the measured fast form; one program holding every unit re-reads all weights
    each step: long LSTM 20-25 vs 9.3 ms), with ``copies`` calls of them (a ``vmap``,
    e.g. the two directions of a bidirectional layer) fitting the GPU at once as one
    grid (see :func:`_batched`)."""
    if hidden <= MIN_UNITS:
        return True  # one program per row block holds all units: nobody waits
    block, units = layout(batch, hidden, False, cores)
    limit = _program_limit(cores)
    return units < hidden and copies * -(-batch // block) * (hidden // units) <= limit


def exchange(splits: int = FLAG_MIN_SPLITS) -> str:
    """The exchange of a row block of ``splits`` programs: ``$RNN_JAX_PALLAS_EXCHANGE``
    if set (for measuring them against each other in separate processes), else
    :data:`EXCHANGE`, with ``"auto"`` resolved."""
    mode = os.environ.get("RNN_JAX_PALLAS_EXCHANGE", EXCHANGE)
    if mode not in ("counter", "flag", "auto"):
        raise ValueError(
            f"RNN_JAX_PALLAS_EXCHANGE: expected 'counter', 'flag' or 'auto', got {mode!r}"
        )
    if mode == "auto":
        return "flag" if splits >= FLAG_MIN_SPLITS else "counter"
    return mode


def on_rocm() -> bool:
    """Whether the default device is an AMD GPU (the barrier was reasoned about and
    tested for NVIDIA's memory model only)."""
    try:
        return "rocm" in str(jax.devices()[0].client.platform_version).lower()
    except Exception:  # noqa: BLE001  no client details: not ROCm as far as we know
        return False


def device_cores() -> int | None:
    """The default device's multiprocessor count, if it reports one."""
    return getattr(jax.devices()[0], "core_count", None)


def _barrier(count_ref, row_block, target):
    """Wait until ``count_ref[row_block]`` reaches ``target``, after adding this
    program's arrival: every earlier store of the row block's programs is then
    visible (release/acquire atomics at GPU scope around CTA barriers)."""
    from jax.experimental.pallas import triton as plgpu

    plgpu.debug_barrier()
    seen = plgpu.atomic_add(count_ref, (row_block,), 1) + 1
    jax.lax.while_loop(
        lambda v: v < target, lambda v: plgpu.atomic_add(count_ref, (row_block,), 0), seen
    )
    plgpu.debug_barrier()


def _load_l2(ref_view):
    """A load that bypasses L1 (not coherent across SMs): data other programs wrote."""
    from jax.experimental.pallas import triton as plgpu

    return plgpu.load(ref_view, volatile=True)


def _sentinel_filled(shape) -> Array:
    """A float32 array of ``shape`` whose every element has the bits of SENTINEL."""
    return jax.lax.bitcast_convert_type(jnp.full(shape, SENTINEL, jnp.int32), jnp.float32)


def _canonical(x: Array) -> Array:
    """``x`` with the sentinel's bit pattern (a NaN that only a NaN input passed
    through unchanged could carry) replaced by the canonical NaN. Compared as
    integers: a float test (``x != x``) is one that a compiler assuming no NaNs may
    fold away."""
    return jnp.where(jax.lax.bitcast_convert_type(x, jnp.int32) == SENTINEL, jnp.nan, x)


def _await(ref_view):
    """Load a tile that other programs are writing, again until none of its elements
    is the sentinel (each element is written once, so a loaded value is final)."""

    def missing(tile):
        flags = jax.lax.bitcast_convert_type(tile, jnp.int32) == SENTINEL
        return jnp.max(flags.astype(jnp.int32)) > 0

    return jax.lax.while_loop(missing, lambda _: _load_l2(ref_view), _load_l2(ref_view))


def _forward_kernel(cell, num_steps, masked, save, block, units, flag, *refs):
    hidden, nc = cell.hidden_size, (2 if cell.name == "lstm" else 1)
    ns = _num_saved(cell) if save else 0
    num_gates = _num_gates(cell)
    split = units < hidden
    has_extra = cell.name == "gru"
    refs = list(refs)
    xp_ref, w_ref = refs.pop(0), refs.pop(0)
    carry_refs = [refs.pop(0) for _ in range(nc)]
    valid_ref = refs.pop(0) if masked else None
    extra_ref = refs.pop(0) if has_extra else None
    # split: the barrier counter (counter) or the sentinel-filled [T, B', H] exchange
    # buffer (flag), an input aliased to the last output (whose ref goes unused)
    count_ref = refs.pop(0) if split and not flag else None
    hbuf_ref = refs.pop(0) if split and flag else None
    ys_ref = refs.pop(0)
    final_refs = [refs.pop(0) for _ in range(nc)]
    save_refs = [refs.pop(0) for _ in range(ns)]
    if split and not flag:
        hbuf_ref = refs.pop(0)  # [2, B', H]: a double buffer
    forward, _ = _step_fns(cell)
    p, j = pl.program_id(0), pl.program_id(1)  # row block, unit split
    rows, own = pl.ds(p * block, block), pl.ds(j * units, units)
    extra = extra_ref[own][None, :] if has_extra else None
    ws = [w_ref[:, pl.ds(k * hidden + j * units, units)] for k in range(num_gates)]

    def mm(a, k):
        return _dot(a, ws[k])

    # Step t's inputs are loaded during step t-1 (before its barrier), so that their
    # memory latency is off the chain of dependent steps.
    def load_inputs(t):
        xs = tuple(xp_ref[t, rows, pl.ds(k * hidden + j * units, units)] for k in range(num_gates))
        return xs, (valid_ref[t, rows][:, None] != 0) if masked else None

    def body(t, state):
        carry, h, (xs, v) = state
        new, y, saved = forward(carry, h, lambda k: xs[k], mm, extra)
        if masked:
            new = tuple(jnp.where(v, n, o) for n, o in zip(new, carry, strict=True))
            y = jnp.where(v, y, 0.0)
        ys_ref[t, rows, own] = y
        for ref, s in zip(save_refs, saved, strict=False):  # none unless saving
            ref[t, rows, own] = s
        following = load_inputs(jnp.minimum(t + 1, num_steps - 1))
        if not split:
            return new, new[0], following
        if flag:  # one slot per step, written once: each element is its own flag
            hbuf_ref[t, rows, own] = _canonical(new[0])
            return new, _await(hbuf_ref.at[t, rows, :]), following
        slot = jax.lax.rem(t + 1, 2)  # double buffer: nobody still reads the other slot
        hbuf_ref[slot, rows, own] = new[0]
        _barrier(count_ref, p, (t + 1) * (hidden // units))
        return new, _load_l2(hbuf_ref.at[slot, rows, :]), following

    carry0 = tuple(ref[rows, own] for ref in carry_refs)
    h0 = carry_refs[0][rows, :]
    final, _, _ = jax.lax.fori_loop(0, num_steps, body, (carry0, h0, load_inputs(0)))
    for ref, c in zip(final_refs, final, strict=True):
        ref[rows, own] = c


def _backward_kernel(cell, num_steps, masked, block, units, flag, *refs):
    hidden, nc, ns = cell.hidden_size, (2 if cell.name == "lstm" else 1), _num_saved(cell)
    num_gates = _num_gates(cell)
    split = units < hidden
    gru = cell.name == "gru"
    refs = list(refs)
    wt_ref, dys_ref, hprev_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    save_refs = [refs.pop(0) for _ in range(ns)]
    dfinal_refs = [refs.pop(0) for _ in range(nc)]
    valid_ref = refs.pop(0) if masked else None
    # split: the barrier counter (counter) or the sentinel-filled dA (and the GRU's
    # dA_n * R) buffers (flag), inputs aliased to the outputs below
    count_ref = refs.pop(0) if split and not flag else None
    if split and flag:
        refs = refs[1 + gru :]  # written and read through the aliased outputs
    dxp_ref = refs.pop(0)
    dhn_ref = refs.pop(0) if gru else None
    dcarry0_refs = [refs.pop(0) for _ in range(nc)]
    _, backward = _step_fns(cell)
    p, j = pl.program_id(0), pl.program_id(1)  # row block, unit split
    rows, own = pl.ds(p * block, block), pl.ds(j * units, units)
    wts = [wt_ref[pl.ds(k * hidden, hidden), own] for k in range(num_gates)]

    # Step t's inputs are loaded during step t+1 (before its barrier); see the forward.
    def load_inputs(t):
        dy = dys_ref[t, rows, own]
        saved = tuple(ref[t, rows, own] for ref in save_refs)
        h_prev = hprev_ref[t, rows, own] if gru else None
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
        if split and flag:
            da = [_canonical(d) for d in da]
            operands = [_canonical(d) for d in operands]
        for k in range(num_gates):
            dxp_ref[t, rows, pl.ds(k * hidden + j * units, units)] = da[k]
        if gru:
            dhn_ref[t, rows, own] = operands[2]
        following = load_inputs(jnp.maximum(t - 1, 0))
        if split:
            if not flag:
                _barrier(count_ref, p, (s + 1) * (hidden // units))
            read = _await if flag else _load_l2
            operands = [
                read(dxp_ref.at[t, rows, pl.ds(k * hidden, hidden)])
                for k in range(2 if gru else num_gates)
            ]
            if gru:
                operands.append(read(dhn_ref.at[t, rows, :]))
        dh_prev = sum(_dot(a, w) for a, w in zip(operands, wts, strict=True))
        if dh_direct is not None:
            dh_prev = dh_prev + dh_direct
        d_prev = (dh_prev, *rest)
        if masked:
            d_prev = tuple(jnp.where(v, n, o) for n, o in zip(d_prev, dcarry, strict=True))
        return d_prev, following

    dfinal = tuple(ref[rows, own] for ref in dfinal_refs)
    dcarry0, _ = jax.lax.fori_loop(0, num_steps, body, (dfinal, load_inputs(num_steps - 1)))
    for ref, d in zip(dcarry0_refs, dcarry0, strict=True):
        ref[rows, own] = d


def _call(kernel, grid, out_shapes, args, aliases, programs):
    """``pallas_call`` of ``kernel`` over ``grid``; ``aliases`` maps input to output
    positions; ``programs``: how many programs wait for each other (0: none)."""
    interpret = _interpret()
    call = pl.pallas_call(
        kernel,
        out_shape=out_shapes,
        grid=grid,
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(),
    )
    limit = None if interpret else _program_limit(device_cores())
    return _not_differentiable(_batched(call, programs, limit))(*args)


def _not_differentiable(fn):
    """``fn`` with a JVP rule that raises a clear error: the kernels have no
    derivatives of their own (first derivatives come from the hand-written backward
    kernel; a derivative of that would need a kernel of its own)."""
    wrapped = jax.custom_jvp(fn)

    @wrapped.defjvp
    def _jvp(primals, tangents):
        raise NotImplementedError(
            "implementation 'pallas' gives first derivatives only (its backward pass is "
            "a kernel with no derivative of its own); use implementation='fused' for "
            "higher-order derivatives"
        )

    return wrapped


def _batched(call, programs, limit):
    """``call`` with a batching rule. Mapped calls run as one kernel with the mapped
    axis added to the grid (Pallas' own rule) when they can: always if no program
    waits for another (``programs == 0``), else when all ``axis_size * programs``
    programs fit on the GPU at once (``limit``; ``None``: no limit). Otherwise they
    run one after another (``lax.map``): programs of a grid that does not fit would
    wait at the barrier for programs that never start."""
    fn = jax.custom_batching.custom_vmap(call)

    @fn.def_vmap
    def rule(axis_size, in_batched, *args):
        if not programs or limit is None or axis_size * programs <= limit:
            in_axes = [0 if b else None for b in in_batched]
            out = _batched(jax.vmap(call, in_axes=in_axes), programs * axis_size, limit)(*args)
        else:
            mapped = [a for a, b in zip(args, in_batched, strict=True) if b]

            def one(slices):
                rest = iter(slices)
                return fn(*[next(rest) if b else a for a, b in zip(args, in_batched, strict=True)])

            out = jax.lax.map(one, mapped)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return fn


def _carry_leaves(carry: Any) -> tuple[Array, ...]:
    return (carry.h, carry.c) if isinstance(carry, LSTMCarry) else (carry,)


def _carry_tree(cell: Cell, leaves) -> Any:
    return LSTMCarry(*leaves) if cell.name == "lstm" else leaves[0]


def _pad_rows(x: Array | None, pad: int, axis: int) -> Array | None:
    if x is None or not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _padded_valid(valid: Array | None, num_steps: int, batch: int, pad: int) -> Array | None:
    """``valid`` as int32 ``[T, B + pad]`` (padded rows invalid), or ``None`` when
    there are neither lengths nor padded rows."""
    if valid is None and not pad:
        return None
    if valid is None:
        valid = jnp.ones((num_steps, batch), bool)
    return _pad_rows(valid.astype(jnp.int32), pad, 1)


class _Plan(NamedTuple):
    """How one call lays out its batch: rows and hidden units per program, the
    padded batch, and the int32 validity mask (``None``: no lengths, no padding)."""

    block: int
    units: int
    rows: int
    hidden: int
    vmask: Array | None

    @property
    def split(self) -> bool:  # units over several programs, exchanging every step
        return self.units < self.hidden

    @property
    def grid(self) -> tuple[int, int]:  # (row blocks, unit splits)
        return self.rows // self.block, self.hidden // self.units

    @property
    def programs(self) -> int:  # programs that wait for each other (0: none do)
        return self.grid[0] * self.grid[1] if self.split else 0

    @property
    def exchange(self) -> str | None:  # how they meet each step (None: they do not)
        return exchange(self.grid[1]) if self.split else None


def _plan(batch: int, hidden: int, valid: Array | None, num_steps: int) -> _Plan:
    """The layout of one call; :func:`forward` and :func:`backward` share it, so the
    saved gates the backward kernel reads are padded as the forward left them."""
    interpret = _interpret()
    block, units = layout(batch, hidden, interpret, None if interpret else device_cores())
    pad = -batch % block
    return _Plan(block, units, batch + pad, hidden, _padded_valid(valid, num_steps, batch, pad))


def plan_exchange(batch: int, hidden: int) -> str | None:
    """The exchange the kernels use for a batch and hidden size on this device
    (``None``: its programs do not meet, as in the interpreter)."""
    return _plan(batch, hidden, None, 1).exchange


def forward(cell, w_flat, b_hn, carry0, xp, valid, save):
    """The forward loop: ``(ys <[T, B, H]>, final carry, saved)``; ``saved`` is the
    tuple of per-step gates ``<[T, B', H]>`` the backward kernel reads (``None``
    unless ``save``; ``B'`` the padded batch). ``w_flat <[H, G*H]>`` (float32 or
    bfloat16), ``xp <float32>[T, B, G*H]``, ``valid <bool>[T, B]`` or ``None``."""
    num_steps, batch = xp.shape[:2]
    hidden = cell.hidden_size
    plan = _plan(batch, hidden, valid, num_steps)
    pad = plan.rows - batch
    args = [_pad_rows(xp, pad, 1), w_flat]
    args += [_pad_rows(c, pad, 0) for c in _carry_leaves(carry0)]
    if plan.vmask is not None:
        args.append(plan.vmask)
    if cell.name == "gru":
        args.append(b_hn if b_hn is not None else jnp.zeros((hidden,), jnp.float32))
    nc = len(_carry_leaves(carry0))
    ns = _num_saved(cell) if save else 0
    seq = jax.ShapeDtypeStruct((num_steps, plan.rows, hidden), jnp.float32)
    tile = jax.ShapeDtypeStruct((plan.rows, hidden), jnp.float32)
    shapes = [seq] + [tile] * nc + [seq] * ns
    flag = plan.exchange == "flag"
    aliases = {}
    if flag:
        args.append(_sentinel_filled(seq.shape))
        shapes.append(seq)
    elif plan.split:
        args.append(jnp.zeros((plan.grid[0],), jnp.int32))
        shapes += [jax.ShapeDtypeStruct((2, plan.rows, hidden), jnp.float32)]
        shapes.append(jax.ShapeDtypeStruct((plan.grid[0],), jnp.int32))
    if plan.split:
        aliases = {len(args) - 1: len(shapes) - 1}
    kernel = functools.partial(
        _forward_kernel, cell, num_steps, plan.vmask is not None, save, plan.block, plan.units, flag
    )
    out = _call(kernel, plan.grid, shapes, args, aliases, plan.programs)
    ys, final, saved = out[0], out[1 : 1 + nc], out[1 + nc : 1 + nc + ns]
    ys = ys[:, :batch]
    final = _carry_tree(cell, [f[:batch] for f in final])
    return ys, final, (tuple(saved) if save else None)


def backward(cell, w_t, valid, h_prev, saved, dys, dfinal):
    """The backward loop: ``(dxp <float32>[T, B, G*H], dcarry0, extras)`` from the
    hidden state before each step ``h_prev <[T, B, H]>``, the saved gates (padded
    rows, as :func:`forward` left them), the output gradients ``dys`` (zero past
    each length) and ``w_t <[G*H, H]>``; ``extras`` is what the weight gradients
    need besides (the GRU's ``dA_n * R``, the gradient of ``H_{t-1} W_hn + b_hn``)."""
    num_steps, batch = h_prev.shape[:2]
    hidden = cell.hidden_size
    plan = _plan(batch, hidden, valid, num_steps)
    pad = plan.rows - batch
    args = [w_t, _pad_rows(dys, pad, 1), _pad_rows(h_prev, pad, 1), *saved]
    args += [_pad_rows(d, pad, 0) for d in _carry_leaves(dfinal)]
    if plan.vmask is not None:
        args.append(plan.vmask)
    nc = len(_carry_leaves(dfinal))
    width = _num_gates(cell) * hidden
    seq = jax.ShapeDtypeStruct((num_steps, plan.rows, hidden), jnp.float32)
    shapes = [jax.ShapeDtypeStruct((num_steps, plan.rows, width), jnp.float32)]
    if cell.name == "gru":
        shapes.append(seq)
    flag = plan.exchange == "flag"
    aliases = {}
    if flag:  # dA (and dA_n * R) start as sentinels: they are the exchange buffers
        aliases = {len(args) + i: i for i in range(len(shapes))}
        args += [_sentinel_filled(s.shape) for s in shapes]
    elif plan.split:
        args.append(jnp.zeros((plan.grid[0],), jnp.int32))
    shapes += [jax.ShapeDtypeStruct((plan.rows, hidden), jnp.float32)] * nc
    if plan.split and not flag:
        shapes.append(jax.ShapeDtypeStruct((plan.grid[0],), jnp.int32))
        aliases = {len(args) - 1: len(shapes) - 1}
    kernel = functools.partial(
        _backward_kernel, cell, num_steps, plan.vmask is not None, plan.block, plan.units, flag
    )
    out = _call(kernel, plan.grid, shapes, args, aliases, plan.programs)
    if plan.split and not flag:
        out = out[:-1]
    dxp = out[0][:, :batch]
    extras = (out[1][:, :batch],) if cell.name == "gru" else ()
    dcarry0 = _carry_tree(cell, [d[:batch] for d in out[-nc:]])
    return dxp, dcarry0, extras
