r"""Reproduces the book's five character language models and tabulates them.

    python -m experiments.book_table                     # 5 flagfiles x 3 seeds
    python -m experiments.book_table --configs=gru,lstm --seeds=1
    python -m experiments.book_table --configs=lstm --seeds=1 --train_flag=--epochs=2 \
        --runs=runs/book_quick --output=runs/book_quick/table.md

Each run is ``python -m experiments.train --flagfile=experiments/configs/NAME.flags
--seed=S --workdir=RUNS/NAME_seedS`` (and each ``--train_flag``) in its own process
(rerunning resumes, or re-checks a finished run against its flags at the cost of a
compile). Prints a
markdown table of final training and validation perplexity (mean ± std over seeds)
and seed 0's greedy sample, and writes it to --output after each flagfile. Rows of
other flagfiles already in --output stay (a run of a subset updates its rows), and a
note under the table says each row's seeds and extra train flags.
"""

import json
import statistics
import subprocess
import sys
from pathlib import Path

from absl import app, flags

from experiments.common import new_file_ok, outdir_ok, parse_flags_or_exit_2

CONFIGS = ["rnn", "gru", "lstm", "deep_gru", "bi_gru"]
HERE = Path(__file__).resolve().parent

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", CONFIGS, "Flagfiles of experiments/configs to run.")
flags.DEFINE_integer("seeds", 3, "Seeds per configuration (0 .. seeds-1).")
flags.DEFINE_string("runs", "runs/book", "Directory of the run directories.")
flags.DEFINE_string("output", "runs/book/table.md", "Markdown table written here.")
flags.DEFINE_multi_string(
    "train_flag",
    [],
    "A flag passed on to every experiments.train run after the flagfile's, which it "
    'overrides (repeatable): "--epochs=2". Use another --runs for such a table.',
)
flags.register_validator("runs", outdir_ok)
# set per run by book_table itself: passed on, they would win and mislabel the table
_OWN = ("flagfile", "seed", "workdir")


def _train_flags_ok(values: list[str]) -> bool:
    for v in values:
        name = v[2:].split("=", 1)[0]
        if not v.startswith("--") or not name:
            raise flags.ValidationError(
                f'expected flags of experiments.train such as "--epochs=2", got {v!r}'
            )
        if name in _OWN or name.removeprefix("no") in _OWN:
            raise flags.ValidationError(
                f"{v!r}: book_table sets --flagfile, --seed and --workdir of each run itself "
                f"(use --configs, --seeds and --runs)"
            )
    return True


flags.register_validator("train_flag", _train_flags_ok)


flags.register_validator("output", new_file_ok)


def run_one(name: str, seed: int) -> dict:
    """Trains (or resumes, or, if finished, only re-checks) one run and returns its
    result. train runs every time: a finished run with the same flags costs a compile
    and writes the same result, and a run directory made with other flags, or a
    hand-written result.json, is refused by train instead of tabulated."""
    workdir = Path(FLAGS.runs) / f"{name}_seed{seed}"
    cmd = [
        sys.executable,
        "-m",
        "experiments.train",
        f"--flagfile={HERE / 'configs' / f'{name}.flags'}",
        f"--seed={seed}",
        f"--workdir={workdir}",
        "--log_every_s=60",
        *FLAGS.train_flag,
    ]
    print("$ python", " ".join(cmd[1:]), flush=True)
    code = subprocess.run(cmd).returncode
    if code != 0:  # train printed why
        print(f"error: experiments.train exited with {code} for {workdir}", file=sys.stderr)
        sys.exit(code if code in (1, 2) else 1)
    return json.loads((workdir / "result.json").read_text())


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(argv):
    del argv
    unknown = sorted(set(FLAGS.configs) - set(CONFIGS))
    if unknown:
        print(f"error: --configs: unknown {unknown}; expected some of {CONFIGS}", file=sys.stderr)
        sys.exit(2)
    if FLAGS.seeds < 1:
        print(f"error: --seeds: expected >= 1, got {FLAGS.seeds}", file=sys.stderr)
        sys.exit(2)
    if not FLAGS.configs:
        print("error: --configs: expected at least one flagfile", file=sys.stderr)
        sys.exit(2)
    rows, notes = read_table(Path(FLAGS.output))
    Path(FLAGS.output).parent.mkdir(parents=True, exist_ok=True)  # (the validator allows a new one)
    flags_text = " ".join(FLAGS.train_flag) or "none"
    for name in FLAGS.configs:
        results = [run_one(name, s) for s in range(FLAGS.seeds)]
        sample = results[0]["sample"].replace("|", "\\|")
        rows[name] = (
            f"| {name} | {mean_std([r['train_ppl'] for r in results])} "
            f"| {mean_std([r['val_ppl'] for r in results])} "
            f"| {results[0]['wall_s']:.0f} | `{sample}` |"
        )
        notes[name] = f"- {name}: seeds 0-{FLAGS.seeds - 1}, extra train flags: {flags_text}"
        table = render_table(rows, notes)  # after every flagfile: a failure keeps the rest
        from rnn_jax.files import write_atomic  # (imports JAX: not for a bad flag)

        write_atomic(Path(FLAGS.output), table)
    print(table)
    print(f"wrote {FLAGS.output} (runs in {FLAGS.runs})")


HEADER = (
    "| flagfile | train ppl | val ppl | wall s (seed 0) | greedy sample, seed 0 |",
    "|---|---|---|---|---|",
)


def read_table(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The rows and notes of an earlier table at ``path``, by flagfile name: a run of
    some flagfiles replaces their rows and keeps the others."""
    rows: dict[str, str] = {}
    notes: dict[str, str] = {}
    if not path.is_file():
        return rows, notes
    for line in path.read_text().splitlines():
        first = line.strip("|- ").split("|")[0].split(":")[0].strip()
        if first not in CONFIGS:
            continue
        (rows if line.startswith("| ") else notes)[first] = line
    return rows, notes


def render_table(rows: dict[str, str], notes: dict[str, str]) -> str:
    """The table in the flagfiles' order, then what each row ran with."""
    order = [n for n in CONFIGS if n in rows]
    lines = [*HEADER, *(rows[n] for n in order), ""]
    lines += [notes[n] for n in order if n in notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit_2)
