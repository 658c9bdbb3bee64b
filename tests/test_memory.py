"""The memory check of a compiled step: its arithmetic, the host's free memory as
read from /proc and cgroup files, and a training run refused before it starts."""

import dataclasses
import logging
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from test_train import TINY as TRAIN_TINY  # the training tests' tiny run, shorter

from rnn_jax import autotune, memory, train
from rnn_jax.config import ConfigError, TrainConfig

TINY = {**TRAIN_TINY, "num_train": 64, "num_val": 32, "epochs": 1, "sample_chars": 5}
TINY["data_parallel"] = False  # one device: the host-memory arithmetic below
MiB = 2**20


def tiny(tmp_path, **kw):
    return TrainConfig(**{**TINY, "workdir": str(tmp_path / "run"), **kw})


def files(root: Path, tree: dict) -> None:
    for name, text in tree.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def host(tmp_path, tree, self_cgroup):
    files(tmp_path, {**tree, "self_cgroup": self_cgroup})
    return memory.host_available(
        meminfo=tmp_path / "meminfo",
        cgroup_root=tmp_path / "cg",
        self_cgroup=tmp_path / "self_cgroup",
    )


MEMINFO = "MemTotal:       24683784 kB\nMemFree: 100 kB\nMemAvailable:   1000000 kB\n"


def test_host_memory_is_memavailable_capped_by_the_cgroup(tmp_path):
    # no cgroup limit anywhere: MemAvailable (kB)
    assert host(tmp_path / "a", {"meminfo": MEMINFO}, "0::/\n") == 1000000 * 1024
    # cgroup v2, the process's own folder: limit - usage + inactive page cache
    v2 = {
        "meminfo": MEMINFO,
        "cg/job/memory.max": f"{10 * MiB}\n",
        "cg/job/memory.current": f"{6 * MiB}\n",
        "cg/job/memory.stat": f"anon 5\ninactive_file {MiB}\nactive_file 7\n",
        "cg/memory.max": "max\n",  # the root: no limit
        "cg/memory.current": "123\n",
    }
    assert host(tmp_path / "b", v2, "0::/job\n") == 5 * MiB
    # MemAvailable when it is the smaller
    small = {**v2, "meminfo": "MemAvailable: 2048 kB\n"}
    assert host(tmp_path / "c", small, "0::/job\n") == 2 * MiB
    # cgroup v1 (a hybrid mount, as on the development VM); its "no limit" is ~2**63
    v1 = {
        "meminfo": MEMINFO,
        "cg/memory/job/memory.limit_in_bytes": f"{8 * MiB}\n",
        "cg/memory/job/memory.usage_in_bytes": f"{7 * MiB}\n",
        "cg/memory/job/memory.stat": f"cache 9\ntotal_inactive_file {2 * MiB}\n",
        "cg/memory/memory.limit_in_bytes": "9223372036854771712\n",
        "cg/memory/memory.usage_in_bytes": "4868034560\n",
    }
    assert host(tmp_path / "d", v1, "4:memory:/job\n0::/\n") == 3 * MiB
    unlimited = {**v1, "cg/memory/job/memory.limit_in_bytes": "9223372036854771712\n"}
    assert host(tmp_path / "e", unlimited, "4:memory:/job\n0::/\n") == 1000000 * 1024
    # nothing readable: unknown
    assert host(tmp_path / "f", {}, "") is None
    # a limit on a parent folder (a batch job's, the process in one of its steps)
    parent_v2 = {
        "meminfo": MEMINFO,
        "cg/job/memory.max": f"{50 * MiB}\n",
        "cg/job/memory.current": f"{20 * MiB}\n",
        "cg/job/step/task/memory.max": "max\n",
        "cg/job/step/task/memory.current": f"{MiB}\n",
    }
    assert host(tmp_path / "g", parent_v2, "0::/job/step/task\n") == 30 * MiB
    parent_v1 = {
        "meminfo": MEMINFO,
        "cg/memory/job/memory.limit_in_bytes": f"{40 * MiB}\n",
        "cg/memory/job/memory.usage_in_bytes": f"{30 * MiB}\n",
        "cg/memory/job/step/memory.limit_in_bytes": "9223372036854771712\n",
        "cg/memory/job/step/memory.usage_in_bytes": f"{MiB}\n",
    }
    assert host(tmp_path / "h", parent_v1, "4:memory:/job/step\n") == 10 * MiB


class Stats(types.SimpleNamespace):
    pass


class Compiled:
    def __init__(self, stats):
        self.stats = stats

    def memory_analysis(self):
        if isinstance(self.stats, Exception):
            raise self.stats
        return self.stats


def device(platform, id=0, stats=None):
    return types.SimpleNamespace(platform=platform, id=id, memory_stats=lambda: stats)


STATS = Stats(
    argument_size_in_bytes=10**9,  # resident before the step: not counted
    output_size_in_bytes=100,
    alias_size_in_bytes=40,
    temp_size_in_bytes=1000,
)


def test_a_step_needs_its_unaliased_outputs_and_temporaries(monkeypatch):
    assert memory.step_need(Compiled(STATS)) == 1060
    assert memory.step_need(Compiled(None)) is None
    assert memory.step_need(Compiled(NotImplementedError())) is None
    assert memory.step_need(Compiled(Stats())) is None
    # CPU devices share the host's memory: their needs add up
    monkeypatch.setattr(memory, "host_available", lambda: 2000)
    two = memory.estimate(Compiled(STATS), [device("cpu", 0), device("cpu", 1)])
    assert (two.per_device, two.devices, two.need, two.available) == (1060, 2, 2120, 2000)
    assert not two.fits and two.pool == "host memory"
    assert "on each of 2 CPU devices" in two.describe()
    one = memory.estimate(Compiled(STATS), [device("cpu")])
    assert one.fits and one.share == pytest.approx(0.53)
    # accelerators: each has its own memory; the tightest decides
    gpus = [
        device("gpu", 0, {"bytes_limit": 5000, "bytes_in_use": 1000}),
        device("gpu", 1, {"bytes_limit": 5000, "bytes_in_use": 4000}),
        device("gpu", 2, None),
    ]
    tight = memory.estimate(Compiled(STATS), gpus)
    assert (tight.need, tight.available, tight.pool) == (1060, 1000, "GPU 1")
    assert not tight.fits
    unknown = memory.estimate(Compiled(STATS), [device("tpu", 0, None)])
    assert unknown.available is None and unknown.fits and unknown.share is None
    assert memory.estimate(Compiled(None), [device("cpu")]) is None


def test_the_plan_of_a_real_program_counts_its_intermediates():
    a = jnp.ones((512, 512), jnp.float32)  # 1 MiB
    f = jax.jit(lambda a: jnp.tanh(a @ a) @ a)  # tanh(a @ a) must be held for the 2nd dot
    need = memory.step_need(f.lower(a).compile())
    assert 2 * MiB <= need <= 8 * MiB, need


@pytest.mark.parametrize(
    "value, on",
    [(None, True), ("1", True), ("0", False), ("false", False), (" Off ", False), ("no", False)],
)
def test_the_environment_variable_turns_the_check_off(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv(memory.ENV, raising=False)
    else:
        monkeypatch.setenv(memory.ENV, value)
    assert memory.enabled() is on


def test_a_budget_caps_the_host_memory_counted_as_free(monkeypatch):
    """RNN_JAX_MEMORY_BUDGET (a sweep's share per trial) caps the host pool only,
    and only when it is the tighter bound; a malformed value names the variable."""
    cpu = types.SimpleNamespace(platform="cpu")
    gpu = types.SimpleNamespace(platform="gpu", id=0, memory_stats=lambda: {"bytes_limit": 50})
    monkeypatch.setattr(memory, "step_need", lambda compiled: 30)
    monkeypatch.setattr(memory, "host_available", lambda: 100)
    monkeypatch.delenv(memory.BUDGET_ENV, raising=False)
    assert memory.budget() is None
    assert memory.estimate(None, [cpu, cpu]) == memory.Estimate(30, 2, 100, "host memory")
    monkeypatch.setenv(memory.BUDGET_ENV, " 50 ")
    assert memory.budget() == 50
    capped = memory.estimate(None, [cpu, cpu])
    assert capped == memory.Estimate(30, 2, 50, "the host memory RNN_JAX_MEMORY_BUDGET allows")
    assert not capped.fits and "60 bytes" in capped.describe()
    assert memory.estimate(None, [gpu]).available == 50  # a device's own memory: not capped
    monkeypatch.setenv(memory.BUDGET_ENV, "500")  # looser than what is free: no effect
    assert memory.estimate(None, [cpu]).pool == "host memory"
    monkeypatch.setattr(memory, "host_available", lambda: None)  # unknown: the budget
    assert memory.estimate(None, [cpu]).available == 500
    for bad in ("8GB", "-1", "1e9"):
        monkeypatch.setenv(memory.BUDGET_ENV, bad)
        with pytest.raises(ValueError, match=rf"RNN_JAX_MEMORY_BUDGET: .* got '{bad}'"):
            memory.budget()


def snapshot(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_a_model_larger_than_memory_is_refused_before_it_is_made(tmp_path, monkeypatch):
    """Parameters and optimizer state are sized by jax.eval_shape before they are
    made: --hidden_size=65536 with 2 layers and Adam's moments (some 400 GB) failed
    in XLA with RESOURCE_EXHAUSTED and a traceback."""
    monkeypatch.delenv(memory.ENV, raising=False)
    config = tiny(tmp_path, hidden_size=65536, num_layers=2, optimizer="adam")
    with pytest.raises(ConfigError, match="parameters and optimizer state would need") as e:
        train.run(config, echo=lambda _: None)
    assert e.value.flag == "hidden_size" and "--num_layers (2)" in str(e.value)
    assert "--embed_dim" not in str(e.value)  # (one-hot input: no embedding to shrink)
    assert not Path(config.workdir).exists()


def fake_step(monkeypatch, need: int, free: int = 2**20) -> None:
    """Steps that need ``need`` bytes, ``free`` of host memory (the tiny run's model,
    some 40 KB, fits in it)."""
    monkeypatch.setattr(memory, "step_need", lambda compiled: need)
    monkeypatch.setattr(memory, "host_available", lambda: free)


def test_a_step_larger_than_memory_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(memory.ENV, raising=False)
    config = tiny(tmp_path)
    fake_step(monkeypatch, 2**22)
    with pytest.raises(ConfigError, match="would need") as e:
        train.run(config, echo=lambda _: None)
    assert e.value.flag == "batch_size"
    message = str(e.value)
    for part in ("--batch_size (16)", "--num_steps (8)", "--hidden_size (16)", "--remat"):
        assert part in message
    assert "4.00 MiB, and 1.00 MiB of host memory is free" in message
    assert "--parallel" not in message
    assert not Path(config.workdir).exists()  # the folder it made is gone again
    with pytest.raises(ConfigError) as e:  # with remat on, it is not offered again
        train.run(tiny(tmp_path, remat=True), echo=lambda _: None)
    assert "--remat" not in str(e.value)

    # a run that fits trains; then a resume on a "smaller machine" is refused and
    # leaves every file of the run as it was
    monkeypatch.undo()
    assert train.run(config, echo=lambda _: None).status == "completed"
    before = snapshot(Path(config.workdir))
    fake_step(monkeypatch, 2**22)
    with pytest.raises(ConfigError, match="training step would need"):
        train.run(tiny(tmp_path, epochs=2), echo=lambda _: None)
    assert snapshot(Path(config.workdir)) == before
    # the environment variable lets it run anyway
    monkeypatch.setenv(memory.ENV, "0")
    assert train.run(tiny(tmp_path, epochs=2), echo=lambda _: None).status == "completed"


def test_a_budget_counts_the_model_and_the_step_together(tmp_path, monkeypatch):
    """The state checked against the budget, then the step against the whole budget
    again, let a trial use twice its share; a malformed budget given to train.run
    raised only once the run directory was made (ValueError, nothing written now)."""
    monkeypatch.delenv(memory.ENV, raising=False)
    monkeypatch.setenv(memory.BUDGET_ENV, str(2**20))
    fake_step(monkeypatch, 2**20 - 1000, free=10**12)  # alone, the step fits the budget
    with pytest.raises(ConfigError, match="RNN_JAX_MEMORY_BUDGET allows beyond the model is"):
        train.run(tiny(tmp_path), echo=lambda _: None)
    monkeypatch.setenv(memory.BUDGET_ENV, "8GB")
    with pytest.raises(ValueError, match="RNN_JAX_MEMORY_BUDGET: expected a whole number"):
        train.run(tiny(tmp_path), echo=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_a_step_close_to_the_limit_warns_and_is_compiled_once(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(memory.ENV, raising=False)
    fake_step(monkeypatch, 9 * 2**20 // 10)
    lines = []
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        result = train.run(tiny(tmp_path), echo=lines.append)
    assert result.status == "completed"
    assert any(line.startswith("warning: the training step needs 0.90 MiB") for line in lines)
    compiles = [r for r in caplog.records if "Compiling jit(train_step)" in r.getMessage()]
    assert len(compiles) == 1, [r.getMessage()[:80] for r in compiles]
    # resumed: the restored state is placed as the fresh one was, so again one compile
    caplog.clear()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        result = train.run(tiny(tmp_path, epochs=2), echo=lines.append)
    assert result.status == "completed" and any(line.startswith("resumed") for line in lines)
    compiles = [r for r in caplog.records if "Compiling jit(train_step)" in r.getMessage()]
    assert len(compiles) == 1, [r.getMessage()[:80] for r in compiles]


def test_nothing_free_is_refused_and_wavefront_is_not_offered_remat(tmp_path, monkeypatch):
    monkeypatch.delenv(memory.ENV, raising=False)
    monkeypatch.setattr(memory, "host_available", lambda: 0)  # a cgroup at its limit
    with pytest.raises(ConfigError, match="0 bytes of host memory is free"):
        train.run(tiny(tmp_path), echo=lambda _: None)
    assert memory.Estimate(5, 1, 0, "host memory").share == float("inf")
    deep = tiny(tmp_path, num_layers=2, implementation="wavefront")
    estimate = memory.Estimate(5, 1, 1, "GPU 0")
    message = str(train.memory_refusal(deep, estimate))
    assert "--remat" not in message and "XLA_PYTHON_CLIENT_MEM_FRACTION" in message
    assert "--remat" in str(train.memory_refusal(tiny(tmp_path), estimate))
    # a sweep's share: its refusal says how to get more
    monkeypatch.setattr(memory, "host_available", lambda: 10**12)
    monkeypatch.setenv(memory.BUDGET_ENV, "1000")
    with pytest.raises(ConfigError) as e:
        train.run(tiny(tmp_path), echo=lambda _: None)
    message = str(e.value)
    assert "1,000 bytes of the host memory RNN_JAX_MEMORY_BUDGET allows is free" in message
    assert "--parallel=N gives each trial 1/N" in message and "MEM_FRACTION" not in message


def test_autotune_skips_a_candidate_that_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.delenv(memory.ENV, raising=False)
    monkeypatch.setattr(memory, "host_available", lambda: 1000)
    lines = []
    config = tiny(tmp_path, cell="gru", implementation="auto", unroll=0)
    with pytest.raises(ConfigError, match="the training step would need") as e:
        autotune.tune(config, 28, cache_path=tmp_path / "cache.json", echo=lines.append)
    assert e.value.flag == "batch_size" and "--remat" in str(e.value)
    failed = [line for line in lines if "failed (DoesNotFit: the step would need" in line]
    assert len(failed) >= 2, lines
    assert not (tmp_path / "cache.json").exists()
    # through the launcher's path: refused as a bad flag, and the new folder removed
    with pytest.raises(ConfigError, match="would need"):
        train.run(dataclasses.replace(config, autotune=True), echo=lines.append)
    assert not Path(config.workdir).exists()


def test_autotune_counts_every_cpu_device_of_a_data_parallel_run(tmp_path, monkeypatch):
    """A candidate is compiled for one device's rows; the run runs it on each of its
    devices, which share host memory (it was checked as if on one)."""
    monkeypatch.delenv(memory.ENV, raising=False)
    monkeypatch.setattr(memory, "step_need", lambda compiled: 600)
    monkeypatch.setattr(memory, "host_available", lambda: 1000)
    config = tiny(tmp_path, cell="gru", implementation="fused", unroll=0, data_parallel=True)
    # (fused with unroll 0: two candidates, unroll 1 and 2)

    class TwoDevices:  # autotune's jax, seeing this device twice
        devices = staticmethod(lambda: jax.devices() * 2)

        def __getattr__(self, name):
            return getattr(jax, name)

    monkeypatch.setattr(autotune, "jax", TwoDevices())
    alone = dataclasses.replace(config, data_parallel=False)
    assert len(autotune._devices(alone)) == 1 and len(autotune._devices(config)) == 2
    with pytest.raises(ConfigError, match=r"1,200 bytes \(600 bytes on each of 2 CPU devices"):
        autotune.tune(config, 28, cache_path=tmp_path / "cache.json", echo=lambda _: None)
