r"""Claims (seed, section 4) about bidirectional RNNs, in three measurements.

    python -m experiments.claims.bidirectional               # ~5 min on 2 CPU cores
    python -m experiments.claims.bidirectional --parts=c --time_iters=5

(a) *Estimating an observation from context on both sides.* Windows of The Time
    Machine with one character replaced by a mask token; the model predicts the
    hidden character. A bidirectional GRU against unidirectional GRUs with the same
    number of parameters: one reads its prediction at the masked position (left
    context only), one after the last character (it has read both sides, but must
    carry what it needs to the end).
(b) *A poor next-token model.* A unidirectional and a bidirectional GRU language
    model trained by ``rnn_jax.train.run`` with the same settings: training and
    validation perplexity, the perplexity of the last position of each window (the
    only one whose target the backward direction has not read) and greedy samples.
(c) *Costly.* Time of one jitted training step (forward, backward, clipped SGD
    update; ``rnn_jax.train.make_steps``) of the bidirectional GRU against a
    unidirectional GRU of the same hidden size and one of the same parameter count.

Writes ``bidirectional.md`` and ``bidirectional.png`` into ``--outdir``.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from experiments.common import deferred_sigint

with deferred_sigint():
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from absl import app, flags

    from experiments.claims.common import (
        RESULTS,
        keep_committed_results,
        mean_std,
        pyplot,
        save_figure,
        write_text,
    )
    from experiments.common import outdir_ok, parse_flags_or_exit_2
    from rnn_jax import data, models, text
    from rnn_jax.config import TrainConfig, model_config

PARTS = ("a", "b", "c")

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (only when run as a command, so tests can import this)."""
    flags.DEFINE_list(
        "parts", list(PARTS), "Which measurements to run: a (masked), b (LM), c (cost)."
    )
    flags.DEFINE_integer("seeds", 3, "Seeds per model in (a) and (b) (0 .. seeds-1).")
    # (a)
    flags.DEFINE_integer(
        "mask_hidden", 32, "(a) Hidden size of each direction of the bidirectional GRU."
    )
    flags.DEFINE_integer("mask_num_steps", 32, "(a) Characters per window.")
    flags.DEFINE_integer("mask_train_steps", 800, "(a) Adam steps per model.")
    flags.DEFINE_integer("mask_batch", 128, "(a) Windows per batch.")
    flags.DEFINE_float("mask_lr", 0.01, "(a) Adam learning rate (gradients clipped at norm 1).")
    flags.DEFINE_integer("mask_num_train", 10_000, "(a) Training windows (start positions).")
    flags.DEFINE_integer("mask_num_val", 5_000, "(a) Validation windows, each with a fixed mask.")
    # (b)
    flags.DEFINE_integer("lm_hidden", 32, "(b) Hidden size of both language models.")
    flags.DEFINE_integer("lm_epochs", 20, "(b) Epochs (the book: 50).")
    flags.DEFINE_integer("lm_batch", 1024, "(b) Batch size (the book: 1024).")
    flags.DEFINE_float("lm_lr", 4.0, "(b) SGD learning rate (the book: 4), clipping at norm 1.")
    flags.DEFINE_integer("lm_num_train", 10_000, "(b) Training windows (the book: 10,000).")
    flags.DEFINE_integer("lm_num_val", 2_000, "(b) Validation windows (the book: 5,000).")
    flags.DEFINE_integer("sample_chars", 60, "(b) Greedy sample length after 'time traveller '.")
    # (c)
    flags.DEFINE_list("time_num_steps", ["32", "128"], "(c) Sequence lengths T to time.")
    flags.DEFINE_integer("time_batch", 256, "(c) Batch size of the timed step.")
    flags.DEFINE_integer(
        "time_iters", 10, "(c) Timed steps per round (median taken).", lower_bound=1
    )
    flags.DEFINE_integer("time_rounds", 5, "(c) Rounds (mean ± std over rounds of the median).")
    flags.DEFINE_string("outdir", str(RESULTS), "Where bidirectional.md / .png are written.")
    flags.register_validator("outdir", outdir_ok)
    flags.DEFINE_string("note", "", "Extra paragraph for the markdown (e.g. 'reduced settings').")


def count_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def lm_params(vocab_size: int, hidden: int, bidirectional: bool) -> int:
    """Parameter count of a one-layer GRU language model (one-hot input)."""
    model = models.language_model(
        models.ModelConfig(
            vocab_size=vocab_size, cell="gru", hidden_size=hidden, bidirectional=bidirectional
        )
    )
    return count_params(jax.eval_shape(model.init, jax.random.key(0)))


def matching_hidden(vocab_size: int, target: int) -> int:
    """The unidirectional hidden size whose parameter count is closest to ``target``.

    The count is a quadratic polynomial of the hidden size (the recurrent weights
    grow as H^2, the input, output and bias ones as H), so three counts determine it.
    """
    counts = [lm_params(vocab_size, h, False) for h in (1, 2, 3)]
    a = (counts[2] - 2 * counts[1] + counts[0]) / 2
    b = counts[1] - counts[0] - 3 * a
    c = counts[0] - a - b
    root = (-b + math.sqrt(b * b - 4 * a * (c - target))) / (2 * a) if a else (target - c) / b
    guesses = {max(1, math.floor(root) + k) for k in (-1, 0, 1, 2)}
    return min(sorted(guesses), key=lambda h: abs(lm_params(vocab_size, h, False) - target))


# --- (a) masked character ---------------------------------------------------------------


def mask_windows(
    ids: np.ndarray, starts: np.ndarray, num_steps: int, mask_id: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows ``ids[s : s + num_steps]`` with one random position each set to ``mask_id``.

    Returns ``(x <int32>[B, T], positions <int32>[B], labels <int32>[B])``: ``x`` the
    masked windows, ``positions`` the masked index of each row and ``labels`` the
    character that was there.
    """
    starts = np.asarray(starts)
    x = np.asarray(ids)[starts[:, None] + np.arange(num_steps)].astype(np.int32)
    rows = np.arange(len(starts))
    positions = rng.integers(num_steps, size=len(starts)).astype(np.int32)
    labels = x[rows, positions].copy()
    x[rows, positions] = mask_id
    return x, positions, labels


MASK_MODELS = {
    # name: (bidirectional, read the prediction at the mask (True) or at the end)
    "bidirectional, at the mask": (True, True),
    "unidirectional, at the mask": (False, True),
    "unidirectional, after the last char": (False, False),
}


def train_masked(
    ids: np.ndarray,
    vocab_size: int,
    *,
    bidirectional: bool,
    at_mask: bool,
    hidden: int,
    seed: int,
    num_steps: int,
    train_steps: int,
    batch_size: int,
    lr: float,
    num_train: int,
    num_val: int,
) -> dict:
    """Trains one masked-character model; returns validation accuracy, perplexity at
    the masked position, accuracy per masked position and the parameter count."""
    mask_id = vocab_size  # one extra input token
    model = models.language_model(
        models.ModelConfig(
            vocab_size=vocab_size + 1, cell="gru", hidden_size=hidden, bidirectional=bidirectional
        )
    )
    params = model.init(jax.random.key(seed))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
    opt_state = tx.init(params)

    def logits_fn(params, x, pos):
        logits, _ = model.apply(params, x)  # [B, T, V + 1]
        where = pos if at_mask else jnp.full_like(pos, x.shape[1] - 1)
        out = jnp.take_along_axis(logits, where[:, None, None], axis=1)[:, 0]
        return out[:, :vocab_size]  # the mask token is never a label

    def loss_fn(params, x, pos, y):
        return jnp.mean(models.token_losses(logits_fn(params, x, pos), y))

    @jax.jit
    def step(params, opt_state, x, pos, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, pos, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def evaluate(params, x, pos, y):
        logits = logits_fn(params, x, pos)
        return models.token_losses(logits, y), jnp.argmax(logits, -1) == y

    for i in range(train_steps):
        rng = np.random.default_rng([seed, i])
        starts = rng.integers(num_train, size=batch_size)
        x, pos, y = mask_windows(ids, starts, num_steps, mask_id, rng)
        params, opt_state, _ = step(params, opt_state, x, pos, y)
    val_rng = np.random.default_rng(12345)  # the same masks for every model and seed
    x, pos, y = mask_windows(
        ids, np.arange(num_train, num_train + num_val), num_steps, mask_id, val_rng
    )
    losses, correct = [], []
    for k in range(0, num_val, 1000):
        l_, c_ = evaluate(params, x[k : k + 1000], pos[k : k + 1000], y[k : k + 1000])
        losses.append(np.asarray(l_))
        correct.append(np.asarray(c_))
    losses, correct = np.concatenate(losses), np.concatenate(correct)
    per_pos = [
        float(correct[pos == t].mean()) if np.any(pos == t) else math.nan for t in range(num_steps)
    ]
    return {
        "params": count_params(params),
        "hidden": hidden,
        "val_acc": float(correct.mean()),
        "val_ppl": math.exp(float(losses.mean())),
        "acc_by_position": per_pos,
    }


def part_a(seeds: list[int]) -> dict:
    ids, vocab = text.load_corpus(None, "char", 0)
    v = len(vocab)
    h_bi = FLAGS.mask_hidden
    target = lm_params(v + 1, h_bi, True)
    h_uni = matching_hidden(v + 1, target)
    out = {"hidden": {}, "runs": {}}
    for name, (bi, at_mask) in MASK_MODELS.items():
        h = h_bi if bi else h_uni
        runs = []
        for seed in seeds:
            t = time.perf_counter()
            runs.append(
                train_masked(
                    ids,
                    v,
                    bidirectional=bi,
                    at_mask=at_mask,
                    hidden=h,
                    seed=seed,
                    num_steps=FLAGS.mask_num_steps,
                    train_steps=FLAGS.mask_train_steps,
                    batch_size=FLAGS.mask_batch,
                    lr=FLAGS.mask_lr,
                    num_train=FLAGS.mask_num_train,
                    num_val=FLAGS.mask_num_val,
                )
            )
            print(
                f"(a) {name}, H={h}, seed {seed}: val acc {runs[-1]['val_acc']:.3f}, "
                f"ppl {runs[-1]['val_ppl']:.2f} ({time.perf_counter() - t:.0f} s)",
                flush=True,
            )
        out["runs"][name] = runs
        out["hidden"][name] = h
    return out


# --- (b) next-character language model ----------------------------------------------------


def position_losses(result_params, config: TrainConfig) -> np.ndarray:
    """Mean validation cross-entropy at each position ``t`` of the windows: ``[T]``."""
    ids, vocab = text.load_corpus(None, "char", 0)
    windows = data.make_windows(ids, config.num_steps, config.num_train, config.num_val)
    model = models.language_model(model_config(config, len(vocab)))

    @jax.jit
    def losses(params, x, y):
        logits, _ = model.apply(params, x)
        return models.token_losses(logits, y)

    total = np.zeros(config.num_steps)
    count = 0.0
    for b in data.eval_batches(windows, config.batch_size, "val"):
        total += np.sum(np.asarray(losses(result_params, b.x, b.y)) * b.weight[:, None], axis=0)
        count += float(b.weight.sum())
    return total / count


def part_b(seeds: list[int]) -> dict:
    from rnn_jax import train

    out = {}
    with tempfile.TemporaryDirectory(prefix="claims_bidirectional_") as tmp:
        for bi in (False, True):
            name = "bidirectional" if bi else "unidirectional"
            runs = []
            for seed in seeds:
                config = TrainConfig(
                    cell="gru",
                    hidden_size=FLAGS.lm_hidden,
                    bidirectional=bi,
                    init="uniform",
                    batch_size=FLAGS.lm_batch,
                    num_train=FLAGS.lm_num_train,
                    num_val=FLAGS.lm_num_val,
                    optimizer="sgd",
                    lr=FLAGS.lm_lr,
                    schedule="constant",
                    grad_clip=1.0,
                    epochs=FLAGS.lm_epochs,
                    seed=seed,
                    workdir=f"{tmp}/{name}_seed{seed}",
                    sample_chars=FLAGS.sample_chars,
                    log_every_s=1e9,
                )
                t = time.perf_counter()
                result = train.run(config, echo=lambda s: None)
                curve = [
                    json.loads(line)
                    for line in (Path(config.workdir) / "metrics.jsonl").read_text().splitlines()
                ]
                per_pos = position_losses(result.params, config)
                runs.append(
                    {
                        "train_ppl": result.train_ppl,
                        "val_ppl": result.val_ppl,
                        "last_ppl": math.exp(per_pos[-1]),
                        "rest_ppl": math.exp(per_pos[:-1].mean()),
                        "position_ppl": np.exp(per_pos).tolist(),
                        "sample": result.sample,
                        "curve": [(r["epoch"], r["train_ppl"], r["val_ppl"]) for r in curve],
                        "params": count_params(result.params),
                    }
                )
                print(
                    f"(b) {name} seed {seed}: train ppl {result.train_ppl:.2f}, val ppl "
                    f"{result.val_ppl:.2f}, last position {runs[-1]['last_ppl']:.2f} "
                    f"({time.perf_counter() - t:.0f} s); {result.sample!r}",
                    flush=True,
                )
            out[name] = runs
    return out


# --- (c) cost per step ------------------------------------------------------------------


def compiled_step(hidden: int, bidirectional: bool, num_steps: int, batch: int):
    """``rnn_jax.train``'s jitted training step of a one-layer GRU LM, compiled ahead
    of time for a fixed random batch: ``(run, compile_s, params)`` where ``run()``
    does one step and waits for it."""
    from rnn_jax import train

    config = TrainConfig(
        cell="gru",
        hidden_size=hidden,
        bidirectional=bidirectional,
        num_steps=num_steps,
        batch_size=batch,
        optimizer="sgd",
        lr=1.0,
        schedule="constant",
        grad_clip=1.0,
    )
    model = models.language_model(model_config(config, 28))
    tx = train.make_optimizer(config, 1000)
    train_step, _ = train.make_steps(model, tx, config, 1000)
    state = {"now": train.init_state(model, tx, config)}
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(28, size=(batch, num_steps)), jnp.int32)
    batch_ = data.Batch(x, jnp.roll(x, -1, axis=1), jnp.ones((batch,), jnp.float32))
    t = time.perf_counter()
    compiled = train_step.lower(state["now"], batch_).compile()
    compile_s = time.perf_counter() - t

    def run():
        state["now"], m = compiled(state["now"], batch_)
        jax.block_until_ready((state["now"], m))

    for _ in range(3):  # warm-up
        run()
    return run, compile_s, count_params(state["now"]["params"])


def part_c() -> dict:
    """Per (variant, T): the median step time of each round and the compile time.

    The variants of one T are timed in turns within every round, so a slow period of
    a shared machine hits them all alike."""
    v = 28
    h = FLAGS.lm_hidden
    h_eq = matching_hidden(v, lm_params(v, h, True))
    variants = {
        f"unidirectional H={h} (same hidden size)": (h, False),
        f"unidirectional H={h_eq} (same parameters)": (h_eq, False),
        f"bidirectional H={h}": (h, True),
    }
    out = {}
    for t in [int(x) for x in FLAGS.time_num_steps]:
        runs = {}
        for name, (hidden, bi) in variants.items():
            run, compile_s, n = compiled_step(hidden, bi, t, FLAGS.time_batch)
            runs[name] = run
            out[(name, t)] = {
                "medians": [],
                "compile_s": compile_s,
                "params": n,
                "recurrent_macs": (2 if bi else 1) * 3 * hidden * hidden,  # H @ W_h
            }
        for _ in range(FLAGS.time_rounds):
            for name, run in runs.items():
                times = []
                for _ in range(FLAGS.time_iters):
                    t0 = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - t0)
                out[(name, t)]["medians"].append(statistics.median(times))
        for name in variants:
            r = out[(name, t)]
            print(
                f"(c) {name}, T={t}: {1e3 * statistics.mean(r['medians']):.2f} ms/step, "
                f"compile {r['compile_s']:.1f} s",
                flush=True,
            )
    return out


# --- report -----------------------------------------------------------------------------


def plot(a, b, c, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    if a:
        for name, runs in a["runs"].items():
            acc = np.array([r["acc_by_position"] for r in runs])
            ax.plot(
                np.arange(acc.shape[1]), np.nanmean(acc, 0), label=f"{name} (H={a['hidden'][name]})"
            )
        ax.set_xlabel("masked position in the window")
        ax.set_ylabel("validation accuracy")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
    ax.set_title("(a) masked character")
    ax.grid(True, alpha=0.3)
    ax = axes[1]
    if b:
        for (name, runs), color in zip(b.items(), ("C0", "C3"), strict=False):
            ppl = np.array([r["position_ppl"] for r in runs]).mean(0)
            ax.plot(
                np.arange(1, len(ppl) + 1),
                ppl,
                "o-",
                ms=3,
                color=color,
                label=f"{name}, validation",
            )
        ax.set_yscale("log")
        ax.set_xlabel("position t in the window (target: character t+1)")
        ax.set_ylabel("perplexity at position t")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
    ax.set_title("(b) next-character language model")
    ax.grid(True, which="both", alpha=0.3)
    ax = axes[2]
    if c:
        names = list(dict.fromkeys(k[0] for k in c))
        lengths = sorted({k[1] for k in c})
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            means = [1e3 * statistics.mean(c[(name, t)]["medians"]) for t in lengths]
            stds = [1e3 * _std(c[(name, t)]["medians"]) for t in lengths]
            ax.bar(
                np.arange(len(lengths)) + i * width, means, width, yerr=stds, capsize=3, label=name
            )
        ax.set_xticks(
            np.arange(len(lengths)) + width * (len(names) - 1) / 2, [f"T={t}" for t in lengths]
        )
        ax.set_ylabel("ms per training step (CPU)")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
    ax.set_title("(c) cost of a training step")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def _std(values) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def markdown(a, b, c, seeds, note, seconds) -> str:
    lines = [
        "# Bidirectional recurrent networks",
        "",
        "**Claims** (seed, section 4): each step's state depends on past and future "
        "inputs; bidirectional RNNs suit estimating an observation from context on both "
        "sides, are a poor fit for predicting the next token, and are costly to train.",
        "",
    ]
    if note:
        lines += [f"**{note}**", ""]
    lines += [
        f"Command: `python -m experiments.claims.bidirectional` ({seconds:.0f} s on this "
        f"machine); seeds {', '.join(map(str, seeds))}; numbers are mean ± std over seeds.",
        "",
        "![(a) accuracy by masked position, (b) perplexity by position, (c) step time]"
        "(bidirectional.png)",
        "",
    ]
    if a:
        lines += _markdown_a(a)
    if b:
        lines += _markdown_b(b)
    if c:
        lines += _markdown_c(c)
    return "\n".join(lines)


def _markdown_a(a) -> list[str]:
    runs = a["runs"]
    lines = [
        "## (a) Masked character: context on both sides",
        "",
        f"**Setup.** Windows of {FLAGS.mask_num_steps} characters of The Time Machine "
        "(28 tokens); one position per window, drawn uniformly, is replaced by an extra "
        "mask token and the model predicts the character that was there (cross-entropy "
        f"over the 28 characters). {FLAGS.mask_train_steps} Adam steps (lr "
        f"{FLAGS.mask_lr:g}, clipping at norm 1), batch {FLAGS.mask_batch}, windows "
        f"starting in the first {FLAGS.mask_num_train:,} characters, fresh masks every "
        f"batch; validation: {FLAGS.mask_num_val:,} later windows with fixed masks. "
        "One-layer GRUs with one-hot input; the unidirectional hidden size is chosen so "
        "that its parameter count matches the bidirectional model's.",
        "",
        "| model | hidden size | parameters | val accuracy | val perplexity (masked char) |",
        "|---|---|---|---|---|",
    ]
    for name, rs in runs.items():
        lines.append(
            f"| {name} | {a['hidden'][name]} | {rs[0]['params']:,} "
            f"| {mean_std([r['val_acc'] for r in rs])} "
            f"| {mean_std([r['val_ppl'] for r in rs], '.2f')} |"
        )
    bi = statistics.mean(r["val_acc"] for r in runs["bidirectional, at the mask"])
    best_uni_name = max(
        (n for n in runs if n.startswith("uni")),
        key=lambda n: statistics.mean(r["val_acc"] for r in runs[n]),
    )
    uni = statistics.mean(r["val_acc"] for r in runs[best_uni_name])
    held = bi > uni
    lines += [
        "",
        f"**Result.** The bidirectional GRU recovers {bi:.1%} of the masked characters, "
        f"the best unidirectional model of the same size ({best_uni_name}) {uni:.1%} "
        f"({100 * (bi - uni):+.1f} points), the unidirectional model reading at the mask "
        f"{statistics.mean(r['val_acc'] for r in runs['unidirectional, at the mask']):.1%}. "
        + (
            "**The claim held**: with both sides of the gap in its state at the masked "
            "position, the bidirectional model is the better estimator at equal "
            "parameter budget."
            if held
            else "**The claim did not hold** at this budget: the unidirectional model "
            "matched or beat the bidirectional one."
        )
        + " The left panel of the figure shows accuracy by masked position: the "
        "unidirectional model reading at the mask knows nothing right of the gap, and "
        "the one reading after the last character has all the context but must carry "
        "the gap's neighbours to the end of the window.",
        "",
    ]
    return lines


def _markdown_b(b) -> list[str]:
    lines = [
        "## (b) Next-character language model",
        "",
        f"**Setup.** `rnn_jax.train.run` with the book's GRU settings except the budget: "
        f"hidden size {FLAGS.lm_hidden}, one-hot input, PyTorch-style uniform "
        f"initialisation, batch {FLAGS.lm_batch}, 32-step windows, "
        f"{FLAGS.lm_num_train:,} training / {FLAGS.lm_num_val:,} validation windows, SGD "
        f"lr {FLAGS.lm_lr:g} with clipping at norm 1, {FLAGS.lm_epochs} epochs; the only "
        "difference is `bidirectional`. *Last position* is the validation perplexity of "
        "the last position of every window alone (the only target the backward "
        "direction has not read as an input); *other positions* is the rest.",
        "",
        "| model | parameters | train ppl | val ppl | val ppl, last position | val ppl, "
        "other positions |",
        "|---|---|---|---|---|---|",
    ]
    for name, rs in b.items():
        lines.append(
            f"| {name} | {rs[0]['params']:,} | {mean_std([r['train_ppl'] for r in rs], '.2f')} "
            f"| {mean_std([r['val_ppl'] for r in rs], '.2f')} "
            f"| {mean_std([r['last_ppl'] for r in rs], '.2f')} "
            f"| {mean_std([r['rest_ppl'] for r in rs], '.2f')} |"
        )
    lines += ["", "Greedy samples after `time traveller ` (seed by seed):", ""]
    lines += ["| seed | unidirectional | bidirectional |", "|---|---|---|"]
    for seed, (u, bi) in enumerate(zip(b["unidirectional"], b["bidirectional"], strict=True)):
        lines.append(f"| {seed} | `{u['sample']}` | `{bi['sample']}` |")
    uni_val = statistics.mean(r["val_ppl"] for r in b["unidirectional"])
    bi_val = statistics.mean(r["val_ppl"] for r in b["bidirectional"])
    uni_last = statistics.mean(r["last_ppl"] for r in b["unidirectional"])
    bi_last = statistics.mean(r["last_ppl"] for r in b["bidirectional"])
    held = bi_val < uni_val and bi_last > uni_last
    lines += [
        "",
        f"**Why the bidirectional validation perplexity is low ({bi_val:.2f} against "
        f"{uni_val:.2f}).** Training and validation feed the model a whole window "
        "x_1..x_T and score its output at step t against x_{t+1}. The backward "
        "direction's state at step t has read x_T..x_t, which includes x_{t+1}: the "
        "answer is part of the input, so the model learns to copy it, on validation "
        "windows as well as on training ones. Validation perplexity does not expose "
        "this because it is measured the same way. Only the last position of a window "
        "has its target outside the input; there the bidirectional model scores "
        f"{bi_last:.2f} against the unidirectional model's {uni_last:.2f}. Generation "
        "is always in that situation (the next character is not written yet), and "
        "rerunning the network on the text so far does not help. The greedy samples "
        "above are not evidence either way (greedy decoding of models this small falls "
        "into loops, unidirectional or not); the last-position perplexity is. "
        + (
            "**The claim held**: a far lower perplexity than the unidirectional model "
            "wherever the target is visible, and a worse one where it is not, which is "
            "the only situation a next-character model is used in."
            if held
            else "**The claim did not hold as stated** in these numbers (see the table)."
        ),
        "",
    ]
    return lines


def _ratios(c, name: str, base: str, t: int) -> list[float]:
    """Per-round ratios of median step times (the variants ran in turns each round)."""
    return [x / y for x, y in zip(c[(name, t)]["medians"], c[(base, t)]["medians"], strict=True)]


def _markdown_c(c) -> list[str]:
    names = list(dict.fromkeys(k[0] for k in c))
    lengths = sorted({k[1] for k in c})
    base = names[0]
    eq_name = names[1] if len(names) > 2 else names[0]
    lines = [
        "## (c) Cost of a training step",
        "",
        "**Setup.** The jitted `train_step` of `rnn_jax.train.make_steps` (forward, "
        "backward, clipping, SGD update) of the one-layer GRU language model on a "
        f"fixed random batch of {FLAGS.time_batch} windows, on this machine's CPU "
        "(2 cores, shared with other jobs, so absolute times are noisy): after "
        f"compilation and 3 warm-up steps, {FLAGS.time_rounds} rounds in which the "
        f"variants take turns, {FLAGS.time_iters} steps each. Times: the median of "
        "each round, mean ± std over rounds; ratios: the ratio of the two variants' "
        "medians within each round (paired), mean ± std over rounds.",
        "",
        "| model | parameters | "
        + " | ".join(f"ms/step, T={t}" for t in lengths)
        + " | "
        + " | ".join(f"÷ same hidden, T={t}" for t in lengths)
        + " | "
        + " | ".join(f"÷ same parameters, T={t}" for t in lengths)
        + " |",
        "|---|---|" + "---|" * (3 * len(lengths)),
    ]
    for name in names:
        ms = [mean_std([1e3 * x for x in c[(name, t)]["medians"]], ".2f") for t in lengths]
        same = [mean_std(_ratios(c, name, base, t), ".2f") for t in lengths]
        eq = [mean_std(_ratios(c, name, eq_name, t), ".2f") for t in lengths]
        lines.append(
            f"| {name} | {c[(name, lengths[0])]['params']:,} | " + " | ".join(ms + same + eq) + " |"
        )
    bi_name = names[-1]
    ratio_same = [statistics.mean(_ratios(c, bi_name, base, t)) for t in lengths]
    ratio_eq = [statistics.mean(_ratios(c, bi_name, eq_name, t)) for t in lengths]
    if max(ratio_eq) < 0.95:
        vs_eq = (
            "cheaper: the extra cost is no more than that of its extra parameters, and "
            "the gradient chains are not longer"
        )
    elif min(ratio_eq) > 1.05:
        macs_bi = c[(bi_name, lengths[0])]["recurrent_macs"]
        macs_eq = c[(eq_name, lengths[0])]["recurrent_macs"]
        vs_eq = (
            "more expensive than its parameter count explains, with "
            f"{macs_bi:,} recurrent multiply-adds per example and step against "
            f"{macs_eq:,}, so the difference comes from elsewhere (the direction axis, "
            "reversing the sequences), not from longer gradient chains"
        )
    else:
        vs_eq = (
            "about as expensive: the extra cost is that of the extra parameters, not "
            "of longer gradient chains"
        )
    lines += [
        "",
        "**Result.** A bidirectional step costs "
        + ", ".join(f"{r:.2f}x (T={t})" for r, t in zip(ratio_same, lengths, strict=True))
        + " a unidirectional step of the same hidden size, and "
        + ", ".join(f"{r:.2f}x (T={t})" for r, t in zip(ratio_eq, lengths, strict=True))
        + " one with the same number of parameters. The bidirectional layer does twice "
        "the recurrent work of the same hidden size (two directions), but rnn_jax runs "
        "both directions in one scan (vmapped over a direction axis), so its sequential "
        "chain is T steps, as long as the unidirectional one, and the backward pass "
        "retraces that one chain. "
        + (
            "**The claim held against a unidirectional network of the same hidden size**"
            if min(ratio_same) > 1.1
            else "**The claim did not hold against the same hidden size**"
        )
        + f"; against the same parameter budget the bidirectional step is {vs_eq}.",
        "",
    ]
    return lines


def main(argv):
    del argv  # positional arguments are refused by parse_flags_or_exit_2
    keep_committed_results(FLAGS)
    parts = set(FLAGS.parts)
    if not parts or parts - set(PARTS):
        print(
            f"error: --parts: expected some of {','.join(PARTS)}, got {FLAGS.parts}",
            file=sys.stderr,
        )
        sys.exit(2)
    if FLAGS.seeds < 1:
        print(f"error: --seeds: expected >= 1, got {FLAGS.seeds}", file=sys.stderr)
        sys.exit(2)
    seeds = list(range(FLAGS.seeds))
    t0 = time.perf_counter()
    a = part_a(seeds) if "a" in parts else None
    b = part_b(seeds) if "b" in parts else None
    c = part_c() if "c" in parts else None
    seconds = time.perf_counter() - t0
    outdir = Path(FLAGS.outdir)
    plot(a, b, c, outdir / "bidirectional.png")
    md = markdown(a, b, c, seeds, FLAGS.note, seconds)
    write_text(outdir / "bidirectional.md", md)
    print(md)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags_or_exit_2)
