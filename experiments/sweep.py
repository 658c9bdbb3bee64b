r"""Grid or random search over the flags of experiments.train, one process per trial.

    # 3 cells x 4 learning rates x 2 depths, 2 seeds each, 2 trials at a time
    python -m experiments.sweep --base=experiments/configs/gru.flags \
        --set="epochs=2;num_train=2048;batch_size=256" --seeds=2 --parallel=2 \
        --sweep_dir=runs/cells --grid="cell=rnn,gru,lstm;lr=0.5,1,2,4;num_layers=1,2"

    # 20 random configurations (reproducible: --sweep_seed), log-uniform learning rates
    python -m experiments.sweep --base=experiments/configs/gru.flags --random=20 \
        --ranges="lr=log:0.01:10;hidden_size=int:16:128;dropout=uniform:0:0.5" \
        --sweep_dir=runs/random

    # the trials and their commands, without running or writing anything
    python -m experiments.sweep --grid="lr=0.5,1,2" --dry_run

Every trial is ``python -m experiments.train --flagfile=BASE --SET... --SWEPT...
--seed=S --workdir=SWEEP_DIR/trial_NNN_name=value_..._seed=S`` with its output in
``log.txt`` beside its run files, ``--parallel`` at a time, each with
``cores // parallel`` threads (XLA_FLAGS, OMP/MKL/OPENBLAS_NUM_THREADS) and, with
--parallel above 1, ``1 / parallel`` of the host memory free when the sweep starts
(``RNN_JAX_MEMORY_BUDGET``, unless set already; fewer trials left to run than
--parallel share it among themselves): trials that fit alone but not together are
refused, exit 2, rather than killed by the OOM killer. The sweep
directory holds ``trials.json`` (the definition and every trial's command),
``results.csv``, ``summary.md``, ``curves.png`` and ``heatmap.png`` (a grid with two
dimensions of several values) or ``scatter.png`` (random search).

Rerunning the same command skips completed trials (result.json), resumes interrupted
ones from their checkpoints and leaves failed ones (diverged, crashed) as recorded
unless --retry_failed; a changed definition for an existing --sweep_dir is refused.
A failing trial is recorded with the last error line of its log and the sweep goes on;
the exit code is 0 once every trial has run, whatever their outcome. SIGTERM / Ctrl-C
stop the running trials (they save a checkpoint) and exit with 143 / 130. Bad input:
one line ``error: --flag: ...`` on stderr and exit code 2, before any trial starts.
See rnn_jax/sweeps.py for the --grid / --ranges / --set syntax.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from experiments.common import deferred_sigint

with deferred_sigint("interrupted (SIGINT) while starting; no trial was started"):
    from absl import app, flags

    from experiments.common import parse_cpu_devices, parse_flags_or_exit_2, resolve_cpu_devices
    from rnn_jax import files, memory, parallel, sweeps  # (imports JAX)
    from rnn_jax.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXIT_SIGNAL = {signal.SIGTERM: 143, signal.SIGINT: 130}
THREAD_VARS = ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
CORES_VAR = parallel.CORES_ENV  # a trial's share of the cores, for --cpu_devices=auto

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "base", "", "Flagfile of experiments.train every trial starts from; empty: train's defaults."
)
flags.DEFINE_string(
    "set", "", "Fixed overrides of every trial, 'name=value;name=value' (e.g. 'epochs=2')."
)
flags.DEFINE_string(
    "grid",
    None,
    "Grid search: 'name=v1,v2;name=v1,v2'; trials are the product (the last name fastest).",
)
flags.DEFINE_integer(
    "random", 0, "Random search: this many configurations sampled from --ranges (0: off)."
)
flags.DEFINE_string(
    "ranges",
    None,
    "Random search ranges: 'lr=log:0.01:10;dropout=uniform:0:0.5;hidden_size=int:16:128;"
    "cell=choice:gru,lstm'.",
)
flags.DEFINE_integer("sweep_seed", 0, "Seed of the random search's sampling.")
flags.DEFINE_integer("seeds", 1, "Seeds per configuration: --seed=0 .. N-1.")
flags.DEFINE_integer("parallel", 1, "Trials run at the same time.")
flags.DEFINE_integer(
    "threads_per_trial", 0, "CPU threads of each trial; 0: the cores divided by --parallel."
)
flags.DEFINE_string("sweep_dir", "runs/sweep", "Directory of the trials' run directories.")
flags.DEFINE_bool(
    "retry_failed", False, "Rerun trials that failed or diverged in an earlier run of the sweep."
)
flags.DEFINE_bool("dry_run", False, "Print the trials and their commands; run and write nothing.")


def main(argv):
    del argv  # positional arguments are refused by parse_flags_or_exit_2
    try:
        memory.budget()  # the trials' share of host memory, when set by hand
    except ValueError as e:
        fail(f"error: {e}")
    try:
        sweep = make_sweep()
        sweep_dir = Path(FLAGS.sweep_dir)
        sweeps.validate_trials(sweep, sweep_dir, launcher_check(sweep))
        commands = {t.name: command(sweep, t, sweep_dir) for t in sweep.trials}
        if FLAGS.dry_run:
            for t in sweep.trials:
                print(shlex.join(commands[t.name]))
            return
        with SweepLock(sweep_dir):
            check_or_write_trials(sweep, sweep_dir, commands)
            signum = run_sweep(sweep, sweep_dir, commands)
    except sweeps.SweepError as e:
        fail(f"error: {e}")
    sys.exit(EXIT_SIGNAL[signum] if signum else 0)


def fail(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(2)


def make_sweep() -> sweeps.Sweep:
    """The parsed and expanded sweep of the flags (SweepError on bad input)."""
    base_args = []
    if FLAGS.base:
        if not Path(FLAGS.base).is_file():
            raise sweeps.SweepError("base", f"no such flagfile: {FLAGS.base}")
        try:
            base_args = flags.FlagValues().read_flags_from_files(
                [f"--flagfile={FLAGS.base}"], force_gnu=True
            )
        except flags.Error as e:
            raise sweeps.SweepError("base", str(e)) from None
        except (UnicodeDecodeError, OSError) as e:  # (absl reads the file itself)
            raise sweeps.SweepError("base", f"{FLAGS.base} is not readable text ({e})") from None
    if FLAGS.parallel < 1:
        raise sweeps.SweepError("parallel", f"expected >= 1, got {FLAGS.parallel}")
    if FLAGS.threads_per_trial < 0:
        raise sweeps.SweepError(
            "threads_per_trial", f"expected >= 0, got {FLAGS.threads_per_trial}"
        )
    if not FLAGS.sweep_dir:
        raise sweeps.SweepError("sweep_dir", "expected a directory path, got ''")
    for path in (Path(FLAGS.sweep_dir), *Path(FLAGS.sweep_dir).parents):
        if path.exists() and not path.is_dir():
            raise sweeps.SweepError("sweep_dir", f"{path} exists and is not a directory")
    return sweeps.plan(
        grid=FLAGS.grid,
        random_count=FLAGS.random,
        ranges=FLAGS.ranges,
        fixed=FLAGS.set,
        seeds=FLAGS.seeds,
        sweep_seed=FLAGS.sweep_seed,
        base_args=base_args,
        base_name=FLAGS.base,
    )


def launcher_check(sweep: sweeps.Sweep):
    """The check of the base flagfile's ``--cpu_devices`` (a flag of the launcher, not
    of the run) for :func:`rnn_jax.sweeps.validate_trials`: a count that is not
    ``auto`` must split each configuration's batch, as the launcher requires."""
    given = [
        value
        for name, _, value in (a.lstrip("-").partition("=") for a in sweep.base_launcher)
        if name == "cpu_devices"
    ]
    if not given:
        return None
    value = given[-1]
    try:
        parse_cpu_devices(value)
    except ValueError as e:
        raise sweeps.SweepError("base", f"{FLAGS.base}: --cpu_devices: {e}") from None

    def check(config) -> None:
        try:
            resolve_cpu_devices(value, config.batch_size, config.data_parallel)
        except ValueError as e:
            raise ConfigError("batch_size", f"with {FLAGS.base}'s {e}") from None

    return check


def command(sweep: sweeps.Sweep, trial: sweeps.Trial, sweep_dir: Path) -> list[str]:
    """The trial's ``python -m experiments.train`` command line."""
    base = [f"--flagfile={Path(FLAGS.base).resolve()}"] if FLAGS.base else []
    run_dir = sweep_dir.resolve() / trial.name
    return [
        sys.executable,
        "-m",
        "experiments.train",
        *base,
        *sweeps.trial_args(sweep, trial, run_dir),
    ]


class SweepLock:
    """An exclusive lock on ``SWEEP_DIR/.lock``: one sweep process per directory."""

    def __init__(self, sweep_dir: Path):
        self.path = sweep_dir / ".lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise sweeps.SweepError(
                "sweep_dir", f"another sweep is running in {self.path.parent}"
            ) from None
        return self

    def __exit__(self, *exc):
        self.file.close()


def check_or_write_trials(sweep: sweeps.Sweep, sweep_dir: Path, commands: dict) -> None:
    """Writes trials.json, or refuses a sweep directory made by another definition."""
    path = sweep_dir / sweeps.TRIALS_FILE
    if not path.exists():  # a new sweep (run directories already there are resumed)
        content = json.dumps(sweeps.trials_json(sweep, commands), indent=2)
        files.write_atomic(path, content + "\n")
        return
    saved = sweeps.read_json(path)
    if saved is None or "definition" not in saved:
        raise sweeps.SweepError("sweep_dir", f"{path} is unreadable")
    changes = sweeps.sweep_changes(saved, sweep)
    if changes:
        raise sweeps.SweepError(
            "sweep_dir",
            f"{sweep_dir} holds a different sweep ({'; '.join(changes)}); rerun it with its "
            f"original flags or use another --sweep_dir",
        )


# --- running -------------------------------------------------------------------------


def child_env(parallel: int, threads: int, trials: int) -> tuple[dict[str, str], int]:
    """The trials' environment (thread counts, PYTHONPATH, each trial's share of the
    host memory) and threads per trial; ``trials``: how many are still to run."""
    env = dict(os.environ)
    at_once = min(parallel, trials)
    if at_once > 1 and not env.get(memory.BUDGET_ENV, "").strip():
        free = memory.host_available()  # (each trial's own check sees what is free then)
        if free is not None:
            env[memory.BUDGET_ENV] = str(free // at_once)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    k = threads or max(1, (cores or 1) // parallel)
    for var in THREAD_VARS[1:]:
        env[var] = str(k)
    if parallel > 1 or threads:
        env[CORES_VAR] = str(k)  # --cpu_devices=auto: at most one CPU device per core of it
        extra = f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={k}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {extra}".strip()
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # GPUs: share the memory
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env, k


@dataclasses.dataclass
class Attempt:
    """A running trial process and where its log of this attempt starts."""

    trial: sweeps.Trial
    proc: subprocess.Popen
    run_dir: Path
    log_offset: int
    started: float


def launch(trial: sweeps.Trial, cmd: list[str], run_dir: Path, env: dict[str, str]) -> Attempt:
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / sweeps.LOG_FILE
    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "a") as log:
        shown = (*THREAD_VARS, CORES_VAR, memory.BUDGET_ENV)
        threads = " ".join(f"{k}={shlex.quote(env[k])}" for k in shown if k in env)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"{sweeps.LOG_HEADER}{stamp} {threads} $ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=_sigterm_with_parent if sys.platform == "linux" else None,
        )
    return Attempt(trial, proc, run_dir, offset, time.monotonic())


def _sigterm_with_parent() -> None:
    """In the child: SIGTERM it (it checkpoints and exits) if the sweep dies, even by
    SIGKILL, so no orphan keeps writing into a run directory a rerun will use."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def conclude(attempt: Attempt) -> dict:
    """Records how the attempt ended in the trial's status file; returns the record."""
    rc = attempt.proc.returncode
    with open(attempt.run_dir / sweeps.LOG_FILE, errors="replace") as log:
        log.seek(attempt.log_offset)
        text = log.read()
    reason = "" if rc == 0 else sweeps.failure_reason(text, rc)
    status = sweeps.outcome(rc, reason)
    if status == "completed" and not (attempt.run_dir / "result.json").is_file():
        status, reason = "failed", "exit code 0 but no result.json"
    record = {
        "status": status,
        "exit_code": rc,
        "reason": reason,
        "elapsed_s": round(time.monotonic() - attempt.started, 1),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    files.write_atomic(attempt.run_dir / sweeps.STATUS_FILE, json.dumps(record, indent=2) + "\n")
    return record


class StopOnSignal:
    """SIGTERM / SIGINT: start no more trials and pass SIGTERM to the running ones
    (they save a checkpoint and exit)."""

    def __init__(self, running: list[Attempt]):
        self.running, self.signum, self._previous = running, None, {}

    def __enter__(self):
        for sig in EXIT_SIGNAL:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum  # the loop announces it: no printing inside a handler
        for attempt in self.running:
            if attempt.proc.poll() is None:
                attempt.proc.send_signal(signal.SIGTERM)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_sweep(sweep: sweeps.Sweep, sweep_dir: Path, commands: dict) -> int | None:
    """Runs the trials still to run; writes the reports; returns a signal that stopped it."""
    todo = pick_trials(sweep, sweep_dir)
    env, threads = child_env(FLAGS.parallel, FLAGS.threads_per_trial, len(todo))
    if todo:
        share = ""
        if min(FLAGS.parallel, len(todo)) > 1 and env.get(memory.BUDGET_ENV, "").strip():
            share = f" and {memory.gib(int(env[memory.BUDGET_ENV]))} of host memory"
        print(
            f"{FLAGS.parallel} at a time with {sweeps.plural(threads, 'thread')}{share} each",
            flush=True,
        )
    running: list[Attempt] = []
    done, announced = 0, False
    with StopOnSignal(running) as stop:
        while (todo and stop.signum is None) or running:
            while todo and len(running) < FLAGS.parallel and stop.signum is None:
                trial = todo.pop(0)
                running.append(launch(trial, commands[trial.name], sweep_dir / trial.name, env))
                print(f"started {trial.name}", flush=True)
            time.sleep(0.2)
            if stop.signum is not None and not announced:
                name = signal.Signals(stop.signum).name
                print(f"{name}: stopping the running trials", flush=True)
                announced = True
            for attempt in [a for a in running if a.proc.poll() is not None]:
                running.remove(attempt)
                done += 1
                record = conclude(attempt)
                print_outcome(attempt, record, done, done + len(running) + len(todo))
                write_reports(sweep, sweep_dir, plots=False)
    summary = write_reports(sweep, sweep_dir, done > 0 or not (sweep_dir / "curves.png").exists())
    reports = sorted(p.name for p in sweep_dir.iterdir() if p.suffix in (".csv", ".md", ".png"))
    print(f"{summary}\n{sweep_dir}: {', '.join(reports)}", flush=True)
    return stop.signum


def pick_trials(sweep: sweeps.Sweep, sweep_dir: Path) -> list:
    """The trials to run now; prints what is skipped and why."""
    completed, failed, todo, resuming = 0, 0, [], 0
    for trial in sweep.trials:
        run_dir = sweep_dir / trial.name
        status = sweeps.trial_state(run_dir)["status"]
        if status == "completed":
            completed += 1
        elif status in sweeps.FAILED and not FLAGS.retry_failed:
            failed += 1
        else:
            todo.append(trial)
            resuming += sweeps.has_checkpoint(run_dir)
    configs = len({t.config for t in sweep.trials})
    print(
        f"{sweep_dir}: {sweeps.plural(len(sweep.trials), 'trial')} "
        f"({sweeps.plural(configs, 'configuration')} x "
        f"{sweeps.plural(sweep.definition['seeds'], 'seed')}); skipped {completed + failed} "
        f"({completed} completed, {failed} failed earlier"
        f"{'; --retry_failed reruns them' if failed else ''}); "
        f"to run {len(todo)} ({resuming} resuming from a checkpoint)",
        flush=True,
    )
    return todo


def print_outcome(attempt: Attempt, record: dict, done: int, total: int) -> None:
    line = (
        f"[{done}/{total}] {attempt.trial.name}: {record['status']} in {record['elapsed_s']:.0f} s"
    )
    if record["status"] == "completed":
        result = sweeps.read_json(attempt.run_dir / "result.json") or {}
        line += f", val ppl {result.get('val_ppl', float('nan')):.3f}"
    elif record["reason"]:
        line += f" (exit code {record['exit_code']}): {record['reason']}"
    print(line, flush=True)


def write_reports(sweep: sweeps.Sweep, sweep_dir: Path, plots: bool) -> str:
    """Writes results.csv and summary.md (and with ``plots`` the plots) from the trials'
    run directories; returns the summary."""
    rows = [sweeps.result_row(sweep, t, sweep_dir / t.name) for t in sweep.trials]
    groups = sweeps.group_rows(rows, sweep.trials)
    files.write_atomic(sweep_dir / "results.csv", sweeps.csv_text(rows, sweep.swept))
    summary = sweeps.summary_markdown(sweep, groups, str(sweep_dir))
    files.write_atomic(sweep_dir / "summary.md", summary)
    if plots:
        write_plots(sweep, sweep_dir, rows, groups)
    return summary


def write_plots(sweep: sweeps.Sweep, sweep_dir: Path, rows: list[dict], groups: list) -> None:
    """curves.png, and heatmap.png (two grid dimensions) or scatter.png (random search)."""
    curves = {t.name: sweeps.read_metrics(sweep_dir / t.name) for t in sweep.trials}
    sweeps.plot_curves(groups, curves, sweep_dir / "curves.png")
    axes = sweeps.heatmap_axes(sweep.grid)
    if axes:
        sweeps.plot_heatmap(groups, axes, sweep.grid, sweep_dir / "heatmap.png")
    if sweep.ranges and any(r["status"] == "completed" for r in rows):
        sweeps.plot_scatter(rows, sweep.ranges, sweep_dir / "scatter.png")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit_2)
