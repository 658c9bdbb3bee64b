r"""Claim (seed, section 3): deep RNNs need careful tuning (learning rate, gradient
clipping) and careful initialisation to converge.

    python -m experiments.claims.depth          # the grid below, 15-30 min on 2 CPU cores
    python -m experiments.claims.depth --depths=1,4 --lrs=1,4 --seeds=1 --epochs=1

A grid over depth (1-4 stacked GRU layers) x SGD learning rate x gradient clipping
(global norm 1, or none) x initialisation x seeds, on the book's character language
model (The Time Machine, 32-step windows, one-hot input, SGD with a constant
learning rate, hidden size 32). Every run computes what ``rnn_jax.train.run`` does
with ``--optimizer=sgd --schedule=constant --grad_clip=C --lr=LR --seed=S`` (same
initialisation, the same batches from ``rnn_jax.data.train_batch``, the same loss
and clipping arithmetic; tests/test_claims_b.py checks one run against
``train.run``), but in one process with one compiled step per depth (learning rate
and clipping threshold are traced arguments), so the grid fits in about 20 CPU minutes.

A run whose clipping never engaged (gradient norm always below the threshold)
computed exactly what the unclipped run computes, so the unclipped run is copied
rather than repeated. A run *diverged* when its training loss became non-finite,
an epoch's training perplexity went above ``STOP_PPL`` (the run stops there), or
its last epoch's training perplexity is above the vocabulary size (it ended worse
than guessing uniformly); it *failed* when it diverged or ended with a
validation perplexity above ``--fail_ppl`` (by default the unigram perplexity of
the validation text, about 16.6: no better than letter frequencies). A grid point
that converges at the shallowest depth but not the deepest is *diverged*,
*stalled* (training perplexity flat in the last epoch) or *slow* (still falling)
there; the verdict reads the learning rate, clipping and the initialisation
separately. Writes ``depth.json`` (every run), ``depth.md`` and ``depth.png``
(validation perplexity against learning rate, one panel per depth and
initialisation, with and without clipping) into ``--outdir``.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

from experiments.common import deferred_sigint

with deferred_sigint():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from absl import app, flags

    from experiments.claims.common import (
        RESULTS,
        keep_committed_results,
        mean_std,
        pyplot,
        save_figure,
        write_json,
        write_text,
    )
    from experiments.common import outdir_ok, parse_flags_or_exit_2
    from rnn_jax import data, models, text

CEILING = 40.0  # plots draw larger (or diverged) perplexities at this height
STOP_PPL = 1000.0  # an epoch's training perplexity above this stops the run: diverged

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (only when run as a command, so tests can import this)."""
    flags.DEFINE_list("depths", ["1", "2", "3", "4"], "Numbers of stacked layers to compare.")
    flags.DEFINE_list(
        "lrs", ["1", "2", "4", "8", "16"], "SGD learning rates of the grid (constant)."
    )
    flags.DEFINE_list("clips", ["1", "0"], "Gradient clipping global norms; 0 = no clipping.")
    flags.DEFINE_list(
        "inits",
        ["uniform", "default"],
        "Initialisations: uniform = the book's (PyTorch) U(-1/sqrt(H), 1/sqrt(H)); default = "
        "rnn_jax's LeCun-normal input and orthogonal recurrent weights.",
    )
    flags.DEFINE_integer("seeds", 3, "Seeds per grid point (0 .. seeds-1).")
    flags.DEFINE_integer(
        "epochs",
        10,
        "Passes over the training windows: long enough that the deeper models are "
        "not judged on slowness alone (3 left depth 3-4 near the unigram at every rate).",
    )
    flags.DEFINE_integer("batch_size", 256, "Windows per batch.")
    flags.DEFINE_integer("hidden_size", 32, "Hidden units per layer.")
    flags.DEFINE_enum("cell", "gru", ["rnn", "gru", "lstm"], "Recurrent cell of every layer.")
    flags.DEFINE_integer("num_steps", 32, "Time steps per window.")
    flags.DEFINE_integer("num_train", 10_000, "Training windows.")
    flags.DEFINE_integer("num_val", 2_000, "Validation windows (evaluated once, at the end).")
    flags.DEFINE_float(
        "fail_ppl",
        0.0,
        "A run that ends above this validation perplexity failed to train; 0: the unigram "
        "(letter-frequency) perplexity of the validation text.",
    )
    flags.DEFINE_string("outdir", str(RESULTS), "Where depth.md and depth.png are written.")
    flags.register_validator("outdir", outdir_ok)
    flags.DEFINE_string("note", "", "Extra paragraph for the markdown (e.g. 'reduced settings').")


# --- training -------------------------------------------------------------------------


def clip_by_global_norm(grads, max_norm):
    """``optax.clip_by_global_norm``'s arithmetic with a traced ``max_norm`` (inf = off)."""
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    clipped = jax.tree.map(lambda g: jnp.where(norm < max_norm, g, g / norm * max_norm), grads)
    return clipped, norm


def make_steps(model: models.Model):
    """Jitted ``train_step(params, lr, clip, batch)`` and ``eval_step(params, batch)``.

    ``lr`` and ``clip`` are traced scalars, so one compilation serves the whole grid
    of a depth. The arithmetic is ``rnn_jax.train``'s: mean token cross-entropy over
    rows of weight 1, ``clip_by_global_norm`` then ``sgd``.
    """

    def loss_fn(params, x, y, weight):
        logits, _ = model.apply(params, x)
        w = weight[:, None]
        loss_sum = jnp.sum(models.token_losses(logits, y) * w)
        count = jnp.sum(w) * x.shape[1]
        return loss_sum / count, (loss_sum, count)

    @jax.jit
    def train_step(params, lr, clip, x, y, weight):
        grads, (loss_sum, count) = jax.grad(loss_fn, has_aux=True)(params, x, y, weight)
        grads, norm = clip_by_global_norm(grads, clip)
        params = jax.tree.map(lambda p, g: p + g * (-lr), params, grads)
        return params, loss_sum, count, norm

    @jax.jit
    def eval_step(params, x, y, weight):
        _, (loss_sum, count) = loss_fn(params, x, y, weight)
        return loss_sum, count

    return train_step, eval_step


def perplexity(mean_loss: float) -> float:
    return math.exp(mean_loss) if math.isfinite(mean_loss) and mean_loss < 700 else math.inf


def train_one(steps, params, windows, *, lr, clip, seed, epochs, batch_size, worst_ppl):
    """One SGD run (``clip`` 0 = none); returns a dict of results.

    Diverged: a non-finite loss or an epoch's training perplexity above ``STOP_PPL``
    (the run stops there; its perplexities are reported as ``inf``), or a last
    epoch's training perplexity above ``worst_ppl`` (uniform guessing).
    """
    train_step, eval_step = steps
    spe = data.steps_per_epoch(windows, batch_size, "windows")
    c = jnp.float32(clip if clip > 0 else np.inf)
    lr_ = jnp.float32(lr)
    diverged, max_norm, clipped, train_ppl, curve = False, 0.0, False, math.inf, []
    for epoch in range(epochs):
        metrics = []
        for i in range(spe):
            b = data.train_batch(windows, batch_size, seed, epoch, i)
            params, ls, n, norm = train_step(params, lr_, c, b.x, b.y, b.weight)
            metrics.append((ls, n, norm))
        ls, n, norm = (np.asarray([m[k] for m in metrics], np.float64) for k in range(3))
        train_ppl = perplexity(ls.sum() / n.sum())
        curve.append(train_ppl)
        finite_norm = norm[np.isfinite(norm)]
        max_norm = max(max_norm, float(finite_norm.max()) if finite_norm.size else math.inf)
        clipped |= bool(np.any(~(norm < float(c))))
        if not (np.all(np.isfinite(ls)) and train_ppl <= STOP_PPL):
            diverged = stopped = True
            break
    else:
        stopped = False
        diverged = not train_ppl <= worst_ppl
    val_ppl = math.inf
    if not stopped:
        total = count = 0.0
        for b in data.eval_batches(windows, batch_size, "val"):
            s_, n_ = eval_step(params, b.x, b.y, b.weight)
            total, count = total + float(s_), count + float(n_)
        val_ppl = perplexity(total / count)
    return {
        "lr": lr,
        "clip": clip,
        "seed": seed,
        "train_ppl": train_ppl if not stopped else math.inf,
        "val_ppl": val_ppl,
        "diverged": diverged,
        "epochs_run": len(curve),
        "max_grad_norm": max_norm,
        "clipped": clipped,
        "train_curve": curve,
    }


def sweep(
    *,
    num_layers: int,
    lrs: list[float],
    clips: list[float],
    seeds: list[int],
    epochs: int,
    batch_size: int,
    hidden_size: int,
    cell: str = "gru",
    init: str = "uniform",
    num_steps: int = 32,
    num_train: int = 10_000,
    num_val: int = 2_000,
    worst_ppl: float = 0.0,
) -> list[dict]:
    """Trains one model per (lr, clip, seed) at depth ``num_layers`` (one compilation).

    ``clip`` 0 means no clipping. A run whose clipping never engaged (gradient norm
    always below the threshold) computed exactly what the unclipped run computes, so
    the unclipped run is not repeated but copied (``"copied": True``).
    ``worst_ppl`` (0: the vocabulary size, i.e. uniform guessing): a run whose last
    epoch's training perplexity exceeds it diverged. Returns one dict per run.
    """
    ids, vocab = text.load_corpus(None, "char", 0)
    windows = data.make_windows(ids, num_steps, num_train, num_val)
    config = models.ModelConfig(
        vocab_size=len(vocab),
        cell=cell,
        hidden_size=hidden_size,
        num_layers=num_layers,
        init=init,
        forget_bias=0.0 if init == "uniform" else 1.0,
    )
    model = models.language_model(config)
    steps = make_steps(model)
    worst = worst_ppl or float(len(vocab))
    out = []
    for lr in lrs:
        for seed in seeds:
            done: dict[float, dict] = {}
            for clip in sorted(clips, key=lambda c: c == 0):  # clipped runs first
                unclipped_twin = [r for r in done.values() if not r["clipped"]]
                if clip == 0 and unclipped_twin:
                    r = {**unclipped_twin[0], "clip": 0.0, "copied": True}
                else:
                    r = train_one(
                        steps,
                        model.init(jax.random.key(seed)),
                        windows,
                        lr=lr,
                        clip=clip,
                        seed=seed,
                        epochs=epochs,
                        batch_size=batch_size,
                        worst_ppl=worst,
                    )
                    r["copied"] = False
                done[clip] = r
                out.append({"depth": num_layers, **r})
    return out


def unigram_ppl(num_steps: int, num_train: int, num_val: int) -> float:
    """Validation perplexity of letter frequencies counted on the training text."""
    ids, vocab = text.load_corpus(None, "char", 0)
    windows = data.make_windows(ids, num_steps, num_train, num_val)
    counts = np.bincount(windows.train_tokens, minlength=len(vocab)) + 1  # add-one
    logp = np.log(counts / counts.sum())
    _, targets = windows.take(np.arange(num_train, num_train + num_val))
    return math.exp(-float(np.mean(logp[targets])))


# --- reporting ------------------------------------------------------------------------


FALLING = 0.01  # a last epoch that lowers the training perplexity by more: still learning


def _falling(curve: list[float]) -> bool:
    """The training perplexity fell by more than ``FALLING`` (relative) in the last epoch."""
    return len(curve) < 2 or curve[-1] < (1 - FALLING) * curve[-2]


def is_failed(run: dict, fail_ppl: float) -> bool:
    return run["diverged"] or not run["val_ppl"] <= fail_ppl


def clip_name(clip: float) -> str:
    return "none" if clip == 0 else f"{clip:g}"


def summarize(rows: list[dict], fail_ppl: float) -> dict:
    """Per (init, depth): the best grid point by mean validation perplexity over seeds,
    how many grid points train with every seed, and failure / divergence rates."""
    summary = {}
    inits = list(dict.fromkeys(r["init"] for r in rows))  # in the order run
    for key in sorted(
        {(r["init"], r["depth"]) for r in rows}, key=lambda k: (inits.index(k[0]), k[1])
    ):
        mine = [r for r in rows if (r["init"], r["depth"]) == key]
        points: dict[tuple, list[dict]] = {}
        for r in mine:
            points.setdefault((r["lr"], r["clip"]), []).append(r)

        def score(runs):
            vals = [r["val_ppl"] for r in runs]
            return statistics.mean(vals) if all(math.isfinite(v) for v in vals) else math.inf

        best = min(points, key=lambda k: score(points[k]))
        by_clip = {}
        for c in sorted({r["clip"] for r in mine}, reverse=True):
            sub = [r for r in mine if r["clip"] == c]
            by_clip[c] = {
                "n": len(sub),
                "failed": sum(is_failed(r, fail_ppl) for r in sub) / len(sub),
                "diverged": sum(r["diverged"] for r in sub) / len(sub),
                "diverged_runs": sum(r["diverged"] for r in sub),
                "good_lrs": sorted(
                    lr
                    for (lr, c2), runs in points.items()
                    if c2 == c and not any(is_failed(r, fail_ppl) for r in runs)
                ),
                "stable_lrs": sorted(
                    lr
                    for (lr, c2), runs in points.items()
                    if c2 == c and not any(r["diverged"] for r in runs)
                ),
                # every failed, not diverged seed's training perplexity still falling
                # by more than FALLING in the last epoch (one epoch: unknown, counted
                # as falling): slow rather than stalled
                "falling_lrs": sorted(
                    lr
                    for (lr, c2), runs in points.items()
                    if c2 == c
                    and all(
                        _falling(r["train_curve"])
                        for r in runs
                        if is_failed(r, fail_ppl) and not r["diverged"]
                    )
                ),
            }
        summary[key] = {
            "best": best,
            "best_val": [r["val_ppl"] for r in points[best]],
            "best_train": [r["train_ppl"] for r in points[best]],
            "failed": sum(is_failed(r, fail_ppl) for r in mine) / len(mine),
            "diverged": sum(r["diverged"] for r in mine) / len(mine),
            # neither diverged nor better than the unigram (slow or stalled)
            "failed_not_diverged": sum(is_failed(r, fail_ppl) and not r["diverged"] for r in mine)
            / len(mine),
            "good_points": sum(
                not any(is_failed(r, fail_ppl) for r in runs) for runs in points.values()
            ),
            "points": len(points),
            "by_clip": by_clip,
        }
    return summary


def plot(rows: list[dict], path: Path, fail_ppl: float) -> None:
    plt = pyplot()
    depths = sorted({r["depth"] for r in rows})
    inits = sorted({r["init"] for r in rows}, key=lambda i: i != "uniform")
    fig, axes = plt.subplots(
        len(inits),
        len(depths),
        figsize=(3.4 * len(depths), 3.1 * len(inits)),
        squeeze=False,
        sharey=True,
    )
    for row, init in enumerate(inits):
        for ax, depth in zip(axes[row], depths, strict=True):
            for clip in sorted({r["clip"] for r in rows}, reverse=True):
                sub = [r for r in rows if (r["init"], r["depth"], r["clip"]) == (init, depth, clip)]
                lrs = sorted({r["lr"] for r in sub})
                vals = [[min(r["val_ppl"], CEILING) for r in sub if r["lr"] == lr] for lr in lrs]
                label = "no clipping" if clip == 0 else f"clip at norm {clip:g}"
                ax.errorbar(
                    lrs,
                    [np.mean(v) for v in vals],
                    yerr=[np.std(v) for v in vals],
                    fmt="s--" if clip == 0 else "o-",
                    capsize=3,
                    label=label,
                )
                bad = [r["lr"] for r in sub if r["diverged"]]
                if bad:
                    ax.plot(bad, [CEILING] * len(bad), "x", color="red", ms=8)
            ax.axhline(fail_ppl, color="gray", lw=0.8, ls=":")
            ax.set_xscale("log", base=2)
            ticks = sorted({r["lr"] for r in rows})
            ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
            ax.minorticks_off()
            ax.set_ylim(1, CEILING * 1.08)
            ax.set_title(f"{depth} layer{'s' if depth > 1 else ''}, init {init}", fontsize=10)
            ax.grid(True, alpha=0.3)
            if row == len(inits) - 1:
                ax.set_xlabel("SGD learning rate")
        axes[row][0].set_ylabel("validation perplexity")
    axes[0][0].legend(
        fontsize=7, title=f"x: diverged; dotted: unigram {fail_ppl:.1f}", title_fontsize=7
    )
    fig.tight_layout()
    save_figure(fig, path)


def markdown(rows: list[dict], s: dict, fail_ppl: float, seconds: float, note: str) -> str:
    summary = summarize(rows, fail_ppl)
    lines = [
        "# Depth needs tuning",
        "",
        "**Claim** (seed, section 3): deep RNNs need careful tuning (learning rate, "
        "gradient clipping) and careful initialisation to converge.",
        "",
    ]
    if note:
        lines += [f"**{note}**", ""]
    lines += [
        "**Setup.** Character language model on The Time Machine (28 tokens, one-hot "
        f"input), {s['cell'].upper()} with hidden size {s['hidden_size']} per layer, "
        f"depth {', '.join(map(str, s['depths']))}; {s['num_train']:,} training windows "
        f"of {s['num_steps']} steps, batch {s['batch_size']}, {s['epochs']} epochs "
        f"({s['steps']} SGD steps, no momentum, constant learning rate in "
        f"{{{', '.join(f'{x:g}' for x in s['lrs'])}}}), gradient clipping at global norm "
        + " or ".join(clip_name(c) for c in s["clips"])
        + f", initialisation {' and '.join(f'`{i}`' for i in s['inits'])}, seeds "
        f"{', '.join(map(str, s['seeds']))}. Validation perplexity on {s['num_val']:,} "
        "held-out windows after the last epoch. *Diverged*: a non-finite training "
        f"loss, or an epoch's training perplexity above {STOP_PPL:g} (the run stops "
        "there and counts as non-finite in the means), or a last epoch's training "
        "perplexity above 28 (ended worse than uniform guessing). *Failed*: diverged, "
        "or validation perplexity above "
        f"{fail_ppl:.2f}, the unigram perplexity of the validation text (no better "
        "than letter frequencies); *converged*: not failed. A grid point that converges "
        "at the shallowest depth but not the deepest is *diverged* there (a seed "
        "diverged), *stalled* (no seed diverged, a seed's training perplexity no longer "
        "falling in the last epoch) or *slow* (every seed still improving). Each run "
        "computes what "
        "`rnn_jax.train.run` computes "
        "with the same flags (checked in tests/test_claims_b.py), one compiled step per "
        f"depth. Command: `python -m experiments.claims.depth`; {seconds:.0f} s.",
        "",
        "## Best setting per depth (validation / training perplexity, mean ± std over seeds)",
        "",
        "| init | depth | best lr | best clip | val ppl | train ppl | grid points that "
        "converge (every seed) | lrs that converge, clipped | lrs that converge, unclipped "
        "| largest lr without divergence, clipped / unclipped | failed runs | diverged "
        "runs | failed, not diverged |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    clip_on = max(s["clips"])
    for (init, depth), d in summary.items():
        lr, clip = d["best"]
        good = {
            c: ", ".join(f"{x:g}" for x in d["by_clip"][c]["good_lrs"]) or "none"
            for c in d["by_clip"]
        }
        stable = " / ".join(
            _largest(d["by_clip"][c]["stable_lrs"]) if c in d["by_clip"] else "-"
            for c in (clip_on, 0.0)
            if clip_on > 0 or c == 0.0
        )
        lines.append(
            f"| {init} | {depth} | {lr:g} | {clip_name(clip)} | {mean_std(d['best_val'], '.2f')} "
            f"| {mean_std(d['best_train'], '.2f')} | {d['good_points']}/{d['points']} "
            f"| {good.get(clip_on, '-') if clip_on > 0 else '-'} | {good.get(0.0, '-')} "
            f"| {stable} | {d['failed']:.0%} | {d['diverged']:.0%} "
            f"| {d['failed_not_diverged']:.0%} |"
        )
    lines += [
        "",
        "## Failed and diverged runs by clipping",
        "",
        "| init | depth | clipping | runs | failed | diverged |",
        "|---|---|---|---|---|---|",
    ]
    for (init, depth), d in summary.items():
        for clip, c in d["by_clip"].items():
            lines.append(
                f"| {init} | {depth} | {clip_name(clip)} | {c['n']} | {c['failed']:.0%} "
                f"| {c['diverged']:.0%} |"
            )
    lines += [
        "",
        "## Validation perplexity of every grid point (mean ± std over seeds)",
        "",
        "| init | depth | clip | " + " | ".join(f"lr {x:g}" for x in s["lrs"]) + " |",
        "|---|---|---|" + "---|" * len(s["lrs"]),
    ]
    for init in s["inits"]:
        for depth in s["depths"]:
            for clip in s["clips"]:
                vals = [
                    mean_std(
                        [
                            r["val_ppl"]
                            for r in rows
                            if (r["init"], r["depth"], r["clip"], r["lr"])
                            == (init, depth, clip, lr)
                        ],
                        ".2f",
                    )
                    for lr in s["lrs"]
                ]
                lines.append(f"| {init} | {depth} | {clip_name(clip)} | " + " | ".join(vals) + " |")
    copied = sum(r["copied"] for r in rows)
    unclipped = sum(r["clip"] == 0 for r in rows)
    lines += [
        "",
        f"({copied} of {unclipped} unclipped runs never reached the clipping threshold "
        "in their clipped twin and are copies of it.)",
        "",
        "![validation perplexity against learning rate per depth](depth.png)",
        "",
        "## Did the claim hold?",
        "",
        verdict(summary, s),
        "",
    ]
    return "\n".join(lines)


def _largest(lrs: list[float]) -> str:
    return f"{max(lrs):g}" if lrs else "none"


def _learning_rate_verdict(init: str, first: dict, last: dict, ds: list[int], s: dict) -> str:
    """Deeper converges in fewer grid points, and why the lost points fail at the
    deepest depth: diverged (a seed blew up) or stalled (training perplexity no longer
    falling) support the claim; slow (still falling when the budget ran out) means a
    longer budget, not a more careful setting."""
    if last["good_points"] >= first["good_points"]:
        return (
            f"**Learning rate: did not hold** for init `{init}`: depth {ds[-1]} converges in "
            f"{last['good_points']} grid points, depth {ds[0]} in {first['good_points']}."
        )
    kinds: dict[str, list[str]] = {"diverged": [], "stalled": [], "slow": []}
    for c, fc in first["by_clip"].items():
        lc = last["by_clip"][c]
        for lr in sorted(set(fc["good_lrs"]) - set(lc["good_lrs"])):
            kind = (
                "diverged"
                if lr not in lc["stable_lrs"]
                else "slow"
                if lr in lc["falling_lrs"]
                else "stalled"
            )
            kinds[kind].append(f"lr {lr:g} clip {clip_name(c)}")
    lost = "; ".join(f"{k}: {', '.join(v)}" for k, v in kinds.items() if v)
    head = (
        f"**Learning rate: held** for init `{init}`"
        if kinds["diverged"] or kinds["stalled"]
        else f"**Learning rate: partly held** for init `{init}`"
    )
    text = (
        f"{head}: depth {ds[-1]} converges in {last['good_points']} grid points against "
        f"{first['good_points']} at depth {ds[0]}; the settings it loses, at depth {ds[-1]} "
        f"({lost})"
    )
    if kinds["diverged"] or kinds["stalled"]:
        return text + ": the deeper model needs a more careful choice."
    return (
        text + ": every setting lost was still improving when the "
        f"{s['epochs']} epochs ran out, so depth asks for a longer budget here, not a more "
        "careful setting."
    )


def _clipping_verdict(init: str, summary: dict, ds: list[int], clip_on: float) -> str:
    """Held when clipping prevents more divergence at the deepest depth than at the
    shallowest, by two runs at least (one run in 15 is noise)."""

    def without(d):
        return summary[(init, d)]["by_clip"][0.0]

    def with_(d):
        return summary[(init, d)]["by_clip"][clip_on]

    # runs clipping saved, counted as integers (rates times n round to 1.999...)
    cuts = {d: without(d)["diverged_runs"] - with_(d)["diverged_runs"] for d in ds}
    n = without(ds[0])["n"]
    numbers = ", ".join(
        f"depth {d} {without(d)['diverged']:.0%} / {with_(d)['diverged']:.0%}" for d in ds
    )
    if all(without(d)["diverged_runs"] == 0 for d in ds):
        head, why = "not tested", "no run diverged without clipping: nothing to prevent"
    elif cuts[ds[-1]] - cuts[ds[0]] >= 2:
        head, why = (
            "held",
            f"clipping prevents more divergence at depth {ds[-1]} than at depth {ds[0]}",
        )
    else:
        head, why = (
            "not a depth effect",
            f"clipping prevents about as much divergence at depth {ds[0]} as at depth "
            f"{ds[-1]} (or more), within two runs of {n}",
        )
    return (
        f"**Clipping: {head}** for init `{init}`: diverged runs without / with clipping "
        f"{numbers}; {why}."
    )


def verdict(summary: dict, s: dict) -> str:
    """A plain-words reading of the numbers, computed from them. The claim has three
    parts, read separately: the learning rate (do deeper models converge in fewer
    settings, and do they diverge at smaller rates: unstable, or only slower?),
    clipping (does it prevent more divergence as depth grows?) and the
    initialisation (does it matter more as depth grows?)."""
    parts = []
    clip_on = max(s["clips"])
    for init in s["inits"]:
        ds = sorted(d for i, d in summary if i == init)
        first, last = summary[(init, ds[0])], summary[(init, ds[-1])]
        parts.append(
            f"Init `{init}`: grid points that converge (beat the unigram) with every seed: "
            + ", ".join(
                f"depth {d} {summary[(init, d)]['good_points']}/{summary[(init, d)]['points']}"
                for d in ds
            )
            + "; best validation perplexity: "
            + ", ".join(
                f"depth {d} {statistics.mean(summary[(init, d)]['best_val']):.2f}"
                if all(math.isfinite(v) for v in summary[(init, d)]["best_val"])
                else f"depth {d} none"
                for d in ds
            )
            + "; largest learning rate at which no seed diverged ("
            + " / ".join(f"clip {clip_name(c)}" for c in first["by_clip"])
            + "): "
            + ", ".join(
                f"depth {d} "
                + " / ".join(
                    _largest(v["stable_lrs"]) for v in summary[(init, d)]["by_clip"].values()
                )
                for d in ds
            )
            + "; runs that failed without diverging: "
            + ", ".join(f"depth {d} {summary[(init, d)]['failed_not_diverged']:.0%}" for d in ds)
            + "."
        )
        if first["good_points"] == 0:
            parts.append(
                f"Nothing converges even at depth {ds[0]}: the grid is **inconclusive** for "
                f"init `{init}`."
            )
            continue
        parts.append(_learning_rate_verdict(init, first, last, ds, s))
        if 0.0 in first["by_clip"] and clip_on > 0:
            parts.append(_clipping_verdict(init, summary, ds, clip_on))
    if len(s["inits"]) > 1:
        parts.append(init_comparison(summary, s))
    parts.append(
        f"Budget: {s['epochs']} epochs ({s['steps']} SGD steps); a run counts as converged "
        "when its validation perplexity beats the unigram, not when it stopped improving."
    )
    return " ".join(parts)


def init_comparison(summary: dict, s: dict) -> str:
    """Best validation perplexity and converging grid points per depth and
    initialisation, and the verdict: held when the better start at the deepest depth
    converges in two grid points more than the other and that advantage grew by two
    since the shallowest depth (one grid point is within seed noise)."""

    def best(init, depth):
        vals = summary[(init, depth)]["best_val"]
        return statistics.mean(vals) if all(math.isfinite(v) for v in vals) else math.inf

    inits = s["inits"]
    rows = []
    for depth in sorted(s["depths"]):
        rows.append(
            f"depth {depth}: "
            + " vs ".join(
                f"{best(i, depth):.2f} ({summary[(i, depth)]['good_points']} points)" for i in inits
            )
        )
    shallowest, deepest = min(s["depths"]), max(s["depths"])
    # the better start at the deepest depth: more converging points, then the lower best
    order = sorted(inits, key=lambda i: (-summary[(i, deepest)]["good_points"], best(i, deepest)))

    def gap(depth):  # converging grid points: the better start at depth minus the other
        others = max(summary[(i, depth)]["good_points"] for i in order[1:])
        return summary[(order[0], depth)]["good_points"] - others

    # in grid points; one is within seed noise
    grows = gap(deepest) - gap(shallowest)
    held = gap(deepest) >= 2 and grows >= 2
    partly = not held and gap(deepest) >= 1 and grows >= 1
    return (
        "Initialisation, best validation perplexity and grid points that converge, "
        + " vs ".join(f"`{i}`" for i in inits)
        + ": "
        + "; ".join(rows)
        + (
            f". At depth {deepest} `{order[0]}` is the better start, converging in "
            f"{gap(deepest):+d} grid points against the other"
            if gap(deepest) > 0
            else f". At depth {deepest} no initialisation converges in more grid points"
        )
        + f" (depth {shallowest}: {gap(shallowest):+d}): **initialisation: "
        + (
            "held**, it matters more as depth grows."
            if held
            else "partly held**: its advantage at depth "
            f"{deepest} or its growth with depth is one grid point only."
            if partly
            else "not held**: its advantage does not grow with depth."
        )
    )


def main(argv):
    del argv  # positional arguments are refused by parse_flags_or_exit_2
    keep_committed_results(FLAGS)
    try:
        depths = [int(d) for d in FLAGS.depths]
        lrs = sorted(float(x) for x in FLAGS.lrs)
        clips = sorted((float(x) for x in FLAGS.clips), reverse=True)
    except ValueError as e:
        print(f"error: --depths, --lrs, --clips: {e}", file=sys.stderr)
        sys.exit(2)
    bad_init = sorted(set(FLAGS.inits) - {"uniform", "default"})
    if bad_init or not FLAGS.inits:
        print(f"error: --inits: expected uniform and/or default, got {bad_init}", file=sys.stderr)
        sys.exit(2)
    if FLAGS.seeds < 1 or FLAGS.epochs < 1 or not depths or min(depths) < 1:
        print("error: --seeds, --epochs and every depth must be >= 1", file=sys.stderr)
        sys.exit(2)
    if not lrs or not clips or min(lrs) <= 0 or min(clips) < 0:
        print("error: --lrs must be > 0 and --clips >= 0", file=sys.stderr)
        sys.exit(2)
    seeds = list(range(FLAGS.seeds))
    fail_ppl = FLAGS.fail_ppl or unigram_ppl(FLAGS.num_steps, FLAGS.num_train, FLAGS.num_val)
    t0 = time.perf_counter()
    rows = []
    for init in FLAGS.inits:
        for depth in depths:
            t = time.perf_counter()
            new = sweep(
                num_layers=depth,
                lrs=lrs,
                clips=clips,
                seeds=seeds,
                epochs=FLAGS.epochs,
                batch_size=FLAGS.batch_size,
                hidden_size=FLAGS.hidden_size,
                cell=FLAGS.cell,
                init=init,
                num_steps=FLAGS.num_steps,
                num_train=FLAGS.num_train,
                num_val=FLAGS.num_val,
            )
            rows += [{"init": init, **r} for r in new]
            print(
                f"init {init}, depth {depth}: {len(new)} runs in {time.perf_counter() - t:.0f} s; "
                "val ppl by (lr, clip): "
                + ", ".join(f"{r['lr']:g}/{clip_name(r['clip'])}: {r['val_ppl']:.2f}" for r in new),
                flush=True,
            )
    seconds = time.perf_counter() - t0
    outdir = Path(FLAGS.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    settings = {
        "cell": FLAGS.cell,
        "hidden_size": FLAGS.hidden_size,
        "depths": depths,
        "lrs": lrs,
        "clips": clips,
        "inits": list(FLAGS.inits),
        "seeds": seeds,
        "epochs": FLAGS.epochs,
        "batch_size": FLAGS.batch_size,
        "num_steps": FLAGS.num_steps,
        "num_train": FLAGS.num_train,
        "num_val": FLAGS.num_val,
        "steps": FLAGS.epochs * math.ceil(FLAGS.num_train / FLAGS.batch_size),
    }
    # the raw runs first: they survive a failure in the reporting
    write_json(outdir / "depth.json", {"settings": settings, "fail_ppl": fail_ppl, "rows": rows})
    plot(rows, outdir / "depth.png", fail_ppl)
    md = markdown(rows, settings, fail_ppl, seconds, FLAGS.note)
    write_text(outdir / "depth.md", md)
    print(md)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags_or_exit_2)
