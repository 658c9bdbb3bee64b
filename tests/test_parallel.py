"""Data-parallel training on 4 (forced host) CPU devices against one device."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from test_train import corrupt_step  # flips a byte of a saved step

from rnn_jax import parallel, runs, train
from rnn_jax.checkpoint import MANIFEST_SUFFIX, Checkpointer
from rnn_jax.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
BASE = TrainConfig(
    cell="gru",
    num_layers=2,
    optimizer="sgd",  # Adam divides by sqrt(v): it magnifies float reordering of tiny grads
    lr=1.0,
    schedule="constant",  # the second part extends the run: a cosine would change shape
    hidden_size=16,
    batch_size=16,
    num_steps=8,
    num_train=160,  # 10 steps per epoch
    num_val=32,
    epochs=1,
    eval_every=1,
    checkpoint_every=5,
    sample_chars=5,
    log_every_s=1e9,
)


def run_on_4_devices(config: TrainConfig) -> None:
    code = (
        "import json, sys, jax\n"
        "from rnn_jax import train\n"
        "from rnn_jax.config import TrainConfig\n"
        "assert jax.device_count() == 4, jax.devices()\n"
        "train.run(TrainConfig(**json.loads(sys.argv[1])), echo=lambda s: None)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    subprocess.run(
        [sys.executable, "-c", code, json.dumps(dataclasses.asdict(config))],
        check=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def step_losses(workdir: str) -> list[float]:
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [math.log(json.loads(line)["train_ppl"]) for line in lines]


def assert_params_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)


def test_four_devices_equal_one_and_checkpoints_move_between_them(tmp_path):
    assert jax.device_count() == 1
    one = dataclasses.replace(BASE, workdir=str(tmp_path / "one"))
    four = dataclasses.replace(BASE, workdir=str(tmp_path / "four"))
    train.run(one, echo=lambda s: None)
    run_on_4_devices(four)
    # losses of all 10 steps and the parameters after them
    np.testing.assert_allclose(step_losses(four.workdir), step_losses(one.workdir), rtol=1e-6)
    assert len(step_losses(one.workdir)) == 10
    a, b = runs.load(Path(one.workdir)), runs.load(Path(four.workdir))  # 4 -> 1 device restore
    assert a.step == b.step == 10
    assert_params_close(a.params, b.params)

    # 1 -> 4: the 4-device run continues the 1-device run's checkpoint for a second epoch
    train.run(
        dataclasses.replace(one, epochs=2, workdir=str(tmp_path / "ref")), echo=lambda s: None
    )
    run_on_4_devices(dataclasses.replace(one, epochs=2))
    ref, moved = runs.load(tmp_path / "ref"), runs.load(Path(one.workdir))
    assert ref.step == moved.step == 20
    assert_params_close(ref.params, moved.params)
    np.testing.assert_allclose(step_losses(one.workdir), step_losses(tmp_path / "ref"), rtol=1e-6)


def run_two_processes(config: TrainConfig) -> list[str]:
    """``config`` trained by ``experiments.train`` as two processes of one run
    (``jax.distributed`` on this host, a CPU device each), as BUILD.md's multi-host
    commands; their outputs."""
    outs = []
    for proc in start_two_processes(config):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def start_two_processes(config: TrainConfig) -> list[subprocess.Popen]:
    """The two processes of :func:`run_two_processes`, started."""
    import socket

    with socket.socket() as probe:  # a free port for the coordinator
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    default = dataclasses.asdict(TrainConfig())
    flags = [
        f"--{k}={v}"
        for k, v in dataclasses.asdict(config).items()
        if v != default[k] and k not in ("log_every_s", "workdir")
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.train",
                *flags,
                f"--workdir={config.workdir}",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                "--cpu_devices=1",
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    return procs


def test_two_processes_train_one_run_as_one_device_does(tmp_path):
    """The multi-host path on one host: two processes share the run directory (only
    process 0 takes its lock and writes its files: a second lock refused the run, and
    each process logged every evaluation), train what one device trains, and resume
    past a corrupt newest checkpoint."""
    one = dataclasses.replace(BASE, workdir=str(tmp_path / "one"))
    two = dataclasses.replace(BASE, workdir=str(tmp_path / "two"))
    train.run(one, echo=lambda s: None)
    outs = run_two_processes(two)
    assert all("data parallel: 16 rows per batch over 2 CPU devices" in o for o in outs)
    np.testing.assert_allclose(step_losses(two.workdir), step_losses(one.workdir), rtol=1e-6)
    assert len(step_losses(two.workdir)) == 10  # one line per evaluation, not per process
    assert_params_close(runs.load(Path(one.workdir)).params, runs.load(Path(two.workdir)).params)

    # the resume finds step 10 corrupt: both processes fall back to step 5, and
    # process 0 alone sets step 10 aside (it stayed, and orbax's max_to_keep then
    # deleted the good step 5 before it); the run trains what one device trains
    train.run(dataclasses.replace(one, epochs=2), echo=lambda s: None)
    corrupt_step(two.workdir, 10)
    outs = run_two_processes(dataclasses.replace(two, epochs=2))
    assert all("resumed from step 5" in o for o in outs)
    assert all("moved unusable step(s) 10 to" in o for o in outs)
    aside = Path(two.workdir) / "checkpoints.unusable"
    assert sorted(p.name for p in aside.iterdir()) == ["10", f"10{MANIFEST_SUFFIX}"]
    with Checkpointer(Path(two.workdir) / "checkpoints", read_only=True) as ckpt:
        assert ckpt.all_steps() == [10, 15, 20]  # 10 saved again, and intact
        assert all(ckpt.verify(step) for step in (10, 15, 20))
    np.testing.assert_allclose(step_losses(two.workdir), step_losses(one.workdir), rtol=1e-6)
    assert len(step_losses(two.workdir)) == 20
    a, b = runs.load(Path(one.workdir)), runs.load(Path(two.workdir))
    assert a.step == b.step == 20
    assert_params_close(a.params, b.params)
    assert json.loads((Path(two.workdir) / "result.json").read_text())["status"] == "completed"

    # SIGTERM to one process: both stop at the same step, saved (the process that got
    # it stopped alone, and the other waited at its next collective)
    procs = start_two_processes(dataclasses.replace(two, epochs=1000))
    for line in procs[0].stdout:
        if line.startswith("step 21/"):
            break
    procs[1].send_signal(signal.SIGTERM)
    try:
        outs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:  # (a hang: the old code's)
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [143, 143], outs
    saved = [out.split("SIGTERM received: saved step ")[1].split(";")[0] for out in outs]
    assert saved[0] == saved[1] and int(saved[0]) % train.SIGNAL_AGREEMENT_EVERY == 0


SHARDED_GRADIENTS = r"""
import contextlib
import re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from rnn_jax import cells, fused, parallel
assert parallel.split_cpu(2) == 2
mesh = Mesh(np.asarray(jax.devices()), ("data",))
T, B, H, V = 6, 4, 8, 5


def loop_all_reduces(hlo):
    # all-reduces inside a while loop's body: one per iteration when it runs
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    found = 0
    for block in hlo.split("\n\n"):
        name = block.lstrip().split(" ", 1)[0].lstrip("%")
        if name in bodies:
            found += block.count(" all-reduce(")
    return found


for name, opts in [("lstm", {}), ("gru", {"reset_after": True}), ("gru", {}), ("rnn", {})]:
    cell = cells.make(name, H, **opts)
    # (token ids?, layer options, set the mesh?): the partitioner's split of one
    # loop, then the per-device chunked layers (shard_map) under jax.set_mesh. The
    # chunk loops are the same code for every cell: all cases for the LSTM's pair
    # carry, the loop and one chunked case for the GRU (reset after), one loop for
    # the array carries of the other cells (CI time)
    cases = [(False, {}, False)]
    if name == "lstm" or opts:
        cases += [(True, {}, False), (True, {"chunk": 2}, True)]
    if name == "lstm":
        cases += [(False, {"remat": True}, True), (True, {"chunk": 2}, False)]
    for tokens, kw, set_mesh in cases:
        key = jax.random.PRNGKey(0)
        params = cell.init(key, V)
        if tokens:
            xs = jax.random.randint(key, (T, B), 0, V)
        else:
            xs = jax.random.normal(key, (T, B, V))
        lengths = jnp.array([T, 2, 0, 5])
        r = jax.random.normal(jax.random.PRNGKey(1), (T, B, H))

        def loss(params, xs, lengths, r):
            carry = jax.tree.map(lambda z: jnp.zeros((B, H)), cell.initial_carry())
            ys, final = fused.layer(cell, params, carry, xs, lengths, **kw)
            return jnp.sum(ys * r) + sum(jnp.sum(f**2) for f in jax.tree.leaves(final))

        grad = jax.jit(jax.grad(loss, argnums=(0, 1) if not tokens else 0))
        expected = grad(params, xs, lengths, r)
        batch = lambda a, axis: jax.device_put(
            a, NamedSharding(mesh, P(*([None] * axis), "data"))
        )
        args = (
            jax.device_put(params, NamedSharding(mesh, P())),
            batch(xs, 1),
            batch(lengths, 0),
            batch(r, 1),
        )
        with jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext():
            lowered = grad.lower(*args)
        compiled = lowered.compile()
        hlo = compiled.as_text()
        case = (name, opts, tokens, kw, set_mesh)
        assert "all-gather" not in hlo, case
        per_chunk = loop_all_reduces(hlo)
        if kw and not set_mesh:  # the partitioner alone reduces in every chunk
            assert per_chunk > 0, case
        else:
            assert per_chunk == 0, case
        got = compiled(*args)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
        if set_mesh and name == "lstm" and "chunk" in kw:
            # parallel.in_mesh inside jit (the README's order) and around it: the same
            # per-device program as jax.set_mesh above
            raw = jax.grad(loss, argnums=0 if tokens else (0, 1))
            inside = jax.jit(parallel.in_mesh(mesh, raw))
            around = parallel.in_mesh(mesh, jax.jit(raw))
            lower_around = parallel.in_mesh(mesh, jax.jit(raw).lower)
            for lower, step in ((inside.lower, inside), (lower_around, around)):
                assert loop_all_reduces(lower(*args).compile().as_text()) == 0, case
                for a, b in zip(
                    jax.tree.leaves(step(*args)), jax.tree.leaves(expected), strict=True
                ):
                    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)

# the training state: replicated, but the carried state (sequential partition) follows
# the batch, placed and restored alike
state = {"params": {"w": np.zeros(3)}, "carry": np.zeros((B, H)), "step": np.int32(0)}
placed = parallel.place_state(state, mesh)
assert placed["carry"].sharding.spec == P("data"), placed["carry"].sharding
assert placed["params"]["w"].sharding.spec == P() and placed["step"].sharding.spec == P()
abstract = parallel.abstract_state(jax.eval_shape(lambda: state), mesh)
assert abstract["carry"].sharding.spec == P("data") and abstract["params"]["w"].sharding.spec == P()
# a mesh that is not one is refused when wrapping, not when called
try:
    parallel.in_mesh(mesh.abstract_mesh, lambda: None)
except ValueError as e:
    assert str(e).startswith("mesh: expected a jax.sharding.Mesh or None, got AbstractMesh"), e
else:
    raise AssertionError("an AbstractMesh was taken")
# a batch that does not split over the devices is refused by name
assert parallel.shard_batch({"x": np.ones((4, 3))}, mesh)["x"].sharding.spec == P("data")
for bad in ({"x": np.ones((4, 3)), "y": np.ones((7, 3))}, np.float32(1)):
    try:
        parallel.shard_batch(bad, mesh)
    except ValueError as e:
        assert str(e).startswith("batch: ") and "split evenly over the 2 devices" in str(e), e
    else:
        raise AssertionError(bad)
print("ok")
"""


def test_fused_gradients_of_a_sharded_batch_gather_nothing():
    """With the batch split over 2 CPU devices (`parallel.split_cpu`), the fused layers'
    gradients (recurrent and input weights, inputs, final carries; token ids and float
    inputs, with lengths) equal the one-device gradients, and
    - lower to partial sums and one all-reduce: no all-gather of the [T, B, ...]
      arrays (a [T*B, K] reshape used to force one);
    - chunked (chunk=2, remat) under `jax.set_mesh`, each device runs its rows
      (shard_map) with no all-reduce inside a loop; without the mesh set, the
      partitioner alone puts one in the chunk loop (what the per-device path avoids).
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    # no forced device count: the script splits the CPU itself
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(parallel.FORCE_DEVICES_FLAG)
    )
    out = subprocess.run(
        [sys.executable, "-c", SHARDED_GRADIENTS],
        env=env,
        cwd=ROOT,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_cpu_device_count_divides_the_batch_and_skips_small_steps(monkeypatch):
    from rnn_jax import parallel

    big = parallel.CPU_SPLIT_MIN_MACS
    assert parallel.cpu_device_count(32, big, cores=2) == 2
    assert parallel.cpu_device_count(33, big, cores=2) == 1  # odd batch: no even split
    assert parallel.cpu_device_count(9, big, cores=4) == 3  # the largest divisor <= cores
    assert parallel.cpu_device_count(1024, big - 1, cores=2) == 1  # too little work
    assert parallel.cpu_device_count(1024, cores=8) == 8
    # the book's model (H=32 B=1024 T=32 LSTM) splits; a toy one does not
    assert parallel.recurrent_macs("lstm", 32, 1024, 32) == 32 * 1024 * 4 * 32 * 32
    assert parallel.recurrent_macs("gru", 8, 4, 8, num_layers=2, bidirectional=True) == (
        8 * 4 * 3 * 8 * 8 * 4
    )
    monkeypatch.setenv(parallel.CORES_ENV, "3")
    assert parallel.cpu_cores() == 3
    assert parallel.cpu_device_count(12, big) == 3
    with pytest.raises(ValueError, match="batch_size"):
        parallel.cpu_device_count(0)


def test_split_cpu_checks_its_argument_and_leaves_a_forced_count(monkeypatch):
    from rnn_jax import parallel

    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="num_devices"):
            parallel.split_cpu(bad)
    monkeypatch.setenv("XLA_FLAGS", "--foo=1 --xla_force_host_platform_device_count=4")
    assert parallel.forced_cpu_devices() == 4
    assert parallel.split_cpu(2) == 4  # XLA_FLAGS wins; the config is not touched
    monkeypatch.delenv("XLA_FLAGS")
    assert parallel.forced_cpu_devices() is None
    jax.devices()  # the backends are up in this process: too late to change them
    with pytest.raises(RuntimeError, match="jax_num_cpu_devices"):
        parallel.split_cpu(2)
    assert parallel.split_cpu(1) == 1  # ... but asking for what there is is fine


def test_distributed_flags_are_checked():
    """experiments.train's multi-host flags, before jax.distributed.initialize."""
    assert parallel.distributed_problem(None, None, None) is None
    assert parallel.distributed_problem("host:1234", None, None) is None  # cluster detection
    assert parallel.distributed_problem("host:1234", 2, 1) is None
    assert "needs --coordinator_address" in parallel.distributed_problem(None, 4, 9)
    assert "--process_id: expected 0 <= process_id < num_processes (2), got 7" in (
        parallel.distributed_problem("host:1", 2, 7)
    )
    assert "--num_processes: expected >= 1, got 0" in parallel.distributed_problem("h:1", 0, 0)
