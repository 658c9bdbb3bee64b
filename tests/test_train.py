"""Training end to end at tiny sizes: steps, resumption, signals, corruption, bad input."""

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rnn_jax import checkpoint, data, generate, models, networks, runs, text, train
from rnn_jax import config as config_module
from rnn_jax.config import ConfigError, TrainConfig, model_config

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    hidden_size=16,
    batch_size=16,
    num_steps=8,
    num_train=128,
    num_val=64,
    epochs=2,
    lr=0.01,
    log_every_s=1e9,
)


def tiny(tmp_path, **kw):
    return TrainConfig(**{**TINY, "workdir": str(tmp_path / "run"), **kw})


def quiet(_):
    pass


def restore_params(config):
    """The newest checkpoint's training state of ``config``'s run."""
    ids, vocab = text.load_corpus(config.data or None, config.tokens, config.min_freq)
    windows = data.make_windows(ids, config.num_steps, config.num_train, config.num_val)
    spe = data.steps_per_epoch(windows, config.batch_size, config.partition)
    model = models.language_model(model_config(config, len(vocab)))
    tx = train.make_optimizer(config, spe * config.epochs)
    abstract = jax.eval_shape(lambda: train.init_state(model, tx, config))
    with checkpoint.Checkpointer(Path(config.workdir) / "checkpoints") as ckpt:
        return ckpt.restore_latest(abstract)


class Steps(NamedTuple):
    ids: np.ndarray
    windows: data.Windows
    spe: int
    model: models.Model
    train_step: Any
    eval_step: Any
    state: dict


def steps(config, total_steps=100):
    """The bundled corpus' windows, ``config``'s model and its compiled steps, and a
    fresh training state."""
    ids, vocab = text.load_corpus()
    windows = data.make_windows(ids, config.num_steps, config.num_train, config.num_val)
    spe = data.steps_per_epoch(windows, config.batch_size, config.partition)
    model = models.language_model(model_config(config, len(vocab)))
    tx = train.make_optimizer(config, total_steps)
    train_step, eval_step = train.make_steps(model, tx, config, spe)
    return Steps(
        ids, windows, spe, model, train_step, eval_step, train.init_state(model, tx, config)
    )


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- the pure steps ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(cell="lstm"),
        dict(cell="gru", num_layers=2, dropout=0.2, embed_dim=8),
        dict(cell="rnn", bidirectional=True, optimizer="sgd", lr=1.0),
        dict(cell="gru", partition="sequential", optimizer="adamw"),
    ],
)
def test_one_step_changes_every_parameter_and_lowers_the_loss(tmp_path, kw):
    config = tiny(tmp_path, **kw)
    _, windows, _, _, train_step, eval_step, state = steps(config)
    batch = data.train_batch(windows, config.batch_size, 0, 0, 0, config.partition)
    before = eval_step(state["params"], batch)
    new_state, metrics = train_step(state, batch)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state["params"], new_state["params"])
    assert all(jax.tree.leaves(changed)), changed
    after = eval_step(new_state["params"], batch)
    assert after[0] < before[0]
    assert int(new_state["step"]) == 1
    assert float(metrics["count"]) == config.batch_size * config.num_steps
    if not kw.get("dropout"):  # the step's loss is the loss of the params it started from
        np.testing.assert_allclose(metrics["loss_sum"], before[0], rtol=1e-6)


def test_sequential_training_carries_the_state_and_resets_it_each_epoch(tmp_path):
    """partition="sequential": each step starts from the previous step's final state,
    and from zeros at the start of every epoch. Checked over an epoch boundary
    against the model run by hand, with the cross-entropy written out."""
    config = tiny(tmp_path, cell="gru", partition="sequential", num_train=512)  # 4 steps/epoch
    _, windows, spe, model, train_step, _, state = steps(config)
    assert spe >= 2
    carry = None
    for step in range(spe + 2):
        epoch, i = divmod(step, spe)
        batch = data.train_batch(windows, config.batch_size, config.seed, epoch, i, "sequential")
        if i == 0:
            carry = model.initial_carry(config.batch_size)
        logits, final = model.apply(state["params"], batch.x, carry)
        log_p = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(log_p, batch.y[..., None], axis=-1)[..., 0]
        want = -jnp.sum(picked * batch.weight[:, None])
        state, metrics = train_step(state, batch)
        np.testing.assert_allclose(metrics["loss_sum"], want, rtol=1e-5, err_msg=f"step {step}")
        for got, expected in zip(
            jax.tree.leaves(state["carry"]), jax.tree.leaves(final), strict=True
        ):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        carry = final


def test_dropout_draws_new_masks_every_step(tmp_path):
    """With dropout, the step number picks the masks: the same params and batch at
    two steps give two losses; at the same step, the same loss."""
    config = tiny(tmp_path, dropout=0.3)
    _, windows, _, _, train_step, _, state = steps(config)
    batch = data.train_batch(windows, config.batch_size, 0, 0, 0, config.partition)
    loss = [
        float(train_step({**state, "step": jnp.int32(k)}, batch)[1]["loss_sum"]) for k in (0, 1, 0)
    ]
    assert loss[0] == loss[2] and abs(loss[0] - loss[1]) > 1e-3 * abs(loss[0])


def test_weighted_loss_ignores_padding_rows(tmp_path):
    config = tiny(tmp_path, num_train=20)  # 20 windows, batch 16: the second batch has 12 pads
    ids, vocab = text.load_corpus()
    windows = data.make_windows(ids, config.num_steps, config.num_train, config.num_val)
    model = models.language_model(model_config(config, len(vocab)))
    tx = train.make_optimizer(config, 10)
    _, eval_step = train.make_steps(model, tx, config, 2)
    params = model.init(jax.random.key(0))
    batch = data.train_batch(windows, 16, 0, 0, 1)
    assert batch.weight.sum() == 4
    loss_sum, count = eval_step(params, batch)
    real = batch.weight > 0
    logits, _ = model.apply(params, batch.x[real])
    want = models.token_losses(logits, batch.y[real]).sum()
    np.testing.assert_allclose(loss_sum, want, rtol=1e-6)
    assert float(count) == 4 * config.num_steps


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_learning_rate_schedules_follow_their_formulas(tmp_path, schedule):
    """SGD on a unit gradient moves a parameter by the step's learning rate: warmup
    from 0 over ``warmup_steps``, then constant, half-cosine or linear decay to 0 at
    ``total`` steps (the formulas written out here)."""
    lr, warmup, total = 2.0, 4, 12
    config = tiny(tmp_path, optimizer="sgd", momentum=0.0, lr=lr, schedule=schedule,
                  warmup_steps=warmup, grad_clip=0.0)  # fmt: skip

    def want(k):
        if schedule == "constant":
            return lr
        if k < warmup:
            return lr * k / warmup
        frac = (k - warmup) / (total - warmup)
        return lr * (0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1 - frac)

    tx = train.make_optimizer(config, total)
    params = {"w": jnp.zeros(())}
    opt_state = tx.init(params)
    for k in range(total):
        updates, opt_state = tx.update({"w": jnp.ones(())}, opt_state, params)
        np.testing.assert_allclose(-float(updates["w"]), want(k), rtol=1e-5, atol=1e-6)


def test_weight_decay_and_clipping_follow_their_formulas(tmp_path):
    """adamw decays a parameter by ``lr * weight_decay * w`` (a zero gradient: Adam's
    own step is zero); ``grad_clip`` scales a gradient of global norm 5 to norm 1."""
    config = tiny(tmp_path, optimizer="adamw", lr=0.1, weight_decay=0.5, schedule="constant",
                  grad_clip=0.0)  # fmt: skip
    tx = train.make_optimizer(config, 10)
    params = {"w": jnp.array([2.0, -4.0])}
    updates, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.1, 0.2], rtol=1e-6)
    config = tiny(tmp_path, optimizer="sgd", momentum=0.0, lr=1.0, schedule="constant",
                  grad_clip=1.0)  # fmt: skip
    tx = train.make_optimizer(config, 10)
    grads = {"a": jnp.array([3.0]), "b": jnp.array([[4.0]])}  # global norm 5
    updates, _ = tx.update(grads, tx.init(grads), grads)
    np.testing.assert_allclose(updates["a"], [-0.6], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], [[-0.8]], rtol=1e-6)


def test_a_step_on_a_partial_batch_is_the_mean_over_its_real_tokens(tmp_path):
    """The gradient is the mean token loss's over the real rows only (padding rows
    neither count nor contribute): one SGD step at lr 1 moves the params by minus the
    gradient of that mean, computed here from the model and the cross-entropy
    written out."""
    config = tiny(tmp_path, num_train=20, optimizer="sgd", momentum=0.0, lr=1.0,
                  schedule="constant", grad_clip=0.0)  # fmt: skip
    _, windows, _, model, train_step, _, state = steps(config)
    batch = data.train_batch(windows, 16, 0, 0, 1)  # 4 real rows, 12 padding rows
    real = batch.weight > 0
    assert real.sum() == 4

    def mean_loss(params):
        logits, _ = model.apply(params, batch.x[real])
        log_p = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(log_p, batch.y[real][..., None], axis=-1))

    grads = jax.grad(mean_loss)(state["params"])
    new_state, _ = train_step(state, batch)
    want = jax.tree.map(lambda p, g: p - g, state["params"], grads)
    for got, expected in zip(
        jax.tree.leaves(new_state["params"]), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_evaluation_perplexity_is_the_mean_over_all_tokens(tmp_path):
    """evaluate() over a split whose last batch is partial: exp of the mean token
    loss over every window, from one model call with the cross-entropy written out
    (not a mean of batch means)."""
    config = tiny(tmp_path, num_val=20)
    ids, windows, _, model, _, eval_step, _ = steps(config)
    params = model.init(jax.random.key(3))
    start = config.num_train  # the validation windows follow the training ones
    xs = np.stack([ids[i : i + config.num_steps] for i in range(start, start + 20)])
    ys = np.stack([ids[i + 1 : i + config.num_steps + 1] for i in range(start, start + 20)])
    log_p = jax.nn.log_softmax(model.apply(params, jnp.asarray(xs))[0], axis=-1)
    mean = -jnp.mean(jnp.take_along_axis(log_p, jnp.asarray(ys)[..., None], axis=-1))
    got = train.evaluate(eval_step, params, windows, 16, "val")
    np.testing.assert_allclose(got, math.exp(float(mean)), rtol=1e-5)


def test_short_run_lowers_validation_perplexity(tmp_path):
    config = tiny(tmp_path, epochs=4, num_train=512)
    train.run(config, echo=quiet)
    records = [
        json.loads(x) for x in (Path(config.workdir) / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [32, 64, 96, 128]
    for key in ("step", "epoch", "train_ppl", "val_ppl", "tokens_per_s", "wall_s"):
        assert key in records[0]
    assert records[-1]["val_ppl"] < records[0]["val_ppl"] < 28
    assert (Path(config.workdir) / "curves.png").stat().st_size > 1000
    assert json.loads((Path(config.workdir) / "config.json").read_text())["hidden_size"] == 16


def test_crash_then_resume_in_process_is_bitwise_equal(tmp_path):
    # the cosine schedule (the default), and dropout: the masks follow the step
    full = train.run(tiny(tmp_path / "a", epochs=4, dropout=0.1), echo=quiet)

    def crash_at_step_16(line):
        if line.startswith("step 16/"):
            raise RuntimeError("simulated crash")

    crashing = tiny(tmp_path / "b", epochs=4, checkpoint_every=5, dropout=0.1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.run(crashing, echo=crash_at_step_16)
    lines = []
    resumed = train.run(crashing, echo=lines.append)
    assert "resumed from step 15" in lines[0]
    assert resumed.step == full.step == 32
    assert_bitwise_equal(full.params, resumed.params)

    # metrics.jsonl holds each evaluation once, in order, despite the crash, with the
    # numbers of the uninterrupted run: the checkpoint at step 15 carried the interval's
    # training sums, so the evaluation at 16 averages steps 9-16, not 16 alone
    def metrics(run):
        return [
            json.loads(x) for x in (Path(run.workdir) / "metrics.jsonl").read_text().splitlines()
        ]

    got, want = metrics(crashing), metrics(tiny(tmp_path / "a"))
    assert [r["step"] for r in got] == [8, 16, 24, 32]
    for r, w in zip(got, want, strict=True):
        for k in ("step", "epoch", "train_ppl", "val_ppl", "grad_norm"):
            assert r[k] == pytest.approx(w[k], rel=1e-6), (r["step"], k)


def test_more_epochs_continue_a_finished_run(tmp_path, monkeypatch):
    full = train.run(tiny(tmp_path / "a", epochs=4, schedule="constant"), echo=quiet)
    part = tiny(tmp_path / "b", epochs=2, schedule="constant")
    train.run(part, echo=quiet)
    first = json.loads((Path(part.workdir) / "result.json").read_text())
    resumed = train.run(dataclasses.replace(part, epochs=4), echo=quiet)
    assert resumed.step == full.step == 32
    assert_bitwise_equal(full.params, resumed.params)
    # the 2-epoch result is kept beside the new one, not left as the run's result
    assert json.loads((Path(part.workdir) / "result.previous.json").read_text()) == first
    assert json.loads((Path(part.workdir) / "result.json").read_text()) != first
    before = _snapshot(Path(part.workdir))  # fewer epochs than trained: refused, untouched
    with monkeypatch.context() as m:  # refused from the file names, before any restore
        m.setattr(checkpoint.Checkpointer, "restore_latest", None)
        with pytest.raises(ConfigError, match=r"--epochs: 2 epochs are 16 steps, but .* 32 steps"):
            train.run(part, echo=quiet)
    assert _snapshot(Path(part.workdir)) == before


def test_a_finished_run_keeps_the_settings_it_was_trained_with(tmp_path, monkeypatch):
    """Rerunning a finished run trains nothing: with the same flags it says so and
    leaves its files as they were; with a changed outcome setting (a learning rate,
    a sample prefix) it is refused by name, from the checkpoint names alone, so
    config.json never records a setting the parameters were not trained with."""
    config = tiny(tmp_path, epochs=2, schedule="constant")
    train.run(config, echo=quiet)
    workdir = Path(config.workdir)
    before = _snapshot(workdir)
    lines = []
    again = train.run(config, echo=lines.append)
    assert again.step == 16
    assert any("trained all its 16 steps: nothing to train" in x for x in lines)
    after = _snapshot(workdir)
    for name in ("config.json", "result.json", "metrics.jsonl", "vocab.json", "corpus.json"):
        assert after[name] == before[name], name
    with monkeypatch.context() as m:  # refused before any restore or compilation
        m.setattr(checkpoint.Checkpointer, "restore_latest", None)
        for change, flag in (({"lr": 0.5}, "lr"), ({"sample_prefix": "the "}, "sample_prefix")):
            with pytest.raises(
                ConfigError,
                match=rf"^--{flag}: the run in .* has a checkpoint at its last step \(16\)",
            ):
                train.run(dataclasses.replace(config, **change), echo=quiet)
    assert _snapshot(workdir)["config.json"] == before["config.json"]


def test_a_resume_records_changed_settings(tmp_path):
    """A run trained further with another learning rate keeps what each stretch was
    trained with: config.json's "changes" lists the step and the values."""
    config = tiny(tmp_path, epochs=1, schedule="constant")
    train.run(config, echo=quiet)
    train.run(dataclasses.replace(config, epochs=2, lr=0.02), echo=quiet)
    train.run(dataclasses.replace(config, epochs=3, lr=0.02, grad_clip=0.5), echo=quiet)
    saved = json.loads((Path(config.workdir) / "config.json").read_text())
    assert saved["lr"] == 0.02 and saved["grad_clip"] == 0.5 and saved["epochs"] == 3
    assert saved["changes"] == [
        {"step": 8, "lr": [config.lr, 0.02], "epochs": [1, 2]},
        {"step": 16, "grad_clip": [config.grad_clip, 0.5], "epochs": [2, 3]},
    ]
    assert runs.load_config(Path(config.workdir)).lr == 0.02  # the extra key is ignored


def test_more_epochs_on_a_schedule_say_that_it_changes(tmp_path):
    """A cosine schedule spans the run's steps, so more --epochs rebuild it: the
    resume says so with the learning rate before and after, and config.json records
    the change (a constant schedule extends a run exactly, tested above)."""
    config = tiny(tmp_path, epochs=1, schedule="cosine", checkpoint_every=6)
    train.run(config, echo=quiet)  # checkpoints at 6 and 8; resume from 6 below
    corrupt_step(config.workdir, 8)
    lines = []
    longer = dataclasses.replace(config, epochs=2, lr=0.02)  # the old rate is the old lr's
    train.run(longer, echo=lines.append)
    was = float(train.learning_rate(config, 8)(6))
    now = float(train.learning_rate(longer, 16)(6))
    assert was < now / 2
    warning = next(x for x in lines if x.startswith("warning: --epochs 1 -> 2"))
    assert "rebuilds the cosine schedule over 16 steps" in warning
    assert f"is {now:.3g} (it was {was:.3g})" in warning
    saved = json.loads((Path(config.workdir) / "config.json").read_text())
    assert saved["changes"] == [{"step": 6, "lr": [0.01, 0.02], "epochs": [1, 2]}]


def test_a_resume_that_fails_before_its_first_checkpoint_changes_nothing(tmp_path):
    """The resumed stretch's settings (config.json and its changes) and the move of
    the earlier result wait for its first checkpoint: a resume that diverges at once
    leaves the run directory as the finished run had it, and the original flags
    still find it finished."""
    config = tiny(tmp_path, epochs=1, schedule="constant")
    train.run(config, echo=quiet)
    workdir = Path(config.workdir)
    before = _snapshot(workdir)
    with pytest.raises(train.NonFiniteLoss):
        train.run(dataclasses.replace(config, epochs=2, lr=1e30), echo=quiet)
    after = _snapshot(workdir)
    for name in ("config.json", "result.json", "vocab.json", "corpus.json"):
        assert after[name] == before[name], name
    assert "result.previous.json" not in after
    lines = []
    train.run(config, echo=lines.append)
    assert any("nothing to train" in x for x in lines)


def test_checkpoints_that_all_fail_verification_are_never_trained_over(tmp_path):
    """With every step unusable (here: their manifests lost in a copy) the run is
    refused, files untouched, instead of training from scratch over them."""
    config = tiny(tmp_path, epochs=1, checkpoint_every=4)
    train.run(config, echo=quiet)
    folder = Path(config.workdir) / "checkpoints"
    for manifest in folder.glob(f"*{checkpoint.MANIFEST_SUFFIX}"):
        manifest.unlink()
    before = _snapshot(Path(config.workdir))
    with pytest.raises(ConfigError, match=r"^--workdir: no checkpoint in .* passed its integrity"):
        train.run(config, echo=quiet)
    assert _snapshot(Path(config.workdir)) == before


def test_a_save_stopped_before_its_manifest_is_sealed_when_the_run_resumes(tmp_path, caplog):
    """A SIGKILL after orbax committed a step but before its manifest was written (a
    fuzzer's kills hit it twice in 60 runs): a run whose only step that was could not
    resume ("no checkpoint passed its integrity check"); the run seals it and goes on."""
    config = tiny(tmp_path, epochs=1)  # one checkpoint, at the end (step 8)
    train.run(config, echo=quiet)
    (manifest,) = (Path(config.workdir) / "checkpoints").glob(f"*{checkpoint.MANIFEST_SUFFIX}")
    manifest.unlink()
    lines = []
    with caplog.at_level(logging.WARNING):
        result = train.run(dataclasses.replace(config, epochs=2), echo=lines.append)
    assert "resumed from step 8" in lines[0] and result.step == 16
    assert "Checkpoint step 8 had no integrity manifest" in caplog.text


def test_an_unwritable_checkpoint_folder_is_refused_up_front(tmp_path, monkeypatch):
    """A checkpoints folder that cannot be written (a read-only mount, say) is
    refused by name before anything is written or trained, not at the first save."""
    config = tiny(tmp_path, epochs=1)
    folder = Path(config.workdir) / "checkpoints"
    folder.mkdir(parents=True)
    real = os.access
    monkeypatch.setattr(
        train.os, "access", lambda p, mode: False if Path(p) == folder else real(p, mode)
    )
    with pytest.raises(ConfigError, match=r"^--workdir: cannot write to .*checkpoints"):
        train.run(config, echo=quiet)
    assert sorted(p.name for p in Path(config.workdir).iterdir()) == ["checkpoints"]


def test_earlier_results_are_never_overwritten(tmp_path):
    """Each time a finished run is trained further, its result moves aside: the
    newest to result.previous.json, older ones to result.previous.step<N>.json."""
    config = tiny(tmp_path, epochs=1, schedule="constant")
    workdir = Path(config.workdir)
    results = []
    for epochs in (1, 2, 3):
        train.run(dataclasses.replace(config, epochs=epochs), echo=quiet)
        results.append(json.loads((workdir / "result.json").read_text()))
    assert [r["step"] for r in results] == [8, 16, 24]
    assert json.loads((workdir / "result.previous.json").read_text()) == results[1]
    assert json.loads((workdir / "result.previous.step8.json").read_text()) == results[0]


@pytest.mark.parametrize("tokens", ["raw_char", "char"])
def test_a_run_that_read_the_byte_order_mark_as_text_resumes(tmp_path, monkeypatch, tokens):
    """Until 2026-12-08 a leading byte-order mark was read as a character (raw_char:
    a token; char: a space). Such a run resumes reading it so, with a note, where it
    was refused as trained on other data; a text that changed is still refused."""
    book = tmp_path / "book.txt"
    book.write_bytes(b"\xef\xbb\xbf" + b"The Time Machine. " * 60)
    config = tiny(tmp_path, epochs=1, tokens=tokens, data=str(book), num_train=64)
    as_before = functools.partial(text.load_corpus, keep_bom=True)
    with monkeypatch.context() as m:  # the run as trained before that day
        m.setattr(text, "load_corpus", as_before)
        train.run(config, echo=quiet)
    assert text.load_corpus(book, tokens)[0].size + 1 == as_before(book, tokens)[0].size
    lines = []
    result = train.run(dataclasses.replace(config, epochs=2), echo=lines.append)
    assert result.status == "completed" and any("resumed from step" in x for x in lines)
    assert any(x.startswith("note: ") and "byte-order mark" in x for x in lines)
    book.write_bytes(b"\xef\xbb\xbf" + b"The Machine Time. " * 60)
    with pytest.raises(ConfigError, match=r"--data: the text.* the data changed"):
        train.run(dataclasses.replace(config, epochs=3), echo=quiet)


def test_resume_refuses_changed_model_flags(tmp_path):
    """A resume is refused, before anything is compiled or written, when the model or
    data flags differ, when a change would give the optimizer state another structure
    (its checkpoint could not be restored), and when the data file's text changed
    under the same path (another vocabulary, or the same one: corpus.json's hash)."""
    book = tmp_path / "book.txt"
    book.write_text("the time machine " * 100)
    config = tiny(tmp_path, epochs=1, data=str(book))
    train.run(config, echo=quiet)
    workdir = Path(config.workdir)
    before = _snapshot(workdir)
    refused = [
        (
            dict(hidden_size=32, cell="gru"),
            r"--workdir: .*cell: 'lstm' -> 'gru'; hidden_size: 16 -> 32",
        ),
        (dict(grad_clip=0.0), r"--workdir: .*grad_clip: 1.0 -> 0.0 \(another optimizer state"),
        (dict(schedule="constant"), r"--workdir: .*schedule: 'cosine' -> 'constant'"),
    ]
    for fields, match in refused:
        with pytest.raises(ConfigError, match=match):
            train.run(dataclasses.replace(config, **fields), echo=quiet)
    book.write_text("the machine time " * 100)  # the same letters, another text
    with pytest.raises(ConfigError, match=r"--data: the text \(1700 tokens\) is not the one"):
        train.run(config, echo=quiet)
    book.write_text("a quick brown fox " * 100)
    with pytest.raises(ConfigError, match=r"--data: the text's vocabulary .* differs"):
        train.run(config, echo=quiet)
    assert _snapshot(workdir) == before
    saved = json.loads((workdir / "config.json").read_text())  # no checkpoint yet: allowed
    assert config_module.resume_conflicts(saved, {**saved, "grad_clip": 0.0}, False) == []
    # the same file under another spelling of its path is the same data
    other = str(tmp_path / "." / "sub" / ".." / "book.txt")
    assert config_module.resume_conflicts(saved, {**saved, "data": other}) == []
    assert config_module.resume_conflicts(saved, {**saved, "data": str(tmp_path / "b.txt")})
    config_module.validate(dataclasses.replace(config, log_every_s=float("inf")))  # no logs
    (workdir / "checkpoints").rename(workdir / "saved")
    (workdir / "checkpoints").write_text("")
    with pytest.raises(ConfigError, match=r"--workdir: .*checkpoints exists and is not a folder"):
        train.run(config, echo=quiet)


def corrupt_step(workdir, step: int) -> None:
    """Flips a byte in the middle of the largest file of checkpoint ``step``."""
    folder = Path(workdir) / "checkpoints" / str(step)
    victim = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))


def generate_cli(workdir, *args) -> subprocess.CompletedProcess:
    """``python -m experiments.generate --workdir=WORKDIR ARGS``, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "experiments.generate", f"--workdir={workdir}", *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )


def test_corrupted_latest_checkpoint_falls_back(tmp_path, caplog):
    config = tiny(tmp_path, epochs=2, checkpoint_every=4)  # checkpoints at 4, 8, 12, 16
    train.run(config, echo=quiet)
    corrupt_step(config.workdir, 16)
    # where the unusable step cannot go aside, nothing trains (orbax would delete the
    # good step 12 before it); this was a traceback, and a hang of a multi-process run
    blocker = Path(config.workdir) / "checkpoints.unusable"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"--workdir: .* step\(s\) 16 could not be moved"):
        train.run(config, echo=quiet)
    blocker.unlink()
    lines = []
    result = train.run(config, echo=lines.append)
    assert "resumed from step 12" in lines[0]
    assert "Skipping checkpoint step 16: SHA-256 mismatch" in caplog.text
    assert result.step == 16
    # the unusable step went aside (kept, and out of orbax's max_to_keep count, which
    # would otherwise have deleted the good step 12 first); 16 was saved again
    aside = Path(config.workdir) / "checkpoints.unusable"
    assert "moved unusable step(s) 16 to" in lines[1]
    assert sorted(p.name for p in aside.iterdir()) == ["16", f"16{checkpoint.MANIFEST_SUFFIX}"]
    with checkpoint.Checkpointer(Path(config.workdir) / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [8, 12, 16] and all(ckpt.verify(s) for s in (8, 12, 16))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    def poisoned_optimizer(config, total_steps):  # updates turn NaN from the 6th step on
        def update(grads, count, params=None):
            scale = jnp.where(count >= 5, jnp.nan, -0.01)
            return jax.tree.map(lambda g: scale * g, grads), count + 1

        return optax.GradientTransformation(lambda p: jnp.zeros((), jnp.int32), update)

    monkeypatch.setattr(train, "make_optimizer", poisoned_optimizer)
    config = tiny(tmp_path, checkpoint_every=1, epochs=3)
    with pytest.raises(
        train.NonFiniteLoss, match=r"non-finite parameters at step 6 .*checkpoint: step 5"
    ):
        train.run(config, echo=quiet)
    step, state, _ = restore_params(config)
    assert step == 5
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state["params"]))


def test_is_due():
    assert [s for s in range(1, 11) if train.is_due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if train.is_due(s, 0, 10)] == [10]


# --- generation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw", [dict(cell="gru", num_layers=2), dict(cell="lstm", bidirectional=True)]
)
def test_greedy_generation_equals_a_python_loop_and_is_deterministic(kw):
    config = models.ModelConfig(vocab_size=28, hidden_size=16, **kw)
    model = models.language_model(config)
    params = model.init(jax.random.key(1))
    prefix = jnp.array([3, 5, 7], jnp.int32)
    out = np.asarray(generate.generate_ids(model, params, prefix, 6))
    seq = list(np.asarray(prefix))
    for _ in range(6):  # rerun the whole model on the text so far, take the argmax
        logits, _ = jax.jit(model.apply)(params, jnp.asarray(seq, jnp.int32)[None])
        seq.append(int(jnp.argmax(logits[0, -1])))
    np.testing.assert_array_equal(out, seq[3:])
    np.testing.assert_array_equal(out, generate.generate_ids(model, params, prefix, 6))


def test_sampling_uses_the_key_and_text_round_trips():
    model = models.language_model(models.ModelConfig(vocab_size=28, hidden_size=8))
    params = model.init(jax.random.key(0))
    _, vocab = text.load_corpus()
    a = generate.generate_text(model, params, vocab, "Time Traveller", 40, temperature=1.0, seed=1)
    b = generate.generate_text(model, params, vocab, "Time Traveller", 40, temperature=1.0, seed=2)
    assert a.startswith("time traveller") and a != b
    prefix = jnp.asarray(vocab.to_ids(text.tokenize("time traveller")), jnp.int32)
    ids = generate.generate_ids(model, params, prefix, 40, 1.0, jax.random.key(1))
    assert ids.shape == (40,) and a == vocab.join(list("time traveller") + vocab.to_tokens(ids))


def test_the_generate_launcher_caps_what_the_library_caps():
    """experiments.generate writes the caps out (it checks flags before importing JAX)."""
    source = (ROOT / "experiments" / "generate.py").read_text()
    assert f"MAX_CHARS = {generate.MAX_TOKENS:_}\n" in source
    assert f"MAX_CHARS_BIDIRECTIONAL = {generate.MAX_TOKENS_BIDIRECTIONAL:_}\n" in source


def test_generation_refuses_what_it_cannot_continue():
    """An empty, 2-D, float or out-of-vocabulary prefix, a NaN / negative temperature,
    a float count: named errors before tracing (an empty prefix once read logits at position -1)."""
    model = models.language_model(models.ModelConfig(vocab_size=6, hidden_size=8))
    params = model.init(jax.random.key(0))
    bad = [
        (dict(prefix=jnp.zeros((0,), jnp.int32)), r"prefix: expected .* P >= 1, got int32\[0\]"),
        (dict(prefix=jnp.zeros((1, 2), jnp.int32)), r"prefix: .*got int32\[1, 2\]"),
        (dict(prefix=jnp.array([1.0, 2.0])), r"prefix: .*got float32\[2\]"),
        (dict(prefix=jnp.array([1, 6])), r"prefix: ids must be in \[0, 6\) .*got 6"),
        (dict(prefix=[-1, 2]), r"prefix: ids must be in \[0, 6\) .*got -1"),
        (dict(temperature=float("nan")), "temperature: expected a finite number >= 0"),
        (dict(temperature=-1.0), "temperature: expected a finite number >= 0"),
        (dict(num_tokens=2.0), "num_tokens: expected an int >= 1"),
    ]
    for kw, match in bad:
        kw = {"prefix": jnp.array([1, 2], jnp.int32), "num_tokens": 3, **kw}
        with pytest.raises(ValueError, match=match):
            generate.generate_ids(model, params, **kw)


def test_generate_text_compiles_once_and_refuses_another_vocabulary(caplog):
    """Later calls of one model (other prefixes of a length, temperatures, seeds) reuse
    the program (each call compiled it: ~1 s per sample); a vocabulary of another size
    than the model's is refused by name (its ids would read as other tokens)."""
    import logging

    _, vocab = text.load_corpus()
    model = models.language_model(models.ModelConfig(vocab_size=len(vocab), hidden_size=8))
    params = model.init(jax.random.key(0))
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        samples = [
            generate.generate_text(model, params, vocab, prefix, 7, temperature, seed)
            for prefix, temperature, seed in (("the time", 0.0, 0), ("our time", 1.0, 3))
        ]
    compiles = [r for r in caplog.records if "Compiling jit(generate_ids)" in r.getMessage()]
    assert len(compiles) == 1, [r.getMessage()[:80] for r in compiles]
    assert samples[0].startswith("the time") and len(samples[1]) == len("our time") + 7
    small = text.Vocab(["a", "b"], mode="char")
    with pytest.raises(ValueError, match=f"vocab: 3 tokens, but the model reads {len(vocab)}"):
        generate.generate_text(model, params, small, "ab", 3)


# --- the launchers, as users run them --------------------------------------------------

ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false".strip(),
}
TINY_FLAGS = [f"--{k}={v}" for k, v in TINY.items() if k != "log_every_s"]


def launch(*args, **kw):
    kw.setdefault("env", ENV)
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.train", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_sigkill_then_rerun_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    flags = [*TINY_FLAGS, "--epochs=40", "--checkpoint_every=10", "--sample_chars=5"]
    ref = launch(*flags, f"--workdir={tmp_path / 'ref'}")
    victim = launch(*flags, f"--workdir={tmp_path / 'run'}")
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 120
    while not (ckpts.exists() and any(p.name.endswith(".sha256.json") for p in ckpts.iterdir())):
        assert time.time() < deadline and victim.poll() is None, victim.communicate()
        time.sleep(0.05)
    victim.kill()  # SIGKILL: no chance to save
    victim.wait()
    rerun = launch(*flags, f"--workdir={tmp_path / 'run'}")
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "resumed from step" in out
    assert ref.wait(timeout=300) == 0
    config = TrainConfig(**{**TINY, "epochs": 40})
    a = restore_params(dataclasses.replace(config, workdir=str(tmp_path / "ref")))
    b = restore_params(dataclasses.replace(config, workdir=str(tmp_path / "run")))
    assert a[0] == b[0] == 320
    assert_bitwise_equal(a[1], b[1])


@pytest.mark.parametrize(
    "where, stopped, step",
    [
        ("_check_workdir", "while starting: nothing was written", 0),  # before the lock
        ("_check_memory", "while starting: nothing was trained", 0),  # while compiling
        ("_plot", "after the last step (saved): no sample or result.json yet", 8),
    ],
)
def test_a_signal_outside_the_loop_stops_the_run_where_it_is(
    tmp_path, monkeypatch, where, stopped, step
):
    """Ctrl-C while the step compiled (or a checkpoint was restored) raised
    KeyboardInterrupt inside JAX, which swallowed it (the run trained to its end and
    exited 0; 38 of a fuzzer's SIGINTs) or crashed (SIGSEGV). Noted from the start,
    it stops the run at the next point where nothing is half done: before anything is
    written, before the first step, or (after the last step, saved) before the long
    sample, which a rerun then writes."""
    original = getattr(train, where)

    def signalled(*args, **kw):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # (Python runs its handler here: noted, not raised)
        return original(*args, **kw)

    monkeypatch.setattr(train, where, signalled)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        lines = []
        result = train.run(tiny(tmp_path, epochs=1), echo=lines.append)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (result.status, result.exit_code, result.step) == ("interrupted", 130, step)
    assert f"SIGINT received {stopped}; rerun the same command to resume" in lines, lines
    workdir = Path(tmp_path / "run")
    assert not (workdir / "result.json").exists()
    if where == "_check_workdir":
        assert not workdir.exists()
    if where == "_plot":
        monkeypatch.undo()
        rerun = train.run(tiny(tmp_path, epochs=1), echo=quiet)
        assert rerun.status == "completed" and rerun.sample
        assert (workdir / "result.json").exists()


def test_a_second_signal_goes_to_the_previous_handler():
    """The first Ctrl-C is noted; a second is Python's (KeyboardInterrupt), for a
    start-up that the note cannot cut short."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with train._SignalCatcher() as signals:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert signals.received == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_saves_the_current_step_and_exits(tmp_path):
    proc = launch(*TINY_FLAGS, "--epochs=1000", "--log_every_s=0", f"--workdir={tmp_path}")
    for line in proc.stdout:
        if line.startswith("step "):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "SIGTERM received: saved step" in out
    saved = int(out.split("saved step ")[1].split(";")[0])
    assert (tmp_path / "checkpoints" / f"{saved}.sha256.json").exists()


def _snapshot(path: Path) -> dict:
    return {
        str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    (d / "empty.txt").write_text("")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (d / "short.txt").write_text("tiny")
    (d / "medium.txt").write_text("the time machine " * 100)
    (d / "a_file").write_text("not a directory")
    (d / "a_sweep").mkdir()
    (d / "a_sweep" / "trials.json").write_text("{}\n")
    return d


# Through the launcher, one case per way a bad flag is caught: absl's own parsing
# (enum, bound, validator), the device count before JAX starts, and a ConfigError
# from train.run's validation. Every other ConfigError takes the same launcher path
# and is checked in-process (BAD_CONFIG below).
BAD = [
    (["--data={d}/missing.txt"], "--data: .*not found"),
    (["--cell=transformer"], "cell"),
    (["--unroll=-1"], "--unroll: expected >= 0, got -1"),
    (["--cpu_devices=3", "--batch_size=4"], "--cpu_devices: 3 devices do not split --batch_size 4"),
    (["--cpu_devices=many"], "--cpu_devices=many: expected auto or an integer >= 1"),
    (["--flagfile={d}/missing.flags"], "--flagfile: cannot open .*missing.flags: No such file"),
    # the flag takes every implementation networks does; native runs the LSTM only
    (["--implementation=native", "--cell=gru"], "--implementation: 'native': no native kernel"),
]

BAD_CONFIG = [
    (dict(data="{d}"), "--data: .*directory"),
    (dict(data="{d}/empty.txt"), "--data: .*empty"),
    (dict(data="{d}/latin1.txt"), "--data: .*UTF-8"),
    (dict(data="{d}/short.txt"), "--num_steps: the text has 4 tokens, shorter than one window"),
    (
        dict(data="{d}/medium.txt", num_train=5000),
        "--num_train: .* windows requested, but the text has only",
    ),
    (dict(hidden_size=0), "--hidden_size: expected >= 1, got 0"),
    (dict(lr=-1.0), "--lr: expected a learning rate > 0"),
    (dict(batch_size=0), "--batch_size: expected >= 1"),
    (dict(workdir="{d}/a_file"), "--workdir: .*a_file exists and is not a directory"),
    (dict(workdir="{d}/a_sweep"), "--workdir: .*a_sweep holds a sweep .*trials.json"),
    (dict(dropout=1.5), "--dropout: expected a rate in"),
    (dict(lr=float("inf")), "--lr: expected a finite number, got inf"),
    (dict(grad_clip=float("nan")), "--grad_clip: expected a finite number, got nan"),
    (dict(sample_prefix=""), "--sample_prefix: expected at least one 'char' token"),
    (dict(min_freq=10**8), "--min_freq: the vocabulary holds only"),
    (
        dict(partition="sequential", batch_size=1024),
        "--batch_size: the sequential partition has 0",
    ),
    (dict(hidden_size=99999999999), "--hidden_size: expected <= 65536"),
    # beyond what the run's arrays hold: tracebacks, one after the whole run trained
    (dict(sample_chars=3 * 10**9), "--sample_chars: expected <= 10,000,000"),
    (dict(sample_chars=10**5, bidirectional=True), "--sample_chars: expected <= 10,000 "),
    (dict(warmup_steps=2**31), "--warmup_steps: expected <= 2,147,483,646"),
    (dict(seed=2**32), "--seed: expected <= 4,294,967,295 \\(a JAX key holds 32 bits"),
    (dict(epochs=10**9), "--epochs: 1,000,000,000 epochs of 8 steps are 8,000,000,000 steps"),
    (dict(batch_size=10**9), r"--batch_size: expected at most num_train = \d+ .*got 1000000000"),
    # a config built in Python holds Python values of each field's kind (epochs=1.5
    # failed only after the run directory was written)
    (dict(epochs=1.5), "--epochs: expected an integer, got 1.5"),
    (dict(eval_every=1.5), "--eval_every: expected an integer, got 1.5"),
    (dict(hidden_size="32"), "--hidden_size: expected an integer, got '32'"),
    (dict(hidden_size=np.int64(8)), "--hidden_size: expected an integer, got np.int64"),
    (dict(lr="0.1"), "--lr: expected a number, got '0.1'"),
    (dict(dropout=None), "--dropout: expected a number, got None"),
    (dict(remat="false"), "--remat: expected true or false, got 'false'"),
    (dict(data=3), "--data: expected a string, got 3"),
    (dict(pin_reset="0.5", cell="gru"), "--pin_reset: expected a number or None"),
    (
        dict(partition="sequential", bidirectional=True),
        "--partition: 'sequential' carries .* use --partition=windows with --bidirectional",
    ),
]


@pytest.mark.parametrize(
    "fields,match", BAD_CONFIG, ids=[f"{next(iter(f))}{i}" for i, (f, _) in enumerate(BAD_CONFIG)]
)
def test_bad_config_raises_naming_the_flag_and_writes_nothing(tmp_path, text_files, fields, match):
    """train.run refuses a bad config with a ConfigError naming the flag, before it
    writes anything (the launcher prints that one line and exits 2: BAD above)."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"precious": true}\n')
    before = _snapshot(workdir)
    fields = {k: v.format(d=text_files) if isinstance(v, str) else v for k, v in fields.items()}
    config = TrainConfig(**{**TINY, "workdir": str(workdir), **fields})
    with pytest.raises(ConfigError, match=match):
        train.run(config, echo=quiet)
    assert _snapshot(workdir) == before


def test_flags_of_another_cell_warn_and_do_not_pin_a_resume(tmp_path):
    """A flag the run's cell, optimizer or schedule does not read (``--forget_bias`` of
    a GRU, as a sweep over cells from lstm.flags sets) is named in a warning; a resume
    that changes it is not refused, while one that changes the cell is. A warm-up
    longer than the run is named too."""
    from rnn_jax.config import changed_settings, inapplicable, resume_conflicts

    assert inapplicable(TrainConfig(activation="relu")) == [
        "--activation='relu' does nothing: only the plain RNN has an activation choice, "
        "and --cell is 'lstm'"
    ]
    assert "--reset_after=True does nothing" in inapplicable(TrainConfig(reset_after=True))[0]
    assert "--momentum=0.9 does nothing" in inapplicable(TrainConfig(momentum=0.9))[0]
    assert inapplicable(TrainConfig(cell="rnn", activation="relu", forget_bias=1.0)) == []
    assert inapplicable(TrainConfig(optimizer="sgd", momentum=0.9, forget_bias=0.0)) == []
    assert inapplicable(TrainConfig(weight_decay=0.1)) == [
        "--weight_decay=0.1 does nothing: only --optimizer=adamw decays weights, and "
        "--optimizer is 'adam'"
    ]
    assert inapplicable(TrainConfig(schedule="constant", warmup_steps=10)) == [
        "--warmup_steps=10 does nothing: a constant --schedule has no warm-up, and "
        "--schedule is 'constant'"
    ]
    assert inapplicable(TrainConfig(schedule="linear", warmup_steps=10)) == []
    adam = dataclasses.asdict(TrainConfig())
    assert changed_settings(adam, {**adam, "weight_decay": 0.1, "lr": 0.02}) == {"lr": [0.01, 0.02]}
    lines = []
    config = tiny(tmp_path, cell="gru", forget_bias=0.0, epochs=1, warmup_steps=100)
    train.run(config, echo=lines.append)
    assert (
        "warning: --forget_bias=0.0 does nothing: only the LSTM has a forget gate, and "
        "--cell is 'gru'" in lines
    )
    assert (
        "warning: --warmup_steps 100 is not shorter than the run's 8 steps: the learning "
        "rate never reaches --lr 0.01" in lines
    )
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    lstm = {**saved, "cell": "lstm", "forget_bias": 1.0}
    assert resume_conflicts(saved, {**saved, "forget_bias": 1.0}) == []
    assert resume_conflicts(saved, lstm) == ["cell: 'gru' -> 'lstm'", "forget_bias: 0.0 -> 1.0"]
    result = train.run(dataclasses.replace(config, forget_bias=1.0, epochs=2), echo=quiet)
    assert result.status == "completed" and result.step == 2 * (TINY["num_train"] // 16)


@pytest.mark.parametrize(
    "args,match", BAD, ids=[a[0].split("=")[0] + str(i) for i, (a, _) in enumerate(BAD)]
)
def test_bad_input_exits_2_with_one_line_and_leaves_the_workdir_intact(
    tmp_path, text_files, args, match
):
    import re

    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"precious": true}\n')
    (workdir / "metrics.jsonl").write_text('{"step": 1}\n')
    before = _snapshot(workdir)
    args = [a.format(d=text_files) for a in args]
    flags = [*TINY_FLAGS, f"--workdir={workdir}", *args]
    proc = launch(*flags)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(match, lines[0]), lines[0]
    assert _snapshot(workdir) == before


def test_cpu_devices_split_the_batch_and_change_no_result(tmp_path):
    """--cpu_devices=2 trains on two CPU devices (the batch split, parameters replicated)
    and ends where one device does; auto keeps one device for a step this small (so
    the auto run is the one-device run)."""
    logged = {**ENV, "JAX_LOG_COMPILES": "1"}

    def compiles(err):  # the memory check's compile is the one the first step runs
        return err.count("Compiling jit(train_step)")

    procs = {
        n: launch(*TINY_FLAGS, f"--cpu_devices={n}", f"--workdir={tmp_path / n}", env=logged)
        for n in ("2", "auto")
    }
    outs = {}
    for n, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert compiles(err) == 1, err
        outs[n] = out
    assert "data parallel: 16 rows per batch over 2 CPU devices" in outs["2"]
    assert "data parallel" not in outs["auto"]
    results = {n: json.loads((tmp_path / n / "result.json").read_text()) for n in procs}
    for key in ("train_ppl", "val_ppl"):
        assert results["2"][key] == pytest.approx(results["auto"][key], rel=1e-5)
    # resumed (the restored state's placement is the fresh one's): still one compile
    resumes = [  # each run's checkpoints onto the other device count, at once
        launch(
            *TINY_FLAGS, "--epochs=3", f"--cpu_devices={n}", f"--workdir={tmp_path / d}", env=logged
        )
        for n, d in (("1", "2"), ("2", "auto"))
    ]
    for proc in resumes:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "resumed from step" in out, err
        assert compiles(err) == 1, err


def test_unroll_flag_zero_means_the_backend_default(tmp_path):
    assert model_config(tiny(tmp_path), 28).unroll is None  # default: 0
    assert model_config(tiny(tmp_path, unroll=4), 28).unroll == 4
    model = models.language_model(model_config(tiny(tmp_path), 28))
    assert model.network.unroll == networks.default_unroll()


def test_loading_an_incomplete_run_directory_names_what_is_missing(tmp_path):
    """``runs.load`` (and so experiments.generate) on a directory that is not a whole
    run: a clear ValueError naming the file, and nothing created there."""
    from rnn_jax import runs, text

    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not readable JSON"):
        runs.load(workdir)
    (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(tiny(tmp_path))))
    with pytest.raises(ValueError, match=r"no vocab.json"):
        runs.load(workdir)
    vocab = text.Vocab(text.tokenize("the time machine", "char"), mode="char")
    (workdir / "vocab.json").write_text(vocab.to_json())
    with pytest.raises(ValueError, match=r"checkpoints holds no usable checkpoint"):
        runs.load(workdir)
    assert sorted(p.name for p in workdir.iterdir()) == ["config.json", "vocab.json"]
    with pytest.raises(ValueError, match=r"result.json does not exist"):  # not "not a file"
        runs.read_json(workdir / "result.json")


def test_loading_reads_only_and_names_settings_that_do_not_fit(tmp_path):
    """runs.load (a reader: generate, claims) leaves every file as it was; it removed
    orphan manifests as a writer. config.json edited after training (another
    hidden_size): runs.load raises a ValueError saying the checkpoints do not fit the
    settings (a RuntimeError before)."""
    from rnn_jax import runs

    config = tiny(tmp_path, epochs=1)
    train.run(config, echo=quiet)
    orphan = Path(config.workdir) / "checkpoints" / f"3{checkpoint.MANIFEST_SUFFIX}"
    orphan.write_text("{}")  # a manifest whose step orbax deleted
    before = _snapshot(Path(config.workdir))
    assert runs.load(Path(config.workdir)).step == 8
    assert _snapshot(Path(config.workdir)) == before
    path = Path(config.workdir) / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "hidden_size": 12}))
    with pytest.raises(ValueError, match=r"do not restore into the model .*hidden_size 12"):
        runs.load(Path(config.workdir))


def test_throughput_counts_real_tokens_only(monkeypatch):
    """tokens_per_s counts the tokens trained on: a last, short batch's padding rows
    (weight 0, left out of ``count``) are not throughput."""
    clock = iter([100.0, 102.0])
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock))
    meter = train._Meter(steps_per_epoch=2, step=0)
    full = {"loss_sum": 10.0, "count": 512.0, "grad_norm": 1.0, "param_norm": 1.0}
    meter.pending += [(1, full), (2, {**full, "count": 128.0})]  # 16 x 32, then 4 rows of 16
    meter.flush(None)
    record = meter.record(2)
    assert record["tokens_per_s"] == pytest.approx((512 + 128) / 2.0)
    assert record["seconds_per_step"] == pytest.approx(1.0)


def test_generate_ids_refuses_a_bad_concrete_temperature():
    """A concrete temperature, NumPy scalars and 0-d arrays included, must be a finite
    number >= 0 (only a traced one can decide greedy vs sampling at run time)."""
    model = models.language_model(models.ModelConfig(vocab_size=5, cell="gru", hidden_size=4))
    params = model.init(jax.random.key(0))
    prefix = jnp.array([1])
    for good in (0.0, 1, np.float32(0.5), jnp.float32(2.0)):
        assert generate.generate_ids(model, params, prefix, 3, good).shape == (3,)
    for bad in (np.float32(-1), -1.0, float("nan"), np.inf, np.array([1.0]), "x"):
        with pytest.raises(ValueError, match="temperature: expected a finite number >= 0"):
            generate.generate_ids(model, params, prefix, 3, bad)
    assert generate.generate_ids(model, params, prefix, 3, 3e38).shape == (3,)
    for huge in (1e39, 1e308):  # finite in float64, inf in float32
        with pytest.raises(ValueError, match="temperature: expected at most 3.403e.38"):
            generate.generate_ids(model, params, prefix, 3, huge)
    # a prefix given as a list, also through jax.jit (a list of tracers there)
    want = generate.generate_ids(model, params, jnp.array([1, 2]), 3)
    np.testing.assert_array_equal(generate.generate_ids(model, params, [1, 2], 3), want)
    jitted = jax.jit(functools.partial(generate.generate_ids, model, num_tokens=3))
    np.testing.assert_array_equal(jitted(params, [1, 2]), want)
    # generate_text jits generate_ids, which then sees a tracer: it checks first (a
    # negative or NaN temperature had decoded greedily)
    vocab = text.Vocab(list("abcd"))  # 5 ids, as the model
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature: expected a finite number >= 0"):
            generate.generate_text(model, params, vocab, "ab", 3, temperature=bad)


def test_a_run_directory_is_trained_by_one_process_at_a_time(tmp_path):
    """While a process holds a run directory's lock, another run there is refused by
    name before it restores or writes anything."""
    config = tiny(tmp_path, epochs=1)
    lock = train._lock_workdir(Path(config.workdir))
    try:
        with pytest.raises(ConfigError, match="--workdir: another process is training the run"):
            train.run(config, echo=quiet)
        assert sorted(p.name for p in Path(config.workdir).iterdir()) == [".lock"]
    finally:
        lock.close()


def test_an_attempt_without_a_checkpoint_does_not_pin_the_flags(tmp_path):
    """A run directory whose first attempt stopped before its first checkpoint (here: its
    files written by hand, as a crash leaves them) holds nothing trained, so the
    corrected command starts afresh and rewrites them instead of refusing the change."""
    config = tiny(tmp_path, epochs=1)
    workdir = Path(config.workdir)
    train._write_workdir(workdir, dataclasses.replace(config, batch_size=999), text.Vocab([]), {})
    (workdir / "checkpoints").mkdir()
    result = train.run(config, echo=quiet)
    assert result.status == "completed"
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["batch_size"] == config.batch_size
    assert json.loads((workdir / "corpus.json").read_text())["tokens"] > 0


def test_generate_launcher_reads_the_prefix_as_the_corpus_and_bounds_temperature(tmp_path):
    """experiments.generate on a finished run: a prefix the preprocessing changes is
    reported (so 'Café' read as 'caf ' is not silent) and continued; a temperature
    beyond float32 is refused by flag before the run is loaded."""
    config = tiny(tmp_path, epochs=1)
    train.run(config, echo=quiet)

    launch = functools.partial(generate_cli, config.workdir)

    proc = launch("--prefix=Café 42", "--num_chars=7")
    assert proc.returncode == 0, proc.stderr
    assert "note: --prefix is read as 'caf '" in proc.stderr
    line = proc.stdout.strip("\n")
    assert line.startswith("caf ") and len(line) == len("caf ") + 7
    proc = launch("--temperature=1e39")
    assert proc.returncode == 2
    assert "error: --temperature: expected at most 3.403e+38" in proc.stderr
    proc = launch("--prefix=")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --prefix: expected at least one token after"), proc.stderr


def test_a_sample_prefix_outside_the_vocabulary_is_named(tmp_path, text_files):
    """A text of one's own with the default --sample_prefix ('time traveller '): the
    prefix's letters that text lacks are named before training."""
    lines = []
    train.run(tiny(tmp_path, data=str(text_files / "medium.txt"), epochs=1), echo=lines.append)
    assert (
        "warning: --sample_prefix has 3 token(s) outside the vocabulary ('r', 'v', 'l'): "
        "the samples read each as '<unk>'" in lines
    )


def test_generate_launcher_says_what_it_generates_from(tmp_path):
    """experiments.generate on a bidirectional raw-character run whose newest
    checkpoint is corrupt: it names the step it falls back to and the prefix's tokens
    outside the vocabulary (read as <unk>), and bounds --num_chars for a model that
    reruns the network for every character."""
    config = tiny(tmp_path, epochs=1, checkpoint_every=4, tokens="raw_char", bidirectional=True)
    train.run(config, echo=quiet)  # checkpoints at 4 and 8
    corrupt_step(config.workdir, 8)

    launch = functools.partial(generate_cli, config.workdir)

    proc = launch("--prefix=the ☃ ♞☃", "--num_chars=3")
    assert proc.returncode == 0, proc.stderr
    assert "note: generating from step 4: the newer step(s) 8 could not be used" in proc.stderr
    assert "note: --prefix has 2 token(s) outside the run's vocabulary ('☃', '♞')" in proc.stderr
    assert proc.stdout.startswith("the ☃ ♞☃") and len(proc.stdout.strip("\n")) == 8 + 3
    proc = launch("--num_chars=10001")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --num_chars: expected <= 10,000 for this bidirectional")


def test_sampling_follows_softmax_of_the_logits_over_the_temperature():
    """Drawn tokens' frequencies at temperature 0.5 and 2 against softmax(logits / T)
    written out (20,000 draws: a standard error below 0.004); 0 is the argmax."""
    logits = jnp.array([0.0, 1.0, 2.0])
    keys = jax.random.split(jax.random.key(0), 20_000)
    for temperature in (0.5, 2.0):
        drawn = jax.vmap(lambda k, t=temperature: generate._choose(logits, jnp.float32(t), k))(keys)
        freq = np.bincount(np.asarray(drawn), minlength=3) / len(keys)
        want = np.exp(np.asarray(logits) / temperature)
        np.testing.assert_allclose(freq, want / want.sum(), atol=0.02)
    assert int(generate._choose(logits, jnp.float32(0.0), keys[0])) == 2


def test_uniform_init_is_pytorchs_for_every_layer():
    """init="uniform": the recurrent weights and the output layer are U(-k, k) with
    k = 1/sqrt(fan_in) (H for both here, nn.LSTM's and nn.Linear's defaults), and
    the draws reach close to k."""
    hidden, vocab_size = 16, 100
    config = models.ModelConfig(
        vocab_size=vocab_size, cell="gru", hidden_size=hidden, init="uniform"
    )
    params = models.language_model(config).init(jax.random.key(0))
    k = 1 / math.sqrt(hidden)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        leaf = np.abs(np.asarray(leaf))
        assert leaf.max() <= k and leaf.max() > 0.9 * k, jax.tree_util.keystr(path)


def test_the_largest_legal_sizes_are_accepted(tmp_path):
    """The bounds are inclusive: a batch of exactly num_train windows, and
    num_train + num_val using every window of the text."""
    config_module.validate(tiny(tmp_path, num_train=16, batch_size=16))
    ids, _ = text.load_corpus()
    available = len(ids) - TINY["num_steps"]
    config_module.validate(tiny(tmp_path, num_train=available - 64, num_val=64))
    with pytest.raises(ConfigError, match="--num_train: num_train \\+ num_val"):
        config_module.validate(tiny(tmp_path, num_train=available - 63, num_val=64))
    with pytest.raises(ConfigError, match="--batch_size: expected at most num_train = 16"):
        config_module.validate(tiny(tmp_path, num_train=16, batch_size=17))


def test_ctrl_c_while_the_launcher_imports_exits_130_after_the_imports(capsys):
    """A KeyboardInterrupt raised inside JAX's import is swallowed by its gc callback
    (the run went on) or became an ImportError: the launcher notes Ctrl-C during its
    imports and exits 130 once they are done."""
    import os
    import signal

    from experiments.common import deferred_sigint

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        reached = []
        with pytest.raises(SystemExit) as stop:
            with deferred_sigint("interrupted while starting"):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)  # the handler runs here: noted, not raised
                reached.append(True)
        assert stop.value.code == 130 and reached == [True]
        assert "interrupted while starting" in capsys.readouterr().err
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with deferred_sigint("unused"):  # no Ctrl-C: nothing happens
            pass
        # a handler other than Python's default is left alone (Ctrl-C is not deferred)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with deferred_sigint("unused"):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_in_the_generate_launcher_exits_130_without_the_shutdown(
    tmp_path, monkeypatch, capsys
):
    """Ctrl-C while experiments.generate restores the checkpoint: one line, exit 130,
    through os._exit (the interpreter's shutdown had crashed with SIGSEGV there)."""
    from experiments import generate as launcher
    from rnn_jax import runs

    def interrupted(path):
        raise KeyboardInterrupt

    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(runs, "load_config", lambda path: TrainConfig())  # read first
    monkeypatch.setattr(runs, "load", interrupted)
    monkeypatch.setattr(os, "_exit", fake_exit)  # (experiments.common.exit_at_once)
    launcher.FLAGS(["generate", f"--workdir={tmp_path}"])
    try:
        with pytest.raises(SystemExit):
            launcher.main([])
    finally:
        launcher.FLAGS.unparse_flags()
    assert exits == [130]
    assert capsys.readouterr().err.strip() == "interrupted (SIGINT)"


@pytest.mark.parametrize("module", ["experiments.train", "experiments.generate"])
def test_help_flags_print_help_and_exit_0(module):
    """absl's help flags exit with 1; the launchers exit with 0 after the help (a
    bad flag still exits with 2)."""
    for flag, wanted in (("--helpshort", "--workdir"), ("--helpfull", "--verbosity")):
        done = subprocess.run(
            [sys.executable, "-m", module, flag], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, (flag, done.stderr[-500:])
        assert wanted in done.stdout + done.stderr, flag
    done = subprocess.run(
        [sys.executable, "-m", module, "--help=nonsense"], capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr[-500:]
