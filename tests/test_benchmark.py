"""The training-step benchmark at tiny sizes: workers, aggregation, tables, flags."""

import json
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from experiments import bench_worker, benchmark

ROOT = Path(__file__).resolve().parents[1]
H = 8
TINY = {
    "hidden_size": H,
    "batch_size": 4,
    "num_steps": 8,
    "cell": "gru",
    "num_layers": 1,
    "bidirectional": False,
    "warmup": 1,
    "iters": 2,
    "min_iters": 2,
}


def _cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _worker(report, impl):
    """The raw JSON line of ``impl``'s worker process, or None if ``impl`` was skipped."""
    (result,) = [r for r in report["results"] if r["impl"] == impl]
    if result.get("skipped"):
        return None
    assert result["ok"], result
    assert result["rounds_ok"] == 1 and result["config"] == "tiny" and result["bidirectional"]
    (raw,) = result["rounds"]
    assert result["step_s"] == raw["step_s"]
    return raw


def _check_worker(r, impl):
    assert r["ok"] and r["impl"] == impl and r["platform"] == "cpu"
    assert len(r["step_times_s"]) == 2 and r["steps_run"] == 3
    assert 0 < r["step_s"] < 10 and 0 < r["first_step_s"] < 60
    assert r["tokens_per_step"] == 4 * 8
    assert r["tokens_per_s"] == pytest.approx(32 / r["step_s"])
    assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])
    assert abs(r["loss_first"] - math.log(28)) < 1.0  # a fresh model on random ids
    assert r["memory"]["max_rss_bytes"] > r["memory"]["import_rss_bytes"] > 0
    assert r["threads"] == 1 and r["thread_info"]["OMP_NUM_THREADS"] == "1"
    assert r["thread_info"]["affinity_cpus"] == 1
    if impl == "torch":
        assert r["compile_s"] is None and r["torch_threads"] == 1
    else:
        assert 0 < r["compile_s"] < 120
        m = r["memory"]
        assert m["temp_bytes"] > 0 and m["argument_bytes"] > 0 and m["output_bytes"] > 0
        assert m["xla_total_bytes"] == m["temp_bytes"] + m["argument_bytes"] + m["output_bytes"]


def test_tiny_run_of_every_implementation(tmp_path):
    """One tiny end-to-end run: rnn_jax, flax and torch workers, one process each.

    (One test, so that pytest-xdist runs the three worker processes only once.)
    """
    out, md = tmp_path / "bench.json", tmp_path / "BENCHMARKS.md"
    proc = _cli(
        "--configs=",
        f"--config_spec=tiny:{H}:4:8",
        "--cells=gru",
        "--layers=1",
        "--bidirectional=true",
        "--compare=flax,torch",
        "--rounds=1",
        "--warmup=1",
        "--iters=2",
        "--min_iters=2",
        "--threads=1",
        "--cpu_devices=2",  # both JAX steps with the batch split over 2 CPU devices
        "--flax_cpu_devices=2",
        "--directions=vmap",  # (auto runs two calls at this H on CPU)
        f"--output={out}",
        f"--markdown={md}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    workers = {impl: _worker(report, impl) for impl in ("rnn_jax", "flax", "torch")}
    for impl, raw in workers.items():
        if raw is None:
            assert impl == "torch" and "torch skipped" in " ".join(report["meta"]["notes"])
        else:
            _check_worker(raw, impl)

    # the same architecture: flax has rnn_jax's parameter count; PyTorch's GRU has
    # b_ih and b_hh (6H) where rnn_jax's reset-after GRU has b (3H) and b_hn (H)
    ours = workers["rnn_jax"]["num_params"]
    assert workers["flax"]["num_params"] == ours
    if workers["torch"] is not None:
        assert workers["torch"]["num_params"] - ours == 2 * H * 2  # two directions

    meta = report["meta"]
    assert meta["threads"] == 1 and meta["impls"] == ["rnn_jax", "flax", "torch"]
    assert meta["machine"]["cores"] >= 1 and meta["versions"]["jax"]
    assert meta["options"]["reset_after"] is True and meta["platform"] == "cpu"
    assert f"--config_spec=tiny:{H}:4:8" in meta["command"]
    # settings off their defaults name the section, so it never replaces the default run's
    variant = ["--directions=vmap", "--cpu_devices=2", "--flax_cpu_devices=2", "--threads=1"]
    assert meta["variant"] == variant
    assert [r["impl"] for r in report["results"]] == ["rnn_jax", "flax", "torch"]
    markdown = md.read_text()
    assert markdown.startswith("# Benchmarks")
    assert f"training step [{', '.join(variant)}] -->" in markdown
    for text in ("### Training step", "| tiny | 8 | 4 | 8 | gru | 1 | yes |", "speedup vs torch"):
        assert text in markdown
    assert "speedup vs flax" in proc.stdout and "[3/3]" in proc.stdout
    assert workers["rnn_jax"]["devices"] == workers["flax"]["devices"] == 2
    assert ", 2 devices |" in markdown
    assert workers["rnn_jax"]["directions"] == meta["options"]["directions"] == "vmap"
    assert report["results"][0]["directions"] == "vmap"  # the summary keeps it
    assert "directions as two calls" not in markdown


def test_compile_only_worker():
    spec = {**TINY, "cell": "rnn", "num_layers": 1, "bidirectional": False}
    r = bench_worker.run({**spec, "impl": "rnn_jax", "compile_only": True})
    assert r["ok"], r
    assert r["compile_s"] > 0 and r["memory"]["temp_bytes"] > 0
    assert "step_s" not in r


def test_benchmarked_step_is_the_real_train_step(monkeypatch):
    """The rnn_jax worker times ``rnn_jax.train.make_steps``' step, and it learns."""
    from rnn_jax import train

    calls = []
    real = train.make_steps

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "make_steps", spy)
    spec = {**TINY, "iters": 5, "min_iters": 5}
    r = bench_worker.run({**spec, "impl": "rnn_jax", "lr": 1.0})
    assert r["ok"], r
    assert len(calls) == 1
    model, tx, config = calls[0][:3]
    assert model.config.cell == "gru" and model.config.reset_after is True
    assert config.optimizer == "sgd" and config.grad_clip == 1.0 and config.lr == 1.0
    assert r["steps_run"] == 6
    assert r["loss_last"] < r["loss_first"] - 0.05  # six SGD steps on one batch


def test_worker_reports_bad_specs():
    assert not bench_worker.run({"impl": "mxnet"})["ok"]
    assert "unknown spec keys" in bench_worker.run({"hiden_size": 3})["error"]


def test_aggregate_takes_medians_over_rounds():
    rounds = [
        {
            "ok": True,
            "step_s": s,
            "tokens_per_step": 100,
            "compile_s": c,
            "memory": {"temp_bytes": t},
        }
        for s, c, t in ((0.2, 1.0, 10), (0.1, 3.0, 10), (0.4, 2.0, 10))
    ]
    agg = benchmark.aggregate([*rounds, {"ok": False, "error": "boom"}])
    assert agg["ok"] and agg["rounds_ok"] == 3
    assert agg["step_s"] == 0.2 and agg["step_s_min"] == 0.1 and agg["step_s_max"] == 0.4
    assert agg["tokens_per_s"] == pytest.approx(500.0)
    assert agg["compile_s"] == 2.0 and agg["memory"] == {"temp_bytes": 10}
    failed = benchmark.aggregate([{"ok": False, "error": "boom"}])
    assert not failed["ok"] and failed["error"] == "boom"


def test_config_selection():
    assert benchmark.parse_config_spec("tiny:8:4:16") == benchmark.Config("tiny", 8, 4, 16)
    for bad in ("tiny:8:4", "tiny:8:x:4", ":8:4:4", "tiny:0:4:4"):
        with pytest.raises(ValueError):
            benchmark.parse_config_spec(bad)
    names = [c.name for c in benchmark.selected_configs(["d2l", "long"], ["tiny:8:4:8"])]
    assert names == ["d2l", "long", "tiny"]
    assert [c.name for c in benchmark.selected_configs([], ["tiny:8:4:8"])] == ["tiny"]
    with pytest.raises(ValueError, match="unknown config 'huge'"):
        benchmark.selected_configs(["huge"], [])
    cases = benchmark.make_cases(
        [benchmark.CONFIGS["d2l"]],
        ["gru", "lstm"],
        [1, 2],
        benchmark.parse_bools(["false", "true"]),
    )
    assert len(cases) == 8


def test_cases_flag_runs_exactly_the_listed_cases_in_order():
    cases = benchmark.parse_cases(
        ["long:lstm:2:false", "tiny:gru:1:true", "long:lstm:2:no"], ["tiny:8:4:8"]
    )
    assert [c.label() for c in cases] == ["long lstm L2", "tiny gru L1 bi"]  # dup dropped
    assert cases[1].config == benchmark.Config("tiny", 8, 4, 8)
    for bad, word in (("d2l:gru:x:false", "integers"), ("d2l:gru:1:maybe", "maybe")):
        with pytest.raises(ValueError, match=word):
            benchmark.parse_cases([bad], [])


class _FakeRunner(benchmark.Runner):
    """Returns made-up worker results instead of starting processes."""

    def __init__(self):
        super().__init__({}, 1, 1, lambda s: None, 4)

    def run(self, impl, spec, label):
        return {"ok": True, "step_s": 0.01, "compile_s": 0.2, "tokens_per_step": 1}


def test_foreign_load_is_the_others_share_of_the_cpus(monkeypatch):
    """/proc/stat's busy ticks less this process's and its waited children's CPU time,
    over all ticks: 300 busy of 400, 1 s (100 ticks) of it ours -> 0.5."""
    ticks = iter([(1000, 2000), (1300, 2400)])
    times = iter([(0.5, 0.0, 1.0, 0.0), (0.7, 0.1, 1.7, 0.0)])  # +1.0 s in all
    monkeypatch.setattr(benchmark, "_cpu_jiffies", lambda: next(ticks))
    monkeypatch.setattr(
        benchmark.os,
        "times",
        lambda: types.SimpleNamespace(
            **dict(
                zip(
                    ("user", "system", "children_user", "children_system"), next(times), strict=True
                )
            )
        ),
    )
    monkeypatch.setattr(benchmark.os, "sysconf", lambda name: 100)
    assert benchmark.ForeignLoad().share() == pytest.approx(0.5)


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="Linux's /proc/stat")
def test_foreign_load_sees_a_process_it_did_not_wait_for():
    load = benchmark.ForeignLoad()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.5)
        share = load.share()  # the spinner's CPU time is not ours until it is waited for
    finally:
        spinner.kill()
        spinner.wait()
    assert share is not None and share > 0.6 / len(os.sched_getaffinity(0))


def test_a_worker_timed_on_a_busy_machine_is_flagged(monkeypatch):
    """The progress line warns, the round keeps its share (foreign_cpu), the case its
    largest, and the run's notes (the markdown section) say how many were disturbed."""
    lines = []
    runner = benchmark.Runner({}, 1, 1, lines.append, 2)
    monkeypatch.setattr(
        benchmark,
        "run_worker",
        lambda *a: {"ok": True, "step_s": 0.01, "tokens_per_step": 1, "platform": "cpu"},
    )
    shares = iter([0.02, 0.4])
    monkeypatch.setattr(benchmark.ForeignLoad, "share", lambda self: next(shares))
    quiet, busy = (runner.run("rnn_jax", {}, "case") for _ in range(2))
    assert quiet["foreign_cpu"] == 0.02 and busy["foreign_cpu"] == 0.4
    assert "WARNING" not in lines[0] and "other processes used 40% of the CPUs" in lines[1]
    assert runner.disturbed == 1
    assert benchmark.aggregate([quiet, busy])["foreign_cpu_max"] == 0.4


def test_run_benchmark_reports_progress_and_the_prewarm_compile():
    """After each case ``on_case`` gets every row so far (the partial JSON); a case
    compiled by the prewarm reports that cold compile, the timed load apart."""
    cases = benchmark.parse_cases(["d2l:gru:1:false", "d2l:lstm:1:false"], [])
    seen = []
    prewarmed = {
        ("d2l gru L1", "rnn_jax"): {"ok": True, "compile_s": 7.0},
        ("d2l lstm L1", "rnn_jax"): {"ok": True, "compile_s": 0.1},  # timed one not faster
    }
    results = benchmark.run_benchmark(
        cases, ["rnn_jax", "torch"], _FakeRunner(), 1, prewarmed, lambda r: seen.append(len(r))
    )
    assert seen == [2, 4]
    gru_ours, gru_torch, lstm_ours, _ = results
    assert gru_ours["compile_s"] == 7.0 and gru_ours["compile_load_s"] == 0.2
    assert lstm_ours["compile_s"] == 0.2 and lstm_ours["compile_load_s"] == 0.2  # a miss
    assert "compile_load_s" not in gru_torch


@pytest.mark.slow
def test_prewarm_compiles_first_and_the_timed_workers_load(tmp_path):
    """--prewarm with --cases: one compile-only worker per case into a cache the timed
    workers load from (faster than compiling), the temporary cache removed after."""
    out = tmp_path / "bench.json"
    proc = _cli(
        "--configs=",  # --cases alone selects the cases
        "--cases=tiny:gru:1:false,tiny:rnn:1:false",
        f"--config_spec=tiny:{H}:4:8",
        "--rounds=1",
        "--warmup=1",
        "--iters=2",
        "--min_iters=2",
        "--threads=1",
        "--prewarm=2",
        f"--output={out}",
        "--markdown=",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert "partial" not in report and report["meta"]["options"]["prewarm"] == 2
    assert [(r["cell"], r["impl"]) for r in report["results"]] == [
        ("gru", "rnn_jax"),
        ("rnn", "rnn_jax"),
    ]
    for r in report["results"]:
        assert r["ok"] and 0 < r["compile_load_s"] < r["compile_s"], r
    assert "[prewarm 2/2] tiny rnn L1 rnn_jax: compile" in proc.stdout
    assert "Compile (--prewarm=2)" in proc.stdout
    (cache,) = [w.split("cache ")[1] for w in proc.stdout.splitlines() if "cache /" in w]
    assert not Path(cache).exists()


def _result(impl, step_s, ok=True, **kw):
    case = {
        "config": "d2l",
        "hidden_size": 32,
        "batch_size": 1024,
        "num_steps": 32,
        "cell": "gru",
        "num_layers": 1,
        "bidirectional": False,
    }
    if not ok:
        return {**case, "impl": impl, "ok": False, **kw}
    memory = {"max_rss_bytes": 300 * benchmark.MIB}
    if impl != "torch":
        memory.update(temp_bytes=2 * benchmark.MIB, argument_bytes=1024, output_bytes=1024)
        memory["xla_total_bytes"] = memory["temp_bytes"] + 2048
    return {
        **case,
        "impl": impl,
        "ok": True,
        "step_s": step_s,
        "tokens_per_s": 32768 / step_s,
        "compile_s": None if impl == "torch" else 1.5,
        "first_step_s": 0.01,
        "num_params": 5000,
        "memory": memory,
        **kw,
    }


def _report(results, impls, platform="cpu", gpu=None):
    return {
        "meta": {
            "kind": "training step",
            "date": "2026-01-01 00:00 UTC",
            "command": "python -m experiments.benchmark --compare=flax,torch",
            "machine": {"cpu": "Some CPU", "cores": 4, "cores_usable": 4, "gpu": gpu},
            "platform": platform,
            "versions": {"python": "3.11", "jax": "0.1", "torch": None},
            "threads": 4,
            "impls": impls,
            "options": {
                "vocab_size": 28,
                "reset_after": True,
                "unroll": 1,
                "remat": False,
                "hoist_input": "auto",
                "hoist_input_used": False,
                "rounds": 3,
                "warmup": 2,
                "iters": 10,
                "min_iters": 3,
                "max_time_s": 20.0,
            },
            "notes": ["torch skipped: not installed"],
        },
        "results": results,
    }


def test_speed_table_columns_and_ratios():
    results = [_result("rnn_jax", 0.010), _result("flax", 0.020), _result("torch", 0.005)]
    results[0]["implementation"] = "fused"
    table = benchmark.speed_table(results, ["rnn_jax", "flax", "torch"])
    header, rule, row = table.splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == [
        *benchmark.CASE_COLUMNS,
        "rnn_jax impl",
        "rnn_jax ms/step",
        "rnn_jax tokens/s",
        "flax ms/step",
        "flax tokens/s",
        "torch ms/step",
        "torch tokens/s",
        "speedup vs flax",
        "speedup vs torch",
    ]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == len(columns) and rule.count("---") == len(columns)
    assert cells[:7] == ["d2l", "32", "1024", "32", "gru", "1", "no"]
    assert cells[7:10] == ["fused", "10.0", "3,276,800"]
    assert cells[-2:] == ["2.00x", "0.50x"]  # peer time / rnn_jax time
    results[0].update(implementation="pallas", unroll=8, pallas_exchange="flag")
    row = benchmark.speed_table(results, ["rnn_jax", "flax", "torch"]).splitlines()[2]
    assert [c.strip() for c in row.strip("|").split("|")][7] == "pallas, flag exchange"
    results[0].update(implementation="fused", unroll=1, directions="separate")
    del results[0]["pallas_exchange"]
    row = benchmark.speed_table(results, ["rnn_jax", "flax", "torch"]).splitlines()[2]
    impl = [c.strip() for c in row.strip("|").split("|")][7]
    assert impl == "fused, unroll 1, directions as two calls"


def test_tables_mark_skipped_and_failed_peers():
    results = [
        _result("rnn_jax", 0.010),
        _result("flax", 0, ok=False, error="boom"),
        _result("torch", 0, ok=False, skipped=True),
    ]
    row = benchmark.speed_table(results, ["rnn_jax", "flax", "torch"]).splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[10] == "failed" and cells[12] == "skipped" and cells[-2:] == ["–", "–"]
    detail = benchmark.detail_table(results).splitlines()
    assert [c.strip() for c in detail[0].strip("|").split("|")] == (
        benchmark.CASE_COLUMNS + benchmark.DETAIL_COLUMNS
    )
    assert len(detail) == 3  # header, rule, the one successful measurement
    assert "| rnn_jax | 1.50 | 0.010 | 2.0 | 0.002 | 2.0 | – | 300 | 5,000 |" in detail[2]


def test_markdown_sections_are_replaced_per_device(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nHow to produce this file.\n")
    impls = ["rnn_jax", "flax"]
    report = _report([_result("rnn_jax", 0.010), _result("flax", 0.020)], impls)
    key, section = benchmark.render_section(report)
    assert key == "CPU Some CPU (4 cores): training step"
    # the vector instruction set tells machines with one model name apart (an AMD EPYC
    # with AVX-512 and one without); reports from before it keep their label
    vector = {**report, "meta": {**report["meta"]}}
    vector["meta"]["machine"] = {**report["meta"]["machine"], "vector": "AVX2"}
    key_avx2, section_avx2 = benchmark.render_section(vector)
    assert key_avx2 == "CPU Some CPU, AVX2 (4 cores): training step"
    assert "- Machine: Some CPU (AVX2), 4 cores (4 usable)" in section_avx2
    assert benchmark.cpu_vector_isa() in ("AVX-512", "AVX2", "NEON", None)
    for text in ("### Training step", "speedup vs flax", "reset_after=True", "torch skipped"):
        assert text in section
    assert "`python -m experiments.benchmark --compare=flax,torch`" in section
    benchmark.update_markdown(path, key, section)
    report["results"][1]["step_s"] = 0.030
    key2, section2 = benchmark.render_section(report)
    benchmark.update_markdown(path, key2, section2)  # same device: replaced
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nHow to produce this file.\n")
    assert text.count(f"<!-- benchmark-section: {key} -->") == 1 and "3.00x" in text
    assert "2.00x" not in text
    gpu_report = _report([_result("rnn_jax", 0.001)], ["rnn_jax"], "gpu", "NVIDIA H100")
    key3, section3 = benchmark.render_section(gpu_report)
    assert key3 == "GPU NVIDIA H100: training step"
    benchmark.update_markdown(path, key3, section3)  # another device: appended
    text = path.read_text()
    assert text.index(key) < text.index(key3) and text.count("3.00x") == 1


@pytest.mark.parametrize(
    "args, word",
    [
        (["--configs=d2l,huge"], "--configs: unknown config 'huge'"),
        (["--implementation=wavefront"], "--implementation: 'wavefront' runs unidirectional"),
        # what the workers would each refuse (they ran, and the section said 'failed')
        (["--implementation=native", "--cells=gru"], "'native' runs the LSTM only"),
        (
            ["--implementation=native", "--cases=tiny:lstm:1:false", "--config_spec=tiny:8:4:8"],
            "'native' needs hidden sizes that are multiples of 16; got [8]",
        ),
        (["--implementation=pallas", "--noreset_after"], "'pallas' runs the reset-after GRU"),
        (["--lr=nan"], "expected a finite learning rate"),
        (["--cells=gru,elman"], "elman"),
        (["--compare=mxnet"], "mxnet"),
        (["--config_spec=tiny:8:4"], "name:hidden:batch:steps"),
        (["--layers=0"], "layers"),
        (["--bidirectional=maybe"], "maybe"),
        (["--remat_report", "--remat_config=huge"], "huge"),
        (["--cpu_devices=3", "--configs=d2l"], "--cpu_devices: 3 devices do not split"),
        (["--flax_cpu_devices=0"], "flax_cpu_devices"),
        (["--cases=long:lstm:2"], "--cases: expected config:cell:layers:bidirectional"),
        (["--cases=d2l:gru:1:false,huge:gru:1:false"], "unknown config 'huge'"),
        (["--cases=d2l:elman:1:false"], "elman"),
        (["--prewarm=2", "--compile_report"], "--prewarm"),
        (["--prewarm=-1"], "prewarm"),
        (["--cases=d2l:gru:1:false", "--compile_report"], "--cases: only for the training"),
        (["--compilation_cache_dir=/tmp/c"], "--compilation_cache_dir: only with --prewarm"),
        (["--max_time_s=nan"], "finite number of seconds"),
        (["--min_iters=5", "--iters=2"], "--min_iters: 5 is more than --iters 2"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, word, tmp_path):
    proc = _cli(*args, f"--output={tmp_path / 'b.json'}", f"--markdown={tmp_path / 'B.md'}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0]
    assert proc.stdout == "" and not list(tmp_path.iterdir())


# --- experiments.levers ----------------------------------------------------------------


@pytest.mark.parametrize(
    "args, word",
    [
        (["--configs="], "--configs: expected at least one value"),
        (["--variants="], "--variants: expected at least one value"),
        (["--check", "--check_cells="], "--check_cells: expected at least one cell with --check"),
    ],
)
def test_levers_refuses_empty_lists(args, word, tmp_path):
    """An empty list timed nothing, exited 0 and replaced levers.json with no results."""
    out = tmp_path / "levers.json"
    out.write_text("{}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.levers", *args, f"--output={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {word}"]
    assert out.read_text() == "{}\n"


@pytest.mark.slow
def test_levers_times_every_variant_and_checks_fused_on_the_device(tmp_path):
    out = tmp_path / "levers.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.levers",
            "--configs=",
            "--config_spec=tiny:16:4:5",
            "--cells=lstm",
            "--layers=2",
            "--variants=fused:2,scan:3:nohoist,wavefront:1:bf16,native:1",
            "--iters=2",
            "--rounds=2",
            "--check",
            "--check_cells=gru_reset_after,lstm",
            f"--output={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["platform"] == "cpu" and report["versions"]["jax"]
    checked = [(r["cell"], r["implementation"]) for r in report["check"]]
    from rnn_jax import native

    impls = ("fused", "wavefront", "pallas")
    lstm = (*impls, "native") if native.unavailable() is None else impls
    assert checked == [("gru reset_after", i) for i in impls] + [("lstm", i) for i in lstm]
    assert all(r["ok"] and r["max_rel_diff"] < 1e-5 for r in report["check"])
    assert [r["case"] for r in report["results"]] == ["tiny lstm L2"]
    for row in report["results"]:
        variants = row["variants"]
        assert list(variants) == ["fused:2", "scan:3:nohoist", "wavefront:1:bf16", "native:1"]
        assert all(v["ok"] and v["step_s"] > 0 for v in variants.values())
        assert all(len(v["round_step_s"]) == 2 for v in variants.values())
        assert variants["native:1"]["implementation"] == "native"
        assert variants["fused:2"]["implementation"] == "fused"
        assert variants["fused:2"]["unroll"] == 2
        assert variants["scan:3:nohoist"]["unroll"] == 3
        assert variants["scan:3:nohoist"]["hoist_input"] is False
        assert variants["scan:3:nohoist"]["matmul_dtype"] == "float32"
        assert variants["wavefront:1:bf16"]["implementation"] == "wavefront"
        assert variants["wavefront:1:bf16"]["matmul_dtype"] == "bfloat16"
        fastest = min(variants, key=lambda n: variants[n]["step_s"])
        assert row["fastest"] == fastest
    assert "tiny lstm L2 |" in proc.stdout


@pytest.mark.parametrize(
    "text, word",
    [
        ("fused", "implementation:unroll"),
        ("cudnn:8", "implementation:unroll"),
        ("scan:0", "unroll must be"),
        ("scan:x", "unroll must be"),
        ("scan:2:hoisted", "hoist"),
        ("scan:2:bf16", "bf16 .not with scan"),
        ("pallas:8", "no unroll or hoist option"),
        ("fused:2:bf16:bf16", "each at most once"),
        ("native:4", "native kernels have no unroll or hoist option; use native:1"),
        ("native:1:hoist", "no unroll or hoist option"),
        ("native:1:bf16", "float32 only"),
    ],
)
def test_levers_bad_variants(text, word):
    from experiments import levers

    with pytest.raises(ValueError, match=word):
        levers.parse_variant(text)
    assert levers.parse_variant("scan:4:hoist") == {
        "implementation": "scan",
        "unroll": 4,
        "hoist_input": "true",
    }
    assert levers.parse_variant("wavefront:8:bf16") == {
        "implementation": "wavefront",
        "unroll": 8,
        "matmul_dtype": "bfloat16",
    }
    assert levers.parse_variant("native:1") == {"implementation": "native", "unroll": 1}


def test_levers_rounds_alternate_and_report_each_variants_median():
    """--rounds: ABBA order (a drift of the machine's speed falls on every variant
    alike), each variant's median round, the failures kept, the native variant
    skipped where it does not apply (no JAX work: a fake worker)."""
    from experiments import levers

    calls = []
    times = {"fused": iter([3.0, 1.0, 2.0, 9.0]), "scan": iter([5.0, 4.0, 6.0, 7.0])}

    def fake_run(spec):
        calls.append(spec["implementation"])
        assert spec["cpu_devices"] == "2" and spec["iters"] == 4
        return {"ok": True, "step_s": next(times[spec["implementation"]]), "step_times_s": [0]}

    variants = {
        "fused:1": levers.parse_variant("fused:1"),
        "scan:1": levers.parse_variant("scan:1"),
    }
    variants["native:1"] = levers.parse_variant("native:1")
    gru = {"cell": "gru", "hidden_size": 32, "batch_size": 8, "num_steps": 4}
    out = levers.time_variants(gru, variants, 4, {"iters": 4}, "2", run=fake_run)
    assert calls == ["fused", "scan", "scan", "fused"] * 2
    assert out["fused:1"]["round_step_s"] == [3.0, 1.0, 2.0, 9.0]
    assert out["fused:1"]["step_s"] == 2.0  # the lower middle of an even count
    assert out["scan:1"]["step_s"] == 5.0 and "step_times_s" not in out["scan:1"]
    assert out["native:1"] == {"ok": False, "skip": True, "error": out["native:1"]["error"]}
    assert "LSTM only" in out["native:1"]["error"]
    odd = dict(gru, cell="lstm", hidden_size=24)
    assert "multiple of 16" in levers.variant_skip(odd, variants["native:1"])
    assert levers.variant_skip(odd, variants["fused:1"]) is None

    def flaky(spec):
        return {"ok": False, "error": "boom"} if len(calls) == 9 else fake_run(spec)

    times["fused"] = iter([1.0, 2.0])
    out = levers.time_variants(gru, {"fused:1": variants["fused:1"]}, 3, {"iters": 4}, "2", flaky)
    assert out["fused:1"]["ok"] is False and out["fused:1"]["error"] == "boom"


def test_levers_runs_all_cases_on_one_cpu_device_count(monkeypatch):
    """JAX fixes the CPU device count when it starts, so levers picks one for the
    process: a split shape and a tiny one ask for different counts under auto (refused
    by name), a given count must divide every batch."""
    from experiments import levers
    from rnn_jax import parallel

    monkeypatch.setattr(parallel, "cpu_cores", lambda: 2)
    medium = benchmark.make_cases(
        benchmark.selected_configs(["medium"], []), ["lstm"], [1], [False]
    )
    tiny = benchmark.make_cases(
        benchmark.selected_configs([], ["tiny:8:4:5"]), ["lstm"], [1], [False]
    )
    odd = benchmark.make_cases(benchmark.selected_configs([], ["odd:8:3:5"]), ["gru"], [1], [False])
    assert levers.cpu_devices_for(medium, "auto") == 2
    assert levers.cpu_devices_for(tiny, "auto") == 1
    assert levers.cpu_devices_for(medium + tiny, "1") == 1
    with pytest.raises(
        ValueError, match=r"--cpu_devices=auto: .*medium lstm L1: 2, tiny lstm L1: 1"
    ):
        levers.cpu_devices_for(medium + tiny, "auto")
    with pytest.raises(ValueError, match=r"--cpu_devices: 2 devices do not split --batch_size 3"):
        levers.cpu_devices_for(medium + odd, "2")


def _section(key: str, rows: list[str]) -> str:
    table = [
        "| config | H | B | T | cell | layers | bidir | rnn_jax ms/step |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    return "\n".join(
        [f"<!-- benchmark-section: {key} -->", f"## {key}", "", *table]
        + [f"<!-- /benchmark-section: {key} -->", ""]
    )


def test_markdown_keeps_a_section_whose_cases_a_run_lacks(tmp_path):
    """A run of a subset of a section's cases never deletes the others: the old
    section stays and the run gets its own, dated; a run of the same cases or more
    replaces it; the text around the sections stays."""
    key = "CPU X (2 cores): training step"
    a = "| d2l | 32 | 1024 | 32 | gru | 1 | no | 10.0 |"
    b = "| d2l | 32 | 1024 | 32 | lstm | 1 | no | 11.0 |"
    path = tmp_path / "B.md"
    path.write_text("# Benchmarks\n\nHand-written text.\n\n" + _section(key, [a, b]))
    assert benchmark.table_cases(path.read_text()) == [
        "d2l 32 1024 32 gru 1 no: rnn_jax",
        "d2l 32 1024 32 lstm 1 no: rnn_jax",
    ]
    subset = _section(key, ["| d2l | 32 | 1024 | 32 | gru | 1 | no | 9.0 |"])
    written, kept = benchmark.update_markdown(path, key, subset, {"date": "2026-12-06 21:00 UTC"})
    assert written == f"{key} (2026-12-06 21:00 UTC)"
    assert kept == ["d2l 32 1024 32 lstm 1 no: rnn_jax"]
    text = path.read_text()
    assert "Hand-written text." in text and a in text and b in text and "| 9.0 |" in text
    superset = _section(key, [a.replace("10.0", "8.0"), b.replace("11.0", "7.0")])
    written, kept = benchmark.update_markdown(path, key, superset, {"date": "2026-12-06 22:00 UTC"})
    assert written == key and kept == []
    text = path.read_text()
    assert a not in text and b not in text and "| 8.0 |" in text and "| 7.0 |" in text
    assert text.count("benchmark-section: CPU X") == 4  # two sections, begin and end each
    assert benchmark.partial_path("out/b.json") == Path("out/b.json.partial")
    # a rerun whose measurement failed measured nothing: the measured row stays
    failed = _section(key, [a.replace("10.0", "failed"), b.replace("11.0", "6.0")])
    written, kept = benchmark.update_markdown(path, key, failed, {"date": "2026-12-06 23:00 UTC"})
    assert kept == ["d2l 32 1024 32 gru 1 no: rnn_jax"] and "| 8.0 |" in path.read_text()


def test_markdown_keeps_a_peer_and_the_default_settings(tmp_path):
    """A rerun without a peer's column keeps the section that has it; a run off the
    default settings gets a section of its own, named by the flags that differ."""
    key = "CPU X (2 cores): training step"
    header = "| config | H | B | T | cell | layers | bidir | rnn_jax ms/step | torch ms/step |"
    rule = "|---|---|---|---|---|---|---|---|---|"

    def section(rows, k=key):
        end = f"<!-- /benchmark-section: {k} -->"
        return "\n".join([f"<!-- benchmark-section: {k} -->", header, rule, *rows, end]) + "\n"

    path = tmp_path / "B.md"
    path.write_text(section(["| d2l | 32 | 1024 | 32 | gru | 1 | no | 10.0 | 20.0 |"]))
    alone = section(["| d2l | 32 | 1024 | 32 | gru | 1 | no | 9.0 | skipped |"])
    written, kept = benchmark.update_markdown(path, key, alone, {"date": "D"})
    assert kept == ["d2l 32 1024 32 gru 1 no: torch"] and written == f"{key} (D)"
    assert "| 20.0 |" in path.read_text()
    both = section(["| d2l | 32 | 1024 | 32 | gru | 1 | no | 8.0 | 19.0 |"])
    assert benchmark.update_markdown(path, key, both, {"date": "E"}) == (key, [])
    assert "| 20.0 |" not in path.read_text() and "| 19.0 |" in path.read_text()

    defaults = {"implementation": "auto", "threads": 0, "remat": False, "unroll": 0}
    values = {**defaults, "implementation": "scan", "remat": True}
    assert benchmark.variant(values, defaults) == ["--implementation=scan", "--remat=true"]
    assert benchmark.variant(defaults, defaults) == []
    report = _report([_result("rnn_jax", 0.010)], ["rnn_jax"])
    assert benchmark.render_section(report)[0] == "CPU Some CPU (4 cores): training step"
    report["meta"]["variant"] = ["--implementation=scan", "--remat=true"]
    scan_key, scan_section = benchmark.render_section(report)
    assert scan_key == "CPU Some CPU (4 cores): training step [--implementation=scan, --remat=true]"
    assert f"## {scan_key}" in scan_section
    benchmark.update_markdown(path, scan_key, scan_section)
    text = path.read_text()
    assert "| 19.0 |" in text and text.count("<!-- benchmark-section:") == 3
    assert set(benchmark.VARIANT_FLAGS) >= {"implementation", "threads", "cpu_devices"}


def test_output_flags_are_checked_before_any_work(tmp_path):
    """The shared validators of the launchers' output flags: a file path needs an
    existing folder and must not be one; an output folder must not be (or sit under)
    a file; seconds must be finite."""
    from absl import flags

    from experiments import common

    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    assert common.output_path_ok("") and common.output_path_ok(str(tmp_path / "b.json"))
    assert common.outdir_ok(str(tmp_path / "new" / "deeper"))
    assert common.finite_seconds_ok(3.0)
    for check, value, match in [
        (common.output_path_ok, str(tmp_path), "is a directory"),
        (common.output_path_ok, str(tmp_path / "missing" / "b.json"), "does not exist"),
        (common.outdir_ok, str(a_file), "is a file; expected a folder"),
        (common.outdir_ok, str(a_file / "sub"), "is a file; expected a folder"),
        (common.finite_seconds_ok, float("nan"), "finite number of seconds"),
        # a folder no file can be made in (Linux's /proc): the results were lost at the end
        (common.output_path_ok, "/proc/B.md", "cannot write in /proc"),
        (common.outdir_ok, "/proc/results", "cannot write in /proc"),
    ]:
        if str(value).startswith("/proc") and not os.path.isdir("/proc"):
            continue
        with pytest.raises(flags.ValidationError, match=match):
            check(value)
    assert not list(tmp_path.glob("tmp*"))  # the write probes leave nothing
