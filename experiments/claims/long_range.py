r"""Claim (seed, section 1): gated RNNs capture dependencies across long time-step
distances better than a plain RNN.

    python -m experiments.claims.long_range                 # about 13 minutes on 2 CPU cores
    python -m experiments.claims.long_range --seeds=1 --steps=20 --lengths=10,20

Trains a plain RNN, a GRU and an LSTM (one layer, ``rnn_jax.networks.network``, a
linear head on top) on the two synthetic tasks of :mod:`rnn_jax.tasks` at several
sequence lengths, with Adam and gradient clipping, and scores each on a fresh
held-out batch:

* adding problem: MSE of the sum predicted after the last step (baseline: always
  predicting the mean, MSE 2/12 ~ 0.167);
* copy task: accuracy of the ``num_copy`` symbols recalled at the last steps
  (chance: 1 / num_symbols).

Each (task, cell, length) is one compiled program run once per seed: the whole
optimisation is a ``jax.lax.scan`` over steps drawing a fresh batch from the task
generator every step. Writes ``long_range.md``,
``long_range.png`` and the raw rows ``long_range.json`` into ``--outdir``.

:func:`task_model` and :func:`train` are reused by the ``gradients`` and ``gates``
claims; flags are defined only when this file runs as a script, so importing it
defines none.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from experiments.common import deferred_sigint

with deferred_sigint():
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from absl import app, flags
    from absl import logging as absl_logging

    from experiments.claims import common
    from experiments.common import outdir_ok
    from rnn_jax import cells, networks, tasks

Array = jax.Array
FLAGS = flags.FLAGS
TASKS = ("adding", "copy")
EVAL_SEED = 10_000  # the held-out batch: the same for every run, never trained on
TUNE_SEED = 10_001  # the batch the learning rate is chosen on (not the one reported)
TUNE_SEED_OFFSET = 1_000  # tuning runs use seeds 1000, 1001, ...: other inits, other batches


class TaskModel(NamedTuple):
    """A recurrent network with a linear head, for one synthetic task.

    Attributes:
      task: ``"adding"`` or ``"copy"``.
      cell: the recurrent cell.
      net: ``networks.network(cell)``, one layer.
      init: ``(key) -> {"net": ..., "head": {"W": <f32>[H, O], "b": <f32>[O]}}``.
      batch: ``(key, batch_size, length) -> (xs, targets)``, the task generator.
      outputs: ``(params, xs) -> predictions``: ``<f32>[B]`` for adding (the head on
        H_T), ``<f32>[B, K, V]`` logits for copy (the head on the last K states).
      loss: ``(params, xs, targets) -> (loss, metric)``: MSE and MSE for adding,
        cross-entropy and accuracy for copy (means over the batch).
      baseline: the metric of a memoryless guess (0.167 MSE / 1 / num_symbols).
    """

    task: str
    cell: cells.Cell
    net: networks.Network
    init: Callable[[Array], dict[str, Any]]
    batch: Callable[[Array, int, int], tuple[Array, Array]]
    outputs: Callable[[dict[str, Any], Array], Array]
    loss: Callable[[dict[str, Any], Array, Array], tuple[Array, Array]]
    baseline: float


def task_model(task: str, cell: cells.Cell, *, num_symbols: int = 8, num_copy: int = 3):
    """Builds the :class:`TaskModel` of ``task`` around ``cell``."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    net = networks.network(cell)
    h = cell.hidden_size
    if task == "adding":
        input_size, output_size = 2, 1
    else:
        input_size = output_size = tasks.copy_vocab_size(num_symbols)

    def init(key: Array) -> dict[str, Any]:
        k_net, k_head = jax.random.split(key)
        w = jax.nn.initializers.lecun_normal()(k_head, (h, output_size), jnp.float32)
        return {
            "net": net.init(k_net, input_size),
            "head": {"W": w, "b": jnp.zeros((output_size,), jnp.float32)},
        }

    def batch(key: Array, batch_size: int, length: int) -> tuple[Array, Array]:
        if task == "adding":
            return tasks.adding(key, batch_size, length)
        return tasks.copy(key, batch_size, length, num_symbols=num_symbols, num_copy=num_copy)

    def outputs(params: dict[str, Any], xs: Array) -> Array:
        ys, _ = net.apply_batch(params["net"], xs)
        head = params["head"]
        if task == "adding":
            return (ys[:, -1] @ head["W"] + head["b"])[:, 0]
        return ys[:, -num_copy:] @ head["W"] + head["b"]

    def loss(params: dict[str, Any], xs: Array, targets: Array) -> tuple[Array, Array]:
        out = outputs(params, xs)
        if task == "adding":
            mse = jnp.mean((out - targets) ** 2)
            return mse, mse
        log_p = jax.nn.log_softmax(out)
        ce = -jnp.mean(jnp.take_along_axis(log_p, targets[..., None], axis=-1))
        return ce, jnp.mean(jnp.argmax(out, axis=-1) == targets)

    baseline = tasks.ADDING_BASELINE_MSE if task == "adding" else 1.0 / num_symbols
    return TaskModel(task, cell, net, init, batch, outputs, loss, baseline)


def train(
    model: TaskModel,
    seeds: list[int],
    length: int,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    clip: float = 1.0,
    eval_size: int = 1000,
    eval_seed: int = EVAL_SEED,
) -> dict[str, Any]:
    """Trains ``model`` once per seed (one jitted program, compiled once, per seed).

    Seed ``s`` initialises with ``key(s)`` and draws its training batches from
    ``fold_in(key(s), 1)``; every seed is scored on the same held-out batch of
    ``eval_size`` sequences (seed ``eval_seed``: :data:`EVAL_SEED`, or
    :data:`TUNE_SEED` when choosing the learning rate). Optimiser: clip by global norm
    ``clip``, then Adam with learning rate ``lr`` decayed by a cosine to 10% of it.

    Returns:
      ``{"init": params, "params": params}`` (each with a leading seed axis),
      ``"losses" <f32>[S, steps]`` (training loss per step), ``"metric" <f32>[S]``
      (held-out MSE or accuracy), ``"eval_loss" <f32>[S]``, ``"seconds"`` (wall
      time including compilation).
    """
    tx = optax.chain(
        optax.clip_by_global_norm(clip),
        optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.1)),
    )
    eval_xs, eval_y = model.batch(jax.random.key(eval_seed), eval_size, length)

    def one_seed(key):
        params = model.init(key)
        data_key = jax.random.fold_in(key, 1)

        def step(state, i):
            p, opt_state = state
            xs, y = model.batch(jax.random.fold_in(data_key, i), batch_size, length)
            (loss, _), grads = jax.value_and_grad(model.loss, has_aux=True)(p, xs, y)
            updates, opt_state = tx.update(grads, opt_state, p)
            return (optax.apply_updates(p, updates), opt_state), loss

        (trained, _), losses = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
        eval_loss, metric = model.loss(trained, eval_xs, eval_y)
        return params, trained, losses, eval_loss, metric

    run = jax.jit(one_seed)  # compiled once; the seeds reuse it
    start = time.perf_counter()
    outs = [run(jax.random.key(s)) for s in seeds]
    init, trained, losses, eval_loss, metric = jax.tree.map(lambda *x: jnp.stack(x), *outs)
    jax.block_until_ready(metric)
    return {
        "init": init,
        "params": trained,
        "losses": np.asarray(losses),
        "eval_loss": np.asarray(eval_loss),
        "metric": np.asarray(metric),
        "seconds": time.perf_counter() - start,
    }


def seed_params(stacked: Any, index: int) -> Any:
    """The params of one seed out of :func:`train`'s stacked params."""
    return jax.tree.map(lambda x: x[index], stacked)


# --- the experiment ----------------------------------------------------------------------

CELL_NAMES = ("rnn", "gru", "lstm")
LABELS = {"rnn": "plain RNN", "gru": "GRU", "lstm": "LSTM"}


def num_params(task: str, name: str, hidden_size: int, num_symbols: int = 8) -> int:
    """Parameters of the task model (cell and head) of cell ``name`` at ``hidden_size``."""
    model = task_model(task, cells.make(name, hidden_size), num_symbols=num_symbols)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def matched_hidden_sizes(
    task: str, names: list[str], hidden_size: int, num_symbols: int = 8
) -> dict[str, int]:
    """Hidden size per cell so that every task model has about as many parameters as
    the largest cell's (the LSTM's) at ``hidden_size``: the nearest size for the
    others (a plain RNN of 32 units has a quarter of an LSTM's recurrent weights)."""
    target = max(num_params(task, n, hidden_size, num_symbols) for n in names)
    out = {}
    for n in names:
        h = hidden_size
        while num_params(task, n, h + 1, num_symbols) <= target:
            h += 1
        above, below = num_params(task, n, h + 1, num_symbols), num_params(task, n, h, num_symbols)
        out[n] = h + 1 if above - target < target - below else h
    return out


def run_grid(
    settings: dict[str, Any], echo: Callable[[str], None] = print
) -> tuple[list[dict], list[dict]]:
    """Per (task, cell): the hidden size (matched parameters or not) and the learning
    rate (the lowest held-out loss among ``lrs`` at ``tune_length``, with seeds of
    their own, so other initialisations and training batches, scored on a batch of
    its own: the reported runs are not selected on), then one :func:`train` per
    length. Returns ``(rows, tuning)``: a row per (task, cell, length, seed), and a
    row per (task, cell, lr) tried (its mean held-out loss and metric)."""
    s = settings
    rows, tuning = [], []
    for task in s["tasks"]:
        sizes = (
            matched_hidden_sizes(task, s["cells"], s["hidden_size"], s["num_symbols"])
            if s["match_params"]
            else {n: s["hidden_size"] for n in s["cells"]}
        )
        for name in s["cells"]:
            h = sizes[name]
            cell = cells.make(name, h)
            model = task_model(task, cell, num_symbols=s["num_symbols"], num_copy=s["num_copy"])
            params = num_params(task, name, h, s["num_symbols"])
            lr = s["lrs"][0]
            if len(s["lrs"]) > 1:
                scores = {}
                for candidate in s["lrs"]:
                    out = train(
                        model,
                        [TUNE_SEED_OFFSET + k for k in s["seeds"]],
                        s["tune_length"],
                        steps=s["steps"],
                        batch_size=s["batch_size"],
                        lr=candidate,
                        eval_size=s["eval_size"],
                        eval_seed=TUNE_SEED,
                    )
                    # the loss, not the metric: accuracy at chance is flat in the lr; a
                    # diverged run (NaN) scores worst
                    loss = float(np.mean(out["eval_loss"]))
                    scores[candidate] = loss if math.isfinite(loss) else math.inf
                    tuning.append(
                        {
                            "task": task,
                            "cell": name,
                            "lr": candidate,
                            "loss": scores[candidate],
                            "metric": float(np.mean(out["metric"])),
                        }
                    )
                    echo(
                        f"{task:6s} {name:4s} tune lr {candidate:g} at T={s['tune_length']}: "
                        f"loss {loss:.4f}, {common.mean_std(out['metric'])} "
                        f"({out['seconds']:.1f} s)"
                    )
                lr = min(s["lrs"], key=lambda c: scores[c])
            for length in s["lengths"]:
                out = train(
                    model,
                    s["seeds"],
                    length,
                    steps=s["steps"],
                    batch_size=s["batch_size"],
                    lr=lr,
                    eval_size=s["eval_size"],
                )
                echo(
                    f"{task:6s} {name:4s} H={h} lr={lr:g} T={length:4d}: "
                    f"{'MSE' if task == 'adding' else 'accuracy'} "
                    f"{common.mean_std(out['metric'])} ({out['seconds']:.1f} s)"
                )
                for k, seed in enumerate(s["seeds"]):
                    rows.append(
                        {
                            "task": task,
                            "cell": name,
                            "length": length,
                            "seed": seed,
                            "hidden_size": h,
                            "params": params,
                            "lr": lr,
                            "metric": float(out["metric"][k]),
                            "final_train_loss": float(np.mean(out["losses"][k, -50:])),
                        }
                    )
    return rows, tuning


def _values(rows, **match) -> list[float]:
    return [r["metric"] for r in rows if all(r[k] == v for k, v in match.items())]


def plot(rows: list[dict], settings: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    task_list = settings["tasks"]
    fig, axes = plt.subplots(1, len(task_list), figsize=(5.2 * len(task_list), 3.8), squeeze=False)
    for ax, task in zip(axes[0], task_list, strict=True):
        lengths = settings["lengths"]
        for name in settings["cells"]:
            vals = [_values(rows, task=task, cell=name, length=t) for t in lengths]
            ax.errorbar(
                lengths,
                [np.mean(v) for v in vals],
                yerr=[_sd(v) for v in vals],
                marker="o",
                capsize=3,
                label=LABELS[name],
            )
        model = task_model(
            task, cells.rnn(1), num_symbols=settings["num_symbols"], num_copy=settings["num_copy"]
        )
        label = "predict the mean (0.167)" if task == "adding" else "chance"
        ax.axhline(model.baseline, color="gray", ls="--", lw=1, label=label)
        ax.set_xlabel("sequence length T")
        if task == "adding":
            ax.set_ylabel("held-out MSE (lower is better)")
            ax.set_title("adding problem")
        else:
            ax.set_ylabel("held-out recall accuracy (higher is better)")
            ax.set_title(f"copy task ({settings['num_copy']} of {settings['num_symbols']} symbols)")
            ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path)


def solved(task: str, value: float, baseline: float) -> bool:
    """Adding: MSE below 10% of the baseline; copy: accuracy above 90%."""
    return value < 0.1 * baseline if task == "adding" else value > 0.9


def markdown(
    rows: list[dict], settings: dict[str, Any], seconds: float, note: str, tuning: list[dict] = ()
) -> str:
    s = settings
    lines = [
        "# Long-range dependencies: plain RNN vs GRU vs LSTM",
        "",
        "**Claim** (seed, section 1): gated RNNs capture dependencies across long "
        "time-step distances better than a plain RNN.",
        "",
    ]
    if note:
        lines += [f"**{note}**", ""]
    lines += [
        "**Setup.** Tasks from `rnn_jax.tasks`: the *adding problem* (two channels, "
        "values U(0,1) and two markers, one per half; target = sum of the two marked "
        "values, read after the last step; loss MSE; baseline = always predicting the "
        "mean, MSE 2/12 = 0.167) and the *copy task* "
        f"({s['num_copy']} symbols out of {s['num_symbols']}, a blank delay, a recall "
        f"marker, then the {s['num_copy']} symbols must be emitted in order; loss "
        f"cross-entropy; chance accuracy 1/{s['num_symbols']} = {1 / s['num_symbols']:.3f}). "
        "One recurrent layer (`rnn_jax.networks`, default init: LeCun-normal input, "
        "orthogonal recurrent weights, LSTM forget bias 1) and a linear head; "
        + (
            "hidden sizes chosen so that every model has about as many parameters as the "
            f"{_largest_cell(s)} with {s['hidden_size']} units (table below)"
            if s["match_params"]
            else f"hidden size {s['hidden_size']} for every cell"
        )
        + "; Adam with "
        + (
            "the learning rate chosen per task and cell from "
            f"{{{', '.join(f'{x:g}' for x in s['lrs'])}}} "
            f"by the mean held-out loss at T = {s['tune_length']}, over runs with seeds of "
            f"their own ({TUNE_SEED_OFFSET} + seed: other initialisations and training "
            "batches) scored on a batch of its own, so the reported runs are not selected on"
            if len(s["lrs"]) > 1
            else f"learning rate {s['lrs'][0]:g}"
        )
        + ", cosine decay to 10%, gradient clipping at global norm 1, "
        f"{s['steps']} steps of batch {s['batch_size']} (a fresh batch every step), "
        f"seeds {s['seeds']}. Scored on one held-out batch of {s['eval_size']} "
        f"sequences. Lengths T = {', '.join(map(str, s['lengths']))}. "
        f"`python -m experiments.claims.long_range` ({seconds:.0f} s on this machine).",
        "",
    ]
    lines += sizes_table(rows, tuning, s)
    for task in s["tasks"]:
        baseline = tasks.ADDING_BASELINE_MSE if task == "adding" else 1.0 / s["num_symbols"]
        what = "MSE (baseline 0.167)" if task == "adding" else "recall accuracy"
        lines += [
            f"## {'Adding problem' if task == 'adding' else 'Copy task'}: held-out {what}, "
            "mean ± std over seeds",
            "",
            "| cell | " + " | ".join(f"T = {t}" for t in s["lengths"]) + " |",
            "|---|" + "---|" * len(s["lengths"]),
        ]
        for name in s["cells"]:
            cells_ = [
                common.mean_std(_values(rows, task=task, cell=name, length=t)) for t in s["lengths"]
            ]
            lines.append(f"| {LABELS[name]} | " + " | ".join(cells_) + " |")
        lines += [
            "",
            "Longest length solved by every seed ("
            + ("MSE < 10% of the baseline" if task == "adding" else "accuracy > 90%")
            + "): "
            + ", ".join(
                f"{LABELS[n]}: {longest_solved(rows, task, n, s['lengths'], baseline) or 'none'}"
                for n in s["cells"]
            )
            + ".",
            "",
        ]
    lines += ["![metric vs sequence length](long_range.png)", ""]
    lines += ["## Did the claim hold?", "", verdict(rows, s), ""]
    return "\n".join(lines)


def sizes_table(rows: list[dict], tuning: list[dict], s: dict[str, Any]) -> list[str]:
    """Hidden size, parameters and learning rate per (task, cell), with the tuning
    loss (and metric) of every learning rate tried."""
    tried = len(s["lrs"]) > 1
    lines = [
        "## Sizes and learning rates",
        "",
        "| task | cell | hidden size | parameters | learning rate |"
        + "".join(
            f" lr {x:g}: loss (metric) at T = {s['tune_length']} |" for x in s["lrs"] if tried
        ),
        "|---|---|---|---|---|" + "---|" * (len(s["lrs"]) if tried else 0),
    ]
    for task in s["tasks"]:
        for name in s["cells"]:
            r = next(r for r in rows if r["task"] == task and r["cell"] == name)
            tune = {t["lr"]: t for t in tuning if (t["task"], t["cell"]) == (task, name)}
            lines.append(
                f"| {task} | {LABELS[name]} | {r['hidden_size']} | {r['params']:,} | {r['lr']:g} |"
                + "".join(
                    f" {tune[x]['loss']:.4f} ({tune[x]['metric']:.3f}) |" for x in s["lrs"] if tried
                )
            )
    return [*lines, ""]


def _largest_cell(s: dict[str, Any]) -> str:
    """The cell whose parameter count the others are matched to."""
    task = s["tasks"][0]
    return LABELS[
        max(s["cells"], key=lambda n: num_params(task, n, s["hidden_size"], s["num_symbols"]))
    ]


def longest_solved(rows, task, name, lengths, baseline) -> int | None:
    best = None
    for t in lengths:
        vals = _values(rows, task=task, cell=name, length=t)
        if vals and all(solved(task, v, baseline) for v in vals):
            best = t
    return best


def compare(rows: list[dict], task: str, cell: str, length: int) -> str:
    """``"better"``, ``"worse"`` or ``"same"``: ``cell`` against the plain RNN at ``length``.

    Different means the means differ by more than the larger seed std and more than
    a floor (0.005 MSE, 0.02 accuracy).
    """
    a = _values(rows, task=task, cell=cell, length=length)
    b = _values(rows, task=task, cell="rnn", length=length)
    diff = statistics.mean(a) - statistics.mean(b)
    if task == "adding":
        diff = -diff  # lower MSE is better
    margin = max(_sd(a), _sd(b), 0.005 if task == "adding" else 0.02)
    return "better" if diff > margin else "worse" if diff < -margin else "same"


def _sd(values: list[float]) -> float:
    """The sample std, as the tables show it (0 for one value)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _solves(length: int) -> str:
    return f"solves T <= {length}" if length else "solves none of the lengths"


def verdict(rows: list[dict], s: dict[str, Any]) -> str:
    gated = [n for n in ("gru", "lstm") if n in s["cells"]]
    if "rnn" not in s["cells"] or not gated:
        return "Compare the plain RNN with at least one gated cell to judge the claim."
    parts, outcomes = [], []
    for task in s["tasks"]:
        baseline = tasks.ADDING_BASELINE_MSE if task == "adding" else 1.0 / s["num_symbols"]
        reach = {n: longest_solved(rows, task, n, s["lengths"], baseline) or 0 for n in s["cells"]}
        verdicts = {n: {t: compare(rows, task, n, t) for t in s["lengths"]} for n in gated}
        long = [t for t in s["lengths"] if t > reach["rnn"]]  # where the plain RNN fails
        better = all(any(verdicts[n][t] == "better" for t in long) for n in gated) and long
        worse_long = any(verdicts[n][t] == "worse" for n in gated for t in long)
        outcome = "held" if better and not worse_long else "partly" if better else "not"
        if not better and any(verdicts[n][t] == "better" for n in gated for t in long):
            outcome = "partly"
        outcomes.append(outcome)
        name = "Adding problem" if task == "adding" else "Copy task"
        parts.append(
            f"{name}: the plain RNN {_solves(reach['rnn'])}; against it, "
            + "; ".join(
                f"{LABELS[n]} is "
                + ", ".join(f"{v} at T = {t}" for t, v in verdicts[n].items())
                + f" ({_solves(reach[n])})"
                for n in gated
            )
            + f" — **{ {'held': 'held', 'partly': 'partly held', 'not': 'not held'}[outcome] }**."
        )
    if all(o == "held" for o in outcomes):
        parts.append(
            "**Overall: held** in this setting: the gated cells keep learning at lengths "
            "where the plain RNN is at the baseline."
        )
    else:
        parts.append(
            "**Overall: partly held** in this setting: see each task above; where every "
            "cell is at chance, the budget (steps, size) is too small to separate them."
            if "held" in outcomes or "partly" in outcomes
            else "**Overall: not held** in this setting."
        )
    return " ".join(parts)


# --- command line ------------------------------------------------------------------------


def define_flags() -> None:
    flags.DEFINE_list("tasks", list(TASKS), "Tasks to run: adding, copy.")
    flags.DEFINE_list("cells", list(CELL_NAMES), "Cells to compare: rnn, gru, lstm.")
    flags.DEFINE_list("lengths", ["10", "50", "100", "200"], "Sequence lengths T.")
    flags.DEFINE_integer("seeds", 3, "Seeds per (task, cell, length): 0 .. seeds-1.")
    flags.DEFINE_integer("steps", 1000, "Adam steps per run.")
    flags.DEFINE_integer("batch_size", 64, "Sequences per training batch.")
    flags.DEFINE_integer(
        "hidden_size",
        32,
        "Hidden units of the largest cell, the LSTM by default (of every cell with "
        "--nomatch_params).",
    )
    flags.DEFINE_list(
        "lrs",
        ["1e-3", "3e-3", "1e-2"],
        "Adam peak learning rates (cosine decay to 10%); with more than one, each task "
        "and cell uses the one of lowest held-out loss at --tune_length, in runs with "
        "seeds and a held-out batch of their own.",
    )
    flags.DEFINE_integer("tune_length", 100, "Sequence length the learning rate is chosen at.")
    flags.DEFINE_bool(
        "match_params",
        True,
        "Give every cell about the parameter count of the LSTM with --hidden_size units "
        "(else the same hidden size for all).",
    )
    flags.DEFINE_integer("eval_size", 1000, "Held-out sequences the metric is computed on.")
    flags.DEFINE_integer("num_symbols", 8, "Copy task: distinct symbols.")
    flags.DEFINE_integer("num_copy", 3, "Copy task: symbols to remember and recall.")
    flags.DEFINE_string("outdir", str(common.RESULTS), "Where long_range.md/png are written.")
    flags.register_validator("outdir", outdir_ok)
    flags.DEFINE_string("note", "", "Extra line for the markdown, e.g. 'reduced settings: ...'.")


def main(argv):
    del argv  # positional arguments are refused by parse_flags_or_exit_2
    common.keep_committed_results(FLAGS)
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        settings = _settings()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    start = time.perf_counter()
    rows, tuning = run_grid(settings, echo=lambda m: print(m, flush=True))
    seconds = time.perf_counter() - start
    outdir = Path(FLAGS.outdir)
    # the raw numbers first: they survive a failure in the reporting
    common.write_json(
        outdir / "long_range.json", {"settings": settings, "rows": rows, "tuning": tuning}
    )
    plot(rows, settings, outdir / "long_range.png")
    common.write_text(
        outdir / "long_range.md", markdown(rows, settings, seconds, FLAGS.note, tuning)
    )
    print(f"wrote {outdir / 'long_range.md'} and {outdir / 'long_range.png'} ({seconds:.0f} s)")


def _settings() -> dict[str, Any]:
    for name, allowed in (("tasks", TASKS), ("cells", CELL_NAMES)):
        bad = [v for v in FLAGS[name].value if v not in allowed]
        if bad or not FLAGS[name].value:
            raise ValueError(f"--{name}: expected some of {', '.join(allowed)}, got {bad}")
    lengths = common.int_list(FLAGS.lengths, "lengths")
    if "copy" in FLAGS.tasks and min(lengths) < 2 * FLAGS.num_copy + 1:
        raise ValueError("--lengths: the copy task needs T >= 2 * num_copy + 1")
    if min(lengths) < 2:
        raise ValueError("--lengths: expected lengths >= 2")
    if FLAGS.tune_length < (2 * FLAGS.num_copy + 1 if "copy" in FLAGS.tasks else 2):
        raise ValueError(f"--tune_length: too short ({FLAGS.tune_length})")
    lrs = common.positive_floats(FLAGS.lrs, "lrs")
    for name in ("seeds", "steps", "batch_size", "hidden_size", "eval_size", "num_symbols"):
        if FLAGS[name].value < 1:
            raise ValueError(f"--{name}: expected >= 1, got {FLAGS[name].value}")
    return {
        "tasks": list(FLAGS.tasks),
        "cells": list(FLAGS.cells),
        "lengths": sorted(lengths),
        "seeds": list(range(FLAGS.seeds)),
        "steps": FLAGS.steps,
        "batch_size": FLAGS.batch_size,
        "hidden_size": FLAGS.hidden_size,
        "lrs": sorted(set(lrs)),
        "tune_length": FLAGS.tune_length,
        "match_params": FLAGS.match_params,
        "eval_size": FLAGS.eval_size,
        "num_symbols": FLAGS.num_symbols,
        "num_copy": FLAGS.num_copy,
    }


if __name__ == "__main__":
    from experiments.common import parse_flags_or_exit_2

    define_flags()
    app.run(main, flags_parser=parse_flags_or_exit_2)
