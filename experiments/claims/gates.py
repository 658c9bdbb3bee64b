r"""Claims (seed, section 1): the reset gate helps capture short-term dependencies, the
update gate long-term ones; with the reset gate open the GRU contains the plain RNN,
with the update gate open it can skip sub-sequences.

    python -m experiments.claims.gates                      # a few minutes on 2 CPU cores
    python -m experiments.claims.gates --seeds=1 --steps=20 --lengths=10 --lm_epochs=1

Three measurements with GRU ablations (``rnn_jax.cells.gru``'s ``pin_reset`` /
``pin_update``): the learned GRU; ``R_t = 1`` (reset gate open); ``Z_t = 0`` (the
update gate never keeps the old state); both (which is exactly a plain tanh RNN):

1. the adding problem (long-range memory; ``experiments.claims.long_range.train``)
   at a couple of lengths: held-out MSE, and for the learned GRU whether its update
   gate skips the stretch after the first marker (:func:`update_gate_at_markers`);
2. the character language model on The Time Machine (mostly short-range
   structure; short runs of ``rnn_jax.train.run``): validation perplexity;
3. the gate activations R_t and Z_t of a trained GRU language model (the learned
   GRU of seed 0 from 2., or ``--lm_workdir``, a run directory of ``python -m experiments.train
   --cell=gru``) over a passage of text: the mean over hidden units per character,
   and heat maps over hidden units, with the characters on the x axis.

Writes ``gates.md``, ``gates.png`` (ablations), ``gates_activations.png`` and the
raw numbers ``gates.json`` into ``--outdir``.
"""

from __future__ import annotations

import functools
import sys
import tempfile
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
    from experiments.claims.long_range import seed_params, task_model, train
    from experiments.common import outdir_ok
    from rnn_jax import cells, runs, text
    from rnn_jax import train as lm_train
    from rnn_jax.config import TrainConfig

FLAGS = flags.FLAGS

# flag name -> (label, pin_reset, pin_update, description)
VARIANTS = {
    "learned": ("learned", None, None, "GRU, both gates learned"),
    "r1": ("R=1", 1.0, None, "reset gate pinned open (R_t = 1)"),
    "z0": ("Z=0", None, 0.0, "update gate pinned to 0 (never keeps H_{t-1})"),
    "r1z0": ("R=1, Z=0", 1.0, 0.0, "both pinned: a plain tanh RNN"),
}
PASSAGE = (
    "the time traveller for so it will be convenient to speak of him was expounding "
    "a recondite matter to us"
)


def adding_ablations(s: dict[str, Any], echo: Callable[[str], None]) -> list[dict]:
    rows = []
    for variant in s["variants"]:
        _, pin_r, pin_z, _ = VARIANTS[variant]
        cell = cells.gru(s["hidden_size"], pin_reset=pin_r, pin_update=pin_z)
        model = task_model("adding", cell)
        for length in s["lengths"]:
            out = train(
                model,
                s["seeds"],
                length,
                steps=s["steps"],
                batch_size=s["batch_size"],
                lr=s["lr"],
            )
            echo(
                f"adding {_label(variant):9s} T={length}: MSE {common.mean_std(out['metric'])} "
                f"({out['seconds']:.0f} s)"
            )
            xs, _ = model.batch(jax.random.key(30_000), 1000, length)
            for k, seed in enumerate(s["seeds"]):
                row = {
                    "variant": variant,
                    "length": length,
                    "seed": seed,
                    "mse": out["metric"][k],
                    "hidden_size": s["hidden_size"],
                }
                if pin_z is None:  # the update gate is learned: does it skip?
                    trained = update_gate_at_markers(model.cell, seed_params(out["params"], k), xs)
                    init = update_gate_at_markers(model.cell, seed_params(out["init"], k), xs)
                    row.update(
                        trained,
                        units_keeping_init=init["units_keeping"],
                        best_unit_keeps_init=init["best_unit_keeps"],
                    )
                rows.append(row)
    return rows


@functools.lru_cache(maxsize=8)
def _update_gates(cell: cells.Cell) -> Callable:
    """``(layer params, xs <[B, T, I]>) -> Z_t <[B, T, H]>``, compiled once per cell
    (it is called for every seed and length, trained and at initialisation)."""

    def one(layer, x):
        def body(carry, x_t):
            z = cell.gate_values(layer, carry, x_t)["z"]
            carry, _ = cell.step(layer, carry, x_t)
            return carry, z

        return jax.lax.scan(body, cell.initial_carry(), x)[1]

    return jax.jit(jax.vmap(one, in_axes=(None, 0)))


def update_gate_at_markers(cell: cells.Cell, params: dict[str, Any], xs) -> dict[str, float]:
    """How a GRU trained on the adding problem uses its update gate Z_t (H_t =
    Z_t * H_{t-1} + (1 - Z_t) * H~_t; Z_t = 1 skips the input). Only the two marked
    steps matter for the target, so a model that skips the rest keeps Z_t high at the
    unmarked steps and lowers it to write at the marked ones.

    Args:
      cell: the GRU.
      params: the task model's params (``params["net"]["layer_0"]`` is the GRU's).
      xs: ``<float32>[B, T, 2]`` adding-problem inputs (channel 1: the markers).

    Returns:
      mean Z_t over units at the marked and the unmarked steps (``z_marked``,
      ``z_unmarked``); the share of unit·steps with Z_t > 0.9 there
      (``open_marked``, ``open_unmarked``); per unit, how much it writes at the first
      marker (1 - Z_t there) and how much of its state its update gate alone keeps
      across the unmarked steps after it (the product of its Z_t over those steps),
      each the median over sequences, and the smaller of the two as its *skip score*:
      ``units_keeping``, the units whose score is above 0.5 (they write the first
      marked step and then skip the stretch; a unit that never writes, Z_t ≈ 1
      everywhere, does not count), and ``best_unit_keeps``, the largest score. Z_t ≈
      0.5 at initialisation keeps 0.5^k over k steps.
    """
    z = np.asarray(_update_gates(cell)(params["net"]["layer_0"], xs), np.float64)  # [B, T, H]
    marked = np.asarray(xs[..., 1]) > 0.5
    after_first = np.cumsum(marked, axis=1) >= 1
    stretch = after_first & ~marked  # unmarked steps after the first marker
    with np.errstate(divide="ignore"):
        log_kept = np.sum(np.where(stretch[..., None], np.log(z), 0.0), axis=1)  # [B, H]
    kept = np.exp(np.median(log_kept, axis=0))  # [H]
    first = np.argmax(marked, axis=1)  # the first marked step of every sequence
    write = np.median(1.0 - z[np.arange(len(z)), first], axis=0)  # [H]
    score = np.minimum(kept, write)
    return {
        "units_keeping": int(np.sum(score > 0.5)),
        "best_unit_keeps": float(score.max()),
        "z_marked": float(z[marked].mean()),
        "z_unmarked": float(z[~marked].mean()),
        "open_marked": float((z[marked] > 0.9).mean()),
        "open_unmarked": float((z[~marked] > 0.9).mean()),
    }


def lm_config(s: dict[str, Any], variant: str, seed: int, workdir: str) -> TrainConfig:
    _, pin_r, pin_z, _ = VARIANTS[variant]
    return TrainConfig(
        cell="gru",
        hidden_size=s["lm_hidden"],
        pin_reset=pin_r,
        pin_update=pin_z,
        optimizer="adam",
        lr=s["lm_lr"],
        epochs=s["lm_epochs"],
        batch_size=s["lm_batch"],
        num_train=s["lm_train"],
        num_val=s["lm_val"],
        seed=seed,
        workdir=workdir,
        log_every_s=1e9,
        sample_chars=40,
    )


def lm_ablations(s: dict[str, Any], tmp: Path, echo: Callable[[str], None]) -> list[dict]:
    rows = []
    for variant in s["variants"]:
        for seed in s["seeds"]:
            workdir = tmp / f"lm_{variant}_{seed}"
            result = lm_train.run(lm_config(s, variant, seed, str(workdir)), echo=lambda m: None)
            rows.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "val_ppl": result.val_ppl,
                    "train_ppl": result.train_ppl,
                    "workdir": workdir,
                }
            )
            echo(f"LM {_label(variant):9s} seed {seed}: val ppl {result.val_ppl:.3f}")
    return rows


def gate_activations(workdir: Path, passage: str) -> dict[str, Any]:
    """R_t and Z_t ``<float32>[T, H]`` of a trained GRU run over ``passage``."""
    run = runs.load(workdir)
    cell = run.model.network.cell
    if cell.name != "gru" or run.config.num_layers != 1 or run.config.embed_dim:
        raise ValueError(f"{workdir}: expected a one-layer GRU run with one-hot input")
    tokens = text.tokenize(passage, run.vocab.mode)
    ids = jnp.asarray(run.vocab.to_ids(tokens))
    params = run.params["network"]["layer_0"]

    def body(carry, x):
        g = cell.gate_values(params, carry, x)
        carry, _ = cell.step(params, carry, x)
        return carry, (g["r"], g["z"])

    _, (r, z) = jax.lax.scan(body, cell.initial_carry(), ids)
    return {"tokens": tokens, "r": np.asarray(r), "z": np.asarray(z), "config": run.config}


def plot_ablations(adding_rows, lm_rows, s, path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    names = s["variants"]
    width = 0.8 / max(len(s["lengths"]), 1)
    for j, length in enumerate(s["lengths"]):
        vals = [
            [r["mse"] for r in adding_rows if r["variant"] == v and r["length"] == length]
            for v in names
        ]
        xs = np.arange(len(names)) + (j - (len(s["lengths"]) - 1) / 2) * width
        axes[0].bar(
            xs,
            [np.mean(v) for v in vals],
            width,
            yerr=[_std(v) for v in vals],
            capsize=3,
            label=f"T = {length}",
        )
    axes[0].axhline(1 / 6, color="gray", ls="--", lw=1, label="predict the mean (0.167)")
    axes[0].set_xticks(np.arange(len(names)), [_label(v) for v in names])
    axes[0].set_ylabel("held-out MSE (lower is better)")
    axes[0].set_title("adding problem (long-range)")
    axes[0].legend(fontsize=8)
    vals = [[r["val_ppl"] for r in lm_rows if r["variant"] == v] for v in names]
    axes[1].bar(
        np.arange(len(names)),
        [np.mean(v) for v in vals],
        yerr=[_std(v) for v in vals],
        capsize=3,
        color="C2",
    )
    for i, v in enumerate(vals):
        axes[1].plot([i] * len(v), v, "k.", ms=4)
    axes[1].set_xticks(np.arange(len(names)), [_label(v) for v in names])
    axes[1].set_ylabel("validation perplexity (lower is better)")
    lo = min(min(v) for v in vals)
    axes[1].set_ylim(max(lo - 1, 0), max(max(v) for v in vals) + 0.5)
    axes[1].set_title("character LM, The Time Machine")
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("GRU with gates pinned (R=1: reset open; Z=0: update never keeps the state)")
    fig.tight_layout()
    common.save_figure(fig, path)


def plot_activations(act: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    chars = ["␣" if c == " " else c for c in act["tokens"]]
    n = len(chars)
    fig, axes = plt.subplots(
        3,
        1,
        figsize=(max(10, 0.13 * n), 7.5),
        sharex=True,
        gridspec_kw={"height_ratios": [1, 1.6, 1.6]},
    )
    t = np.arange(n)
    axes[0].plot(t, act["r"].mean(axis=1), "o-", ms=3, label="mean R_t (reset)")
    axes[0].plot(t, act["z"].mean(axis=1), "s-", ms=3, label="mean Z_t (update)")
    axes[0].set_ylim(0, 1)
    axes[0].set_ylabel("mean over units")
    axes[0].legend(fontsize=8, loc="upper right")
    axes[0].grid(True, alpha=0.3)
    for ax, key, title in ((axes[1], "r", "R_t"), (axes[2], "z", "Z_t")):
        im = ax.imshow(
            act[key].T, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest"
        )
        ax.set_ylabel(f"{title}: hidden unit")
        fig.colorbar(im, ax=ax, fraction=0.015, pad=0.01)
    axes[2].set_xticks(t, chars, fontsize=7)
    axes[2].set_xlabel("input character")
    fig.suptitle(
        "GRU language model gates over a passage (value at the step reading each character)"
    )
    fig.tight_layout()
    common.save_figure(fig, path)


def activation_stats(act: dict[str, Any]) -> dict[str, float]:
    """Mean gates over letters vs spaces, and over the step after a space (word start)."""
    space = np.array([c == " " for c in act["tokens"]])
    after_space = np.concatenate([[False], space[:-1]])
    letters = ~space
    out = {}
    for key in ("r", "z"):
        m = act[key].mean(axis=1)
        out[f"{key}_all"] = float(m.mean())
        out[f"{key}_space"] = float(m[space].mean()) if space.any() else float("nan")
        out[f"{key}_letter"] = float(m[letters].mean())
        out[f"{key}_word_start"] = (
            float(m[after_space].mean()) if after_space.any() else float("nan")
        )
        out[f"{key}_frac_closed"] = float(np.mean(act[key] < 0.1))
        out[f"{key}_frac_open"] = float(np.mean(act[key] > 0.9))
    return out


def markdown(adding_rows, lm_rows, act, stats, s, seconds, note, act_source) -> str:
    lines = [
        "# What the GRU's gates do",
        "",
        "**Claims** (seed, section 1): the reset gate helps capture short-term "
        "dependencies; the update gate helps capture long-term dependencies; with the "
        "reset gate open (R_t = 1) the GRU contains the plain RNN; with the update gate "
        "open (Z_t = 1) it can skip sub-sequences.",
        "",
    ]
    if note:
        lines += [f"**{note}**", ""]
    lines += [
        "**Setup.** GRU ablations with `rnn_jax.cells.gru(pin_reset=..., "
        "pin_update=...)`: "
        + "; ".join(f"*{_label(v)}*: {VARIANTS[v][3]}" for v in s["variants"])
        + ". (Z_t = 1 everywhere would freeze the state at zero and cannot be trained, "
        "so the update gate is ablated the other way: with Z_t = 0 the GRU can neither "
        "keep nor skip.) "
        f"(1) Adding problem (long-range), T = {', '.join(map(str, s['lengths']))}, "
        f"hidden {s['hidden_size']}, {s['steps']} Adam steps (lr {s['lr']:g}, cosine to "
        f"10%, clip 1), batch {s['batch_size']}; held-out MSE on 1000 sequences "
        "(baseline 0.167). (2) Character LM on The Time Machine with "
        f"`rnn_jax.train.run`: hidden {s['lm_hidden']}, one-hot input, Adam lr "
        f"{s['lm_lr']:g} with cosine decay, clip 1, batch {s['lm_batch']}, "
        f"{s['lm_epochs']} epochs over {s['lm_train']:,} windows of 32 characters; "
        f"validation perplexity on {s['lm_val']:,} windows. Seeds {s['seeds']}; "
        f"mean ± std over seeds. `python -m experiments.claims.gates` ({seconds:.0f} s "
        "on this machine).",
        "",
        "## Ablations (mean ± std over seeds)",
        "",
        "| variant | "
        + " | ".join(f"adding MSE, T = {t}" for t in s["lengths"])
        + " | LM val ppl | LM train ppl |",
        "|---|" + "---|" * (len(s["lengths"]) + 2),
    ]
    for v in s["variants"]:
        adding = [
            common.mean_std(r["mse"] for r in adding_rows if r["variant"] == v and r["length"] == t)
            for t in s["lengths"]
        ]
        val = common.mean_std((r["val_ppl"] for r in lm_rows if r["variant"] == v), ".3f")
        tr = common.mean_std((r["train_ppl"] for r in lm_rows if r["variant"] == v), ".3f")
        lines.append(
            f"| {_label(v)} ({VARIANTS[v][3]}) | " + " | ".join(adding) + f" | {val} | {tr} |"
        )
    lines += ["", "![ablations](gates.png)", ""]
    skip_rows = [r for r in adding_rows if "z_marked" in r]
    if skip_rows:
        lines += [
            "## Does the learned update gate skip? (adding problem)",
            "",
            "Z_t of the learned GRUs of (1), over the 1000 held-out sequences: H_t = Z_t ⊙ "
            "H_{t-1} + (1 - Z_t) ⊙ H~_t, so Z_t = 1 skips the input. Only the two marked "
            "steps carry information about the target; a model that skips the others keeps "
            "Z_t high there and lowers it at the marked steps. A unit *skips* the stretch "
            "after the first marker when it writes there (1 - Z_t > 0.5) and the product "
            "of its Z_t over the unmarked steps after it is above 0.5 (each the median "
            "over sequences; its *skip score* is the smaller of the two). Mean ± std over "
            "seeds.",
            "",
            "| T | mean Z_t, marked steps | mean Z_t, unmarked steps | unit·steps with Z_t > "
            "0.9, marked | unit·steps with Z_t > 0.9, unmarked | units that skip (of "
            f"{s['hidden_size']}) | the same at initialisation | best unit's skip score "
            "(geometric mean over seeds [min, max]) | the same at initialisation |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for t in s["lengths"]:
            rs = [r for r in skip_rows if r["length"] == t and r["variant"] == "learned"]
            if rs:
                cols = [
                    common.mean_std([r[k] for r in rs])
                    for k in ("z_marked", "z_unmarked", "open_marked", "open_unmarked")
                ]
                cols += [
                    common.mean_std([r[k] for r in rs], ".1f")
                    for k in ("units_keeping", "units_keeping_init")
                ]
                cols += [
                    common.geo_range([r[k] for r in rs])
                    for k in ("best_unit_keeps", "best_unit_keeps_init")
                ]
                lines.append(f"| {t} | " + " | ".join(cols) + " |")
        lines.append("")
    lines += [
        "## Gate activations over a passage",
        "",
        f"Model: {act_source}. Passage ({len(act['tokens'])} characters): "
        f"“{''.join(act['tokens'])}”.",
        "",
        "| gate | mean | at spaces | at letters | first letter of a word | units·steps < 0.1 "
        "| units·steps > 0.9 |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, name in (("r", "R_t (reset)"), ("z", "Z_t (update)")):
        lines.append(
            f"| {name} | {stats[f'{key}_all']:.3f} | {stats[f'{key}_space']:.3f} "
            f"| {stats[f'{key}_letter']:.3f} | {stats[f'{key}_word_start']:.3f} "
            f"| {stats[f'{key}_frac_closed']:.1%} | {stats[f'{key}_frac_open']:.1%} |"
        )
    lines += ["", "![gate activations](gates_activations.png)", ""]
    lines += ["## Did the claims hold?", "", verdict(adding_rows, lm_rows, s), ""]
    return "\n".join(lines)


def _mean(values) -> float:
    return float(np.mean(list(values)))


def _std(values) -> float:
    """The sample std (as the tables show), 0 for one value."""
    values = list(values)
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def verdict(adding_rows, lm_rows, s) -> str:
    if set(s["variants"]) != set(VARIANTS):
        return "Run all four variants (the default --variants) to judge the claims."
    longest = max(s["lengths"])
    mse = {
        _label(v): _mean(
            r["mse"] for r in adding_rows if r["variant"] == v and r["length"] == longest
        )
        for v in VARIANTS
    }
    lm = {_label(v): [r["val_ppl"] for r in lm_rows if r["variant"] == v] for v in VARIANTS}
    ppl = {k: float(np.mean(v)) for k, v in lm.items()}
    parts = [
        f"Adding, T = {longest} (mean MSE): "
        + ", ".join(f"{k} {v:.4f}" for k, v in mse.items())
        + ". LM (mean val ppl): "
        + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items())
        + "."
    ]
    # update gate <-> long-term: removing it (Z=0) should hurt the adding task
    z_long = mse["Z=0"] > 2 * mse["learned"] and mse["Z=0"] > mse["R=1"]
    parts.append(
        (
            "**Update gate / long-term: held.** "
            if z_long
            else "**Update gate / long-term: not clearly.** "
        )
        + f"Pinning Z_t = 0 changes the adding MSE at T = {longest} from "
        f"{mse['learned']:.4f} to {mse['Z=0']:.4f} (pinning R_t = 1: {mse['R=1']:.4f})."
    )
    margin = max(_std(lm["learned"]), _std(lm["R=1"]))
    r_short = ppl["R=1"] > ppl["learned"] + margin
    r_long = mse["R=1"] <= 2 * mse["learned"] + 0.005
    parts.append(
        (
            "**Reset gate / short-term: held.** "
            if r_short
            else "**Reset gate / short-term: not clearly.** "
        )
        + "Opening the reset gate changes the LM's validation perplexity (short-range "
        f"structure) from {ppl['learned']:.3f} to {ppl['R=1']:.3f} (seed spread, std: "
        f"{margin:.3f}), while the adding task (long-range) is "
        + ("hardly affected." if r_long else "affected too.")
    )
    parts.append(
        "**Reset open ⇒ plain RNN: an identity, not an experiment.** With R_t = 1 and "
        "Z_t = 0 the step is H_t = tanh(X_t W_xh + H_{t-1} W_hh + b_h), the plain RNN's "
        "(checked exactly in tests/test_cells.py), so the R=1, Z=0 rows are a plain RNN "
        "(with the GRU's initialisation of the candidate weights): adding MSE "
        f"{mse['R=1, Z=0']:.4f}, LM ppl {ppl['R=1, Z=0']:.3f}."
    )
    parts.append(skip_verdict(adding_rows, longest))
    return " ".join(parts)


def skip_verdict(adding_rows, length: int) -> str:
    """``Z_t = 1`` skipping the input is an identity (tests/test_cells.py); what is
    measured is whether the GRU trained on the adding problem uses it: "yes" when in
    every seed at least one unit writes at the first marker and then keeps more than
    half of its state through its update gate across the unmarked steps after it
    (:func:`update_gate_at_markers`), and no unit does at initialisation."""
    rs = [r for r in adding_rows if r["variant"] == "learned" and r["length"] == length]
    rs = [r for r in rs if "z_marked" in r]
    if not rs:
        return "**Update open ⇒ skip: not measured** (needs the learned variant)."
    keeping = [r["units_keeping"] for r in rs]
    at_init = [r["units_keeping_init"] for r in rs]
    held = min(keeping) >= 1 and max(at_init) == 0
    solved = all(r["mse"] < 0.1 * 2 / 12 for r in rs)  # MSE below 10% of the baseline
    diff = np.array([r["z_unmarked"] - r["z_marked"] for r in rs])
    return (
        "**Update open ⇒ skip: an identity** (Z_t = 1 gives H_t = H_{t-1} exactly, the "
        "input skipped; tests/test_cells.py); **used by the trained GRU: "
        + ("yes" if held else "not clearly")
        + f".** Trained on the adding problem at T = {length}, the learned GRU has "
        + ", ".join(map(str, keeping))
        + f" units (seed by seed, of {rs[0]['hidden_size']}) that write at the first "
        "marker (1 - Z_t > 0.5) and then keep more than half of their state through the "
        "update gate across every unmarked step after it, against "
        + ", ".join(map(str, at_init))
        + " at initialisation"
        + (": it learned to skip the stretch that does not matter. " if held else ". ")
        + "The best unit's skip score (the smaller of the two) is "
        + common.geo_range([r["best_unit_keeps"] for r in rs], ".1e")
        + " (geometric mean over seeds [min, max]), against "
        + common.geo_range([r["best_unit_keeps_init"] for r in rs], ".1e")
        + " at initialisation"
        + (
            ". No unit passes both thresholds in any seed, and the model solves the task "
            "at this length: it carries the marked values through the candidate state "
            "H~_t as well, not through the skip path alone. "
            if solved and max(keeping) == 0
            else ". "
        )
        + "Averaged over all units the gate moves less: mean Z_t "
        f"{_mean(r['z_unmarked'] for r in rs):.3f} at the unmarked steps, "
        f"{_mean(r['z_marked'] for r in rs):.3f} at the marked ones (higher in "
        f"{int(np.sum(diff > 0))} of {len(rs)} seeds)."
    )


def _label(variant: str) -> str:
    return VARIANTS[variant][0]


def define_flags() -> None:
    flags.DEFINE_list("lengths", ["50", "100"], "Adding-problem lengths T for the ablations.")
    flags.DEFINE_list(
        "variants",
        list(VARIANTS),
        "GRU variants: learned, r1 (R_t = 1), z0 (Z_t = 0), r1z0 (both: a plain RNN).",
    )
    flags.DEFINE_integer("seeds", 3, "Seeds: 0 .. seeds-1 (adding and LM runs).")
    flags.DEFINE_integer("steps", 1000, "Adam steps per adding-problem run.")
    flags.DEFINE_integer("batch_size", 64, "Adding-problem batch size.")
    flags.DEFINE_integer("hidden_size", 32, "Adding-problem GRU hidden units.")
    flags.DEFINE_float("lr", 3e-3, "Adding-problem Adam peak learning rate.")
    flags.DEFINE_integer("lm_epochs", 10, "Language model: epochs per run.")
    flags.DEFINE_integer("lm_hidden", 32, "Language model: GRU hidden units.")
    flags.DEFINE_float("lm_lr", 0.01, "Language model: Adam peak learning rate (cosine).")
    flags.DEFINE_integer("lm_batch", 256, "Language model: windows per batch.")
    flags.DEFINE_integer("lm_train", 10_000, "Language model: training windows.")
    flags.DEFINE_integer("lm_val", 5_000, "Language model: validation windows.")
    flags.DEFINE_string(
        "lm_workdir",
        "",
        "A trained one-layer GRU run directory for the gate activations; empty: the "
        "learned-GRU LM of seed 0 trained here.",
    )
    flags.DEFINE_string("passage", PASSAGE, "Text whose gate activations are plotted.")
    flags.DEFINE_string("outdir", str(common.RESULTS), "Where gates.md and the PNGs are written.")
    flags.register_validator("outdir", outdir_ok)
    flags.DEFINE_string("note", "", "Extra line for the markdown, e.g. 'reduced settings: ...'.")


def main(argv):
    del argv  # positional arguments are refused by parse_flags_or_exit_2
    common.keep_committed_results(FLAGS)
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        lengths = common.int_list(FLAGS.lengths, "lengths")
        if not lengths or min(lengths) < 2:
            raise ValueError("--lengths: expected lengths >= 2")
        for name in ("seeds", "steps", "batch_size", "hidden_size", "lm_epochs", "lm_hidden"):
            if FLAGS[name].value < 1:
                raise ValueError(f"--{name}: expected >= 1, got {FLAGS[name].value}")
        bad = [v for v in FLAGS.variants if v not in VARIANTS]
        if bad or not FLAGS.variants:
            raise ValueError(f"--variants: expected some of {', '.join(VARIANTS)}, got {bad}")
        if not FLAGS.lm_workdir and "learned" not in FLAGS.variants:
            raise ValueError(
                "--variants: needs 'learned' for the gate activations (or --lm_workdir)"
            )
        if not FLAGS.passage.strip():
            raise ValueError("--passage: expected some text")
        if FLAGS.lm_workdir:  # read at the end: checked before the training
            try:
                saved = runs.load_config(Path(FLAGS.lm_workdir))
            except ValueError as e:
                raise ValueError(f"--lm_workdir: {e}") from None
            if saved.cell != "gru" or saved.num_layers != 1 or saved.embed_dim:
                raise ValueError(
                    f"--lm_workdir: expected a one-layer GRU run with one-hot input, got "
                    f"cell {saved.cell!r}, {saved.num_layers} layer(s), embed_dim "
                    f"{saved.embed_dim}"
                )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    s = {
        "variants": [v for v in VARIANTS if v in FLAGS.variants],
        "lengths": sorted(lengths),
        "seeds": list(range(FLAGS.seeds)),
        "steps": FLAGS.steps,
        "batch_size": FLAGS.batch_size,
        "hidden_size": FLAGS.hidden_size,
        "lr": FLAGS.lr,
        "lm_epochs": FLAGS.lm_epochs,
        "lm_hidden": FLAGS.lm_hidden,
        "lm_lr": FLAGS.lm_lr,
        "lm_batch": FLAGS.lm_batch,
        "lm_train": FLAGS.lm_train,
        "lm_val": FLAGS.lm_val,
    }
    echo = lambda m: print(m, flush=True)  # noqa: E731
    start = time.perf_counter()
    adding_rows = adding_ablations(s, echo)
    with tempfile.TemporaryDirectory(prefix="gates_lm_") as tmp:
        lm_rows = lm_ablations(s, Path(tmp), echo)
        if FLAGS.lm_workdir:
            source = f"the run in `{FLAGS.lm_workdir}`"
            act = gate_activations(Path(FLAGS.lm_workdir), FLAGS.passage)
        else:
            row = next(r for r in lm_rows if r["variant"] == "learned")
            source = (
                f"the learned GRU language model of seed {row['seed']} above (val ppl "
                f"{row['val_ppl']:.3f})"
            )
            act = gate_activations(row["workdir"], FLAGS.passage)
    seconds = time.perf_counter() - start
    stats = activation_stats(act)
    outdir = Path(FLAGS.outdir)
    lm_raw = [{k: v for k, v in r.items() if k != "workdir"} for r in lm_rows]
    # the raw numbers first: they survive a failure in the reporting
    common.write_json(
        outdir / "gates.json",
        {"settings": s, "adding": adding_rows, "lm": lm_raw, "activation_stats": stats},
    )
    plot_ablations(adding_rows, lm_rows, s, outdir / "gates.png")
    plot_activations(act, outdir / "gates_activations.png")
    md = markdown(adding_rows, lm_rows, act, stats, s, seconds, FLAGS.note, source)
    common.write_text(outdir / "gates.md", md)
    print(f"wrote {outdir / 'gates.md'}, gates.png, gates_activations.png ({seconds:.0f} s)")


if __name__ == "__main__":
    from experiments.common import parse_flags_or_exit_2

    define_flags()
    app.run(main, flags_parser=parse_flags_or_exit_2)
