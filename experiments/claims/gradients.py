r"""Claim (seed, section 2): the LSTM mitigates vanishing and exploding gradients.

    python -m experiments.claims.gradients                  # a few minutes on 2 CPU cores
    python -m experiments.claims.gradients --seeds=1 --steps=20 --length=20

Measures how the gradient of a loss at the last step reaches earlier hidden states:
the norm of dL/dH_t against the distance T-1-t from the loss, for the plain RNN, the
GRU and the LSTM, on the adding problem (``rnn_jax.tasks.adding``; the loss is the
squared error of the sum predicted from H_T only). Three conditions:

* at initialisation (rnn_jax's default: orthogonal recurrent weights);
* at initialisation with the recurrent weights scaled by each of ``--gains`` (> 1:
  the regime where a plain RNN's gradients can explode);
* after training on the task (``experiments.claims.long_range.train``).

dL/dH_t comes from :func:`hidden_state_gradients`: the cell's step runs in a
``jax.lax.scan`` with an additive zero perturbation delta_t added to the hidden
state after every step, and the gradient w.r.t. the deltas is dL/dH_t (the total
derivative, through every later step). For the LSTM the perturbation is on H_t (the
memory cell C_t is left alone; dL/dH_t still flows through it). Norms are averaged
over a batch of sequences; over seeds they are summarised by geometric means (they
span orders of magnitude). Writes ``gradients.md``,
``gradients.png`` and the raw norms ``gradients.json`` into ``--outdir``.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments.common import deferred_sigint

with deferred_sigint():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from absl import app, flags
    from absl import logging as absl_logging

    from experiments.claims import common
    from experiments.claims.long_range import LABELS, TaskModel, seed_params, task_model, train
    from experiments.common import outdir_ok
    from rnn_jax import cells

Array = jax.Array
FLAGS = flags.FLAGS


def _hidden(carry: Any) -> Array:
    return carry.h if isinstance(carry, cells.LSTMCarry) else carry


def _perturb(carry: Any, delta: Array) -> Any:
    if isinstance(carry, cells.LSTMCarry):
        return carry._replace(h=carry.h + delta)
    return carry + delta


def hidden_state_gradients(
    cell: cells.Cell,
    params: dict[str, Array],
    xs: Array,
    loss_fn: Callable[[Array], Array],
    carry: Any = None,
) -> Array:
    """dL/dH_t for every step t of one sequence.

    Runs ``H_t = step(H_{t-1}, X_t) + delta_t`` in a ``jax.lax.scan`` from ``carry``
    (default: the cell's zeros) and returns the gradient of ``L = loss_fn(H_T)``
    w.r.t. the deltas at delta = 0, which is the total derivative dL/dH_t through
    all later steps. For the LSTM the perturbation is on h (``LSTMCarry.h``).

    Args:
      cell: anything with ``step(params, carry, x) -> (carry, y)``,
        ``initial_carry()`` and ``hidden_size``.
      params: the cell's params.
      xs: ``<float32>[T, I]`` inputs (or ``<int32>[T]`` token ids).
      loss_fn: ``(H_T <float32>[H]) -> scalar``.

    Returns:
      ``<float32>[T, H]``: row t is dL/dH_t (t = T-1 is the last step).
    """
    carry0 = cell.initial_carry() if carry is None else carry

    def loss_of(deltas):
        def body(c, inp):
            x, d = inp
            c, _ = cell.step(params, c, x)
            return _perturb(c, d), None

        final, _ = jax.lax.scan(body, carry0, (xs, deltas))
        return loss_fn(_hidden(final))

    zeros = jnp.zeros((xs.shape[0], cell.hidden_size), jnp.float32)
    return jax.grad(loss_of)(zeros)


def gradient_norms(model: TaskModel, params: dict[str, Any], xs: Array, targets: Array) -> Array:
    """``<float32>[T]``: mean over the batch of ||dL/dH_t|| for the adding loss.

    ``L = (H_T W + b - target)^2`` per sequence (the loss at the last step only).
    """
    cell_params = params["net"]["layer_0"]
    head = params["head"]

    def one(x, y):
        def loss_fn(h):
            return ((h @ head["W"] + head["b"])[0] - y) ** 2

        g = hidden_state_gradients(model.cell, cell_params, x, loss_fn)
        return jnp.linalg.norm(g, axis=-1)

    return jnp.mean(jax.vmap(one)(xs, targets), axis=0)


def conditions(gains: list[float]) -> list[str]:
    """``["init", "x1.5", ..., "trained"]``: one condition per recurrent-weight gain."""
    return ["init", *(f"x{g:g}" for g in gains), "trained"]


def title(cond: str) -> str:
    if cond == "init":
        return "at initialisation"
    if cond == "trained":
        return "after training"
    return f"at init, recurrent weights {cond}"


def measure(settings: dict[str, Any], echo: Callable[[str], None] = print) -> dict:
    """``{cell: {condition: <float>[S, T]}}`` norms by seed and step, plus metrics."""
    s = settings
    out = {}
    for name in s["cells"]:
        model = task_model("adding", cells.make(name, s["hidden_size"]))
        scaled = {
            f"x{g:g}": task_model(
                "adding",
                cells.make(
                    name, s["hidden_size"], recurrent_init=jax.nn.initializers.orthogonal(scale=g)
                ),
            )
            for g in s["gains"]
        }
        result = train(
            model,
            s["seeds"],
            s["length"],
            steps=s["steps"],
            batch_size=s["batch_size"],
            lr=s["lr"],
        )
        xs, y = model.batch(jax.random.key(20_000), s["eval_size"], s["length"])
        # one compilation serves every condition: the scaled models differ from
        # ``model`` only in their initialisation
        norms = jax.jit(functools.partial(gradient_norms, model))
        per = {c: [] for c in conditions(s["gains"])}
        for k, seed in enumerate(s["seeds"]):
            per["init"].append(norms(seed_params(result["init"], k), xs, y))
            per["trained"].append(norms(seed_params(result["params"], k), xs, y))
            for cond, m in scaled.items():
                per[cond].append(norms(m.init(jax.random.key(seed)), xs, y))
        out[name] = {c: np.asarray(jnp.stack(v)) for c, v in per.items()}
        out[name]["mse"] = result["metric"]
        echo(
            f"{name:4s}: trained MSE {common.mean_std(result['metric'])}; kept over T-1 "
            "steps (geometric mean over seeds): "
            + ", ".join(
                f"{c} {common.geo_mean(kept(out[name][c])):.1e}" for c in conditions(s["gains"])
            )
            + f" ({result['seconds']:.0f} s)"
        )
    return out


def plot(res: dict, settings: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    conds = conditions(settings["gains"])
    fig, axes = plt.subplots(1, len(conds), figsize=(3.6 * len(conds), 4), sharey=True)
    t = settings["length"]
    distance = np.arange(t)[::-1]  # step t is T-1-t steps from the loss
    for ax, cond in zip(axes, conds, strict=True):
        for name in settings["cells"]:
            v = np.asarray(res[name][cond], dtype=np.float64)
            with np.errstate(divide="ignore"):
                centre = np.exp(np.log(v).mean(axis=0))
            (line,) = ax.plot(distance, centre, label=LABELS[name])
            if v.shape[0] > 1:
                lo, hi = v.min(axis=0), v.max(axis=0)
                ax.fill_between(distance, lo, hi, color=line.get_color(), alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("distance from the loss, T-1-t (steps)")
        ax.set_title(title(cond))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("||dL/dH_t|| (batch mean; geometric mean over seeds)")
    axes[0].legend()
    fig.suptitle(f"adding problem, T = {t}, loss at the last step only (band: min-max over seeds)")
    fig.tight_layout()
    common.save_figure(fig, path)


def _at(v: np.ndarray, d: int) -> np.ndarray:
    """Per-seed norms at distance ``d`` from the loss."""
    return v[:, v.shape[1] - 1 - d]


def kept(v: np.ndarray) -> np.ndarray:
    """Per seed, the share of the gradient kept over the whole sequence:
    ||dL/dH_0|| / ||dL/dH_{T-1}|| (> 1: it grew with distance)."""
    v = np.asarray(v, dtype=np.float64)
    tiny = np.finfo(np.float32).tiny  # a norm that underflowed to 0 counts as the smallest
    far, near = np.maximum(_at(v, v.shape[1] - 1), tiny), np.maximum(_at(v, 0), tiny)
    with np.errstate(invalid="ignore"):
        ratio = far / near
    return np.where(np.isnan(ratio), np.inf, ratio)  # inf / inf: it exploded


def markdown(res: dict, s: dict[str, Any], seconds: float, note: str) -> str:
    t = s["length"]
    dists = sorted({0, 10, 50, t - 1} & set(range(t)))
    gains = ", ".join(f"{g:g}" for g in s["gains"])
    lines = [
        "# Vanishing and exploding gradients: ||dL/dH_t|| against distance",
        "",
        "**Claim** (seed, section 2): the LSTM mitigates vanishing and exploding gradients.",
        "",
    ]
    if note:
        lines += [f"**{note}**", ""]
    lines += [
        f"**Setup.** Adding problem (`rnn_jax.tasks.adding`), T = {t}; one recurrent "
        f"layer of hidden size {s['hidden_size']} and a linear head reading H_T; the loss "
        "is the squared error at the last step only. dL/dH_t is the gradient w.r.t. a "
        "zero perturbation delta_t added to the hidden state after each step of a "
        "`lax.scan` (for the LSTM on H_t, not C_t); its norm is averaged over "
        f"{s['eval_size']} sequences. Conditions: rnn_jax's default initialisation "
        "(orthogonal recurrent weights, LSTM forget bias 1); the same with the recurrent "
        f"weights scaled by {gains}; after training ({s['steps']} Adam steps, lr "
        f"{s['lr']:g}, batch {s['batch_size']}, clipping at norm 1). Seeds {s['seeds']}. "
        "The norms span many orders of magnitude across seeds, so every cell below is the "
        "geometric mean over seeds with the smallest and largest seed in brackets (an "
        "arithmetic mean would be the largest seed's value over the seed count). "
        f"`python -m experiments.claims.gradients` ({seconds:.0f} s on this machine).",
        "",
        "Trained held-out MSE (baseline 0.167, mean ± std over seeds): "
        + ", ".join(f"{LABELS[n]} {common.mean_std(res[n]['mse'])}" for n in s["cells"])
        + ".",
        "",
    ]
    for cond in conditions(s["gains"]):
        lines += [
            f"## {title(cond).capitalize()}",
            "",
            "| cell | "
            + " | ".join(f"distance {d}" for d in dists)
            + f" | kept over {t - 1} steps: distance {t - 1} / distance 0 |",
            "|---|" + "---|" * (len(dists) + 1),
        ]
        for name in s["cells"]:
            v = res[name][cond]
            row = [common.geo_range(_at(v, d), ".2e") for d in dists]
            lines.append(
                f"| {LABELS[name]} | " + " | ".join(row) + f" | {common.geo_range(kept(v))} |"
            )
        lines.append("")
    lines += ["![||dL/dH_t|| against distance](gradients.png)", ""]
    lines += ["## Did the claim hold?", "", verdict(res, s), ""]
    return "\n".join(lines)


def _ratio_of(a: float, b: float) -> float:
    """``a / b`` of two geometric means (``inf`` when ``b`` is 0, 1 for 0 / 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.float64(a) / np.float64(b)
    return 1.0 if np.isnan(r) else float(r)


def _factor(g: dict[str, float]) -> str:
    return f"{_ratio_of(g['lstm'], g['rnn']):.1e}"


def verdict(res: dict, s: dict[str, Any]) -> str:
    """Vanishing: does the LSTM keep more of the gradient than the plain RNN (geometric
    means over seeds, at init and after training)? Exploding: at every gain where the
    plain RNN's gradient grows with distance in every seed, does the LSTM's grow less?"""
    t = s["length"]
    if "lstm" not in res or "rnn" not in res:
        return "Needs both the plain RNN and the LSTM to judge."
    conds = conditions(s["gains"])
    per_seed = {c: {n: kept(res[n][c]) for n in s["cells"]} for c in conds}
    g = {c: {n: common.geo_mean(per_seed[c][n]) for n in s["cells"]} for c in conds}
    parts = [
        f"Gradient kept over {t - 1} steps, ||dL/dH_0|| / ||dL/dH_{t - 1}|| (geometric "
        "mean over seeds; t = 0 is the step farthest from the loss): "
        + "; ".join(
            f"{title(c)}: " + ", ".join(f"{LABELS[n]} {g[c][n]:.1e}" for n in s["cells"])
            for c in conds
        )
        + "."
    ]
    seeds_more = {
        c: int(np.sum(per_seed[c]["lstm"] > per_seed[c]["rnn"])) for c in ("init", "trained")
    }
    n = len(s["seeds"])
    # the geometric mean and most seeds: one extreme seed cannot decide alone
    vanish = {c: g[c]["lstm"] > g[c]["rnn"] and 2 * seeds_more[c] > n for c in ("init", "trained")}
    parts.append(
        "**Vanishing: "
        + (
            "held"
            if all(vanish.values())
            else "partly held"
            if any(vanish.values())
            else "not held"
        )
        + ".** The LSTM keeps more of the gradient than the plain RNN "
        + (
            "both at initialisation and after training"
            if all(vanish.values())
            else "only " + " and ".join(title(c) for c, ok in vanish.items() if ok)
            if any(vanish.values())
            else "in neither condition"
        )
        + f" (geometric means: factor {_factor(g['init'])} at init, the LSTM ahead in "
        f"{seeds_more['init']} of {n} seeds; {_factor(g['trained'])} after training, in "
        f"{seeds_more['trained']} of {n} seeds)"
        + (
            "; it still decays, so the problem is mitigated rather than removed."
            if any(vanish.values()) and all(g[c]["lstm"] < 1 for c, ok in vanish.items() if ok)
            else "."
        )
    )
    gain_conds = conds[1:-1]
    exploding = [c for c in gain_conds if np.all(per_seed[c]["rnn"] > 1)]
    if not exploding:
        parts.append(
            "**Exploding: not tested.** At no gain did the plain RNN's gradient grow with "
            "distance in every seed ("
            + ", ".join(f"{c}: {common.geo_range(per_seed[c]['rnn'])}" for c in gain_conds)
            + "); try larger --gains."
        )
    else:
        less = {
            c: g[c]["lstm"] < g[c]["rnn"]
            and 2 * int(np.sum(per_seed[c]["lstm"] < per_seed[c]["rnn"])) > n
            for c in exploding
        }
        grows = {c: int(np.sum(per_seed[c]["lstm"] > 1)) for c in exploding}
        least = min(_ratio_of(g[c]["rnn"], g[c]["lstm"]) for c in exploding)
        head = (
            "held"
            if all(less.values()) and not any(grows.values())
            else "held, as mitigation"
            if all(less.values())
            else "not held"
        )
        parts.append(
            f"**Exploding: {head}.** Where the plain RNN's gradient grows with distance in "
            "every seed ("
            + ", ".join(exploding)
            + "), the LSTM's "
            + "; ".join(
                f"{c}: x{g[c]['lstm']:.1e} against x{g[c]['rnn']:.1e}"
                + (f", growing in {grows[c]} of {n} seeds" if grows[c] else ", decaying")
                for c in exploding
            )
            + "."
            + (
                " In some seeds the LSTM's gradient grows too (at most x"
                f"{max(float(per_seed[c]['lstm'].max()) for c in exploding):.1e}), "
                + ("far " if least >= 100 else "")
                + f"less than the plain RNN's (by x{least:.1e} at least, geometric means): "
                "mitigated, not prevented."
                if head == "held, as mitigation"
                else ""
            )
        )
    if "gru" in res:
        gru_init = g["init"]["gru"]
        least = gru_init < min(g["init"]["rnn"], g["init"]["lstm"])
        parts.append(
            f"The GRU (not part of this claim) keeps x{gru_init:.1e} at initialisation"
            + (" (the least of the three)" if least else "")
            + f" and x{g['trained']['gru']:.1e} after training, consistent with a "
            "learned update gate carrying the state."
        )
    return " ".join(parts)


def define_flags() -> None:
    flags.DEFINE_list("cells", ["rnn", "gru", "lstm"], "Cells to compare: rnn, gru, lstm.")
    flags.DEFINE_integer("length", 100, "Sequence length T of the adding problem.")
    flags.DEFINE_integer("seeds", 3, "Seeds: 0 .. seeds-1.")
    flags.DEFINE_integer("steps", 1000, "Adam training steps for the 'after training' curves.")
    flags.DEFINE_integer("batch_size", 64, "Training batch size.")
    flags.DEFINE_integer("hidden_size", 32, "Hidden units H.")
    flags.DEFINE_float("lr", 3e-3, "Adam peak learning rate (cosine decay to 10%).")
    flags.DEFINE_list(
        "gains",
        ["1.5", "2", "3"],
        "Scales of the orthogonal recurrent weights, one condition each (> 1: where a "
        "plain RNN's gradients can explode).",
    )
    flags.DEFINE_integer("eval_size", 256, "Sequences the gradient norms are averaged over.")
    flags.DEFINE_string("outdir", str(common.RESULTS), "Where gradients.md/png are written.")
    flags.register_validator("outdir", outdir_ok)
    flags.DEFINE_string("note", "", "Extra line for the markdown, e.g. 'reduced settings: ...'.")


def main(argv):
    del argv  # positional arguments are refused by parse_flags_or_exit_2
    common.keep_committed_results(FLAGS)
    absl_logging.set_verbosity(absl_logging.WARNING)
    bad = [c for c in FLAGS.cells if c not in cells.CELLS]
    problems = [f"--cells: unknown {bad}"] if bad or not FLAGS.cells else []
    for name in ("length", "seeds", "steps", "batch_size", "hidden_size", "eval_size"):
        if FLAGS[name].value < (2 if name == "length" else 1):
            problems.append(f"--{name}: too small ({FLAGS[name].value})")
    try:
        gains = common.positive_floats(FLAGS.gains, "gains")
    except ValueError as e:
        gains = []
        problems.append(str(e))
    if not FLAGS.lr > 0:
        problems.append("--lr: expected > 0")
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        sys.exit(2)
    settings = {
        "cells": list(FLAGS.cells),
        "length": FLAGS.length,
        "seeds": list(range(FLAGS.seeds)),
        "steps": FLAGS.steps,
        "batch_size": FLAGS.batch_size,
        "hidden_size": FLAGS.hidden_size,
        "lr": FLAGS.lr,
        "gains": sorted(set(gains)),
        "eval_size": FLAGS.eval_size,
    }
    start = time.perf_counter()
    res = measure(settings, echo=lambda m: print(m, flush=True))
    seconds = time.perf_counter() - start
    outdir = Path(FLAGS.outdir)
    raw = {n: {c: np.asarray(v).tolist() for c, v in r.items()} for n, r in res.items()}
    # the raw numbers first: they survive a failure in the reporting below
    common.write_json(outdir / "gradients.json", {"settings": settings, "norms": raw})
    plot(res, settings, outdir / "gradients.png")
    common.write_text(outdir / "gradients.md", markdown(res, settings, seconds, FLAGS.note))
    print(f"wrote {outdir / 'gradients.md'} and {outdir / 'gradients.png'} ({seconds:.0f} s)")


if __name__ == "__main__":
    from experiments.common import parse_flags_or_exit_2

    define_flags()
    app.run(main, flags_parser=parse_flags_or_exit_2)
