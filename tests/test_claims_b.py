"""The depth, bidirectional and truncated-BPTT claim experiments: helpers and tiny runs."""

import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments.claims import bidirectional, depth, tbptt
from rnn_jax import text, train
from rnn_jax.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


# --- pure helpers ---------------------------------------------------------------------


def test_mask_windows_masks_exactly_one_position_and_labels_the_original():
    ids, vocab = text.load_corpus(None, "char", 0)
    mask_id = len(vocab)
    starts = np.arange(0, 5000, 7)
    x, pos, labels = bidirectional.mask_windows(ids, starts, 32, mask_id, np.random.default_rng(0))
    original = ids[starts[:, None] + np.arange(32)]
    assert x.shape == original.shape and x.dtype == np.int32
    assert np.all((x == mask_id).sum(axis=1) == 1)  # exactly one mask per window
    rows = np.arange(len(starts))
    assert np.all(x[rows, pos] == mask_id)
    np.testing.assert_array_equal(labels, original[rows, pos])
    keep = np.ones_like(x, bool)
    keep[rows, pos] = False
    np.testing.assert_array_equal(x[keep], original[keep])  # nothing else changed
    assert set(np.unique(pos)) == set(range(32))  # every position gets masked sometimes
    assert np.all(labels < mask_id)


def test_mask_windows_is_a_function_of_the_rng():
    ids = np.arange(100) % 5
    a = bidirectional.mask_windows(ids, np.arange(10), 8, 5, np.random.default_rng(3))
    b = bidirectional.mask_windows(ids, np.arange(10), 8, 5, np.random.default_rng(3))
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)


def test_matching_hidden_equalises_parameter_counts():
    target = bidirectional.lm_params(28, 32, True)
    h = bidirectional.matching_hidden(28, target)
    counts = {k: bidirectional.lm_params(28, k, False) for k in (h - 1, h, h + 1)}
    assert abs(counts[h] - target) == min(abs(c - target) for c in counts.values())
    assert abs(counts[h] - target) / target < 0.02


def test_stream_split_rows_are_contiguous_and_targets_shifted():
    ids = np.arange(103)
    x, y = tbptt.stream_split(ids, 4, 5)
    assert x.shape == y.shape == (4, 25)
    np.testing.assert_array_equal(y, x + 1)
    np.testing.assert_array_equal(np.diff(x, axis=1), 1)
    np.testing.assert_array_equal(x[:, 0], [0, 25, 50, 75])
    with pytest.raises(ValueError):
        tbptt.stream_split(np.arange(10), 4, 5)


def test_depth_summary_counts_failed_and_diverged_runs():
    rows = [
        {"init": "u", "depth": 1, "lr": 1.0, "clip": 1.0, "val_ppl": 9.0, "diverged": False},
        {"init": "u", "depth": 1, "lr": 1.0, "clip": 0.0, "val_ppl": 30.0, "diverged": False},
        {"init": "u", "depth": 1, "lr": 8.0, "clip": 1.0, "val_ppl": 12.0, "diverged": False},
        {"init": "u", "depth": 1, "lr": 8.0, "clip": 0.0, "val_ppl": math.inf, "diverged": True},
    ]
    for r in rows:
        r["train_ppl"] = r["val_ppl"]
        r["train_curve"] = [r["val_ppl"]]
    s = depth.summarize(rows, fail_ppl=16.0)[("u", 1)]
    assert s["best"] == (1.0, 1.0)
    assert s["failed"] == 0.5 and s["diverged"] == 0.25
    assert s["good_points"] == 2 and s["points"] == 4
    assert s["by_clip"][1.0]["good_lrs"] == [1.0, 8.0]
    assert s["by_clip"][0.0]["good_lrs"] == []


# --- the depth sweep computes what train.run computes -------------------------------------


def test_depth_sweep_run_equals_train_run(tmp_path):
    kw = dict(hidden_size=8, num_steps=8, num_train=96, num_val=40, batch_size=16, epochs=2)
    config = TrainConfig(
        cell="gru",
        num_layers=2,
        init="uniform",
        forget_bias=0.0,
        optimizer="sgd",
        lr=4.0,
        schedule="constant",
        grad_clip=0.05,  # small enough to engage
        seed=1,
        workdir=str(tmp_path / "run"),
        log_every_s=1e9,
        sample_chars=2,
        **kw,
    )
    expected = train.run(config, echo=lambda s: None)
    rows = depth.sweep(num_layers=2, lrs=[4.0], clips=[0.05, 0.0], seeds=[1], init="uniform", **kw)
    clipped, unclipped = rows
    assert clipped["clipped"] and not unclipped["copied"]
    assert clipped["val_ppl"] == pytest.approx(expected.val_ppl, rel=1e-4)
    assert clipped["train_ppl"] == pytest.approx(expected.train_ppl, rel=1e-4)
    assert unclipped["val_ppl"] != pytest.approx(clipped["val_ppl"], rel=1e-4)


def test_depth_sweep_copies_an_unclipped_run_whose_clipping_never_engaged():
    rows = depth.sweep(
        num_layers=1,
        lrs=[0.1],
        clips=[1e6, 0.0],
        seeds=[0],
        hidden_size=4,
        num_steps=4,
        num_train=32,
        num_val=8,
        batch_size=16,
        epochs=1,
    )
    assert not rows[0]["clipped"] and rows[1]["copied"]
    assert rows[1]["val_ppl"] == rows[0]["val_ppl"] and rows[1]["clip"] == 0.0


# --- the commands, end to end at tiny sizes ------------------------------------------------


def run_command(name: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"experiments.claims.{name}", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_written(proc, outdir: Path, name: str) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (outdir / f"{name}.png").stat().st_size > 1000
    md = (outdir / f"{name}.md").read_text()
    assert f"]({name}.png)" in md
    return md


@pytest.mark.slow
def test_depth_command(tmp_path):
    proc = run_command(
        "depth",
        "--depths=1,2",
        "--lrs=1,64",
        "--inits=uniform",
        "--seeds=1",
        "--epochs=1",
        "--hidden_size=4",
        "--num_steps=4",
        "--num_train=64",
        "--num_val=16",
        "--batch_size=32",
        f"--outdir={tmp_path}",
    )
    md = assert_written(proc, tmp_path, "depth")
    assert "Did the claim hold?" in md and "| uniform | 2 |" in md


@pytest.mark.slow
def test_bidirectional_command(tmp_path):
    proc = run_command(
        "bidirectional",
        "--seeds=1",
        "--mask_hidden=4",
        "--mask_num_steps=6",
        "--mask_train_steps=2",
        "--mask_batch=8",
        "--mask_num_train=100",
        "--mask_num_val=20",
        "--lm_hidden=4",
        "--lm_epochs=1",
        "--lm_batch=16",
        "--lm_num_train=32",
        "--lm_num_val=16",
        "--sample_chars=3",
        "--time_num_steps=4",
        "--time_batch=4",
        "--time_iters=1",
        "--time_rounds=2",
        "--note=reduced settings: test",
        f"--outdir={tmp_path}",
    )
    md = assert_written(proc, tmp_path, "bidirectional")
    for heading in ("## (a)", "## (b)", "## (c)", "reduced settings: test"):
        assert heading in md


@pytest.mark.slow
def test_tbptt_command(tmp_path):
    proc = run_command(
        "tbptt",
        "--seeds=1",
        "--hidden_size=4",
        "--batch_size=4",
        "--num_steps=4",
        "--num_train=32",
        "--num_val=16",
        "--steps=8",
        "--eval_points=2",
        "--stream_count=2",
        f"--outdir={tmp_path}",
    )
    md = assert_written(proc, tmp_path, "tbptt")
    assert "sequential, carried state" in md


def test_tbptt_refuses_unequal_token_budgets(tmp_path):
    proc = run_command("tbptt", "--num_train=100", f"--outdir={tmp_path}")
    assert proc.returncode == 2 and "multiple" in proc.stderr
    assert not (tmp_path / "tbptt.md").exists()


def _tbptt_results(val, stream, late_val=None, late_stream=None):
    """Two partitions' runs from ``{partition: [ppl per seed]}`` dicts; the late
    (second-half) perplexities default to the all-positions ones."""
    late_val, late_stream = late_val or val, late_stream or stream
    curve = [(100, 9.0, 8.0), (200, 8.0, 7.0)]
    return {
        p: [
            {
                "val_ppl": v,
                "stream_ppl": st,
                "late_window_ppl": lv,
                "late_stream_ppl": ls,
                "train_ppl": 5.0,
                "curve": curve,
            }
            for v, st, lv, ls in zip(val[p], stream[p], late_val[p], late_stream[p], strict=True)
        ]
        for p in tbptt.PARTITIONS
    }


def test_tbptt_verdict_judges_the_carry_gain_seed_by_seed():
    # the window model is better overall, but carrying helps the sequential one more
    # in all 5 seeds (sign test p = 1/32), past the zero start too: the claim held
    res = _tbptt_results(
        {"windows": [7.0, 7.2, 7.1, 7.0, 7.3], "sequential": [9.0, 9.4, 9.2, 9.1, 9.3]},
        {"windows": [6.5, 6.7, 6.6, 6.5, 6.8], "sequential": [7.5, 7.6, 7.7, 7.5, 7.6]},
    )
    gains = tbptt.carry_gains(res, "sequential")
    np.testing.assert_allclose(gains[:3], np.log([9.0 / 7.5, 9.4 / 7.6, 9.2 / 7.7]), rtol=1e-12)
    text = tbptt.verdict(res)
    assert "**The claim held**" in text and "in 5 of 5 seeds" in text and "p = 0.031" in text
    assert "the window model is better at the same number of tokens" in text
    # the same with 3 seeds: every seed agrees, but p = 0.125 is no evidence
    three = {p: r[:3] for p, r in res.items()}
    assert "**Partly held**" in tbptt.verdict(three)
    # one seed where the window model gains more: partly held
    res["sequential"][1]["late_stream_ppl"] = 9.39
    assert "**Partly held**" in tbptt.verdict(res)
    # carrying helps both, the window model more in every seed: not held
    for r in res["windows"]:
        r["late_stream_ppl"] = r["late_window_ppl"] * 0.5
    assert "no more than the window-trained one" in tbptt.verdict(res)
    # all-positions gains favour the sequential model, but past the zero-state start
    # (second half of the positions) the window model gains as much: not held
    res = _tbptt_results(
        {"windows": [7.0, 7.2, 7.1], "sequential": [9.0, 9.4, 9.2]},
        {"windows": [6.5, 6.7, 6.6], "sequential": [7.5, 7.6, 7.7]},
        {"windows": [6.0, 6.2, 6.1], "sequential": [7.0, 7.2, 7.1]},
        {"windows": [5.9, 6.1, 6.0], "sequential": [6.95, 7.15, 7.05]},
    )
    assert (tbptt.carry_gains(res, "sequential") > tbptt.carry_gains(res, "windows")).all()
    assert "**The claim did not hold**" in tbptt.verdict(res)
    # carrying hurts both, the sequential model less: not "held"
    for p, worse in (("windows", 1.05), ("sequential", 1.01)):
        for r in res[p]:
            r["late_stream_ppl"] = r["late_window_ppl"] * worse
    late = {p: tbptt.carry_gains(res, p, late=True) for p in tbptt.PARTITIONS}
    assert (late["sequential"] > late["windows"]).all()
    text = tbptt.verdict(res)
    assert "**The claim did not hold**" in text and "p = 0.125" in text
    assert "its carry gain is the zero-state start" in text
    # gains below the noise floor count as none: 0.001 nats/char in every seed
    for p in tbptt.PARTITIONS:
        for r in res[p]:
            r["late_stream_ppl"] = r["late_window_ppl"] * math.exp(-0.001)
    assert "**The claim did not hold**" in tbptt.verdict(res)
    # two seeds are too few for a verdict
    assert "**Too few seeds to judge**" in tbptt.verdict({p: r[:2] for p, r in res.items()})


def test_tbptt_position_losses_equal_a_loop_over_windows_and_the_stream_perplexity():
    from rnn_jax import models

    model = models.language_model(models.ModelConfig(vocab_size=7, cell="gru", hidden_size=5))
    params = model.init(jax.random.key(0))
    ids = np.random.default_rng(0).integers(0, 7, size=41)
    T = 4
    per_position = tbptt.window_position_losses(model, params, ids, T)
    want = np.zeros(T)
    apply = jax.jit(model.apply)
    for start in range(len(ids) - T):  # every window, one at a time, from zero state
        logits, _ = apply(params, ids[None, start : start + T])
        want += np.asarray(models.token_losses(logits, ids[None, start + 1 : start + T + 1]))[0]
    np.testing.assert_allclose(per_position, want / (len(ids) - T), rtol=1e-5)
    # the streams' chunk losses against each stream read alone, chunk by chunk, its
    # state carried by hand
    losses = tbptt.stream_chunk_losses(model, params, ids, 2, T)
    x, y = tbptt.stream_split(ids, 2, T)
    chunks = x.shape[1] // T  # per stream: the first chunk, then chunks - 1 later ones
    want = np.zeros((chunks, T))
    for row in range(2):
        carry = model.initial_carry(1)
        for k in range(chunks):
            cols = slice(k * T, (k + 1) * T)
            logits, carry = apply(params, x[None, row, cols], carry)
            want[k] += np.asarray(models.token_losses(logits, y[None, row, cols]))[0]
    np.testing.assert_allclose(losses, want, rtol=1e-5)
    first, later = losses[0] / 2, tbptt.later_chunk_losses(losses, 2)
    np.testing.assert_allclose(later, want[1:].mean(axis=0) / 2, rtol=1e-5)
    mean = (first.sum() + later.sum() * (chunks - 1)) / (chunks * T)
    assert math.exp(mean) == pytest.approx(
        tbptt.stream_perplexity(model, params, ids, 2, T), rel=1e-5
    )
    # one chunk per stream: no carried state to score
    with pytest.raises(ValueError, match="one chunk"):
        tbptt.later_chunk_losses(tbptt.stream_chunk_losses(model, params, ids, 8, T), 8)


def _depth_rows(val, stalled=()):
    """Runs of two seeds from ``{(depth, lr, clip): val_ppl}``; inf = diverged; the
    training perplexity falls to the end except at the points in ``stalled``."""
    return [
        {
            "init": "u",
            "depth": d,
            "lr": lr,
            "clip": c,
            "seed": seed,
            "val_ppl": v,
            "train_ppl": v,
            "diverged": not math.isfinite(v),
            "train_curve": [v, v] if (d, lr, c) in stalled else [v + 1, v],
        }
        for (d, lr, c), v in val.items()
        for seed in (0, 1)
    ]


def test_depth_verdict_tells_slow_from_unstable():
    s = {"inits": ["u"], "clips": [1.0, 0.0], "depths": [1, 3], "epochs": 10, "steps": 400}
    val = {(1, lr, c): 10.0 for lr in (1.0, 8.0) for c in (1.0, 0.0)}
    # depth 3 fails at lr 1 (above the unigram, not diverged, still improving) and is
    # fine at lr 8: slower, not less stable
    val.update({(3, 1.0, 1.0): 17.0, (3, 1.0, 0.0): 17.0, (3, 8.0, 1.0): 12.0, (3, 8.0, 0.0): 12.0})
    summary = depth.summarize(_depth_rows(val), fail_ppl=16.0)
    assert summary[("u", 3)]["failed_not_diverged"] == 0.5
    assert summary[("u", 3)]["diverged"] == 0.0
    assert summary[("u", 3)]["by_clip"][0.0]["stable_lrs"] == [1.0, 8.0]
    assert summary[("u", 3)]["by_clip"][0.0]["falling_lrs"] == [1.0, 8.0]
    text = depth.verdict(summary, s)
    assert "**Learning rate: partly held**" in text and "slow: lr 1 clip 1, lr 1 clip none" in text
    assert "**Clipping: not tested**" in text  # nothing diverged
    # the same lost points stalled (training perplexity flat): held
    stalled = {(3, 1.0, 1.0), (3, 1.0, 0.0)}
    text = depth.verdict(depth.summarize(_depth_rows(val, stalled), fail_ppl=16.0), s)
    assert "**Learning rate: held**" in text and "stalled: lr 1 clip 1" in text
    # depth 3 diverges at lr 8 without clipping (both seeds: 2 runs of 4): diverged, and
    # clipping prevents more divergence at depth 3 than at depth 1
    val[(3, 8.0, 0.0)] = math.inf
    summary = depth.summarize(_depth_rows(val), fail_ppl=16.0)
    assert summary[("u", 3)]["by_clip"][0.0]["stable_lrs"] == [1.0]
    text = depth.verdict(summary, s)
    assert "**Learning rate: held**" in text and "diverged: lr 8 clip none" in text
    assert "**Clipping: held**" in text
    # the same divergence at depth 1 too: clipping is not a depth effect
    val[(1, 8.0, 0.0)] = math.inf
    text = depth.verdict(depth.summarize(_depth_rows(val), fail_ppl=16.0), s)
    assert "**Clipping: not a depth effect**" in text
    # as many converging points at depth 3 as at depth 1: did not hold
    val.update({k: 10.0 for k in val})
    assert "**Learning rate: did not hold**" in depth.verdict(
        depth.summarize(_depth_rows(val), fail_ppl=16.0), s
    )


def test_depth_init_verdict_needs_a_gap_that_grows_with_depth():
    s = {"inits": ["u", "d"], "clips": [1.0], "depths": [1, 3], "epochs": 10, "steps": 400}
    rows = []
    for init, good in (("u", {1: 3, 3: 0}), ("d", {1: 3, 3: 2})):
        for d in (1, 3):
            for k, lr in enumerate((1.0, 2.0, 4.0)):
                v = 10.0 if k < good[d] else 17.0
                rows.append(
                    {
                        "init": init,
                        "depth": d,
                        "lr": lr,
                        "clip": 1.0,
                        "seed": 0,
                        "val_ppl": v,
                        "train_ppl": v,
                        "diverged": False,
                        "train_curve": [v + 1, v],
                    }
                )
    text = depth.init_comparison(depth.summarize(rows, fail_ppl=16.0), s)
    assert "`d` is the better start" in text and "**initialisation: held**" in text
    # a gap of one grid point at depth 3: within seed noise
    for r in rows:
        if r["init"] == "u" and r["depth"] == 3:
            r["val_ppl"] = 10.0 if r["lr"] == 1.0 else 17.0
    text = depth.init_comparison(depth.summarize(rows, fail_ppl=16.0), s)
    assert "**initialisation: partly held**" in text
    # equal at depth 1 and at depth 3: not held
    for r in rows:
        if r["init"] == "u" and r["depth"] == 3:
            r["val_ppl"] = 10.0 if r["lr"] < 4.0 else 17.0
    text = depth.init_comparison(depth.summarize(rows, fail_ppl=16.0), s)
    assert "**initialisation: not held**" in text


def _clip_summary(diverged_without, diverged_with, n=15):
    """A two-depth summary whose clipped / unclipped runs diverged this many times."""

    def depth_entry(k0, k1):
        return {
            "by_clip": {
                1.0: {"diverged": k1 / n, "diverged_runs": k1, "n": n},
                0.0: {"diverged": k0 / n, "diverged_runs": k0, "n": n},
            }
        }

    pairs = zip(diverged_without, diverged_with, strict=True)
    return {("u", d): depth_entry(k0, k1) for d, (k0, k1) in zip((1, 4), pairs, strict=True)}


def test_depth_clipping_verdict_counts_runs_not_rounded_rates():
    # 3/15 -> 5/15 diverged without clipping, none with it: exactly two runs more
    # prevented at depth 4 (5/15 - 3/15 times 15 is 1.9999999999999996 in floats)
    text = depth._clipping_verdict("u", _clip_summary((3, 5), (0, 0)), [1, 4], 1.0)
    assert "**Clipping: held**" in text
    # one run more: within noise
    text = depth._clipping_verdict("u", _clip_summary((3, 4), (0, 0)), [1, 4], 1.0)
    assert "**Clipping: not a depth effect**" in text and "within two runs of 15" in text


def test_depth_slow_needs_a_real_fall_and_init_needs_a_real_gap():
    # a plateau at the unigram (17.10 -> 17.09) is stalled, not slow
    assert not depth._falling([17.103, 17.089]) and depth._falling([18.0, 17.0])
    # the initialisation's advantage reverses (-2 -> +1): one grid point at depth 4
    # is within noise, whatever the growth
    s = {"inits": ["u", "d"], "depths": [1, 4]}
    summary = {
        ("u", 1): {"good_points": 5, "best_val": [8.0]},
        ("d", 1): {"good_points": 3, "best_val": [8.5]},
        ("u", 4): {"good_points": 2, "best_val": [9.0]},
        ("d", 4): {"good_points": 3, "best_val": [8.8]},
    }
    text = depth.init_comparison(summary, s)
    assert "`d` is the better start, converging in +1" in text
    assert "**initialisation: partly held**" in text
    summary[("u", 4)]["good_points"] = 3  # a tie at depth 4
    text = depth.init_comparison(summary, s)
    assert "no initialisation converges in more grid points" in text and "not held" in text


def test_tbptt_refuses_streams_of_one_chunk_before_training(tmp_path):
    proc = run_command("tbptt", "--stream_count=1000", f"--outdir={tmp_path}")
    assert proc.returncode == 2 and "--stream_count: 1000 streams" in proc.stderr
    assert not list(tmp_path.iterdir())
