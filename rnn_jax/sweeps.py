"""Hyperparameter sweeps over :class:`~rnn_jax.config.TrainConfig`: the pure parts.

``experiments/sweep.py`` is the launcher; this module holds what it can test without
processes: parsing of the ``--grid`` / ``--ranges`` / ``--set`` syntax, expansion into
trials (grid product or seeded random samples, times seeds), the up-front validation
of every trial's configuration, the bookkeeping files of a sweep directory and its
reports (``results.csv``, ``summary.md``, plots).

Syntax (values are the text passed on the command line of ``experiments.train``)::

    grid    cell=rnn,gru,lstm;lr=0.5,1,2,4     the product, the last name fastest
    ranges  lr=log:0.01:10                     log-uniform in [0.01, 10]
            dropout=uniform:0:0.5              uniform in [0, 0.5]
            hidden_size=int:16:128             an integer in [16, 128]
            cell=choice:gru,lstm               one of the values
    set     epochs=2;num_train=500             the same for every trial

``log`` and ``uniform`` on an integer flag give rounded integers; sampled floats keep
4 significant digits, so a trial's name shows exactly the value it runs with.

Every name must be a field of ``TrainConfig`` other than ``seed`` (``--seeds``) and
``workdir`` (the trial's directory); ``none`` leaves an optional flag (``pin_reset``,
``pin_update``) unset. Errors are :class:`SweepError`, which names the sweep flag at
fault.

A sweep directory::

    trials.json          the definition (compared on reruns) and every trial's command
    results.csv          one row per trial: swept flags, seed, status, final and best
                         val ppl, final train ppl, step, wall_s, reason
    summary.md           mean ± std over seeds per configuration, best first
    curves.png           validation perplexity per configuration (seeds faint)
    heatmap.png          grid with exactly two dimensions of several values
    scatter.png          random search: final val ppl against each sampled flag
    trial_000_lr=1_seed=0/   a run directory of experiments.train (config.json,
                         metrics.jsonl, checkpoints/, result.json, ...) plus log.txt
                         (the trial's output, every attempt) and sweep_status.json
                         (how the last attempt ended: status, exit_code, reason)
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import functools
import io
import itertools
import json
import math
import os
import random
import re
import signal
import statistics
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from rnn_jax.config import RUN_FILES, SWEEP_FILE, ConfigError, TrainConfig, validate

# Flags of experiments.train's launcher that are not TrainConfig fields but may sit in a
# base flagfile: every trial's train reads that file itself (and checks them there).
LAUNCHER_FLAGS = ("cpu_devices", "tune_malloc", "autotune_cache", "autotune_refresh")
LAUNCHER_BOOLS = ("tune_malloc", "autotune_refresh")
_BOOL_TEXTS = ("true", "t", "1", "false", "f", "0")  # absl's spellings, any case

RESERVED = {
    "seed": "the trials' seeds are 0 .. N-1 of --seeds=N",
    "workdir": "every trial runs in its own directory under --sweep_dir",
}
RANGE_KINDS = ("log", "uniform", "int", "choice")
MAX_TRIALS = 100_000  # a sweep's trials are planned (and written to trials.json) up front
TRIALS_FILE = SWEEP_FILE  # (a training run refuses a directory that holds one)
STATUS_FILE = "sweep_status.json"  # in a trial's run directory: how its last attempt ended
LOG_FILE = "log.txt"
LOG_HEADER = "=== "  # starts the line the sweep writes into log.txt before each attempt
FAILED = ("failed", "diverged")
METRIC_COLUMNS = ("val_ppl", "best_val_ppl", "train_ppl", "step", "wall_s")


class SweepError(ValueError):
    """A bad sweep definition; ``flag`` names the sweep's command-line flag."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"--{flag}: {message}")
        self.flag = flag


# --- flag types ----------------------------------------------------------------------


class FieldType(NamedTuple):
    kind: type  # int, float, bool or str
    optional: bool  # None allowed (written "none")


@functools.cache
def field_types() -> dict[str, FieldType]:
    """``TrainConfig`` field -> its type, from the dataclass annotations."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in dataclasses.fields(TrainConfig):
        hint, optional = hints[f.name], False
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            args = typing.get_args(hint)
            optional = type(None) in args
            hint = next(a for a in args if a is not type(None))
        out[f.name] = FieldType(hint, optional)
    return out


def is_none(name: str, text: str) -> bool:
    """``text`` leaves an optional flag unset ("none")."""
    return field_types()[name].optional and text.strip().lower() == "none"


def convert(name: str, text: str) -> Any:
    """The value absl would give flag ``name`` for ``text``.

    Raises:
      ValueError: ``text`` is not of the flag's type.
    """
    kind, _ = field_types()[name]
    if is_none(name, text):
        return None
    if kind is bool:
        lower = text.lower()
        if lower in _BOOL_TEXTS:
            return lower in ("true", "t", "1")
        raise ValueError(f"expected true or false, got {text!r}")
    try:
        if kind is int:
            # absl's reading: only a lower-case 0x / 0o prefix sets the base
            base = {"0x": 16, "0o": 8}.get(text[:2], 10) if len(text) > 2 else 10
            return int(text, base)
        return kind(text)
    except ValueError:
        article = "an" if kind is int else "a"
        raise ValueError(f"expected {article} {kind.__name__}, got {text!r}") from None


def check_name(name: str, flag: str) -> None:
    if name in RESERVED:
        raise SweepError(flag, f"{name} cannot be set: {RESERVED[name]}")
    if name in LAUNCHER_FLAGS:
        raise SweepError(
            flag,
            f"{name} is a flag of experiments.train's launcher, not of the run (TrainConfig), "
            f"so a sweep cannot vary or set it; put it in the --base flagfile, which every "
            f"trial reads",
        )
    if name not in field_types():
        close = difflib.get_close_matches(name, list(field_types()), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise SweepError(
            flag, f"unknown flag {name!r}: not a flag of experiments.train (TrainConfig){hint}"
        )


def check_value(name: str, text: str, flag: str) -> None:
    try:
        convert(name, text)
    except ValueError as e:
        raise SweepError(flag, f"{name}: {e}") from None


# --- parsing -------------------------------------------------------------------------


def parse_pairs(text: str, flag: str) -> dict[str, str]:
    """``"a=1;b=2"`` -> ``{"a": "1", "b": "2"}`` (names checked, in order)."""
    pairs: dict[str, str] = {}
    for item in text.split(";"):
        if not item.strip():
            continue
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or not name:
            raise SweepError(flag, f"expected name=value, got {item.strip()!r}")
        check_name(name, flag)
        if name in pairs:
            raise SweepError(flag, f"{name} is given twice")
        pairs[name] = value.strip()
    return pairs


def parse_set(text: str) -> dict[str, str]:
    """``--set``: fixed overrides for every trial."""
    fixed = parse_pairs(text or "", "set")
    for name, value in fixed.items():
        check_value(name, value, "set")
    return fixed


def parse_grid(text: str) -> dict[str, list[str]]:
    """``--grid``: ``"cell=gru,lstm;lr=1,2"`` -> ``{"cell": ["gru", "lstm"], ...}``."""
    grid = {}
    for name, values in parse_pairs(text or "", "grid").items():
        items = [v.strip() for v in values.split(",")]
        if "" in items:
            raise SweepError("grid", f"{name}: empty value in {values!r}")
        for v in items:
            check_value(name, v, "grid")
        seen: dict[Any, str] = {}
        for v in items:  # the same value in two spellings (1 and 1.0) ran twice
            key = convert(name, v)
            if key in seen:
                same = "" if seen[key] == v else f" ({seen[key]!r} and {v!r} are the same)"
                raise SweepError("grid", f"{name}: a value is repeated in {values!r}{same}")
            seen[key] = v
        grid[name] = items
    if not grid:
        raise SweepError("grid", "empty grid; expected e.g. 'cell=gru,lstm;lr=0.5,1'")
    return grid


@dataclasses.dataclass(frozen=True)
class Range:
    """One ``--ranges`` entry: ``kind`` in :data:`RANGE_KINDS`."""

    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[str, ...] = ()


def parse_ranges(text: str) -> dict[str, Range]:
    """``--ranges``: ``"lr=log:0.01:10;cell=choice:gru,lstm"`` -> name -> :class:`Range`."""
    ranges = {
        name: parse_range(name, spec) for name, spec in parse_pairs(text or "", "ranges").items()
    }
    if not ranges:
        raise SweepError("ranges", "no ranges; expected e.g. 'lr=log:0.01:10;cell=choice:gru,lstm'")
    return ranges


def parse_range(name: str, spec: str) -> Range:
    kind, _, rest = spec.partition(":")
    if kind not in RANGE_KINDS:
        raise SweepError(
            "ranges",
            f"{name}: expected KIND:... with KIND one of {', '.join(RANGE_KINDS)}, got {spec!r}",
        )
    if kind == "choice":
        choices = tuple(v.strip() for v in rest.split(","))
        if "" in choices:
            raise SweepError("ranges", f"{name}: empty choice in {spec!r}")
        for v in choices:
            check_value(name, v, "ranges")
        return Range(kind, choices=choices)
    field = field_types()[name].kind
    if field not in (int, float):
        raise SweepError("ranges", f"{name}: {kind} needs a numeric flag; use choice:A,B")
    bounds = rest.split(":")
    if len(bounds) != 2:
        raise SweepError("ranges", f"{name}: expected {kind}:LOW:HIGH, got {spec!r}")
    as_int = field is int or kind == "int"
    try:
        low, high = (int(b) if as_int else float(b) for b in bounds)
    except ValueError:
        what = "integer" if as_int else "number"
        raise SweepError("ranges", f"{name}: {kind} bounds must be {what}s, got {spec!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise SweepError("ranges", f"{name}: expected finite bounds, got {spec!r}")
    if not (low <= high if kind == "int" else low < high) or (kind == "log" and low <= 0):
        need = (
            "0 < LOW < HIGH" if kind == "log" else "LOW <= HIGH" if kind == "int" else "LOW < HIGH"
        )
        raise SweepError("ranges", f"{name}: expected {need}, got {spec!r}")
    return Range(kind, low, high)


def parse_flag_args(args: Sequence[str], where: str) -> dict[str, str]:
    """A flagfile's expanded arguments (``--name=value``, ``--name``, ``--noname``) ->
    name -> value text. ``seed`` and ``workdir`` are dropped: the sweep sets them;
    :data:`LAUNCHER_FLAGS` too: they stay in the flagfile, which each trial reads."""
    out = {}
    for arg in args:
        body = arg.lstrip("-")
        name, eq, value = body.partition("=")
        if not arg.startswith("-") or not name:
            raise SweepError("base", f"{where}: expected --name=value, got {arg!r}")
        if not eq:  # a boolean: --name or --noname
            negated = name.startswith("no") and name[2:] in field_types()
            if negated and field_types()[name[2:]].kind is bool:
                name, value = name[2:], "false"
            else:
                value = "true"
        if name in LAUNCHER_FLAGS or (name.startswith("no") and name[2:] in LAUNCHER_FLAGS):
            if name in LAUNCHER_BOOLS and value.lower() not in _BOOL_TEXTS:
                raise SweepError(
                    "base", f"{where}: --{name}: expected true or false, got {value!r}"
                )
            continue  # train's own flags: the trials read them from the flagfile
        if name not in field_types():
            raise SweepError("base", f"{where}: unknown flag --{name} (not a TrainConfig field)")
        if is_none(name, value):  # (absl reads the flagfile itself: "none" is no float)
            raise SweepError(
                "base",
                f"{where}: --{name}={value}: a flagfile leaves a flag unset by leaving it out "
                f"(none is a sweep's --grid/--set spelling)",
            )
        try:
            convert(name, value)
        except ValueError as e:
            raise SweepError("base", f"{where}: --{name}: {e}") from None
        if name not in RESERVED:
            out[name] = value
    return out


# --- expansion -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trial:
    """One training run of the sweep: the swept flags' values and a seed."""

    index: int
    name: str
    flags: dict[str, str]
    seed: int

    @property
    def config(self) -> tuple[tuple[str, str], ...]:
        """The configuration (seeds of one configuration share it)."""
        return tuple(self.flags.items())


def expand_grid(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination, in order: the first name slowest, the last fastest."""
    names = list(grid)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*grid.values())]


def sample_value(rng: random.Random, name: str, r: Range) -> str:
    """One value of ``r`` for flag ``name``, as command-line text."""
    if r.kind == "choice":
        return rng.choice(r.choices)
    if r.kind == "int":
        return str(rng.randint(int(r.low), int(r.high)))
    if r.kind == "log":
        x = math.exp(rng.uniform(math.log(r.low), math.log(r.high)))
    else:
        x = rng.uniform(r.low, r.high)
    if field_types()[name].kind is int:
        return str(min(max(round(x), int(r.low)), int(r.high)))
    text = f"{x:.4g}"
    return text if r.low <= float(text) <= r.high else repr(x)


def sample_random(ranges: dict[str, Range], count: int, sweep_seed: int) -> list[dict[str, str]]:
    """``count`` distinct configurations drawn from ``ranges`` (fewer when the ranges
    hold fewer), reproducibly from ``sweep_seed``; names are drawn in the given order."""
    rng = random.Random(sweep_seed)
    configs: list[dict[str, str]] = []
    for _ in range(100 * count):
        if len(configs) == count:
            break
        config = {name: sample_value(rng, name, r) for name, r in ranges.items()}
        if config not in configs:
            configs.append(config)
    return configs


def _name_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text)[:40]


MAX_NAME = 255  # characters (ASCII: bytes) of a trial's folder name, file systems' limit


def trial_name(index: int, flags: dict[str, str], seed: int, width: int = 3) -> str:
    """``trial_003_cell=gru_lr=2_seed=0``: readable, unique through the index. The
    flags' part is cut to keep the name within :data:`MAX_NAME` characters (ending
    ``..``); the folder's ``log.txt`` and ``config.json`` say every value."""
    head, tail = f"trial_{index:0{width}d}", f"seed={seed}"
    middle = "_".join(f"{name}={_name_part(value)}" for name, value in flags.items())
    room = MAX_NAME - len(head) - len(tail) - 2
    if len(middle) > room:
        middle = middle[: room - 2] + ".."
    return "_".join(part for part in (head, middle, tail) if part)


def make_trials(configs: Sequence[dict[str, str]], seeds: int) -> list[Trial]:
    """Configurations x seeds 0 .. seeds-1, the seeds of a configuration together."""
    pairs = [(c, s) for c in configs for s in range(seeds)]
    width = max(3, len(str(len(pairs) - 1)))
    return [Trial(i, trial_name(i, c, s, width), dict(c), s) for i, (c, s) in enumerate(pairs)]


# --- the plan ------------------------------------------------------------------------


@dataclasses.dataclass
class Sweep:
    """What a sweep runs: base flags, fixed overrides, the swept flags and the trials."""

    definition: dict[str, Any]  # compared with trials.json when a sweep directory is reused
    base: dict[str, str]
    fixed: dict[str, str]
    swept: list[str]
    trials: list[Trial]
    grid: dict[str, list[str]] | None = None
    ranges: dict[str, Range] | None = None
    base_launcher: list[str] = dataclasses.field(default_factory=list)  # e.g. --cpu_devices=2

    @property
    def source(self) -> str:
        """The flag that defines the swept values: grid or ranges."""
        return "grid" if self.grid is not None else "ranges"


def plan(
    *,
    grid: str | None,
    random_count: int,
    ranges: str | None,
    fixed: str,
    seeds: int,
    sweep_seed: int,
    base_args: Sequence[str] = (),
    base_name: str = "",
) -> Sweep:
    """Parses and expands a sweep definition (flag texts as given).

    Raises:
      SweepError: naming the flag at fault.
    """
    _check_mode(grid, random_count, ranges, seeds)
    base = parse_flag_args(base_args, base_name)
    fixed_flags = parse_set(fixed)
    definition: dict[str, Any] = {"base_flags": base, "set": fixed_flags, "seeds": seeds}
    if grid is not None:
        parsed_grid, parsed_ranges = parse_grid(grid), None
        _check_count(math.prod(len(values) for values in parsed_grid.values()), seeds, "grid")
        configs = expand_grid(parsed_grid)
        definition.update(mode="grid", grid=parsed_grid)
    else:
        parsed_grid, parsed_ranges = None, parse_ranges(ranges or "")
        configs = sample_random(parsed_ranges, random_count, sweep_seed)
        definition.update(
            mode="random",
            ranges={k: dataclasses.asdict(r) for k, r in parsed_ranges.items()},
            random=random_count,
            sweep_seed=sweep_seed,
        )
    swept = list(parsed_grid or parsed_ranges)
    both = [name for name in swept if name in fixed_flags]
    if both:
        raise SweepError("set", f"{', '.join(both)} also swept by --{'grid' if grid else 'ranges'}")
    trials = make_trials(configs, seeds)
    launcher = [a for a in base_args if a.lstrip("-").partition("=")[0] in LAUNCHER_FLAGS]
    sweep = Sweep(
        definition, base, fixed_flags, swept, trials, parsed_grid, parsed_ranges, launcher
    )
    _check_unset(sweep)
    return sweep


def _check_mode(grid: str | None, random_count: int, ranges: str | None, seeds: int) -> None:
    if grid is not None and random_count:
        raise SweepError("grid", "give either --grid or --random (with --ranges), not both")
    if grid is None and not random_count:
        raise SweepError("grid", "nothing to sweep: give --grid, or --random=N with --ranges")
    if random_count < 0:
        raise SweepError("random", f"expected a number of trials >= 1, got {random_count}")
    if random_count > MAX_TRIALS:
        raise SweepError("random", f"expected at most {MAX_TRIALS} trials, got {random_count}")
    if random_count and ranges is None:
        raise SweepError("ranges", "--random needs --ranges, e.g. 'lr=log:0.01:10'")
    if ranges is not None and not random_count:
        raise SweepError("random", "--ranges needs --random=N (the number of configurations)")
    if seeds < 1:
        raise SweepError("seeds", f"expected >= 1, got {seeds}")
    _check_count(random_count, seeds, "random")


def _check_count(configs: int, seeds: int, source: str) -> None:
    """Refuses more than :data:`MAX_TRIALS` trials (naming ``source``, the flag that
    sets the configurations, where they alone are too many; else ``--seeds``), before
    any is planned."""
    if configs * seeds > MAX_TRIALS:
        raise SweepError(
            "seeds" if configs <= MAX_TRIALS else source,
            f"{configs:,} configuration(s) x {seeds:,} seed(s) = {configs * seeds:,} trials; "
            f"expected at most {MAX_TRIALS:,}",
        )


def _check_unset(sweep: Sweep) -> None:
    """``none`` leaves an optional flag unset, so nothing earlier may set it."""
    for source, values, earlier in (
        ("set", sweep.fixed.items(), sweep.base),
        (sweep.source, _all_values(sweep), {**sweep.base, **sweep.fixed}),
    ):
        for name, text in values:
            if is_none(name, text) and name in earlier:
                raise SweepError(
                    source, f"{name}=none cannot unset the value the base or --set gives"
                )


def _all_values(sweep: Sweep) -> Iterable[tuple[str, str]]:
    for trial in sweep.trials:
        yield from trial.flags.items()


def trial_args(sweep: Sweep, trial: Trial, run_dir: str | os.PathLike) -> list[str]:
    """The flags of ``experiments.train`` after ``--flagfile=BASE``: fixed, swept, seed
    and workdir (later flags win in absl)."""
    flags = {**sweep.fixed, **trial.flags}
    args = [f"--{k}={v}" for k, v in flags.items() if not is_none(k, v)]
    return [*args, f"--seed={trial.seed}", f"--workdir={run_dir}"]


def trial_config(sweep: Sweep, trial: Trial, run_dir: str | os.PathLike) -> TrainConfig:
    """The ``TrainConfig`` the trial's process will build from its flags."""
    flags = {**sweep.base, **sweep.fixed, **trial.flags}
    values = {name: convert(name, text) for name, text in flags.items()}
    return TrainConfig(**{**values, "seed": trial.seed, "workdir": str(run_dir)})


def validate_trials(
    sweep: Sweep,
    sweep_dir: str | os.PathLike,
    check: Callable[[TrainConfig], None] | None = None,
) -> None:
    """Refuses a ``sweep_dir`` that holds a training run, and runs ``TrainConfig``
    validation on every configuration (its first seed), then ``check`` (the
    launcher's own rules, raising ConfigError), if given.

    Raises:
      SweepError: naming --sweep_dir, or --grid/--ranges, --set or --base (whichever
        sets the bad flag).
    """
    held = [Path(sweep_dir) / name for name in RUN_FILES if (Path(sweep_dir) / name).exists()]
    if held:
        raise SweepError(
            "sweep_dir",
            f"{sweep_dir} holds a training run ({held[0]}), not a sweep; use another "
            f"--sweep_dir (its trials would be written beside that run's files)",
        )
    for trial in sweep.trials:
        if trial.seed != 0:
            continue
        try:
            config = trial_config(sweep, trial, Path(sweep_dir) / trial.name)
            validate(config)
            if check is not None:
                check(config)
        except ConfigError as e:
            raise SweepError(_source(sweep, trial, e.flag), f"{trial.name}: {e}") from None


def _source(sweep: Sweep, trial: Trial, name: str) -> str:
    """The sweep flag that gives flag ``name`` its value for ``trial``."""
    if name in trial.flags:
        return sweep.source
    if name in sweep.fixed:
        return "set"
    return "base" if name in sweep.base else sweep.source


def definition_changes(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """``"key: saved -> current"`` for every part of the definition that differs
    (nested keys joined with dots)."""
    current = json.loads(json.dumps(current))
    if isinstance(saved, dict) and isinstance(current, dict):
        return [
            change
            for k in sorted(set(saved) | set(current))
            for change in definition_changes(saved.get(k), current.get(k), f"{prefix}{k}.")
        ]
    if saved == current:
        return []
    return [f"{prefix.rstrip('.')}: {_short(saved)} -> {_short(current)}"]


def sweep_changes(saved: dict[str, Any], sweep: Sweep) -> list[str]:
    """What differs between a sweep directory's ``trials.json`` (``saved``) and
    ``sweep``: :func:`definition_changes`, then the trials' names, which the order of
    the swept flags sets (and, for ``--ranges``, the values drawn), though the
    definition compares them as a set."""
    changes = definition_changes(saved.get("definition"), sweep.definition)
    if changes:
        return changes
    names = [t.get("name") for t in saved.get("trials", []) if isinstance(t, dict)]
    for old, new in zip(names, (t.name for t in sweep.trials), strict=False):
        if old != new:
            return [f"trial names: {old} -> {new} (the order of the swept flags)"]
    return []


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def trials_json(sweep: Sweep, commands: dict[str, list[str]]) -> dict[str, Any]:
    """The content of ``trials.json``."""
    return {
        "definition": sweep.definition,
        "swept": sweep.swept,
        "trials": [
            {**dataclasses.asdict(t), "command": commands.get(t.name, [])} for t in sweep.trials
        ],
    }


# --- trial outcomes ------------------------------------------------------------------


def failure_reason(log_text: str, exit_code: int) -> str:
    """The last ``error:`` line of a trial's log, else the last exception line, else
    the exit code (and the signal that killed it)."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(LOG_HEADER)]
    for line in reversed(lines):
        if line.lower().startswith("error:"):
            return line[:300]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", line):
            return line[:300]
    if exit_code < 0:
        try:
            return f"killed by {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"killed by signal {-exit_code}"
    return f"exit code {exit_code}" + (f": {lines[-1][:300]}" if lines else "")


def outcome(exit_code: int, reason: str) -> str:
    """The status of a finished attempt (``completed`` needs result.json as well)."""
    if exit_code == 0:
        return "completed"
    if exit_code in (130, 143, -signal.SIGINT, -signal.SIGTERM):
        return "interrupted"
    if exit_code == 1 and "non-finite" in reason:
        return "diverged"
    return "failed"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (lines cut by a kill are skipped)."""
    records = []
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def trial_state(run_dir: Path) -> dict[str, Any]:
    """``{"status", "reason", "exit_code"}``: completed (result.json), else the last
    attempt's record, else pending."""
    if (run_dir / "result.json").is_file():
        return {"status": "completed", "reason": "", "exit_code": 0}
    saved = read_json(run_dir / STATUS_FILE)
    if saved and saved.get("status") != "completed":
        return {k: saved.get(k, "") for k in ("status", "reason", "exit_code")}
    return {"status": "pending", "reason": "", "exit_code": ""}


def has_checkpoint(run_dir: Path) -> bool:
    ckpt = run_dir / "checkpoints"
    return ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())


def result_row(sweep: Sweep, trial: Trial, run_dir: Path) -> dict[str, Any]:
    """One row of results.csv: numbers of result.json when completed, else of the last
    evaluation in metrics.jsonl (if any)."""
    state = trial_state(run_dir)
    metrics = read_metrics(run_dir)
    final = read_json(run_dir / "result.json") or (metrics[-1] if metrics else {})
    vals = [m["val_ppl"] for m in metrics if isinstance(m.get("val_ppl"), (int, float))]
    return {
        "trial": trial.name,
        **{name: trial.flags[name] for name in sweep.swept},
        "seed": trial.seed,
        "status": state["status"],
        "val_ppl": final.get("val_ppl"),
        "best_val_ppl": min(vals) if vals else None,
        "train_ppl": final.get("train_ppl"),
        "step": final.get("step"),
        "wall_s": final.get("wall_s"),
        "reason": state["reason"],
    }


# --- reports -------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def csv_text(rows: Sequence[dict[str, Any]], swept: Sequence[str]) -> str:
    columns = ["trial", *swept, "seed", "status", *METRIC_COLUMNS, "reason"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return out.getvalue()


@dataclasses.dataclass
class Group:
    """The seeds of one configuration, summarised over its completed trials."""

    config: tuple[tuple[str, str], ...]
    rows: list[dict[str, Any]]

    @property
    def completed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "completed"]

    @property
    def failed(self) -> int:
        return sum(r["status"] in FAILED for r in self.rows)

    def stat(self, key: str) -> tuple[float, float | None] | None:
        """(mean, std or None for one seed) of ``key`` over completed seeds."""
        values = [float(r[key]) for r in self.completed if r.get(key) is not None]
        if not values:
            return None
        if not all(math.isfinite(v) for v in values):
            return math.inf, None
        std = statistics.stdev(values) if len(values) > 1 else None
        return statistics.fmean(values), std

    def sort_key(self) -> tuple[bool, bool, float]:
        """Configurations with completed seeds first, those with failed seeds after the
        others, then by mean final validation perplexity."""
        stat = self.stat("val_ppl")
        if not stat or math.isnan(stat[0]):
            return True, True, math.inf
        return False, self.failed > 0, stat[0]


def group_rows(rows: Sequence[dict[str, Any]], trials: Sequence[Trial]) -> list[Group]:
    """Rows grouped by configuration, best mean final validation perplexity first."""
    groups: dict[tuple, Group] = {}
    for row, trial in zip(rows, trials, strict=True):
        groups.setdefault(trial.config, Group(trial.config, [])).rows.append(row)
    return sorted(groups.values(), key=Group.sort_key)


def mean_std(stat: tuple[float, float | None] | None, digits: int = 3) -> str:
    if stat is None:
        return "—"
    mean, std = stat
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary_markdown(sweep: Sweep, groups: Sequence[Group], title: str) -> str:
    """Mean ± std over seeds per configuration, best first, with failed seeds counted."""
    rows = [r for g in groups for r in g.rows]
    lines = _summary_header(sweep, groups, rows, title)
    lines += [_summary_row(rank, g) for rank, g in enumerate(groups, 1)]
    problems = [r for r in rows if r["status"] != "completed"]
    if problems:
        lines += ["", "Not completed:", ""]
        lines += [
            f"- `{r['trial']}`: {r['status']}" + (f": {r['reason']}" if r["reason"] else "")
            for r in problems
        ]
    return "\n".join(lines) + "\n"


def _summary_header(sweep: Sweep, groups, rows, title: str) -> list[str]:
    statuses = [r["status"] for r in rows]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
    size = (
        f"{plural(len(groups), 'configuration')} x {plural(sweep.definition['seeds'], 'seed')} "
        f"= {plural(len(rows), 'trial')}"
    )
    columns = [*sweep.swept, "val ppl", "best val ppl", "train ppl", "completed", "failed"]
    return [
        f"# Sweep {title}",
        "",
        f"{sweep.definition['mode']} search over {', '.join(sweep.swept)}: {size}; {counts}.",
        f"Fixed: {_flags_text(sweep.fixed) or '(none)'}.",
        "Ranked by final validation perplexity, mean ± std over the completed seeds "
        "(configurations with failed seeds last). train s: the seeds' mean time in the "
        "training loop (compilation and evaluations included; start-up and loading not).",
        "",
        "| " + " | ".join(["rank", *columns, "train s"]) + " |",
        "|" + "---|" * (len(columns) + 2),
    ]


def _summary_row(rank: int, g: Group) -> str:
    values = [v.replace("|", "\\|") for _, v in g.config]
    wall = g.stat("wall_s")
    cells = [
        str(rank),
        *values,
        mean_std(g.stat("val_ppl")),
        mean_std(g.stat("best_val_ppl")),
        mean_std(g.stat("train_ppl")),
        f"{len(g.completed)}/{len(g.rows)}",
        str(g.failed),
        f"{wall[0]:.0f}" if wall else "—",
    ]
    return "| " + " | ".join(cells) + " |"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _flags_text(flags: dict[str, str]) -> str:
    return " ".join(f"--{k}={v}" for k, v in flags.items())


def heatmap_axes(grid: dict[str, list[str]] | None) -> tuple[str, str] | None:
    """The two swept names when exactly two grid dimensions have more than one value."""
    if not grid:
        return None
    wide = [name for name, values in grid.items() if len(values) > 1]
    return (wide[0], wide[1]) if len(wide) == 2 else None


# --- plots ---------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    _pyplot().close(fig)
    os.replace(tmp, path)


def _label(config: tuple[tuple[str, str], ...]) -> str:
    return " ".join(f"{k}={v}" for k, v in config)


def _log_if_wide(ax, which: str, ratio: float = 5.0) -> None:
    """A log scale, labels on the major ticks only, if the data span more than ``ratio``."""
    from matplotlib.ticker import NullFormatter

    low, high = ax.dataLim.intervalx if which == "x" else ax.dataLim.intervaly
    if low > 0 and high > ratio * low:
        getattr(ax, f"set_{which}scale")("log")
        getattr(ax, f"{which}axis").set_minor_formatter(NullFormatter())


def mean_curve(curves: Sequence[Sequence[dict[str, Any]]]) -> tuple[list[float], list[float]]:
    """Epochs and the mean finite validation perplexity over the curves at each step."""
    by_step: dict[int, list[tuple[float, float]]] = {}
    for curve in curves:
        for r in curve:
            if math.isfinite(r.get("val_ppl", math.nan)):
                by_step.setdefault(r["step"], []).append((r["epoch"], r["val_ppl"]))
    steps = sorted(by_step)
    epochs = [by_step[s][0][0] for s in steps]
    return epochs, [statistics.fmean(v for _, v in by_step[s]) for s in steps]


def plot_curves(groups: Sequence[Group], curves: dict[str, list[dict]], path: Path) -> bool:
    """Validation perplexity per configuration: the mean over seeds, the seeds faint.
    Returns False (and draws nothing) when no trial has evaluated yet."""
    if not any(curves.get(r["trial"]) for g in groups for r in g.rows):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, g in enumerate(groups):
        color = f"C{i % 10}"
        seed_curves = [curves.get(r["trial"], []) for r in g.rows]
        if len(seed_curves) > 1:
            for c in seed_curves:
                ax.plot(*mean_curve([c]), color=color, alpha=0.25, linewidth=0.8)
        x, y = mean_curve(seed_curves)
        if x:  # a configuration whose seeds all failed before evaluating has no line
            ax.plot(x, y, color=color, marker="." if len(x) < 30 else None, label=_label(g.config))
    ax.set(xlabel="epoch", ylabel="validation perplexity")
    _log_if_wide(ax, "y")
    ax.grid(True, alpha=0.3)
    if len(groups) <= 12:
        ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_heatmap(groups: Sequence[Group], axes: tuple[str, str], grid: dict, path: Path) -> None:
    """Mean final validation perplexity over the two swept grid dimensions (a cell with
    failed seeds says how many; one without a completed seed is blank)."""
    import numpy as np

    rows_name, cols_name = axes
    table = np.full((len(grid[rows_name]), len(grid[cols_name])), np.nan)
    notes = {}
    for g in groups:
        config, stat = dict(g.config), g.stat("val_ppl")
        ij = grid[rows_name].index(config[rows_name]), grid[cols_name].index(config[cols_name])
        table[ij] = stat[0] if stat else np.nan
        mean = f"{stat[0]:.2f}" if stat else "—"
        notes[ij] = mean + (f"\n{g.failed} failed" if g.failed else "")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * table.shape[1] + 3, 0.8 * table.shape[0] + 2))
    image = ax.imshow(np.ma.masked_invalid(table), cmap="viridis_r", aspect="auto")
    finite = table[np.isfinite(table)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (i, j), text in notes.items():
        dark = math.isfinite(table[i, j]) and table[i, j] > middle  # viridis_r: high is dark
        ax.text(j, i, text, ha="center", va="center", color="w" if dark else "k")
    ax.set_xticks(range(table.shape[1]), grid[cols_name])
    ax.set_yticks(range(table.shape[0]), grid[rows_name])
    ax.set(
        xlabel=cols_name, ylabel=rows_name, title="final validation perplexity (mean over seeds)"
    )
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    _save(fig, path)


def plot_scatter(rows: Sequence[dict[str, Any]], ranges: dict[str, Range], path: Path) -> None:
    """Random search: final validation perplexity against each sampled flag."""
    plt = _pyplot()
    fig, axs = plt.subplots(1, len(ranges), figsize=(3.5 * len(ranges), 3.5), squeeze=False)
    done = [r for r in rows if r["status"] == "completed" and r.get("val_ppl") is not None]
    for ax, (name, r) in zip(axs[0], ranges.items(), strict=True):
        xs = [row[name] if r.kind == "choice" else float(row[name]) for row in done]
        ax.scatter(xs, [row["val_ppl"] for row in done], s=15)
        ax.set(xlabel=name, ylabel="final val ppl")
        _log_if_wide(ax, "y")
        if r.kind == "log":
            _log_if_wide(ax, "x", 1.0)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
