"""Sweeps: parsing and expansion (pure), reports, and tiny sweeps through the launcher."""

import csv
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rnn_jax import memory, sweeps
from rnn_jax.sweeps import SweepError

ROOT = Path(__file__).resolve().parents[1]
TINY = "hidden_size=8;batch_size=16;num_steps=8;num_train=64;num_val=32;epochs=1;sample_chars=5"


def plan(**kw):
    args = dict(grid=None, random_count=0, ranges=None, fixed="", seeds=1, sweep_seed=0)
    return sweeps.plan(**{**args, **kw})


def run_sweep(*args, timeout=240, env=None):
    return subprocess.run(
        [sys.executable, "-m", "experiments.sweep", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# --- expansion -----------------------------------------------------------------------


def test_grid_is_the_product_in_order_times_seeds():
    sweep = plan(grid="cell=rnn,gru;lr=0.5,1,2", seeds=2, fixed="epochs=2")
    assert sweep.swept == ["cell", "lr"]
    got = [(t.flags["cell"], t.flags["lr"], t.seed) for t in sweep.trials]
    want = [(c, lr, s) for c in ("rnn", "gru") for lr in ("0.5", "1", "2") for s in (0, 1)]
    assert got == want
    assert [t.index for t in sweep.trials] == list(range(12))
    assert sweep.trials[5].name == "trial_005_cell=rnn_lr=2_seed=1"
    assert len({t.name for t in sweep.trials}) == 12
    assert len({t.config for t in sweep.trials}) == 6
    args = sweeps.trial_args(sweep, sweep.trials[5], "d")
    assert args == ["--epochs=2", "--cell=rnn", "--lr=2", "--seed=1", "--workdir=d"]


def test_random_search_is_reproducible_and_inside_its_ranges():
    ranges = "lr=log:0.01:10;hidden_size=int:16:128;dropout=uniform:0:0.5;cell=choice:gru,lstm"
    a = plan(random_count=30, ranges=ranges, sweep_seed=7, seeds=2)
    b = plan(random_count=30, ranges=ranges, sweep_seed=7, seeds=2)
    c = plan(random_count=30, ranges=ranges, sweep_seed=8, seeds=2)
    assert [t.name for t in a.trials] == [t.name for t in b.trials]
    assert [t.flags for t in a.trials] != [t.flags for t in c.trials]
    assert len(a.trials) == 60 and [t.seed for t in a.trials[:4]] == [0, 1, 0, 1]
    for t in a.trials:
        assert 0.01 <= float(t.flags["lr"]) <= 10
        assert 16 <= int(t.flags["hidden_size"]) <= 128
        assert 0 <= float(t.flags["dropout"]) <= 0.5
        assert t.flags["cell"] in ("gru", "lstm")
        assert t.flags["lr"] == f"{float(t.flags['lr']):.4g}"  # 4 significant digits


def test_log_ranges_are_log_uniform_and_integer_flags_get_integers():
    rng = random.Random(0)
    lr = sweeps.Range("log", 1e-3, 1e3)
    logs = [math.log10(float(sweeps.sample_value(rng, "lr", lr))) for _ in range(3000)]
    decades = [sum(d <= x < d + 1 for x in logs) / len(logs) for d in range(-3, 3)]
    assert all(abs(f - 1 / 6) < 0.04 for f in decades), decades
    sizes = [
        sweeps.sample_value(rng, "hidden_size", sweeps.Range("log", 4, 512)) for _ in range(200)
    ]
    assert all(s.isdigit() and 4 <= int(s) <= 512 for s in sizes)
    assert sum(int(s) < 45 for s in sizes) > 80  # the geometric middle, not the arithmetic


def test_random_search_stops_at_the_distinct_configurations():
    sweep = plan(random_count=10, ranges="cell=choice:gru,lstm;bidirectional=choice:true,false")
    assert len(sweep.trials) == 4
    assert len({t.config for t in sweep.trials}) == 4


SIX = ("lr", "grad_clip", "dropout", "epochs", "hidden_size", "num_layers")


@pytest.mark.parametrize(
    "kw, flag, fragment",
    [
        (dict(grid="hiden_size=8,16"), "grid", "did you mean hidden_size"),
        (dict(grid="coordinator_address=x"), "grid", "unknown flag"),
        (dict(grid="cpu_devices=1,2"), "grid", "flag of experiments.train's launcher"),
        (dict(grid=None, random_count=10**9, ranges="lr=log:0.1:1"), "random", "at most"),
        (dict(grid=""), "grid", "empty grid"),
        (dict(grid="lr"), "grid", "expected name=value"),
        (dict(grid="lr=1,,2"), "grid", "empty value"),
        (dict(grid="lr=1,1"), "grid", "repeated"),
        (dict(grid="lr=1;lr=2"), "grid", "twice"),
        (dict(grid="num_layers=1.5"), "grid", "expected an int"),
        (dict(grid="bidirectional=yes"), "grid", "true or false"),
        (dict(grid="seed=0,1"), "grid", "--seeds"),
        (dict(grid="workdir=a,b"), "grid", "--sweep_dir"),
        (dict(grid="lr=1", random_count=3, ranges="lr=log:1:2"), "grid", "not both"),
        (dict(), "grid", "nothing to sweep"),
        (dict(random_count=3), "ranges", "needs --ranges"),
        (dict(grid="lr=1", ranges="lr=log:1:2"), "random", "needs --random"),
        (dict(random_count=3, ranges="lr=log:0:1"), "ranges", "0 < LOW < HIGH"),
        (dict(random_count=3, ranges="lr=log:1"), "ranges", "log:LOW:HIGH"),
        (dict(random_count=3, ranges="lr=log:0.01:inf"), "ranges", "finite bounds"),
        (dict(random_count=3, ranges="lr=normal:1:2"), "ranges", "KIND"),
        (dict(random_count=3, ranges="lr=uniform:a:2"), "ranges", "numbers"),
        (dict(random_count=3, ranges="hidden_size=int:8.5:16"), "ranges", "integers"),
        (dict(random_count=3, ranges="cell=log:1:2"), "ranges", "numeric"),
        (dict(random_count=3, ranges=""), "ranges", "no ranges"),
        (dict(grid="lr=1", fixed="lr=2"), "set", "also swept"),
        (dict(grid="lr=1", fixed="epochs"), "set", "name=value"),
        (dict(grid="lr=1", fixed="epochs=two"), "set", "expected an int"),
        (dict(grid="lr=1", seeds=0), "seeds", ">= 1"),
        (dict(grid="lr=1", base_args=["--bogus=1"]), "base", "unknown flag --bogus"),
        (dict(grid="pin_reset=none", base_args=["--pin_reset=0.5"]), "grid", "cannot unset"),
        # absl reads the flagfile and a trial failed: "none" is no float, "maybe" no bool
        (dict(grid="lr=1", base_args=["--pin_reset=none"]), "base", "leaves a flag unset by"),
        (dict(grid="lr=1", base_args=["--tune_malloc=maybe"]), "base", "expected true or"),
        (dict(grid="embed_dim=0X10"), "grid", "expected an int, got '0X10'"),  # (only 0x)
        (dict(grid="lr=1,2,1"), "grid", r"lr: a value is repeated in '1,2,1'$"),
        (dict(grid="lr=1,1.0"), "grid", r"\('1' and '1.0' are the same\)"),  # (ran twice)
        # planned and validated up front: a million trials took hours before one ran
        (dict(grid="lr=1", seeds=10**6), "seeds", "1,000,000 trials; expected at most"),
        (dict(grid=";".join(f"{n}=1,2,3,4,5,6,7,8,9,10" for n in SIX)), "grid", "1,000,000 con"),
        (dict(random_count=1000, ranges="lr=log:0.1:1", seeds=101), "seeds", "101,000 trials"),
    ],
)
def test_bad_definitions_name_the_flag(kw, flag, fragment):
    with pytest.raises(SweepError, match=fragment) as e:
        plan(**kw)
    assert e.value.flag == flag
    assert str(e.value).startswith(f"--{flag}: ")


def test_base_flagfile_arguments():
    args = ["--cell=gru", "--nobidirectional", "--remat", "--workdir=runs/x", "--seed=3"]
    args += ["--cpu_devices=1", "--notune_malloc"]  # train's launcher flags: left to train
    base = sweeps.parse_flag_args(args, "gru.flags")
    assert base == {"cell": "gru", "bidirectional": "false", "remat": "true"}
    sweep = plan(grid="lr=1", base_args=args, fixed="epochs=2")
    config = sweeps.trial_config(sweep, sweep.trials[0], "d")
    assert (config.cell, config.bidirectional, config.remat, config.lr) == ("gru", False, True, 1.0)
    assert (config.epochs, config.seed, config.workdir) == (2, 0, "d")


def test_validation_before_any_trial_names_the_source(tmp_path):
    sweeps.validate_trials(plan(grid="cell=gru,lstm;hidden_size=8,16"), tmp_path)
    cases = [
        (dict(grid="hidden_size=8,-1"), "grid", "--hidden_size: expected >= 1"),
        (dict(grid="lr=inf,1"), "grid", "--lr: expected a finite number"),
        (dict(grid="lr=1", fixed="num_train=10000000"), "set", "--num_train"),
        (dict(random_count=2, ranges="dropout=uniform:0.5:2"), "ranges", "--dropout"),
        (dict(grid="lr=1", base_args=["--optimizer=rmsprop"]), "base", "--optimizer"),
        (dict(grid="pin_reset=0.5"), "grid", "only the GRU"),
    ]
    for kw, flag, fragment in cases:
        with pytest.raises(SweepError, match=fragment) as e:
            sweeps.validate_trials(plan(**kw), tmp_path)
        assert e.value.flag == flag
    assert list(tmp_path.iterdir()) == []


def test_definition_changes_name_the_keys():
    old = plan(grid="lr=1,2", fixed="epochs=2").definition
    assert sweeps.definition_changes(json.loads(json.dumps(old)), old) == []
    new = plan(grid="lr=1,2,4", fixed="epochs=3", seeds=2).definition
    changes = sweeps.definition_changes(json.loads(json.dumps(old)), new)
    assert changes == [
        'grid.lr: ["1", "2"] -> ["1", "2", "4"]',
        "seeds: 1 -> 2",
        'set.epochs: "2" -> "3"',
    ]


def test_a_reordered_grid_or_ranges_is_another_sweep():
    """The definition compares the swept flags as a set, but their order names the
    trials (a rerun retrained them all into new folders and dropped the finished
    ones from results.csv) and, for ranges, draws other values."""
    for first, second in [
        (dict(grid="lr=1;cell=gru,lstm"), dict(grid="cell=gru,lstm;lr=1")),
        (
            dict(random_count=2, ranges="lr=log:0.01:10;hidden_size=int:16:128"),
            dict(random_count=2, ranges="hidden_size=int:16:128;lr=log:0.01:10"),
        ),
    ]:
        saved = json.loads(json.dumps(sweeps.trials_json(plan(**first), {})))
        assert sweeps.sweep_changes(saved, plan(**first)) == []
        (change,) = sweeps.sweep_changes(saved, plan(**second))
        assert change.startswith("trial names: trial_000_") and "order" in change


def test_trial_names_fit_a_file_name():
    """A grid over many flags with long values named folders beyond 255 bytes (the
    sweep crashed: "File name too long"); names that fit are kept as they were."""
    long = "1." + "0" * 36  # 38 characters, each flag's part about 50
    floats = ("lr", "grad_clip", "weight_decay", "momentum", "log_every_s", "lr_min")
    fields = [f for f in floats if f in sweeps.field_types()]
    grid = ";".join(f"{name}={long},2" for name in fields)
    names = [t.name for t in plan(grid=grid, seeds=2).trials]
    assert len(fields) >= 5 and len(set(names)) == len(names)
    assert max(map(len, names)) == sweeps.MAX_NAME == 255
    assert names[0].startswith(f"trial_000_{fields[0]}={long}_") and names[0].endswith(".._seed=0")
    assert sweeps.trial_name(3, {"lr": "2"}, 0) == "trial_003_lr=2_seed=0"
    fits = {f"f{k}": "x" * 40 for k in range(5)}  # 240 characters: unchanged
    assert len(sweeps.trial_name(0, fits, 0)) < 255 and ".." not in sweeps.trial_name(0, fits, 0)


def test_failure_reasons():
    log = "lstm H=8\nerror: non-finite loss at step 3 (epoch 1); stopped\nI0000 exit\n"
    reason = sweeps.failure_reason(log, 1)
    assert reason == "error: non-finite loss at step 3 (epoch 1); stopped"
    assert sweeps.outcome(1, reason) == "diverged"
    trace = "Traceback (most recent call last):\n  File x\nMemoryError: out of memory\n"
    assert sweeps.failure_reason(trace, 1) == "MemoryError: out of memory"
    assert sweeps.outcome(1, "MemoryError: out of memory") == "failed"
    assert sweeps.failure_reason("step 1\n", -9) == "killed by SIGKILL"
    assert sweeps.failure_reason("step 1\n", 3) == "exit code 3: step 1"
    assert sweeps.outcome(143, "") == sweeps.outcome(-signal.SIGTERM, "") == "interrupted"


# --- reports -------------------------------------------------------------------------


def fake_rows(sweep):
    rows = []
    for t in sweep.trials:
        failed = t.flags["lr"] == "4" and t.seed == 1
        val = None if failed else 10.0 / float(t.flags["lr"]) + t.seed + (t.flags["cell"] == "rnn")
        rows.append(
            {
                "trial": t.name,
                **t.flags,
                "seed": t.seed,
                "status": "diverged" if failed else "completed",
                "val_ppl": val,
                "best_val_ppl": val,
                "train_ppl": val,
                "step": 8,
                "wall_s": 1.5,
                "reason": "error: non-finite loss" if failed else "",
            }
        )
    return rows


def test_summary_ranks_configurations_and_counts_failed_seeds(tmp_path):
    sweep = plan(grid="cell=rnn,gru;lr=1,4", seeds=2)
    rows = fake_rows(sweep)
    groups = sweeps.group_rows(rows, sweep.trials)
    got = [(dict(g.config), g.failed) for g in groups]
    assert got == [  # seeds that failed put a configuration last
        ({"cell": "gru", "lr": "1"}, 0),
        ({"cell": "rnn", "lr": "1"}, 0),
        ({"cell": "gru", "lr": "4"}, 1),
        ({"cell": "rnn", "lr": "4"}, 1),
    ]
    assert groups[0].stat("val_ppl") == pytest.approx((10.5, math.sqrt(0.5)))
    assert groups[2].stat("val_ppl") == (2.5, None)
    md = sweeps.summary_markdown(sweep, groups, "runs/x")
    assert "| 1 | gru | 1 | 10.500 ± 0.707 |" in md and "| 2/2 | 0 |" in md
    assert "| 3 | gru | 4 | 2.500 |" in md and "| 1/2 | 1 |" in md
    assert "6 completed, 2 diverged" in md and "error: non-finite loss" in md
    text = sweeps.csv_text(rows, sweep.swept)
    assert text.splitlines()[0] == (
        "trial,cell,lr,seed,status,val_ppl,best_val_ppl,train_ppl,step,wall_s,reason"
    )
    assert sweeps.heatmap_axes(sweep.grid) == ("cell", "lr")
    assert sweeps.heatmap_axes(plan(grid="cell=rnn,gru;lr=1;epochs=1,2").grid) == ("cell", "epochs")
    assert sweeps.heatmap_axes(plan(grid="cell=rnn,gru;lr=1,2;epochs=1,2").grid) is None
    sweeps.plot_heatmap(groups, ("cell", "lr"), sweep.grid, tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").stat().st_size > 1000


def test_scatter_plot_of_a_random_search(tmp_path):
    sweep = plan(random_count=6, ranges="lr=log:0.1:10;cell=choice:gru,lstm")
    rows = [
        {**t.flags, "status": "completed", "val_ppl": 5.0 + i} for i, t in enumerate(sweep.trials)
    ]
    sweeps.plot_scatter(rows, sweep.ranges, tmp_path / "scatter.png")
    assert (tmp_path / "scatter.png").stat().st_size > 1000


# --- the launcher --------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--base=experiments/configs/nope.flags", "--grid=lr=1"], "base"),
        (["--grid=hidden_size=8,-1"], "grid"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, flag):
    out = run_sweep(*args, f"--sweep_dir={tmp_path / 'sweep'}", timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"error: --{flag}: ") and out.stderr.count("\n") == 1
    assert not (tmp_path / "sweep").exists()


def test_a_base_flagfile_the_trials_would_fail_on_is_refused_up_front(tmp_path):
    """The base's launcher flags, and a file that is not text, passed the sweep's
    checks and then failed every trial (or gave a traceback)."""
    base = tmp_path / "base.flags"
    cases = [
        (b"-cpu_devices=banana\n", [], "error: --base: .*--cpu_devices: expected auto or an"),
        (
            b"--cpu_devices=2\n",
            ["--grid=batch_size=16,15"],
            "error: --grid: trial_001_batch_size=15_seed=0: --batch_size: .* 2 devices do "
            "not split --batch_size 15",
        ),
        (b"\xff--lr=1\n", [], "error: --base: .* is not readable text"),
    ]
    for content, args, match in cases:
        base.write_bytes(content)
        args = args or ["--grid=lr=1"]
        out = run_sweep(f"--base={base}", *args, f"--sweep_dir={tmp_path / 's'}", timeout=60)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert re.match(match, out.stderr), out.stderr
    assert not (tmp_path / "s").exists()


def test_a_malformed_memory_budget_is_refused_before_any_trial(tmp_path):
    env = {**os.environ, "RNN_JAX_MEMORY_BUDGET": "8GB"}
    out = run_sweep("--grid=lr=1", f"--sweep_dir={tmp_path / 'sweep'}", timeout=60, env=env)
    assert out.returncode == 2, out.stderr
    assert out.stderr == (
        "error: RNN_JAX_MEMORY_BUDGET: expected a whole number of bytes >= 0, got '8GB'\n"
    )
    assert not (tmp_path / "sweep").exists()


def test_a_training_run_directory_is_refused(tmp_path):
    """A sweep into a run directory would write its trials and reports (curves.png
    over the run's) beside the run's files; a training run refuses a sweep directory
    alike (tests/test_train.py)."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text("{}\n")
    (run_dir / "curves.png").write_bytes(b"the run's curves")
    out = run_sweep("--grid=lr=1", f"--set={TINY}", f"--sweep_dir={run_dir}", timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: --sweep_dir: ") and "holds a training run" in out.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.json", "curves.png"]
    assert (run_dir / "curves.png").read_bytes() == b"the run's curves"


def test_dry_run_prints_the_commands_and_writes_nothing(tmp_path):
    sweep_dir = tmp_path / "sweep"
    out = run_sweep(
        "--base=experiments/configs/gru.flags",
        "--set=epochs=2",
        "--random=2",
        "--ranges=lr=log:0.1:10",
        "--seeds=2",
        f"--sweep_dir={sweep_dir}",
        "--dry_run",
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 4 and all(" -m experiments.train --flagfile=" in line for line in lines)
    assert re.search(
        rf"--seed=1 --workdir={re.escape(str(sweep_dir.resolve()))}/trial_001_lr=[\d.]+_seed=1$",
        lines[1],
    )
    assert "--epochs=2 --lr=" in lines[0] and not sweep_dir.exists()


def test_sweep_end_to_end_with_a_failure_a_resume_and_a_skip(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = [
        f"--sweep_dir={sweep_dir}",
        f"--set={TINY};grad_clip=0",
        "--grid=lr=1,1e30;optimizer=sgd",  # 2x1; lr=1e30 without clipping diverges
        "--parallel=2",
    ]
    out = run_sweep(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    ok, bad = (
        sweep_dir / f"trial_00{i}_lr={lr}_optimizer=sgd_seed=0"
        for i, lr in enumerate(["1", "1e30"])
    )
    rows = read_csv(sweep_dir / "results.csv")
    assert [r["trial"] for r in rows] == [ok.name, bad.name]
    assert rows[0]["status"] == "completed" and rows[0]["step"] == "4"
    assert float(rows[0]["best_val_ppl"]) <= float(rows[0]["val_ppl"]) < 28
    assert rows[1]["status"] == "diverged" and rows[1]["reason"].startswith("error: non-finite")
    for name in ("summary.md", "curves.png", "trials.json"):
        assert (sweep_dir / name).stat().st_size > 100, name
    summary = (sweep_dir / "summary.md").read_text()
    assert summary.index("| 1 | 1 | sgd |") < summary.index("| 2 | 1e30 | sgd |")
    trials = json.loads((sweep_dir / "trials.json").read_text())["trials"]
    assert trials[1]["flags"] == {"lr": "1e30", "optimizer": "sgd"}
    header = (ok / "log.txt").read_text().splitlines()[0]
    cores = len(os.sched_getaffinity(0))
    assert f"intra_op_parallelism_threads={max(1, cores // 2)}" in header
    assert f"RNN_JAX_CPU_CORES={max(1, cores // 2)}" in header
    # each of the two trials that run at once may count half the host memory as free
    budget = int(re.search(r"RNN_JAX_MEMORY_BUDGET=(\d+)", header).group(1))
    total = int(re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())[1])
    assert 0 < 2 * budget <= total * 1024  # half of what was free then
    assert f"and {memory.gib(budget)} of host memory each" in out.stdout

    # an interrupted trial: a checkpoint but no result.json (killed while sampling)
    (ok / "result.json").unlink()
    bad_log = (bad / "log.txt").read_text()
    out = run_sweep(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "skipped 1 (0 completed, 1 failed earlier" in out.stdout
    assert "to run 1 (1 resuming from a checkpoint)" in out.stdout
    assert "resumed from step 4" in (ok / "log.txt").read_text()
    assert (bad / "log.txt").read_text() == bad_log  # the diverged trial is not retried
    assert read_csv(sweep_dir / "results.csv")[0]["status"] == "completed"

    # everything done: nothing runs
    mtimes = [(d / "log.txt").stat().st_mtime_ns for d in (ok, bad)]
    out = run_sweep(*args)
    assert out.returncode == 0 and "skipped 2 (1 completed, 1 failed earlier" in out.stdout
    assert "to run 0" in out.stdout and "started" not in out.stdout
    assert [(d / "log.txt").stat().st_mtime_ns for d in (ok, bad)] == mtimes


def test_sigterm_stops_the_sweep_and_its_trials(tmp_path):
    """The sweep passes SIGTERM on to its running trials (here still starting up, so
    they just end; a training trial saves a checkpoint, see test_train) and exits 143."""
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.sweep", f"--sweep_dir={sweep_dir}"]
        + [f"--set={TINY}", "--grid=lr=1,2,4", "--parallel=2"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        while not any(line.startswith("started trial_001") for line in lines):
            lines.append(proc.stdout.readline())
            assert lines[-1], "".join(lines)
        proc.send_signal(signal.SIGTERM)
        out = "".join(lines) + proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 143, out
    assert "SIGTERM: stopping the running trials" in out
    rows = read_csv(sweep_dir / "results.csv")
    assert [r["status"] for r in rows] == ["interrupted", "interrupted", "pending"], out

    # the same directory with another definition is refused
    out = run_sweep(f"--sweep_dir={sweep_dir}", f"--set={TINY}", "--grid=lr=1,2", timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("error: --sweep_dir: ")
    assert 'grid.lr: ["1", "2", "4"] -> ["1", "2"]' in out.stderr
