"""rnn_jax.autotune: the candidates per config and backend, the choice of the fastest,
the cache (hits, refresh, keys, broken files) and the --autotune flags of
experiments.train."""

import json
import re
import subprocess
import sys
import time
import types
from dataclasses import replace

import pytest

from rnn_jax import autotune
from rnn_jax.config import TrainConfig

SMALL = TrainConfig(hidden_size=16, batch_size=8, num_steps=8)


def test_candidates_per_config_and_backend():
    assert autotune.candidates(SMALL, "cpu") == [
        ("fused", 1, "auto"),
        ("fused", 2, "auto"),
        ("scan", 1, "auto"),
        ("scan", 2, "auto"),
        ("native", 1, "auto"),  # the LSTM's CPU kernels: no unroll
    ]
    assert [c.name for c in autotune.candidates(SMALL, "cpu")] == [
        "fused:1",
        "fused:2",
        "scan:1",
        "scan:2",
        "native:1",
    ]
    deep = TrainConfig(num_layers=2)
    assert ("wavefront", 2, "auto") in autotune.candidates(deep, "cpu")
    assert not any(c.implementation == "wavefront" for c in autotune.candidates(TrainConfig()))
    gpu = autotune.candidates(TrainConfig(hidden_size=128), "gpu")
    assert ("fused", 8, "auto") in gpu and ("pallas", 1, "auto") in gpu
    assert ("fused", 1, "auto") not in gpu
    assert gpu.count(("pallas", 1, "auto")) == 1  # unroll means nothing to the kernels
    reset_before = TrainConfig(cell="gru", hidden_size=128)
    assert not any(c.implementation == "pallas" for c in autotune.candidates(reset_before, "gpu"))
    # what the caller fixed stays fixed
    assert autotune.candidates(TrainConfig(implementation="scan"), "cpu") == [
        ("scan", 1, "auto"),
        ("scan", 2, "auto"),
    ]
    assert autotune.candidates(TrainConfig(unroll=4), "cpu") == [
        ("fused", 4, "auto"),
        ("scan", 4, "auto"),
        ("native", 1, "auto"),
    ]
    bf16 = autotune.candidates(TrainConfig(matmul_dtype="bfloat16"), "cpu")
    assert not any(c.implementation in ("scan", "native") for c in bf16)
    assert not any(c.implementation == "native" for c in autotune.candidates(SMALL, "gpu"))
    gru = autotune.candidates(TrainConfig(cell="gru"), "cpu")
    assert not any(c.implementation == "native" for c in gru)


def test_candidates_of_a_bidirectional_network_include_both_direction_layouts():
    bi = TrainConfig(bidirectional=True, unroll=1)
    assert [c.name for c in autotune.candidates(bi, "cpu")] == [
        "fused:1:vmap",
        "fused:1:separate",
        "scan:1",  # the scan always maps its step over the directions
        "native:1:vmap",
        "native:1:separate",
    ]
    gpu = autotune.candidates(TrainConfig(bidirectional=True, hidden_size=64, unroll=8), "gpu")
    assert [c.name for c in gpu] == ["fused:8:vmap", "fused:8:separate", "scan:8", "pallas:1"]
    fixed = TrainConfig(bidirectional=True, unroll=1, directions="separate")
    assert [c.name for c in autotune.candidates(fixed, "cpu")] == [
        "fused:1:separate",
        "scan:1",
        "native:1:separate",
    ]
    assert "directions" in autotune.cache_key(bi, 28, 8)
    assert autotune.cache_key(bi, 28, 8) != autotune.cache_key(fixed, 28, 8)


def tiny_autotuned_run(tmp_path, **kw):
    """A run small enough to tune and train in seconds, in ``tmp_path / "run"``."""
    fields = dict(hidden_size=8, batch_size=8, num_steps=8, num_train=16, num_val=8)
    fields.update(epochs=1, unroll=1, autotune=True, sample_chars=2)
    return TrainConfig(**fields, workdir=str(tmp_path / "run"), **kw)


def fake_steps(monkeypatch, seconds, failing=()):
    """Replace compilation by steps that take ``seconds[name]`` on a fake clock (a
    real sleep overshoots by milliseconds on a loaded machine, enough to reorder
    the candidates); count compiles."""
    compiled = []
    now = [0.0]

    def fake(config, vocab_size, rows):
        name = autotune.Candidate(config.implementation, config.unroll, config.directions).name
        compiled.append(name)
        if name in failing:
            raise RuntimeError(f"cannot run {name}")

        def step():
            now[0] += seconds[name]

        return step

    clock = types.SimpleNamespace(perf_counter=lambda: now[0], strftime=time.strftime)
    monkeypatch.setattr(autotune, "time", clock)
    monkeypatch.setattr(autotune, "_compiled_step", fake)
    return compiled


def test_tune_picks_the_fastest_and_caches_it(tmp_path, monkeypatch):
    seconds = {"fused:1": 0.004, "fused:2": 0.001, "scan:1": 0.006, "scan:2": 0.003}
    seconds["native:1"] = 0.005
    compiled = fake_steps(monkeypatch, seconds)
    cache = tmp_path / "sub" / "cache.json"
    lines = []
    choice = autotune.tune(SMALL, 28, cache_path=cache, repeats=2, min_time_s=0, echo=lines.append)
    assert (choice.implementation, choice.unroll, choice.cached) == ("fused", 2, False)
    assert set(choice.ms) == set(seconds) and choice.ms["fused:2"] < choice.ms["scan:2"]
    assert sorted(compiled) == sorted(seconds) and "picked fused unroll 2" in lines[-1]
    stored = json.loads(cache.read_text())
    assert len(stored) == 1 and next(iter(stored.values()))["implementation"] == "fused"
    # a second call is served from the cache without compiling anything
    again = autotune.tune(SMALL, 28, cache_path=cache, echo=lines.append)
    assert (again.implementation, again.unroll, again.cached) == ("fused", 2, True)
    assert len(compiled) == 5
    # refresh times again; a different shape is a different key
    seconds["fused:2"] = 0.01
    fresh = autotune.tune(SMALL, 28, cache_path=cache, refresh=True, repeats=2, min_time_s=0)
    assert (fresh.implementation, fresh.unroll, fresh.cached) == ("scan", 2, False)
    autotune.tune(SMALL, 40, cache_path=cache, repeats=1, min_time_s=0, echo=lines.append)
    assert len(json.loads(cache.read_text())) == 2


def test_tune_picks_the_faster_direction_layout(tmp_path, monkeypatch):
    bi = TrainConfig(hidden_size=16, batch_size=8, num_steps=8, bidirectional=True, unroll=1)
    seconds = {"fused:1:vmap": 0.004, "fused:1:separate": 0.002, "scan:1": 0.005}
    seconds.update({"native:1:vmap": 0.006, "native:1:separate": 0.003})
    compiled = fake_steps(monkeypatch, seconds)
    cache, lines = tmp_path / "c.json", []
    choice = autotune.tune(bi, 28, cache_path=cache, repeats=2, min_time_s=0, echo=lines.append)
    assert choice[:2] == ("fused", 1) and choice.directions == "separate"
    assert sorted(compiled) == sorted(seconds)
    assert "picked fused unroll 1, directions separate" in lines[-1]
    again = autotune.tune(bi, 28, cache_path=cache, echo=lines.append)
    assert (again.directions, again.cached) == ("separate", True) and len(compiled) == 5
    assert "fused unroll 1, directions separate (cached in" in lines[-1]


def test_train_run_applies_the_tuned_direction_layout(tmp_path, monkeypatch):
    """run() builds its model with the layout the tune picked and records it in
    config.json (stopped before compiling: test_train_run_with_autotune_records_the_choice
    trains to the end)."""
    from rnn_jax import train

    fake_steps(monkeypatch, {"fused:1:vmap": 0.003, "fused:1:separate": 0.0, "scan:1": 0.003})
    built = []

    class Stop(Exception):
        pass

    make_steps, write_workdir = train.make_steps, train._write_workdir

    def recording_make_steps(model, *args, **kwargs):
        built.append(model.network.directions)
        return make_steps(model, *args, **kwargs)  # jitted, compiled at the first step

    def write_then_stop(*args, **kwargs):
        write_workdir(*args, **kwargs)
        raise Stop

    monkeypatch.setattr(train, "make_steps", recording_make_steps)
    monkeypatch.setattr(train, "_write_workdir", write_then_stop)
    config = tiny_autotuned_run(tmp_path, bidirectional=True)
    with pytest.raises(Stop):
        train.run(config, echo=lambda s: None, autotune_cache=tmp_path / "c.json")
    assert built == ["separate"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["implementation"], saved["directions"]) == ("fused", "separate")


def test_tune_skips_failing_candidates_and_survives_a_broken_cache(tmp_path, monkeypatch):
    seconds = {"fused:1": 0.003, "fused:2": 0.001, "scan:1": 0.002, "scan:2": 0.004}
    seconds["native:1"] = 0.005
    fake_steps(monkeypatch, seconds, failing=("fused:2",))
    cache = tmp_path / "cache.json"
    cache.write_text("{not json")
    lines = []
    choice = autotune.tune(SMALL, 28, cache_path=cache, repeats=1, min_time_s=0, echo=lines.append)
    assert (choice.implementation, choice.unroll) == ("scan", 1)
    assert choice.ms["fused:2"] is None
    assert any("ignoring unreadable cache" in s for s in lines)
    assert any("fused:2 failed (RuntimeError: cannot run fused:2)" in s for s in lines)
    assert cache.read_text() == "{not json"  # not an autotune cache: never written over
    fake_steps(monkeypatch, seconds, failing=tuple(seconds))
    with pytest.raises(RuntimeError, match="every candidate failed"):
        autotune.tune(SMALL, 99, cache_path=cache, echo=lines.append)


def test_tune_really_times_the_training_step(tmp_path):
    one_unroll = TrainConfig(hidden_size=16, batch_size=8, num_steps=8, unroll=1)
    choice = autotune.tune(one_unroll, 28, cache_path=tmp_path / "c.json", repeats=1, min_time_s=0)
    assert (choice.implementation, choice.unroll) in [("fused", 1), ("scan", 1), ("native", 1)]
    assert set(choice.ms) == {"fused:1", "scan:1", "native:1"}
    assert all(v > 0 for v in choice.ms.values())


def test_tune_with_one_candidate_times_nothing(tmp_path, monkeypatch):
    compiled = fake_steps(monkeypatch, {})
    fixed = TrainConfig(implementation="fused", unroll=3)
    choice = autotune.tune(fixed, 28, cache_path=tmp_path / "c.json")
    assert choice == autotune.Choice("fused", 3, {}, False, "auto") and compiled == []
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize(
    "kwargs,needle",
    [({"repeats": 0}, "repeats"), ({"rounds": True}, "rounds"), ({"min_time_s": -1}, "min_time_s")],
)
def test_tune_bad_arguments(tmp_path, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        autotune.tune(SMALL, 28, cache_path=tmp_path / "c.json", **kwargs)


def test_default_cache_path(monkeypatch, tmp_path):
    monkeypatch.setenv("RNN_JAX_AUTOTUNE_CACHE", str(tmp_path / "x.json"))
    assert autotune.default_cache_path() == tmp_path / "x.json"
    monkeypatch.delenv("RNN_JAX_AUTOTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert autotune.default_cache_path() == tmp_path / "rnn_jax" / "autotune.json"


def test_cache_path_check_refuses_what_it_would_write_over(tmp_path):
    """--autotune_cache (``check_cache_path``): a folder, or a file that is not a cache
    (it would be overwritten), is refused; a cache or a new path is fine."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert "is a directory" in autotune.check_cache_path(tmp_path)
    assert "is not an autotune cache" in autotune.check_cache_path(notes)
    (tmp_path / "list.json").write_text("[1, 2]")
    assert "not a JSON object" in autotune.check_cache_path(tmp_path / "list.json")
    (tmp_path / "c.json").write_text("{}")
    assert autotune.check_cache_path(tmp_path / "c.json") is None
    assert autotune.check_cache_path(tmp_path / "new" / "c.json") is None
    (tmp_path / "empty.json").write_text("")  # e.g. from mktemp: a cache not yet written
    assert autotune.check_cache_path(tmp_path / "empty.json") is None


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--autotune_cache={tmp}"], "--autotune_cache: .* is a directory"),
        (["--coordinator_address=localhost:1234"], "--autotune: not with --coordinator_address"),
    ],
)
def test_train_autotune_flags_are_checked_first(tmp_path, extra, needle):
    args = [a.format(tmp=tmp_path) for a in extra]
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--autotune", f"--workdir={tmp_path}/run"]
        + args,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert re.search(needle, proc.stderr), proc.stderr
    assert not (tmp_path / "run").exists()


def test_train_run_with_autotune_records_the_choice(tmp_path):
    """TrainConfig.autotune (also a sweep-able flag): run() tunes first, trains with
    the choice and records it in the run's config.json."""
    from rnn_jax import train

    config = tiny_autotuned_run(tmp_path)
    lines = []
    result = train.run(config, echo=lines.append, autotune_cache=tmp_path / "c.json")
    assert result.exit_code == 0
    picked = [s for s in lines if s.startswith("autotune: picked")]
    assert len(picked) == 1
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["autotune"] is True and saved["unroll"] == 1
    assert f"picked {saved['implementation']} unroll 1" in picked[0]


def test_every_setting_that_changes_the_timed_program_changes_the_cache_key():
    """A cached choice is reused only for the same program: the cell and its
    options, the sizes, the layout options, the vocabulary and one device's rows
    each give a key of their own."""
    base = autotune.cache_key(SMALL, 28, 8)
    changed = dict(
        cell="gru",
        hidden_size=17,
        num_layers=2,
        bidirectional=True,
        reset_after=True,
        pin_reset=0.5,
        pin_update=0.5,
        activation="relu",
        embed_dim=4,
        dropout=0.1,
        remat=True,
        matmul_dtype="bfloat16",
        directions="separate",
        num_steps=9,
    )
    keys = {
        name: autotune.cache_key(replace(SMALL, **{name: v}), 28, 8) for name, v in changed.items()
    }
    keys["vocab_size"] = autotune.cache_key(SMALL, 29, 8)
    keys["rows"] = autotune.cache_key(SMALL, 28, 16)
    assert base not in keys.values(), [k for k, v in keys.items() if v == base]
    assert len(set(keys.values())) == len(keys)
    # settings that do not change the program share the key
    assert autotune.cache_key(replace(SMALL, lr=0.5, seed=3, epochs=7), 28, 8) == base
