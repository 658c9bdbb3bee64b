"""The package's public surface: what ``import rnn_jax`` loads, and what waits."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
import rnn_jax
heavy = ("optax", "orbax", "flax", "matplotlib", "torch")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
assert not loaded, loaded  # the library alone imports none of them
for name in rnn_jax.__all__:
    getattr(rnn_jax, name)
for name in ("sweeps", "tasks"):  # (an AttributeError until imported, once)
    assert name in rnn_jax._LAZY, name
for name in rnn_jax._LAZY:  # each documented lazy module loads on first use
    assert getattr(rnn_jax, name).__name__ == f"rnn_jax.{name}", name
    assert name in rnn_jax.__doc__, name
try:
    rnn_jax.no_such_module
except AttributeError as e:
    assert "no attribute 'no_such_module'" in str(e)
else:
    raise AssertionError
print("ok")
"""


def test_import_is_light_and_lazy_modules_load_on_first_use():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
