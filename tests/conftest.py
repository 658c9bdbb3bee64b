"""Session setup: a JAX compilation cache for each test process.

Many tests compile the same small programs (the reference networks at the same
shapes, the same kernels under several tests). A persistent compilation cache in a
temporary directory made for the session lets a later compile of an identical
program load the executable instead; a cache hit is the same compiled program, so
no result changes. Each pytest-xdist worker gets its own subdirectory (no two
processes write one file); only compiles of at least 0.2 s are stored. Measured on
the 2-core CPU, whole suite with two workers: a shared directory under JAX's file
lock and every compile stored was slower (610 vs 564 s: the lock's eviction scan
reads the whole directory on every store). Subprocesses that tests start do not
use it.
"""

import os
import shutil
import tempfile

import jax

_ENV = "RNN_JAX_TEST_COMPILATION_CACHE"


def pytest_configure(config):
    if not os.environ.get(_ENV):  # the controller, or a run without workers
        os.environ[_ENV] = tempfile.mkdtemp(prefix="rnn_jax_test_jit_")
        config._rnn_jax_cache_owner = True
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.environ[_ENV], worker))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    if getattr(config, "_rnn_jax_cache_owner", False):
        shutil.rmtree(os.environ.pop(_ENV), ignore_errors=True)
