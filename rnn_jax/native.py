r"""The LSTM's loops over time as native CPU kernels (the ``"native"`` implementation).

:mod:`rnn_jax.fused` runs each loop over time as a ``lax.scan``; on a CPU, XLA
executes every step as a few separate operations (the recurrent matmul, a fusion of
the gates, the saves), each a pass over memory with its own dispatch. Here each loop
is one C++ function (``rnn_jax/csrc/lstm_loops.cc``) called through XLA's FFI: the
forward step computes ``H_{t-1} W_h`` in register tiles of whole units (the four
gate columns of 16 units side by side), and applies the nonlinearities and the cell
update to each tile while it is still in registers; the backward step computes
``dA_t`` from the saved gates and ``dA_t W_hᵀ`` in one pass. The input projection
and the weight gradients stay single XLA matmuls (:mod:`rnn_jax.fused`), as do the
other cells.

Shapes (``G = 4H``): forward ``xp <float32>[T, B, G]`` (``X W_x``), ``W_h
<float32>[H, G]``, ``b <float32>[G]``, carry ``<float32>[B, H]`` each, ``valid
<bool>[T, B]`` -> ``ys <float32>[T, B, H]``, the final carry and the saves ``(acts
<[T, B, G]>, c_prev <[T, B, H]>, tanh_c <[T, B, H]>, h_prev_t <[H, T*B]>)``;
backward -> ``dA <float32>[T, B, G]``, the initial carry's gradient and ``db
<float32>[G] = Σ_{t,b} dA[t, b]``. The kernels add the bias and sum its gradient
themselves: as separate XLA operations they were passes over ``<[T, B, G]>``
(BUILD.md, "The bias"). The layer adds ``b`` outside where it runs the XLA loops
after all (float64, bfloat16 params or matmuls, an empty sequence or batch), for a
bias that is not float32, and in its chunked forms, which pass zeros.

``h_prev_t`` is the hidden state before each step, transposed by the forward
kernel (16 x 16 register blocks on AVX-512), so that the recurrent weight gradient
``Σ_t h_{t-1}ᵀ dA_t`` is one plain ``[H, T*B] x [T*B, G]`` matmul: XLA's own
transpose of ``[T*B, H]`` for that matmul took 17 ms per layer and direction per
device at the long shape, on the Intel Xeon (BUILD.md). With ``reverse`` the loops
run from the last step to the first (the backward direction of a bidirectional
layer, every array in time order). The equations are those of the fused LSTM
(:mod:`rnn_jax.fused`, module docstring).

The kernel is compiled on first use by the machine's C++ compiler (``$CXX``, else
``c++``, ``g++`` or ``clang++``) for the machine's own CPU (``-march=native``) and
cached under ``$RNN_JAX_CACHE_DIR`` (default ``~/.cache/rnn_jax``), keyed by the
source, the flags, the jaxlib version and the CPU; about 3 s once. Where it cannot
be built, :func:`unavailable` says why and ``implementation="auto"`` runs the XLA
loops; ``RNN_JAX_NATIVE=0`` turns it off. ``RNN_JAX_NATIVE_ARCH`` replaces
``-march=native`` with other flags: ``-march=x86-64-v3`` builds the AVX2 kernels
on an AVX-512 CPU (:func:`vector_lanes` then says 8). Both are read once, when a
process first uses the kernels; flags for instructions this CPU lacks build code
that dies on its first call (an illegal instruction), not a message.

Derivatives: first derivatives come from the backward kernel; derivatives of the
kernels themselves (grad of grad) are those of the XLA loops they match (a custom
JVP on each kernel call computes its tangents with :mod:`rnn_jax.fused`'s loops).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib

from rnn_jax import cells
from rnn_jax.cells import LSTMCarry

Array = jax.Array

SOURCE = Path(__file__).parent / "csrc" / "lstm_loops.cc"
UNITS = 16  # the kernels' unit groups: H must be a multiple
# The vector widths of the builds implementation="auto" runs: AVX-512's 16 floats and
# AVX2's 8, the builds measured faster than the XLA loops or level with them
# (networks.choose_implementation). NEON and SSE: not measured.
AUTO_LANES = (16, 8)
_TARGETS = {"forward": "rnn_jax_lstm_forward", "backward": "rnn_jax_lstm_backward"}
_SYMBOLS = {"forward": "RnnJaxLstmForward", "backward": "RnnJaxLstmBackward"}


def _compiler() -> str | None:
    return os.environ.get("CXX") or next(
        (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None
    )


def _arch_flags() -> list[str]:
    """``$RNN_JAX_NATIVE_ARCH`` split on spaces (``-march=x86-64-v3``: an AVX2 build
    that any AVX2 CPU runs), else this CPU's own (``-march=native``)."""
    if os.environ.get("RNN_JAX_NATIVE_ARCH", "").strip():
        return os.environ["RNN_JAX_NATIVE_ARCH"].split()
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686"):
        return ["-march=native"]
    if machine in ("aarch64", "arm64"):
        return ["-mcpu=native"]
    return []


def _cpu_signature() -> str:
    """What the compiled code depends on: the CPU's model and instruction sets."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() + platform.machine()
    lines = [
        line
        for line in text.splitlines()
        if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")
    ]
    return "\n".join(sorted(set(lines)))


def cache_dir() -> Path:
    """Where compiled kernels are kept (``$RNN_JAX_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/rnn_jax``, else ``~/.cache/rnn_jax``)."""
    if os.environ.get("RNN_JAX_CACHE_DIR"):
        return Path(os.environ["RNN_JAX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rnn_jax"


def build(arch_flags: list[str] | None = None) -> tuple[Path | None, str | None]:
    """Compiles the kernels for ``arch_flags`` (default: this CPU's, ``-march=native``)
    or finds them in the cache: ``(path of the library, None)`` or ``(None, why
    not)``. Other flags (``["-march=x86-64-v3"]``) build the code another CPU runs,
    as the tests do for the instruction sets below this machine's."""
    compiler = _compiler()
    if compiler is None:
        return None, "no C++ compiler found (set CXX, or install g++ or clang++)"
    arch = _arch_flags() if arch_flags is None else list(arch_flags)
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", *arch]
    include = jax.ffi.include_dir()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                " ".join([compiler, *flags]).encode(),
                jaxlib.__version__.encode(),  # the FFI headers' version
                _cpu_signature().encode(),
            ]
        )
    ).hexdigest()[:20]
    target = cache_dir() / "native" / key / "liblstm_loops.so"
    if target.exists():
        return target, None
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # built beside the target and renamed: concurrent builds never see a partial file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [compiler, *flags, f"-I{include}", str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-3:]
            return None, f"{' '.join(cmd)} failed: {' / '.join(tail)}"
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"could not build {SOURCE.name} in {target.parent}: {e}"
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return target, None


def register(path: Path, suffix: str = "") -> tuple[ctypes.CDLL, dict[str, str]]:
    """Loads the library at ``path`` and registers its two handlers with XLA as
    ``rnn_jax_lstm_{forward,backward}{suffix}``: ``(library, {"forward": name,
    "backward": name})``."""
    lib = ctypes.cdll.LoadLibrary(str(path))
    names = {}
    for name, symbol in _SYMBOLS.items():
        names[name] = _TARGETS[name] + suffix
        jax.ffi.register_ffi_target(
            names[name], jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
        )
    return lib, names


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    """The loaded kernel library, or ``(None, why not)``."""
    if os.environ.get("RNN_JAX_NATIVE", "1") == "0":
        return None, "turned off by RNN_JAX_NATIVE=0"
    path, why = build()
    if path is None:
        return None, why
    try:
        lib, _ = register(path)
    except OSError as e:
        return None, f"could not load {path}: {e}"
    return lib, None


def unavailable() -> str | None:
    """Why the kernels cannot run here (``None`` if they can): not on a CPU backend,
    turned off, or not built. Builds them on the first call."""
    if jax.default_backend() != "cpu":
        return f"the kernels run on CPUs; the default backend is {jax.default_backend()!r}"
    return _library()[1]


def vector_lanes() -> int | None:
    """Floats per vector of the kernels built here: 16 (AVX-512), 8 (AVX, AVX2), 4
    (ARM's NEON, SSE); ``None`` where they cannot run (:func:`unavailable`)."""
    if unavailable() is not None:
        return None
    return int(_library()[0].RnnJaxLstmLanes())


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The instruction-set flags of Linux's ``/proc/cpuinfo`` (x86: ``avx2``,
    ``avx512f``, ...); ``None`` where there is none. Read once per process:
    ``implementation="auto"`` asks on every eager call."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((x for x in text.splitlines() if x.startswith("flags")), None)
    return None if line is None else frozenset(line.split(":", 1)[-1].split())


def _cpu_may_have_avx2() -> bool:
    """False where the CPU cannot run an AVX2 or AVX-512 build: not x86-64, or
    :func:`cpu_flags` lack ``avx2`` and ``fma`` (then :func:`runs_under_auto` need
    not build the kernels to find out). True where it cannot tell (no flags)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = cpu_flags()
    return flags is None or {"avx2", "fma"} <= flags


def runs_under_auto() -> bool:
    """Whether ``implementation="auto"`` runs the kernels on this CPU: where they are
    built for AVX-512 or AVX2 (:func:`vector_lanes` in :data:`AUTO_LANES`), the builds
    measured faster than the XLA loops or level with them. Other CPUs (ARM, x86
    without AVX2) get ``False`` without a build; elsewhere the first call builds the
    kernels (about 3 s, cached)."""
    return _cpu_may_have_avx2() and vector_lanes() in AUTO_LANES


def unsupported(cell: Any) -> str | None:
    """Why the kernels cannot run ``cell`` (``None`` if they can)."""
    if cell.name != "lstm":
        return f"no native kernel for the cell {cell.name!r} (the LSTM only)"
    if not cells.is_builtin(cell):
        return f"the {cell.name!r} cell was {cells.CHANGED_CELL}"
    if cell.hidden_size % UNITS:
        return f"hidden_size must be a multiple of {UNITS}, got {cell.hidden_size}"
    return None


def _valid(valid: Array | None, num_steps: int, batch: int) -> Array:
    return jnp.ones((num_steps, batch), bool) if valid is None else valid


def _forward_call(w, h0, c0, xp, valid, save=True, target=None, reverse=False, b=None):
    """The forward kernel (``target``: another registered build's name; ``reverse``:
    the steps from the last to the first; ``b <[4H]>``: the bias, added to ``xp``,
    None for zeros)."""
    num_steps, batch, gates = xp.shape
    b = jnp.zeros((gates,), jnp.float32) if b is None else b
    hidden = gates // 4
    f32 = jnp.float32
    per_step = jax.ShapeDtypeStruct((num_steps, batch, hidden), f32)
    carry = jax.ShapeDtypeStruct((batch, hidden), f32)
    # without save, the saves are empty arrays (the kernel writes none)
    hidden_by_step = (hidden, num_steps * batch)  # h_prev_t
    saves = (xp.shape, per_step.shape, per_step.shape, hidden_by_step) if save else ((0,),) * 4
    out = (per_step, carry, carry, *(jax.ShapeDtypeStruct(s, f32) for s in saves))
    call = jax.ffi.ffi_call(target or _TARGETS["forward"], out, vmap_method="sequential")
    return call(xp, w, b, h0, c0, valid, save=bool(save), reverse=bool(reverse))


def _backward_call(w, valid, acts, c_prev, tanh_c, dys, dh, dc, target=None, reverse=False):
    """The backward kernel: ``(dA, dh_0, dc_0, db)``, ``db <[4H]>`` the bias gradient
    ``Σ_{t,b} dA[t, b]`` (``target``: another registered build's name; ``reverse``:
    that of a forward loop run with ``reverse``)."""
    f32 = jnp.float32
    carry = jax.ShapeDtypeStruct(dh.shape, f32)
    bias = jax.ShapeDtypeStruct(acts.shape[-1:], f32)
    out = (jax.ShapeDtypeStruct(acts.shape, f32), carry, carry, bias)
    call = jax.ffi.ffi_call(target or _TARGETS["backward"], out, vmap_method="sequential")
    return call(w, acts, c_prev, tanh_c, dys, dh, dc, valid, reverse=bool(reverse))


@functools.partial(jax.custom_jvp, nondiff_argnums=(6, 7))
def _forward_kernel(w, b, h0, c0, xp, valid, save, reverse):
    return _forward_call(w, h0, c0, xp, valid, save, reverse=reverse, b=b)


# The kernels' derivatives are those of the same loops in XLA (rnn_jax.fused, which
# imports this module: hence the imports inside the rules).


@_forward_kernel.defjvp
def _forward_kernel_jvp(save, reverse, primals, tangents):
    from rnn_jax.fused import lstm_forward_reference

    valid = primals[5]  # boolean: no tangent
    _, tangent = jax.jvp(
        lambda w, b, h0, c0, xp: lstm_forward_reference(w, h0, c0, xp + b, valid, reverse),
        primals[:5],
        tangents[:5],
    )
    if not save:  # the saves are empty
        tangent = (*tangent[:3], *(jnp.zeros((0,), jnp.float32),) * 4)
    return _forward_kernel(*primals, save, reverse), tangent


@functools.partial(jax.custom_jvp, nondiff_argnums=(8,))
def _backward_kernel(w, valid, acts, c_prev, tanh_c, dys, dh, dc, reverse):
    return _backward_call(w, valid, acts, c_prev, tanh_c, dys, dh, dc, reverse=reverse)


@_backward_kernel.defjvp
def _backward_kernel_jvp(reverse, primals, tangents):
    from rnn_jax.fused import lstm_backward_reference

    valid = primals[1]  # boolean: no tangent
    rest = (primals[0], *primals[2:])
    drest = (tangents[0], *tangents[2:])

    def reference(w, *a):
        da, dh, dc = lstm_backward_reference(w, valid, *a, reverse=reverse)
        return da, dh, dc, jnp.sum(da, axis=(0, 1))

    _, tangent = jax.jvp(reference, rest, drest)
    return _backward_kernel(*primals, reverse), tangent


def forward(
    w: Array,
    carry0: Any,
    xp: Array,
    valid: Array | None,
    save: bool = True,
    reverse: bool = False,
    b: Array | None = None,
):
    """The forward loop: ``(ys, final carry, saves)``; ``w``: ``W_h <float32>[H, 4H]``;
    ``b``: the bias ``<float32>[4H]`` the kernel adds to ``xp`` (None: none);
    the saves ``(acts <[T, B, 4H]>, c_prev <[T, B, H]>, tanh_c <[T, B, H]>, h_prev_t
    <[H, T*B]>)``, the last the hidden state before each step transposed, for the
    weight gradient (``h_prev_t @ dA.reshape(T*B, 4H)``, no transpose of its own);
    without ``save`` the saves are ``None`` (and not computed). ``reverse``: the steps
    from ``T-1`` down to 0, every array in time order (a row's padding, its last
    steps, comes first and keeps the initial carry)."""
    b = jnp.zeros(xp.shape[-1:], jnp.float32) if b is None else b
    valid = _valid(valid, *xp.shape[:2])
    ys, h, c, *saves = _forward_kernel(
        w, b, carry0.h, carry0.c, xp, valid, bool(save), bool(reverse)
    )
    return ys, LSTMCarry(h, c), (tuple(saves) if save else None)


def backward(
    w: Array, valid: Array | None, saved: tuple, dys: Array, dfinal: Any, reverse: bool = False
):
    """The backward loop: ``(dA <float32>[T, B, 4H], dcarry0, db <float32>[4H])``
    from the forward loop's saves (the first three: ``h_prev_t`` is the weight
    gradient's, outside); ``db = Σ_{t,b} dA[t, b]``, the bias gradient, summed by the
    kernel as it writes ``dA``; ``reverse`` as the forward loop's."""
    acts = saved[0]
    da, dh, dc, db = _backward_kernel(
        w, _valid(valid, *acts.shape[:2]), *saved[:3], dys, dfinal.h, dfinal.c, bool(reverse)
    )
    return da, LSTMCarry(dh, dc), db
