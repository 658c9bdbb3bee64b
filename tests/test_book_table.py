"""experiments.book_table: one short flagfile run end to end, and its flag checks."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SHORT = ["--train_flag=--epochs=1", "--train_flag=--num_train=1024", "--train_flag=--num_val=512"]


def book_table(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.book_table", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_short_table_of_one_flagfile(tmp_path):
    out = tmp_path / "table.md"
    gru = "| gru | 5.03 ± 0.02 | 6.71 ± 0.09 | 24 | `time traveller the` |"
    gru_note = "- gru: seeds 0-2, extra train flags: none"
    out.write_text(  # an earlier table: a run of other flagfiles keeps its rows
        "| flagfile | train ppl | val ppl | wall s (seed 0) | greedy sample, seed 0 |\n"
        f"|---|---|---|---|---|\n{gru}\n\n{gru_note}\n"
    )
    done = book_table("--configs=rnn", "--seeds=1", f"--runs={tmp_path}", f"--output={out}", *SHORT)
    assert done.returncode == 0, done.stderr[-2000:]
    # the printed command can be pasted: the interpreter, the flagfile, the passed flags
    assert "$ python -m experiments.train --flagfile=" in done.stdout
    assert "--epochs=1 --num_train=1024 --num_val=512" in done.stdout
    assert f"wrote {out} (runs in {tmp_path})" in done.stdout
    rows = out.read_text().splitlines()
    assert rows[0].startswith("| flagfile | train ppl | val ppl |") and rows[2].startswith(
        "| rnn |"
    )
    assert rows[3] == gru and rows[4] == ""  # kept, in the flagfiles' order
    assert rows[5:] == [
        "- rnn: seeds 0-0, extra train flags: --epochs=1 --num_train=1024 --num_val=512",
        gru_note,
    ]
    train_ppl, val_ppl = (float(x) for x in rows[2].split("|")[2:4])
    result = json.loads((tmp_path / "rnn_seed0" / "result.json").read_text())
    assert (train_ppl, val_ppl) == (round(result["train_ppl"], 2), round(result["val_ppl"], 2))
    assert json.loads((tmp_path / "rnn_seed0" / "config.json").read_text())["epochs"] == 1
    # into a folder that does not exist yet (the run is finished: re-checked, not trained)
    new = tmp_path / "new" / "table.md"
    done = book_table("--configs=rnn", "--seeds=1", f"--runs={tmp_path}", f"--output={new}", *SHORT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert new.read_text().splitlines()[2] == rows[2]


def test_bad_flags_exit_2_naming_the_flag(tmp_path):
    for args, flag in (
        (["--train_flag=epochs=2"], "--train_flag"),
        (["--train_flag=--seed=3"], "sets --flagfile, --seed and --workdir"),
        (["--train_flag=--workdir=/tmp/x"], "--train_flag"),
        (["--configs=lstm,nope"], "--configs"),
        (["--seeds=0"], "--seeds"),
        (["--configs="], "--configs: expected at least one flagfile"),
    ):
        done = book_table(f"--runs={tmp_path}", f"--output={tmp_path / 't.md'}", *args)
        assert done.returncode == 2, (args, done.stderr[-500:])
        assert flag in done.stderr, (args, done.stderr[-500:])
    assert not (tmp_path / "t.md").exists()


def test_torch_reference_checks_its_flags_before_training(tmp_path):
    """An unknown flagfile (after a known one), an empty list, no seeds or a folder as
    --output: one line, exit 2, before any training (they were tracebacks after it,
    or an empty JSON)."""
    out = tmp_path / "ref.json"
    for args, message in (
        (["--configs=rnn,nope"], "error: --configs: no flagfile nope.flags"),
        (["--configs="], "error: --configs: expected at least one flagfile"),
        (["--seeds=0"], "--seeds=0: 0 is not a positive integer"),
        ([f"--output={tmp_path}"], "expected a file path"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "experiments.torch_reference", f"--output={out}", *args],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr[-500:])
        assert done.stdout == "" and not out.exists()
