"""Tests for rnn_jax.checkpoint: round trips, retention, integrity fallbacks."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rnn_jax import checkpoint
from rnn_jax.checkpoint import MANIFEST_SUFFIX, Checkpointer, CorruptCheckpointError

LOGGER = "rnn_jax.checkpoint"


def make_state(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = {
        "w_x": jax.random.normal(k1, (5, 12), jnp.float32),
        "w_h": jax.random.normal(k2, (4, 12), jnp.float32),
        "b": jax.random.normal(k3, (12,), jnp.float32),
    }
    opt_state = optax.adam(1e-3).init(params)
    # Make the moments non-trivial so the round trip compares real data.
    opt_state = jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x + 3, opt_state)
    return {"params": params, "opt_state": opt_state, "step": jnp.asarray(seed + 7, jnp.int32)}


def abstract(state):
    return jax.eval_shape(lambda: state)


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def save_steps(ckpt, steps):
    states = {}
    for s in steps:
        states[s] = make_state(s)
        assert ckpt.save(s, states[s], {"epoch": s, "step_in_epoch": 2 * s, "seed": 42})
    return states


def data_files(step_dir):
    out = []
    for dirpath, _, names in os.walk(step_dir):
        for n in names:
            p = os.path.join(dirpath, n)
            if os.path.getsize(p) > 0:
                out.append(p)
    return sorted(out)


def flip_byte(path, offset=None):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        i = len(data) // 2 if offset is None else offset
        data[i] ^= 0xFF
        f.seek(0)
        f.write(data)


def test_round_trip_and_meta(tmp_path):
    state = make_state(3)
    meta = {"epoch": 4, "step_in_epoch": 17, "data_seed": 1234, "note": "x"}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.save(100, state, meta)
        assert ckpt.all_steps() == [100]
        assert ckpt.latest_step() == 100
        assert ckpt.verify(100)
    # A fresh manager (as after a restart) restores onto an abstract target.
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        step, restored, rmeta = ckpt.restore_latest(abstract(state))
    assert step == 100
    assert rmeta == meta
    assert_bitwise_equal(restored, state)
    # The optax NamedTuples survive with their types.
    assert type(restored["opt_state"][0]) is type(state["opt_state"][0])
    assert isinstance(restored["params"]["w_x"], jax.Array)
    # Restoring does not touch the files the manifest describes.
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.verify(100)


def test_restore_with_explicit_sharding(tmp_path):
    state = make_state(1)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract(state)
    )
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {})
        step, restored, meta = ckpt.restore_latest(target)
    assert step == 1 and meta == {}
    assert_bitwise_equal(restored, state)
    assert all(x.sharding == sharding for x in jax.tree.leaves(restored))


def test_save_refuses_bad_steps_and_meta_before_writing(tmp_path):
    """A float or bool step, meta that JSON cannot hold, a zero-size array: a named
    ValueError and nothing on disk (orbax failed in its thread, files half written)."""
    state = make_state()
    with Checkpointer(tmp_path / "ck") as ckpt:
        for step, meta, match in [
            (2.7, None, r"step: expected a non-negative int, got 2.7"),
            (True, None, r"step: expected a non-negative int, got True"),
            (1, {"epoch": np.int64(1)}, r"meta: expected a JSON-serializable dict"),
        ]:
            with pytest.raises(ValueError, match=match):
                ckpt.save(step, state, meta)
        with pytest.raises(ValueError, match=r"state: orbax cannot save arrays of size 0"):
            ckpt.save(1, {**state, "empty": np.zeros((0, 3))})
        assert ckpt.save(jnp.int32(1), state, {"epoch": 1})  # e.g. state["step"]
    assert sorted(os.listdir(tmp_path / "ck")) == ["1", "1" + MANIFEST_SUFFIX]


def test_empty_directory_returns_none(tmp_path):
    with Checkpointer(tmp_path / "none") as ckpt:
        assert ckpt.all_steps() == []
        assert ckpt.latest_step() is None
        assert ckpt.restore_latest(abstract(make_state())) is None
    assert os.path.isdir(tmp_path / "none")


def test_a_read_only_reader_changes_nothing(tmp_path, caplog):
    """A reader (runs.load, a generate) opened the directory as a writer: it removed
    orphan manifests, and made the folder when it was missing. Read-only, it restores
    and leaves every file as it was (without orbax's three warnings that it is
    read-only); it refuses to save."""
    state = make_state(2)
    with Checkpointer(tmp_path / "ck") as ckpt:
        save_steps(ckpt, [1, 2])
    orphan = tmp_path / "ck" / f"7{MANIFEST_SUFFIX}"  # its step gone (orbax's max_to_keep)
    orphan.write_text("{}")
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()}
    folders = {p for p in tmp_path.rglob("*") if p.is_dir()}
    with caplog.at_level(logging.WARNING), Checkpointer(tmp_path / "ck", read_only=True) as ckpt:
        step, restored, meta = ckpt.restore_latest(abstract(state))
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    with Checkpointer(tmp_path / "ck", read_only=True) as ckpt:
        with pytest.raises(ValueError, match=r"save: .* was opened read_only"):
            ckpt.save(3, state, {})
    assert step == 2
    assert_bitwise_equal(restored, make_state(2))
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before
    assert {p for p in tmp_path.rglob("*") if p.is_dir()} == folders
    with pytest.raises(FileNotFoundError, match="directory: .* is not a folder"):
        Checkpointer(tmp_path / "missing", read_only=True)
    assert not (tmp_path / "missing").exists()


def test_max_to_keep_must_keep_a_step(tmp_path):
    """orbax took max_to_keep=0, reported each save as written and kept none."""
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_to_keep: expected an int >= 1 or None"):
            Checkpointer(tmp_path / "c", max_to_keep=bad)
    assert not (tmp_path / "c").exists()


def test_max_to_keep_removes_old_steps_and_manifests(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        save_steps(ckpt, [1, 2, 3, 4])
        assert ckpt.all_steps() == [3, 4]
    names = sorted(os.listdir(tmp_path))
    assert sorted(n for n in names if n.endswith(MANIFEST_SUFFIX)) == [
        "3" + MANIFEST_SUFFIX,
        "4" + MANIFEST_SUFFIX,
    ]
    assert not any(n in ("1", "2") for n in names)


def test_a_save_stopped_before_its_manifest_leaves_the_older_steps(tmp_path, monkeypatch):
    """orbax's max_to_keep deleted the old steps when it committed the new one, before
    its manifest: a kill in between (a fuzzer found it with max_to_keep=1) left no
    usable step. The old ones now go once the new one is sealed."""
    with Checkpointer(tmp_path, max_to_keep=1) as ckpt:
        states = save_steps(ckpt, [1])

        def killed(step):
            raise KeyboardInterrupt  # (the process ends here)

        monkeypatch.setattr(ckpt, "_write_manifest", killed)
        with pytest.raises(KeyboardInterrupt):
            ckpt.save(2, make_state(2), {})
    monkeypatch.undo()
    with Checkpointer(tmp_path, max_to_keep=1) as ckpt:
        assert ckpt.all_steps() == [1, 2] and ckpt.verify(1)
        step, restored, _ = ckpt.restore_latest(abstract(states[1]))  # 2: no manifest
        assert step == 1
        ckpt.save(3, make_state(3), {})
        assert ckpt.all_steps() == [3]
    assert sorted(os.listdir(tmp_path)) == ["3", f"3{MANIFEST_SUFFIX}"]


def test_flipped_byte_falls_back_to_previous_step(tmp_path, caplog):
    with Checkpointer(tmp_path) as ckpt:
        states = save_steps(ckpt, [10, 20])
        # Flip one byte in the largest array-data chunk of the newest step.
        files = [f for f in data_files(os.path.join(tmp_path, "20")) if "/d/" in f]
        flip_byte(max(files, key=os.path.getsize))
        assert not ckpt.verify(20)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            step, restored, meta = ckpt.restore_latest(abstract(states[10]))
    assert step == 10 and meta["epoch"] == 10
    assert_bitwise_equal(restored, states[10])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("20" in r.getMessage() and "SHA-256 mismatch" in r.getMessage() for r in warnings)


def test_a_deleted_file_falls_back_to_previous_step(tmp_path, caplog):
    """A file of the newest step gone (the manifest untouched): the step fails its
    check by name, even when orbax alone could still restore it, and the previous
    step is restored."""
    with Checkpointer(tmp_path) as ckpt:
        states = save_steps(ckpt, [10, 20])
        root = os.path.join(tmp_path, "20")
        gone = min(data_files(root), key=os.path.getsize)
        os.remove(gone)
        assert ckpt.check(20).startswith("files missing from the checkpoint")
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            step, restored, _ = ckpt.restore_latest(abstract(states[10]))
    assert step == 10
    assert_bitwise_equal(restored, states[10])
    assert any("20" in r.getMessage() and "missing" in r.getMessage() for r in caplog.records)


def test_missing_manifest_falls_back(tmp_path, caplog):
    with Checkpointer(tmp_path) as ckpt:
        states = save_steps(ckpt, [1, 2])
    os.remove(os.path.join(tmp_path, "2" + MANIFEST_SUFFIX))
    with Checkpointer(tmp_path) as ckpt, caplog.at_level(logging.WARNING, logger=LOGGER):
        step, restored, _ = ckpt.restore_latest(abstract(states[1]))
        with pytest.raises(CorruptCheckpointError, match="no integrity manifest"):
            ckpt.restore(2, abstract(states[2]))
    assert step == 1
    assert_bitwise_equal(restored, states[1])
    assert any("step 2" in r.getMessage() and "manifest" in r.getMessage() for r in caplog.records)


def test_the_writer_seals_a_newest_step_whose_manifest_was_never_written(tmp_path, caplog):
    """Only the newest step, only when every older one has its manifest (else they
    were lost some other way), only where orbax finished it and it restores with
    finite values (a power loss can leave unwritten data), and only by a writer."""
    with Checkpointer(tmp_path) as ckpt:
        states = save_steps(ckpt, [1, 2])
        target = abstract(states[2])
        assert ckpt.seal_newest(target) is None  # nothing to do
    manifest = Path(tmp_path) / f"2{MANIFEST_SUFFIX}"
    expected = manifest.read_bytes()
    manifest.unlink()
    with Checkpointer(tmp_path, read_only=True) as reader:
        assert reader.seal_newest(target) is None and not manifest.exists()
    with Checkpointer(tmp_path) as ckpt, caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ckpt.seal_newest(target) == 2
        step, restored, _ = ckpt.restore_latest(target)
    assert manifest.read_bytes() == expected and step == 2
    assert_bitwise_equal(restored, states[2])
    assert "step 2 had no integrity manifest" in caplog.text

    def nan(x):
        return x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x

    with Checkpointer(tmp_path) as ckpt:  # a step that restores to NaN: damaged
        ckpt.save(3, jax.tree.map(nan, states[2]), {})
    (Path(tmp_path) / f"3{MANIFEST_SUFFIX}").unlink()
    with Checkpointer(tmp_path) as ckpt, caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ckpt.seal_newest(target) is None
    assert "step 3 has no manifest and holds non-finite values" in caplog.text
    shutil.rmtree(Path(tmp_path) / "3")
    for name in ("1", "2"):  # both lost: left unusable
        (Path(tmp_path) / f"{name}{MANIFEST_SUFFIX}").unlink()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.seal_newest(target) is None
    (Path(tmp_path) / f"1{MANIFEST_SUFFIX}").write_bytes(b"{}")  # (older ones: present)
    (Path(tmp_path) / "2" / "commit_success.txt").unlink()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.seal_newest(target) is None  # not orbax's finished layout


def test_tampered_manifest_and_extra_file_fall_back(tmp_path, caplog):
    with Checkpointer(tmp_path) as ckpt:
        states = save_steps(ckpt, [1, 2, 3])
        # Step 3: a file added after the manifest was written.
        with open(os.path.join(tmp_path, "3", "state", "stray"), "w") as f:
            f.write("x")
        # Step 2: manifest garbage.
        with open(os.path.join(tmp_path, "2" + MANIFEST_SUFFIX), "w") as f:
            f.write("{not json")
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            step, restored, _ = ckpt.restore_latest(abstract(states[1]))
    assert step == 1
    assert_bitwise_equal(restored, states[1])
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 3" in m and "not in the manifest" in m for m in msgs)
    assert any("step 2" in m and "unreadable" in m for m in msgs)


def test_a_manifest_with_a_malformed_file_entry_falls_back(tmp_path, caplog):
    with Checkpointer(tmp_path) as ckpt:
        states = save_steps(ckpt, [1, 2])
        path = os.path.join(tmp_path, "2" + MANIFEST_SUFFIX)
        manifest = json.loads(Path(path).read_text())
        first = sorted(manifest["files"])[0]
        manifest["files"][first] = "not a dict"  # valid JSON: it raised AttributeError
        with open(path, "w") as f:
            json.dump(manifest, f)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            step, restored, _ = ckpt.restore_latest(abstract(states[1]))
    assert step == 1
    assert_bitwise_equal(restored, states[1])
    assert any("malformed integrity manifest" in r.getMessage() for r in caplog.records)


def test_all_corrupt_returns_none(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        states = save_steps(ckpt, [1])
        os.remove(ckpt.manifest_path(1))
        assert ckpt.restore_latest(abstract(states[1])) is None


def test_orbax_restore_error_falls_back(tmp_path, caplog):
    with Checkpointer(tmp_path) as ckpt:
        states = save_steps(ckpt, [1, 2])
        # Damage step 2 consistently with its manifest (as if it had been written
        # broken): integrity passes, orbax's restore raises.
        os.remove(os.path.join(tmp_path, "2", "state", "_METADATA"))
        checkpoint._atomic_write_json(
            ckpt.manifest_path(2),
            {
                "version": 1,
                "step": 2,
                "algorithm": "sha256",
                "files": checkpoint._digest_tree(ckpt.step_dir(2)),
            },
        )
        assert ckpt.verify(2)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            step, restored, _ = ckpt.restore_latest(abstract(states[1]))
    assert step == 1
    assert_bitwise_equal(restored, states[1])
    assert any(
        "step 2" in r.getMessage() and "restore failed" in r.getMessage() for r in caplog.records
    )


def test_wrong_target_structure_raises_instead_of_none(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        save_steps(ckpt, [1])
        wrong = {"something": jax.ShapeDtypeStruct((3,), jnp.float32)}
        with pytest.raises(RuntimeError, match="could be restored"):
            ckpt.restore_latest(wrong)


@pytest.mark.parametrize("suffix", [".orbax-checkpoint-tmp", ".orbax-checkpoint-tmp-1712345678"])
def test_half_written_temp_dir_is_ignored(tmp_path, suffix):
    with Checkpointer(tmp_path) as ckpt:
        states = save_steps(ckpt, [5])
    # What a process killed mid-save leaves: an unfinalized, partial step directory.
    tmp = tmp_path / ("9" + suffix)
    (tmp / "state.orbax-checkpoint-tmp").mkdir(parents=True)
    (tmp / "state.orbax-checkpoint-tmp" / "_METADATA").write_text("{trunc")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [5]
        assert ckpt.latest_step() == 5
        step, restored, _ = ckpt.restore_latest(abstract(states[5]))
        assert step == 5
        assert_bitwise_equal(restored, states[5])
        # Saving the step whose temp dir was left behind works too.
        state9 = make_state(9)
        assert ckpt.save(9, state9, {"epoch": 9})
        assert ckpt.all_steps() == [5, 9]
        step, restored, meta = ckpt.restore_latest(abstract(state9))
    assert step == 9 and meta == {"epoch": 9}
    assert_bitwise_equal(restored, state9)


def test_save_same_step_twice(tmp_path):
    s1, s2 = make_state(1), make_state(2)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(3, s1, {"v": 1})
        # e.g. the final save right after a periodic save of the same step
        assert ckpt.save(3, s2, {"v": 2}) is False
        assert ckpt.all_steps() == [3]
        step, restored, meta = ckpt.restore_latest(abstract(s1))
        assert step == 3 and meta == {"v": 1}
        assert_bitwise_equal(restored, s1)
        # force overwrites
        assert ckpt.save(3, s2, {"v": 2}, force=True)
        step, restored, meta = ckpt.restore_latest(abstract(s2))
        assert step == 3 and meta == {"v": 2}
        assert_bitwise_equal(restored, s2)
        assert ckpt.verify(3)


def test_a_step_another_checkpointer_saved_is_not_overwritten(tmp_path):
    """Two Checkpointers on one directory: the second sees the step the first saved
    after it listed the steps (it wrote over it)."""
    s1, s2 = make_state(1), make_state(2)
    with Checkpointer(tmp_path) as a, Checkpointer(tmp_path) as b:
        assert a.save(5, s1, {"v": 1})
        assert b.save(5, s2, {"v": 2}) is False
        step, restored, meta = b.restore_latest(abstract(s1))
    assert step == 5 and meta == {"v": 1}
    assert_bitwise_equal(restored, s1)


def test_unusable_existing_step_is_rewritten(tmp_path):
    s1, s2 = make_state(1), make_state(2)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, s1, {"v": 1})
        os.remove(ckpt.manifest_path(3))  # killed before the manifest was written
        assert ckpt.save(3, s2, {"v": 2})
        step, restored, meta = ckpt.restore_latest(abstract(s2))
    assert step == 3 and meta == {"v": 2}
    assert_bitwise_equal(restored, s2)


def test_save_older_step_after_fallback(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=5) as ckpt:
        states = save_steps(ckpt, [10, 20])
        os.remove(ckpt.manifest_path(20))
        step, _, _ = ckpt.restore_latest(abstract(states[10]))
        assert step == 10
        # Training resumes from 10 and saves 15 although a (broken) 20 exists.
        s15 = make_state(15)
        assert ckpt.save(15, s15, {})
        step, restored, _ = ckpt.restore_latest(abstract(s15))
    assert step == 15
    assert_bitwise_equal(restored, s15)


def test_manifest_layout_and_orphan_cleanup(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        save_steps(ckpt, [7])
        with open(ckpt.manifest_path(7)) as f:
            manifest = json.load(f)
    assert manifest["step"] == 7 and manifest["algorithm"] == "sha256"
    rels = list(manifest["files"])
    assert rels == sorted(rels) and any(r.startswith("state/") for r in rels)
    assert any(r.startswith("meta/") for r in rels)
    # No temp files left next to the manifest.
    assert sorted(os.listdir(tmp_path)) == ["7", "7" + MANIFEST_SUFFIX]
    # An orphaned manifest (step deleted behind our back) is removed on open.
    (tmp_path / ("99" + MANIFEST_SUFFIX)).write_text("{}")
    Checkpointer(tmp_path).close()
    assert not (tmp_path / ("99" + MANIFEST_SUFFIX)).exists()


_RESHARD_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from rnn_jax.checkpoint import Checkpointer

assert jax.device_count() == 2, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("x",))
target = {
    "w": jax.ShapeDtypeStruct((4, 6), jnp.float32, sharding=NamedSharding(mesh, P("x"))),
    "n": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P())),
}
with Checkpointer(sys.argv[1]) as ckpt:
    step, state, meta = ckpt.restore_latest(target)
assert step == 5 and meta == {"epoch": 1}
assert state["w"].sharding == target["w"].sharding
assert len(state["w"].addressable_shards) == 2
np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(24, dtype=np.float32).reshape(4, 6))
assert int(state["n"]) == 11
print("OK")
"""


_SAVE_ON_TWO = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from rnn_jax.checkpoint import Checkpointer

mesh = Mesh(np.array(jax.devices()), ("x",))
w = jax.device_put(jnp.arange(24, dtype=jnp.float32).reshape(4, 6), NamedSharding(mesh, P("x")))
with Checkpointer(sys.argv[1]) as ckpt:
    ckpt.save(5, {"w": w, "n": jnp.asarray(11, jnp.int32)}, {"epoch": 1})
"""


def _on_two_devices(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_restore_onto_fewer_devices_without_shardings(tmp_path):
    """A state saved sharded over 2 devices restores onto this process's one device
    from ``jax.eval_shape`` output or numpy arrays, which carry no sharding (orbax
    refused them: "Topology mismatch")."""
    _on_two_devices(_SAVE_ON_TWO, str(tmp_path))
    want = np.arange(24, dtype=np.float32).reshape(4, 6)
    targets = [
        jax.eval_shape(lambda: {"w": jnp.zeros((4, 6)), "n": jnp.int32(0)}),
        {"w": np.zeros((4, 6), np.float32), "n": np.int32(0)},
    ]
    with Checkpointer(tmp_path) as ckpt:
        for target in targets:
            step, state, meta = ckpt.restore_latest(target)
            assert step == 5 and meta == {"epoch": 1} and int(state["n"]) == 11
            np.testing.assert_array_equal(np.asarray(state["w"]), want)
            assert state["w"].sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])


def test_restore_onto_more_devices(tmp_path):
    state = {"w": jnp.arange(24, dtype=jnp.float32).reshape(4, 6), "n": jnp.asarray(11, jnp.int32)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, state, {"epoch": 1})
    proc = _on_two_devices(_RESHARD_SCRIPT, str(tmp_path))
    assert proc.stdout.strip().endswith("OK")


def test_a_step_deleted_while_restored_is_read_again_from_the_new_listing(tmp_path):
    """A reader of a run still training (generate, runs.load, with --keep_checkpoints=1)
    restored a step that the writer deleted meanwhile: it reported "intact checkpoints
    that do not restore into the model ... were those files changed?" or found no
    usable step. It lists the steps again and restores the new one."""
    with Checkpointer(tmp_path, max_to_keep=1) as writer:
        states = save_steps(writer, [1, 2])
        with Checkpointer(tmp_path, read_only=True) as reader:
            real = reader._restore_verified

            def raced(step, target):
                if step == 2:  # the writer saves 3 (and deletes 2) during this restore
                    writer.save(3, make_state(3), {"epoch": 3})
                    raise FileNotFoundError(2, "No such file or directory", f"{tmp_path}/2")
                return real(step, target)

            reader._restore_verified = raced
            step, restored, meta = reader.restore_latest(abstract(states[2]))
    assert step == 3 and meta == {"epoch": 3}
    assert_bitwise_equal(restored, make_state(3))


def test_a_step_deleted_while_listed_or_checked_is_retried_or_skipped(tmp_path, monkeypatch):
    """A run's max_to_keep deletes steps while a reader (generate, runs.load) lists or
    checks them: orbax's listing is retried (it raised FileNotFoundError, 28 of 702
    reads against a saving loop), and a step gone during its check is unusable."""
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise FileNotFoundError(2, "gone", "/x/7")
        return "listed"

    assert checkpoint._listing(flaky) == "listed" and len(calls) == 3

    def gone():
        raise NotADirectoryError(20, "not a directory", "/x/8")

    with pytest.raises(NotADirectoryError):
        checkpoint._listing(gone, attempts=2)
    with Checkpointer(tmp_path) as ckpt:
        states = save_steps(ckpt, [1, 2])
        real = checkpoint._list_files

        def vanishing(root):
            if root.endswith(os.sep + "2"):
                raise FileNotFoundError(2, "No such file or directory", root)
            return real(root)

        monkeypatch.setattr(checkpoint, "_list_files", vanishing)
        assert "removed while it was checked" in ckpt.check(2)
        step, restored, _ = ckpt.restore_latest(abstract(states[1]))
    assert step == 1
    assert_bitwise_equal(restored, states[1])
