"""Session setup: a JAX compilation cache for each test process.

Many tests compile the same small programs (the reference networks at the same
shapes, the same kernels under several tests). A persistent compilation cache in a
temporary directory made for the session lets a later compile of an identical
program load the executable instead; a cache hit is the same compiled program, so
no result changes. Each pytest-xdist worker gets its own subdirectory (no two
processes write one file); only compiles of at least 0.2 s are stored. Measured on
the 2-core CPU, whole suite with two workers: a shared directory under JAX's file
lock and every compile stored was slower (610 vs 564 s: the lock's eviction scan
reads the whole directory on every store). The subprocesses that tests start
(launchers, sweeps, claims, 4-device runs) share one directory of their own
(``$JAX_COMPILATION_CACHE_DIR``, which they inherit): few of them store, and a rerun
of one configuration loads its programs.

Compiling dominates the suite (its programs are small and run a few times), so
every test process, and the subprocesses tests start (they inherit ``XLA_FLAGS``;
a test that adds a flag for one keeps the rest), compiles with XLA's cheaper backend settings
(``FAST_COMPILE_FLAGS``: LLVM's optimisation level 0 and no expensive LLVM
passes). They change how the CPU code is optimised, not what it computes (XLA:CPU
does not reassociate float arithmetic unless fast math is asked for). Measured on the
2-core Xeon of 2026-11-27 (4 two-layer bidirectional gradients, scan and fused):
compile 7.5 -> 3.8 s; ``tests/test_networks.py`` with two workers 167 -> 123 s.
Timings of the library are never taken from test runs.
"""

import os
import shutil
import tempfile

import jax

_ENV = "RNN_JAX_TEST_COMPILATION_CACHE"
FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)


def pytest_configure(config):
    # before any backend starts: XLA reads its flags once, at the first computation
    flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(flags + [f for f in FAST_COMPILE_FLAGS if f not in flags])
    if not os.environ.get(_ENV):  # the controller, or a run without workers
        os.environ[_ENV] = tempfile.mkdtemp(prefix="rnn_jax_test_jit_")
        config._rnn_jax_cache_owner = True
        os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ[_ENV], "subprocesses")
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.environ[_ENV], worker))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    if getattr(config, "_rnn_jax_cache_owner", False):
        shutil.rmtree(os.environ.pop(_ENV), ignore_errors=True)
