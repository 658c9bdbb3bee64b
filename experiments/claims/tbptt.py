r"""Truncated backpropagation through time: carried state vs independent windows.

    python -m experiments.claims.tbptt                 # about 2 min on 2 CPU cores
    python -m experiments.claims.tbptt --seeds=1 --steps=320 --eval_points=4

The book trains its language models either on shuffled, independent windows (the
hidden state starts at zero in every window) or with *sequential partitioning*:
consecutive batches continue each other, the final state of a batch is the initial
state of the next, and the gradient is cut at batch boundaries (truncated BPTT), so
the model can use context longer than one window. Both are
``rnn_jax.train.run`` with ``--partition=windows`` or ``--partition=sequential``
and otherwise the same flags: the same model, batch size, window length, learning
rate and number of optimizer steps, hence the same number of training tokens seen
(``num_train`` is a multiple of ``batch_size * num_steps``, so a sequential epoch is
exactly ``1 / num_steps`` of a windows epoch).

Validation perplexity is measured two ways on the same held-out text:

* *windows*: what ``train.run`` reports, every validation window from a zero state;
* *stream*: the validation text as one long stream (``--stream_count``) read chunk
  by chunk with the state carried across chunks (how a sequentially trained model is
  meant to be used), scored on every character.

The claim is about what carried state buys: the verdict compares, seed by seed, how
much carrying lowers each model's loss past the zero-state start of the windows
(the windows' positions >= T/2 against the stream's later chunks), not which model
is better overall.

Writes ``tbptt.md`` and ``tbptt.png`` (validation perplexity against training tokens
seen, and the final numbers) into ``--outdir``.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
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
    from rnn_jax import models, text
    from rnn_jax.config import TrainConfig, model_config

PARTITIONS = ("windows", "sequential")
GAIN_FLOOR = 0.005  # nats/char: a smaller carry gain (or difference of gains) is noise

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (only when run as a command, so tests can import this)."""
    flags.DEFINE_integer(
        "seeds", 5, "Seeds per partition (0 .. seeds-1); 5 let the sign test reach p < 0.05."
    )
    flags.DEFINE_integer(
        "steps",
        3200,
        "Optimizer steps of every run: a multiple of the windows epoch "
        "(num_train / batch_size steps), hence of the sequential one too.",
    )
    flags.DEFINE_integer("eval_points", 20, "Validation evaluations along each run.")
    flags.DEFINE_enum("cell", "gru", ["rnn", "gru", "lstm"], "Recurrent cell.")
    flags.DEFINE_integer("hidden_size", 32, "Hidden units.")
    flags.DEFINE_integer("batch_size", 32, "Windows (sequential: streams) per batch.")
    flags.DEFINE_integer(
        "num_steps", 32, "Time steps per window; the truncation length.", lower_bound=1
    )
    flags.DEFINE_integer(
        "num_train",
        10_240,
        "Training windows; a multiple of batch_size * num_steps (the book: 10,000).",
    )
    flags.DEFINE_integer(
        "num_val", 5_000, "Validation windows (the book's 5,000: 5,032 characters)."
    )
    flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adam"], "Optimizer (the book: sgd).")
    flags.DEFINE_float("lr", 1.0, "Learning rate (constant), clipping at global norm 1.")
    flags.DEFINE_integer(
        "stream_count",
        1,
        "Streams the validation text is cut into (stream eval). Each starts from a zero "
        "state: more streams score more of the text without context beyond a window.",
        lower_bound=1,
    )
    flags.DEFINE_string("outdir", str(RESULTS), "Where tbptt.md and tbptt.png are written.")
    flags.register_validator("outdir", outdir_ok)
    flags.DEFINE_string("note", "", "Extra paragraph for the markdown (e.g. 'reduced settings').")


def config_for(partition: str, seed: int, workdir: str) -> TrainConfig:
    """The run of ``partition``: every other flag is the same for both partitions."""
    spe = steps_per_epoch(partition)
    return TrainConfig(
        cell=FLAGS.cell,
        hidden_size=FLAGS.hidden_size,
        init="uniform",
        forget_bias=0.0 if FLAGS.cell == "lstm" else 1.0,  # (the other cells have none)
        partition=partition,
        batch_size=FLAGS.batch_size,
        num_steps=FLAGS.num_steps,
        num_train=FLAGS.num_train,
        num_val=FLAGS.num_val,
        optimizer=FLAGS.optimizer,
        lr=FLAGS.lr,
        schedule="constant",
        grad_clip=1.0,
        epochs=FLAGS.steps // spe,
        eval_every=FLAGS.steps // FLAGS.eval_points,
        seed=seed,
        workdir=workdir,
        sample_chars=60,
        log_every_s=1e9,
    )


def steps_per_epoch(partition: str) -> int:
    if partition == "windows":
        return math.ceil(FLAGS.num_train / FLAGS.batch_size)
    return FLAGS.num_train // (FLAGS.batch_size * FLAGS.num_steps)


def stream_length(num_tokens: int, num_streams: int, num_steps: int) -> int:
    """Characters per stream when ``num_tokens`` are cut into ``num_streams``
    contiguous streams of whole chunks of ``num_steps`` (each needs its next
    character as a target; the tail that does not fill a chunk is dropped)."""
    return (num_tokens - 1) // num_streams // num_steps * num_steps


def stream_split(ids: np.ndarray, num_streams: int, num_steps: int) -> tuple[np.ndarray, ...]:
    """Cuts ``ids`` into ``num_streams`` contiguous rows of a whole number of chunks.

    Returns ``(x, y)``, each ``<int32>[num_streams, chunks * num_steps]`` with ``y``
    the next character of ``x``; the tail that does not fill a chunk is dropped.
    """
    ids = np.asarray(ids, np.int32)
    per_stream = stream_length(len(ids), num_streams, num_steps)
    if per_stream == 0:
        raise ValueError(
            f"{len(ids)} tokens are too few for {num_streams} streams of {num_steps} steps"
        )
    starts = np.arange(num_streams) * per_stream
    cols = starts[:, None] + np.arange(per_stream)
    return ids[cols], ids[cols + 1]


def stream_chunk_losses(model: models.Model, params, ids, num_streams: int, T: int):
    """``<float64>[chunks, T]``: the loss summed over the streams at each position of
    each chunk, ``ids`` read as ``num_streams`` streams with the state carried from
    chunk to chunk of ``T`` steps (zero only at the start of each stream)."""
    x, y = stream_split(ids, num_streams, T)

    @jax.jit
    def chunk(params, carry, xc, yc):
        logits, carry = model.apply(params, xc, carry)
        return carry, jnp.sum(models.token_losses(logits, yc), axis=0)

    carry = model.initial_carry(num_streams)
    rows = []
    for k in range(0, x.shape[1], T):
        carry, s = chunk(params, carry, x[:, k : k + T], y[:, k : k + T])
        rows.append(np.asarray(s, np.float64))
    return np.stack(rows)


def stream_perplexity_of(losses: np.ndarray, num_streams: int) -> float:
    """Perplexity over every scored character, from :func:`stream_chunk_losses`."""
    return math.exp(losses.sum() / (num_streams * losses.size))


def later_chunk_losses(losses: np.ndarray, num_streams: int) -> np.ndarray:
    """``<float64>[T]``: the mean loss at each position of the chunks after each
    stream's first (their state carried from everything before), from
    :func:`stream_chunk_losses`; needs streams of two chunks at least."""
    if len(losses) < 2:
        raise ValueError(
            f"one chunk of {losses.shape[1]} per stream: no chunk reads a carried state "
            "(fewer streams or more validation text)"
        )
    return losses[1:].mean(axis=0) / num_streams


def stream_perplexity(model: models.Model, params, ids: np.ndarray, num_streams: int, T: int):
    """Perplexity over ``ids`` read as ``num_streams`` streams, the state carried
    from chunk to chunk of ``T`` steps (zero only at the start of each stream)."""
    return stream_perplexity_of(
        stream_chunk_losses(model, params, ids, num_streams, T), num_streams
    )


def window_position_losses(model: models.Model, params, ids: np.ndarray, T: int) -> np.ndarray:
    """``<float64>[T]``: the mean loss at each position of every window of ``T`` steps
    of ``ids`` (one per start, as ``train.run``'s validation windows), each read from
    a zero state. Position t has seen exactly t + 1 characters."""
    ids = np.asarray(ids, np.int32)
    starts = np.arange(len(ids) - T)
    cols = starts[:, None] + np.arange(T)

    @jax.jit
    def losses(params, x, y):
        logits, _ = model.apply(params, x)
        return jnp.sum(models.token_losses(logits, y), axis=0)

    total = np.zeros(T)
    for k in range(0, len(starts), 1024):
        c = cols[k : k + 1024]
        total += np.asarray(losses(params, ids[c], ids[c + 1]), np.float64)
    return total / len(starts)


def run_all(seeds: list[int]) -> dict:
    from rnn_jax import train

    ids, vocab = text.load_corpus(None, "char", 0)
    val_ids = ids[FLAGS.num_train : FLAGS.num_train + FLAGS.num_val + FLAGS.num_steps]
    out = {p: [] for p in PARTITIONS}
    tokens_per_step = FLAGS.batch_size * FLAGS.num_steps
    with tempfile.TemporaryDirectory(prefix="claims_tbptt_") as tmp:
        for seed in seeds:
            for partition in PARTITIONS:
                config = config_for(partition, seed, f"{tmp}/{partition}_seed{seed}")
                t = time.perf_counter()
                result = train.run(config, echo=lambda s: None)
                seconds = time.perf_counter() - t
                model = models.language_model(model_config(config, len(vocab)))
                history = [
                    json.loads(line)
                    for line in (Path(config.workdir) / "metrics.jsonl").read_text().splitlines()
                ]
                chunks = stream_chunk_losses(
                    model, result.params, val_ids, FLAGS.stream_count, FLAGS.num_steps
                )
                stream = stream_perplexity_of(chunks, FLAGS.stream_count)
                # the windows' second half of the positions: every window has read at
                # least T/2 characters there, so its zero-state start is behind it;
                # against every position of the stream's chunks after its first
                late = slice(FLAGS.num_steps // 2, None)
                win_pos = window_position_losses(model, result.params, val_ids, FLAGS.num_steps)
                stream_pos = later_chunk_losses(chunks, FLAGS.stream_count)
                out[partition].append(
                    {
                        "train_ppl": result.train_ppl,
                        "val_ppl": result.val_ppl,
                        "stream_ppl": stream,
                        "late_window_ppl": math.exp(win_pos[late].mean()),
                        "late_stream_ppl": math.exp(stream_pos.mean()),
                        "sample": result.sample,
                        "epochs": config.epochs,
                        "curve": [
                            (r["step"] * tokens_per_step, r["val_ppl"], r["train_ppl"])
                            for r in history
                        ],
                        "seconds": seconds,
                    }
                )
                print(
                    f"{partition} seed {seed}: {config.epochs} epochs, train ppl "
                    f"{result.train_ppl:.2f}, val ppl (windows) {result.val_ppl:.2f}, "
                    f"(stream) {stream:.2f} ({seconds:.0f} s)",
                    flush=True,
                )
    return out


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for partition, color in zip(PARTITIONS, ("C0", "C3"), strict=True):
        runs = results[partition]
        tokens = np.array([c[0] for c in runs[0]["curve"]])
        vals = np.array([[c[1] for c in r["curve"]] for r in runs])
        mean, std = vals.mean(0), (vals.std(0, ddof=1) if len(runs) > 1 else 0 * vals[0])
        label = "independent windows" if partition == "windows" else "sequential, carried state"
        ax.plot(tokens, mean, color=color, label=f"{label} (validation, windows)")
        ax.fill_between(tokens, mean - std, mean + std, color=color, alpha=0.2)
        trains = np.array([[c[2] for c in r["curve"]] for r in runs]).mean(0)
        ax.plot(tokens, trains, color=color, ls=":", label=f"{label} (training)")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("validation perplexity along training")
    width = 0.35
    lowest = math.inf
    for i, (partition, color) in enumerate(zip(PARTITIONS, ("C0", "C3"), strict=True)):
        runs = results[partition]
        means = [np.mean([r[k] for r in runs]) for k in ("val_ppl", "stream_ppl")]
        stds = [
            np.std([r[k] for r in runs], ddof=1) if len(runs) > 1 else 0.0
            for k in ("val_ppl", "stream_ppl")
        ]
        lowest = min(lowest, *means)
        ax2.bar(
            np.arange(2) + i * width,
            means,
            width,
            yerr=stds,
            capsize=3,
            color=color,
            label=partition,
        )
    if math.isfinite(lowest):
        ax2.set_ylim(bottom=0.9 * lowest)
    ax2.set_xticks(np.arange(2) + width / 2, ["windows (zero state)", "streams (carried state)"])
    ax2.set_xlabel("how validation is read")
    ax2.set_ylabel("final validation perplexity")
    ax2.legend(title="trained on", fontsize=8)
    ax2.grid(True, axis="y", alpha=0.3)
    ax2.set_title("final validation perplexity")
    fig.tight_layout()
    save_figure(fig, path)


def markdown(results: dict, seeds: list[int], seconds: float, note: str) -> str:
    w, s = results["windows"], results["sequential"]
    tokens = FLAGS.steps * FLAGS.batch_size * FLAGS.num_steps
    val_chars = FLAGS.num_val + FLAGS.num_steps
    scored = stream_length(val_chars, FLAGS.stream_count, FLAGS.num_steps) * FLAGS.stream_count
    lines = [
        "# Truncated BPTT: sequential partitioning with carried state vs independent windows",
        "",
        "**Claim** (the book's language-model training): with sequential partitioning "
        "the hidden state is carried from one batch to the next (gradients truncated "
        "at the batch boundary), so the model can use context beyond one window; with "
        "random independent windows it starts from a zero state every window.",
        "",
    ]
    if note:
        lines += [f"**{note}**", ""]
    lines += [
        f"**Setup.** `rnn_jax.train.run`, {FLAGS.cell.upper()} hidden size "
        f"{FLAGS.hidden_size}, one-hot input, uniform (PyTorch-style) initialisation, "
        f"batch {FLAGS.batch_size}, {FLAGS.num_steps}-step windows, "
        f"{FLAGS.num_train:,} training windows, {FLAGS.optimizer.upper()} lr "
        f"{FLAGS.lr:g} (constant) with clipping at norm 1; both partitions run "
        f"{FLAGS.steps} optimizer steps = {tokens:,} training tokens "
        f"({w[0]['epochs']} windows epochs, {s[0]['epochs']} sequential epochs; the "
        "sequential state is reset at every epoch start). Validation: "
        f"{FLAGS.num_val:,} held-out windows from a zero state (*windows*, "
        "`train.run`'s number), and the same text as "
        + (
            "one contiguous stream"
            if FLAGS.stream_count == 1
            else f"{FLAGS.stream_count} contiguous streams"
        )
        + f" read in {FLAGS.num_steps}-step chunks with the state carried (*stream*; "
        f"{scored:,} of its {val_chars:,} characters scored, only the first chunk of each "
        "stream from a zero state). "
        f"Seeds {', '.join(map(str, seeds))}; mean ± std over seeds. Command: "
        f"`python -m experiments.claims.tbptt` ({seconds:.0f} s).",
        "",
        "| trained on | train ppl (last eval interval) | final val ppl (windows, zero "
        "state) | final val ppl (streams, carried state) | carry gain, nats/char | carry "
        "gain past the zero start (windows: positions >= T/2) | best val ppl along training "
        "(windows) | at tokens | wall s per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, partition in (
        ("independent windows", "windows"),
        ("sequential, carried state", "sequential"),
    ):
        runs = results[partition]
        best = [min(r["curve"], key=lambda c: c[1]) for r in runs]
        lines.append(
            f"| {name} | {mean_std([r['train_ppl'] for r in runs], '.2f')} "
            f"| {mean_std([r['val_ppl'] for r in runs], '.2f')} "
            f"| {mean_std([r['stream_ppl'] for r in runs], '.2f')} "
            f"| {mean_std(carry_gains(results, partition), '.3f')} "
            f"| {mean_std(carry_gains(results, partition, late=True), '.3f')} "
            f"| {mean_std([b[1] for b in best], '.2f')} "
            f"| {', '.join(f'{b[0]:,}' for b in best)} "
            f"| {np.mean([r['seconds'] for r in runs]):.0f} |"
        )
    lines += [
        "",
        "Training perplexity is each partition's own: over shuffled windows from a zero "
        "state, or over the carried-state streams (more context, hence lower). Both "
        f"partitions train on the same {FLAGS.num_train + FLAGS.num_steps:,} characters: "
        f"the sequential one reads each of them once per epoch ({s[0]['epochs']} epochs), "
        f"the window one {FLAGS.num_steps} times per epoch ({w[0]['epochs']} epochs).",
        "",
        "![validation perplexity against tokens seen; final numbers](tbptt.png)",
        "",
        "Greedy samples after `time traveller ` (seed 0): windows "
        f"`{w[0]['sample']}`; sequential `{s[0]['sample']}`.",
        "",
        "## Did the claim hold?",
        "",
        verdict(results),
        "",
    ]
    return "\n".join(lines)


def carry_gains(results: dict, partition: str, late: bool = False) -> np.ndarray:
    """Per seed, what carrying the state through the validation text gains, in nats
    per character: ln(val ppl, zero-state windows) - ln(val ppl, carried streams).
    ``late``: past the zero-state start: the windows' positions >= T/2 (each window
    has read T/2 characters there) against every position of the stream's chunks
    after its first (both cover the validation text but its first characters), so
    the gain is context beyond half a window, not a recovery from an unfamiliar zero
    start."""
    a, b = ("late_window_ppl", "late_stream_ppl") if late else ("val_ppl", "stream_ppl")
    return np.array([math.log(r[a]) - math.log(r[b]) for r in results[partition]])


def verdict(results: dict) -> str:
    """The claim is about what the sequential model learns: to use the state it is
    handed, i.e. context beyond one window. So the test is whether reading the
    validation text with the state carried, past the windows' zero-state start, helps
    the sequentially trained model (by more than ``GAIN_FLOOR``), and more than the
    window-trained one, seed by seed (the same seed's two runs share the
    initialisation). "Held" needs both in every seed and a one-sided sign test below
    0.05 (5 seeds at least); "did not hold" when most seeds show no gain, or no more
    gain than the window model. Which model is better overall is reported, not
    judged: the seed makes no claim about it."""

    def m(p, k):
        return float(np.mean([r[k] for r in results[p]]))

    gw, gs = carry_gains(results, "windows"), carry_gains(results, "sequential")
    lw, ls = (carry_gains(results, p, late=True) for p in PARTITIONS)
    diff = ls - lw
    n, more = len(diff), int(np.sum(diff > GAIN_FLOOR))
    # one-sided sign test: the chance of `more` or more seeds of n favouring the
    # sequential model when either is as likely
    p_sign = sum(math.comb(n, k) for k in range(more, n + 1)) / 2**n
    parts = [
        "Carrying the state through the validation text changes the cross-entropy of "
        f"the sequentially trained model by {-gs.mean():+.3f} nats/char "
        f"({m('sequential', 'val_ppl'):.2f} -> {m('sequential', 'stream_ppl'):.2f} ppl) "
        f"and of the window-trained model by {-gw.mean():+.3f} nats/char "
        f"({m('windows', 'val_ppl'):.2f} -> {m('windows', 'stream_ppl'):.2f} ppl). Part "
        "of that is the zero-state start of every window, which a sequentially trained "
        "model rarely sees; past it (the windows' second half of the positions, where a "
        "window has read half its length), carrying changes the sequential model's by "
        f"{-ls.mean():+.3f} and the window model's by {-lw.mean():+.3f} nats/char: the "
        f"sequential model gains more in {more} of {n} seeds (difference "
        f"{mean_std(diff, '.3f')}; one-sided sign test p = {p_sign:.3f})."
    ]
    helped = int(np.sum(ls > GAIN_FLOOR))  # seeds in which carrying helps the sequential model
    if n < 3:
        parts.append("**Too few seeds to judge** (at least 3).")
    elif helped == n and more == n and p_sign < 0.05:
        parts.append(
            "**The claim held**: trained with carried state, the model learns to use "
            "context beyond one window, and gains more from it than a model trained on "
            "independent windows."
        )
    elif 2 * helped <= n:
        parts.append(
            "**The claim did not hold** here: past the first half window, carried state "
            f"does not lower the sequentially trained model's loss by more than {GAIN_FLOOR} "
            f"nats/char in {n - helped} of {n} seeds: its carry gain is the zero-state start "
            "of the windows, not context beyond them."
        )
    elif 2 * more <= n:
        parts.append(
            "**The claim did not hold** here: carried state helps the sequentially "
            "trained model no more than the window-trained one."
        )
    else:
        parts.append(
            f"**Partly held**: carried state helps the sequential model in {helped} of {n} "
            f"seeds and more than the window model in {more} of {n} (by more than "
            f"{GAIN_FLOOR} nats/char), short of every seed with p < 0.05."
        )
    ws, ss = m("windows", "stream_ppl"), m("sequential", "stream_ppl")
    parts.append(
        f"Overall (not part of the claim), read with carried state the sequential model "
        f"scores {ss:.2f} and the window model {ws:.2f}"
        + (" (the window model is better at the same number of tokens)." if ws < ss else ".")
    )
    early = max(len(results["windows"][0]["curve"]) // 4 - 1, 0)  # a quarter of the budget
    tokens_early = results["windows"][0]["curve"][early][0]
    early_w = float(np.mean([r["curve"][early][1] for r in results["windows"]]))
    early_s = float(np.mean([r["curve"][early][1] for r in results["sequential"]]))
    parts.append(
        f"Early in training ({tokens_early:,} tokens) the validation perplexity (windows) "
        f"is {early_s:.2f} for the sequential model and {early_w:.2f} for the window model."
    )
    # generalisation gap, each model read the way it was trained: the window model's
    # training perplexity is over zero-state windows, the sequential one's over
    # carried-state streams
    gap_w = m("windows", "val_ppl") - m("windows", "train_ppl")
    gap_s = m("sequential", "stream_ppl") - m("sequential", "train_ppl")
    parts.append(
        "Validation minus training perplexity at the end, each read as it was trained "
        f"(windows: zero state; sequential: carried state): windows {gap_w:.2f}, "
        f"sequential {gap_s:.2f}."
    )
    return " ".join(parts)


def _flag_values() -> dict:
    names = (
        "seeds steps eval_points cell hidden_size batch_size num_steps num_train num_val "
        "optimizer lr stream_count"
    ).split()
    return {k: FLAGS[k].value for k in names}


def main(argv):
    del argv  # positional arguments are refused by parse_flags_or_exit_2
    keep_committed_results(FLAGS)
    if FLAGS.seeds < 1 or FLAGS.eval_points < 1:
        print("error: --seeds and --eval_points must be >= 1", file=sys.stderr)
        sys.exit(2)
    chunk = FLAGS.batch_size * FLAGS.num_steps
    if FLAGS.num_train % chunk:
        print(
            f"error: --num_train: {FLAGS.num_train} is not a multiple of batch_size * "
            f"num_steps = {chunk}, so the partitions would see different token counts",
            file=sys.stderr,
        )
        sys.exit(2)
    for p in PARTITIONS:
        if FLAGS.steps % steps_per_epoch(p) or FLAGS.steps < FLAGS.eval_points:
            print(
                f"error: --steps: {FLAGS.steps} must be a multiple of the {p} epoch "
                f"({steps_per_epoch(p)} steps) and >= --eval_points",
                file=sys.stderr,
            )
            sys.exit(2)
    val_chars = FLAGS.num_val + FLAGS.num_steps
    if stream_length(val_chars, FLAGS.stream_count, FLAGS.num_steps) < 2 * FLAGS.num_steps:
        print(
            f"error: --stream_count: {FLAGS.stream_count} streams of {val_chars:,} "
            f"validation characters leave fewer than 2 chunks of {FLAGS.num_steps} per "
            "stream, so no chunk would read a carried state",
            file=sys.stderr,
        )
        sys.exit(2)
    seeds = list(range(FLAGS.seeds))
    t0 = time.perf_counter()
    results = run_all(seeds)
    seconds = time.perf_counter() - t0
    outdir = Path(FLAGS.outdir)
    # the raw numbers first: they survive a failure in the reporting
    write_json(outdir / "tbptt.json", {"flags": _flag_values(), "results": results})
    plot(results, outdir / "tbptt.png")
    md = markdown(results, seeds, seconds, FLAGS.note)
    write_text(outdir / "tbptt.md", md)
    print(md)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags_or_exit_2)
