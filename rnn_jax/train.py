"""Training a character (or word) language model: state, pure steps, the host loop.

Data flows one way: text -> ids (``text``) -> batches (``data``) -> logits
(``models``) -> loss -> gradients -> optax update -> metrics and checkpoints.

* ``train_step(state, batch) -> (state, metrics)`` and
  ``eval_step(params, batch) -> (loss_sum, count)`` are pure and jit-compiled once;
  per-step randomness (dropout) is ``fold_in(key(seed), step)``.
* The training state ``{"params", "opt_state", "step", "carry"}`` is the only thing
  checkpointed; with the data a pure function of ``(seed, epoch, step)`` a resumed run
  ends with parameters bitwise equal to an uninterrupted one (on CPU).
* Loss: mean per-token cross-entropy over real (``weight`` 1) rows; perplexity is
  ``exp`` of it. Sequential partitioning carries the final state into the next batch
  with the gradient stopped (truncated BPTT) and resets it at every epoch start.

:func:`run` is the whole job: validate, set up or resume the run directory, train,
evaluate, checkpoint, plot and sample. Launch it with ``python -m experiments.train``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rnn_jax import data, files, memory, models, parallel, text
from rnn_jax.config import (
    ConfigError,
    TrainConfig,
    changed_settings,
    inapplicable,
    model_config,
    resume_conflicts,
    validate,
)

log = logging.getLogger("rnn_jax")

EXIT_SIGNAL = {signal.SIGTERM: 143, signal.SIGINT: 130}


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss; nothing after it was saved."""


# --- optimiser and steps ------------------------------------------------------------


def learning_rate(config: TrainConfig, total_steps: int) -> float | optax.Schedule:
    """``config.lr``, or the schedule over ``total_steps`` (cosine: warm up, then decay
    to zero at the last step; linear: the same with straight lines)."""
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, config.lr, config.warmup_steps, max(total_steps, config.warmup_steps + 1)
        )
    return optax.join_schedules(  # "linear"
        [
            optax.linear_schedule(0.0, config.lr, max(config.warmup_steps, 1)),
            optax.linear_schedule(config.lr, 0.0, max(total_steps - config.warmup_steps, 1)),
        ],
        [config.warmup_steps],
    )


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """``clip_by_global_norm`` (if ``grad_clip > 0``) then sgd / adam / adamw on
    :func:`learning_rate`'s schedule."""
    lr = learning_rate(config, total_steps)
    if config.optimizer == "sgd":
        opt = optax.sgd(lr, momentum=config.momentum or None)
    elif config.optimizer == "adam":
        opt = optax.adam(lr)
    else:
        opt = optax.adamw(lr, weight_decay=config.weight_decay)
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), opt)
    return opt


def make_steps(
    model: models.Model, tx: optax.GradientTransformation, config: TrainConfig, steps_per_epoch: int
) -> tuple[Callable, Callable]:
    """The jit-compiled ``train_step`` and ``eval_step`` for ``model``."""
    sequential = config.partition == "sequential"
    base_key = jax.random.key(config.seed)
    use_dropout = config.dropout > 0

    def loss_fn(params, batch, carry, key):
        logits, final = model.apply(
            params, batch.x, carry, dropout_key=key, time_major_logits=True
        )  # <[T, B, V]>: see models.language_model
        losses = models.token_losses(logits, batch.y.T)
        return jnp.sum(losses * batch.weight[None, :]), final

    def token_count(weight, num_steps):
        return jnp.sum(weight) * num_steps

    # With the batch split over devices, every sum over it is a collective, and a
    # device that reaches one waits there for the others. XLA:CPU runs a device's
    # ready ops in any order, so a sum whose inputs are ready early (the token
    # count, the loss) could make one device wait through the other's whole loop
    # before starting its own (seen in the profiler: the two halves of a step run
    # one after the other). optimization_barrier holds them until the gradient is
    # complete; the mean's gradient is the sum's, divided once at the end.

    @jax.jit
    def train_step(state, batch):
        step = state["step"]
        key = jax.random.fold_in(base_key, step) if use_dropout else None
        carry = None
        if sequential:  # fresh state at the start of every epoch
            fresh = step % steps_per_epoch == 0
            carry = jax.tree.map(lambda c: jnp.where(fresh, jnp.zeros_like(c), c), state["carry"])
        (loss_sum, final), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], batch, carry, key
        )
        grads, loss_sum, weight = jax.lax.optimization_barrier((grads, loss_sum, batch.weight))
        count = token_count(weight, batch.x.shape[1])
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {
            "params": params,
            "opt_state": opt_state,
            "step": step + 1,
            "carry": jax.lax.stop_gradient(final) if sequential else state["carry"],
        }
        metrics = {
            "loss_sum": loss_sum,
            "count": count,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
        }
        return new_state, metrics

    @jax.jit
    def eval_step(params, batch):
        loss_sum, _ = loss_fn(params, batch, None, None)
        loss_sum, weight = jax.lax.optimization_barrier((loss_sum, batch.weight))
        return loss_sum, token_count(weight, batch.x.shape[1])

    return train_step, eval_step


def init_state(model: models.Model, tx: optax.GradientTransformation, config: TrainConfig):
    params = model.init(jax.random.key(config.seed))
    carry = model.initial_carry(config.batch_size) if config.partition == "sequential" else ()
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "carry": carry,
    }


def evaluate(
    eval_step, params, windows: data.Windows, batch_size: int, split: str, mesh=None
) -> float:
    """Perplexity ``exp(mean per-token cross-entropy)`` over a split's windows."""
    total = count = 0.0
    for batch in data.eval_batches(windows, batch_size, split):
        s, n = eval_step(params, parallel.shard_batch(batch, mesh))
        total, count = total + float(s), count + float(n)
    return perplexity(total / count)


def perplexity(mean_loss: float) -> float:
    """``exp(mean per-token cross-entropy)``; ``inf`` past float range."""
    return math.exp(mean_loss) if mean_loss < 700 else math.inf


# --- the host loop ------------------------------------------------------------------


def is_due(step: int, every: int, total: int) -> bool:
    """Periodic work (eval, checkpoint) fires every ``every`` steps and on the last one."""
    return step == total or (every > 0 and step % every == 0)


class _SignalCatcher:
    """Turns SIGTERM / SIGINT into a flag the run checks where it can stop cleanly
    (before it locks the run directory, after autotune, before the loop, after each
    step, before the final sample). A second signal is the previous handler's (the
    default: Ctrl-C raises KeyboardInterrupt, SIGTERM ends the process), for a
    start-up the flag cannot cut short (a compile)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in EXIT_SIGNAL:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
            return
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def agreed(self) -> int | None:
        """The signal to act on: this process's; in a multi-process run, the first
        that any process noted (a gather every process reaches at the same point: one
        process stopping alone left the others waiting at their next collective)."""
        noted = [signum for signum in _gathered(self.received or 0) if signum]
        return noted[0] if noted else None

    def stop(self, echo, what: str, step: int, signum: int | None = None) -> Result:
        """The Result of a run stopped by a signal (``signum``, else the noted one)
        ``what`` (where), at ``step``."""
        signum = signum or self.received
        echo(f"{signal.Signals(signum).name} received {what}; rerun the same command to resume")
        return Result("interrupted", step, exit_code=EXIT_SIGNAL[signum])

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class Result:
    """What :func:`run` returns: how it ended and the final numbers."""

    status: str  # "completed" or "interrupted" (divergence raises NonFiniteLoss)
    step: int
    train_ppl: float | None = None
    val_ppl: float | None = None
    sample: str | None = None
    exit_code: int = 0
    params: Any = None


class _Meter:
    """Training metrics between two evaluations.

    Device metrics are read in :meth:`flush` only (not after every step, which would
    stall the asynchronous dispatch); it also stops on the first non-finite value.
    """

    def __init__(self, steps_per_epoch: int, step: int):
        self.steps_per_epoch = steps_per_epoch
        self.pending: list[tuple[int, dict]] = []
        self.reset(step)

    def reset(self, step: int) -> None:
        self.sums = {"loss_sum": 0.0, "count": 0.0, "grad_norm": 0.0}
        self.steps, self.since_step, self.since = 0, step, time.perf_counter()
        self.timed_count = 0.0  # tokens since ``since`` (a resume restores sums, not time)

    def state(self) -> dict[str, float]:
        """The interval's sums so far, for a checkpoint's metadata (call after flush)."""
        return {**self.sums, "steps": self.steps}

    def restore(self, saved: Any) -> None:
        """Continues the interval a checkpoint cut: its sums (:meth:`state`), so the
        first evaluation after a resume averages the same steps as without one."""
        if isinstance(saved, dict) and set(saved) == {*self.sums, "steps"}:
            self.sums = {k: float(saved[k]) for k in self.sums}
            self.steps = int(saved["steps"])

    def flush(self, last_saved: int | None) -> None:
        for step, m in jax.device_get(self.pending):
            bad = [k for k in ("loss_sum", "grad_norm", "param_norm") if not np.isfinite(m[k])]
            if bad:
                what = {"loss_sum": "loss", "grad_norm": "gradients"}.get(bad[0], "parameters")
                good = "none" if last_saved is None else f"step {last_saved}"
                raise NonFiniteLoss(
                    f"non-finite {what} at step {step} (epoch "
                    f"{(step - 1) // self.steps_per_epoch + 1}); stopped, last good "
                    f"checkpoint: {good}. Lower --lr or set --grad_clip"
                )
            for k in self.sums:
                self.sums[k] += float(m[k])
            self.timed_count += float(m["count"])
            self.steps += 1
        self.pending.clear()

    def train_loss(self) -> float:
        return self.sums["loss_sum"] / self.sums["count"]

    def record(self, step: int) -> dict[str, float]:
        """The interval's numbers; call after :meth:`flush` and before evaluating."""
        seconds = time.perf_counter() - self.since
        return {
            "step": step,
            "epoch": round(step / self.steps_per_epoch, 4),
            "train_ppl": perplexity(self.train_loss()),
            "grad_norm": self.sums["grad_norm"] / max(self.steps, 1),
            # the real tokens trained on (padding rows of a last, short batch not counted)
            "tokens_per_s": self.timed_count / seconds,
            "seconds_per_step": seconds / max(step - self.since_step, 1),
        }


def run(
    config: TrainConfig,
    *,
    echo: Callable[[str], None] = print,
    autotune_cache: str | os.PathLike | None = None,
    autotune_refresh: bool = False,
) -> Result:
    """Trains (or resumes) the run of ``config`` in ``config.workdir``.

    With ``config.autotune``, first times the candidate implementations, unrolls and
    (bidirectional) direction layouts (:func:`rnn_jax.autotune.tune`, cached in
    ``autotune_cache``; ``autotune_refresh`` times again) and trains with the
    fastest; the run's ``config.json`` records the choice.

    Evaluates every ``eval_every`` steps (default: every epoch) and at the end,
    checkpoints every ``checkpoint_every`` steps and at the end, and on SIGTERM /
    SIGINT saves the current step and returns ``status="interrupted"`` (a signal
    while it starts: before the first step, nothing trained; after the last step:
    before the final sample, which a rerun writes; during that sample: the run ends
    as completed).

    Raises:
      ConfigError: bad configuration, before anything is compiled or written; a
        step larger than the free memory (:mod:`rnn_jax.memory`), once compiled,
        before a checkpoint is read or anything written.
      NonFiniteLoss: the loss became NaN or infinite; the last good checkpoint stays.
    """
    # SIGTERM / SIGINT are noted from the start, not only in the loop: a Ctrl-C while
    # JAX compiled or restored raised KeyboardInterrupt inside JAX, which swallowed it
    # (the run then trained to its end and returned 0) or crashed (SIGSEGV). A signal
    # noted before the loop stops the run before its first step.
    with _SignalCatcher() as signals:
        return _run(config, echo, autotune_cache, autotune_refresh, signals)


def _run(config, echo, autotune_cache, autotune_refresh, signals) -> Result:
    ids, vocab = validate(config)
    if memory.enabled():
        memory.budget()  # a malformed RNN_JAX_MEMORY_BUDGET: its ValueError, nothing written
    for warning in inapplicable(config):
        echo(f"warning: {warning}")
    unknown = vocab.unknown(config.sample_prefix)
    if unknown:  # (a text of its own with the default prefix, say)
        echo(
            f"warning: --sample_prefix has {len(unknown)} token(s) outside the vocabulary "
            f"({text.some(unknown)}): the samples read each as {text.UNK!r}"
        )
    workdir = Path(config.workdir)
    corpus = _corpus_record(config, ids)
    try:
        _check_workdir(workdir, config, vocab, corpus)  # a resume's conflicts, before timing
    except ConfigError as e:  # perhaps a run that read the byte-order mark as text
        ids, vocab, corpus = _text_as_trained(workdir, config, e)
        echo(
            f"note: {config.data} starts with a byte-order mark, which the run in "
            f"{workdir} was trained reading as its first character (rnn_jax read it so "
            f"until 2026-12-08): it is read so for this run"
        )
    _check_progress(workdir, config, ids)
    if signals.received is not None and jax.process_count() == 1:  # (nothing written)
        return signals.stop(echo, "while starting: nothing was written", _saved_step(workdir))
    fresh = not workdir.exists()
    # One run per run directory. The processes of a multi-process run share it: process
    # 0 holds the lock for all (another process's lock would refuse its own run).
    lock = _lock_workdir(workdir) if jax.process_index() == 0 else None
    try:
        return _train(config, ids, vocab, corpus, echo, autotune_cache, autotune_refresh, signals)
    except ConfigError:  # refused once compiled (memory, autotune): leave no new folder
        if fresh and lock is not None:
            _remove_if_only_lock(workdir)
        raise
    finally:
        if lock is not None:
            lock.close()


def _remove_if_only_lock(workdir: Path) -> None:
    """Removes ``workdir`` if it holds nothing but ``.lock`` (while the lock is held,
    so no other process is using it); leaves it where that fails."""
    try:
        if [p.name for p in workdir.iterdir()] == [".lock"]:
            (workdir / ".lock").unlink()
            workdir.rmdir()
    except OSError:
        pass


def _lock_workdir(workdir: Path):
    """An exclusive lock on ``workdir/.lock`` (creating ``workdir``), held while the
    run trains: a second process on the same run directory is refused by name
    instead of racing the first one's checkpoints. Returns the open lock file."""
    import fcntl

    try:
        workdir.mkdir(parents=True, exist_ok=True)
        handle = open(workdir / ".lock", "a")
    except OSError as e:
        raise ConfigError("workdir", f"cannot write to {workdir}: {e.strerror or e}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigError(
            "workdir",
            f"another process is training the run in {workdir}; wait for it or use "
            f"another --workdir",
        ) from None
    return handle


def _train(config, ids, vocab, corpus, echo, autotune_cache, autotune_refresh, signals) -> Result:
    """:func:`run` once its checks passed and it holds the run directory's lock."""
    from rnn_jax import checkpoint, generate  # orbax is imported only when training

    workdir = Path(config.workdir)
    if config.autotune:
        from rnn_jax import autotune

        choice = autotune.tune(
            config, len(vocab), cache_path=autotune_cache, refresh=autotune_refresh, echo=echo
        )
        config = dataclasses.replace(
            config,
            implementation=choice.implementation,
            unroll=choice.unroll,
            directions=choice.directions,
        )
        if signals.received is not None:  # (its choice is cached; nothing else written)
            return signals.stop(echo, "while autotuning: nothing was trained", _saved_step(workdir))
    windows = data.make_windows(ids, config.num_steps, config.num_train, config.num_val)
    steps_per_epoch = data.steps_per_epoch(windows, config.batch_size, config.partition)
    total = steps_per_epoch * config.epochs
    if config.schedule != "constant" and config.warmup_steps >= total:
        echo(  # (the peak would come at step warmup_steps; the last step is total - 1)
            f"warning: --warmup_steps {config.warmup_steps} is not shorter than the run's "
            f"{total} steps: the learning rate never reaches --lr {config.lr:g}"
        )
    model = models.language_model(model_config(config, len(vocab)))
    tx = make_optimizer(config, total)
    mesh = _mesh(config)
    if mesh is not None:
        kind = mesh.devices.flat[0].platform.upper()
        echo(f"data parallel: {config.batch_size} rows per batch over {mesh.size} {kind} devices")

    train_step, eval_step = make_steps(model, tx, config, steps_per_epoch)
    _check_state_memory(model, tx, config, mesh)  # (the state is made next)
    state = parallel.place_state(init_state(model, tx, config), mesh)
    _check_memory(train_step, state, windows, config, mesh, echo)
    train_step, eval_step = parallel.in_mesh(mesh, train_step), parallel.in_mesh(mesh, eval_step)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
    abstract = parallel.abstract_state(jax.eval_shape(lambda: state), mesh)
    ckpt.seal_newest(abstract)  # a save stopped before its manifest
    restored = ckpt.restore_latest(abstract)
    start, last_saved, saved_meter = 0, None, None
    if restored is not None:
        start, state, meta = restored
        saved_meter = meta.get("meter") if isinstance(meta, dict) else None
        last_saved = start
        if start > total:  # only when a newer step than _check_progress saw was unusable
            ckpt.close()
            raise _epochs_error(config, workdir, start, steps_per_epoch)
        echo(f"resumed from step {start} ({workdir / 'checkpoints'})")
        try:
            _set_aside_unusable(ckpt, start, workdir, echo)
        except ConfigError:
            ckpt.close()
            raise
        _warn_rescheduled(workdir, config, start, steps_per_epoch, echo)
    elif ckpt.all_steps():  # steps there, none usable: never train over them from scratch
        steps = ", ".join(map(str, ckpt.all_steps()))
        ckpt.close()
        raise ConfigError(
            "workdir",
            f"no checkpoint in {workdir / 'checkpoints'} passed its integrity check (steps "
            f"{steps}; the warnings above say why); nothing was changed. Move that folder "
            f"away to train afresh there, or use another --workdir",
        )
    else:
        echo(f"run directory: {workdir}")
    if (signum := signals.agreed()) is not None:  # while compiling or restoring
        ckpt.close()
        return signals.stop(echo, "while starting: nothing was trained", start, signum)
    result_path = workdir / "result.json"
    # A resumed stretch commits its settings (config.json, with their changes) and
    # moves the earlier result aside at its first checkpoint, not before: a resume
    # that fails first (a non-finite loss, a Ctrl-C while compiling) leaves the run
    # directory saying what its checkpoints were trained with.
    resumed_stretch = restored is not None and start < total
    # The processes of a multi-process run share the run directory; process 0 writes
    # its files (each process writing them raced on the temporary files and logged
    # every evaluation once per process).
    writer = jax.process_index() == 0
    if writer and restored is None:
        _write_workdir(workdir, config, vocab, corpus, fresh=True)
    elif writer:
        missing = not (workdir / "config.json").exists() and not resumed_stretch
        _write_workdir(workdir, config, vocab, corpus, settings=missing)
    if restored is not None and start == total:
        echo(f"the run has trained all its {total} steps: nothing to train")

    def commit_stretch() -> None:
        if not writer:
            return
        _write_workdir(workdir, config, vocab, corpus, step=start)
        if result_path.exists():
            kept = _keep_previous_result(workdir)
            os.replace(result_path, workdir / "result.previous.json")
            echo(f"moved the earlier result to {workdir / 'result.previous.json'}{kept}")

    metrics_path = workdir / "metrics.jsonl"
    history = _load_history(metrics_path, upto=start, rewrite=writer)
    echo(
        f"{config.cell} H={config.hidden_size} L={config.num_layers}"
        f"{' bidirectional' if config.bidirectional else ''}, vocab {len(vocab)}, "
        f"{_count(state['params']):,} params; {steps_per_epoch} steps/epoch x "
        f"{config.epochs} epochs = {total} steps"
    )
    meter = _Meter(steps_per_epoch, start)
    meter.restore(saved_meter)
    t_start, last_log = time.perf_counter(), time.perf_counter()
    wall_offset = history[-1]["wall_s"] if history else 0.0
    status, exit_code = "completed", 0

    def save(step: int) -> None:
        nonlocal last_saved, resumed_stretch
        meter.flush(last_saved)  # never save a state whose loss was not finite
        if last_saved != step:
            meta = {"step": step, "epoch": step // steps_per_epoch, "meter": meter.state()}
            ckpt.save(step, state, meta)
            last_saved = step
            if resumed_stretch:
                resumed_stretch = False
                commit_stretch()

    multi = jax.process_count() > 1
    try:
        for step in range(start, total):
            epoch, i = divmod(step, steps_per_epoch)
            batch = data.train_batch(
                windows, config.batch_size, config.seed, epoch, i, config.partition
            )
            state, metrics = train_step(state, parallel.shard_batch(batch, mesh))
            done = step + 1
            meter.pending.append((done, metrics))
            if is_due(done, config.eval_every or steps_per_epoch, total):
                meter.flush(last_saved)
                record = meter.record(done)
                val = evaluate(eval_step, state["params"], windows, config.batch_size, "val", mesh)
                record["val_ppl"] = val
                record["wall_s"] = wall_offset + time.perf_counter() - t_start
                history.append(record)
                if writer:
                    _append_jsonl(metrics_path, record)
                eta = (total - done) * record["seconds_per_step"]
                echo(
                    f"step {done}/{total} epoch {record['epoch']:.2f}: "
                    f"train ppl {record['train_ppl']:.3f}, val ppl {val:.3f}, "
                    f"{record['tokens_per_s']:,.0f} tok/s, ETA {_hms(eta)}"
                )
                meter.reset(done)
                last_log = time.perf_counter()
            elif time.perf_counter() - last_log > config.log_every_s:
                meter.flush(last_saved)
                echo(f"step {done}/{total}: train loss {meter.train_loss():.4f}")
                last_log = time.perf_counter()
            if is_due(done, config.checkpoint_every, total):
                save(done)
            if not multi:
                signum = signals.received
            elif done % SIGNAL_AGREEMENT_EVERY == 0 or done == total:
                signum = signals.agreed()  # (every process, at the same steps)
            else:
                signum = None
            if signum is not None:
                save(done)
                name = signal.Signals(signum).name
                echo(f"{name} received: saved step {done}; rerun the same command to resume")
                status, exit_code = "interrupted", EXIT_SIGNAL[signum]
                break
    finally:
        ckpt.close()
    params = state["params"]
    if writer:
        _plot(history, workdir / "curves.png", echo)
    if status == "interrupted":
        return Result(status, int(state["step"]), exit_code=exit_code, params=params)
    if (signum := signals.agreed()) is not None:  # after the last step (saved)
        return signals.stop(
            echo, "after the last step (saved): no sample or result.json yet", total, signum
        )
    final = history[-1] if history else {}
    sample = generate.generate_text(model, params, vocab, config.sample_prefix, config.sample_chars)
    echo(
        f"done: train ppl {final.get('train_ppl', float('nan')):.3f}, "
        f"val ppl {final.get('val_ppl', float('nan')):.3f}"
    )
    echo(f"sample: {sample!r}")
    if writer:
        _write_json_atomic(workdir / "result.json", {"status": status, **final, "sample": sample})
    return Result(status, total, final.get("train_ppl"), final.get("val_ppl"), sample, 0, params)


MEMORY_WARN_SHARE = 0.8  # warn when a step needs more than this share of what is free
# In a multi-process run the processes agree on a signal every this many steps (a
# gather; one process stopping alone would leave the others at their next collective)
SIGNAL_AGREEMENT_EVERY = 10


def _check_memory(train_step, state, windows, config: TrainConfig, mesh, echo) -> None:
    """Compiles ``train_step`` (``jit`` reuses the executable at the first step) and
    refuses a step that needs more memory than its devices have free
    (:mod:`rnn_jax.memory`), before a checkpoint is read or anything is written:
    on a CPU such a step is killed by the OOM killer without a message. Warns above
    80%. In a multi-process run every process refuses when one does (a process left
    alone would wait at the first collective). ``RNN_JAX_MEMORY_CHECK=0`` skips it
    (the step then compiles at its first call, as before)."""
    if not memory.enabled():
        return
    batch = data.train_batch(windows, config.batch_size, config.seed, 0, 0, config.partition)
    batch = parallel.shard_batch(batch, mesh)
    compiled = parallel.in_mesh(mesh, lambda: train_step.lower(state, batch).compile())()
    devices = _local_devices(mesh)
    cpus = sum(d.platform == "cpu" for d in devices)  # each holds a copy of the state
    held = cpus * _tree_bytes(state)
    estimate = memory.estimate(compiled, devices, held)
    fits = _all_fit(estimate is None or estimate.fits, "batch_size", "the training step")
    if fits:
        if estimate is not None and (estimate.share or 0) > MEMORY_WARN_SHARE:
            echo(f"warning: the training step needs {estimate.describe()}")
        return
    raise memory_refusal(config, estimate)


def _check_state_memory(model, tx, config: TrainConfig, mesh) -> None:
    """Refuses parameters and optimiser state larger than the free memory of the
    devices that each hold a copy (``jax.eval_shape``: nothing is allocated), before
    they are made: a model too large (``--hidden_size=65536 --num_layers=8``) failed
    in XLA with RESOURCE_EXHAUSTED and a traceback, or met the OOM killer."""
    if not memory.enabled():
        return
    abstract = jax.eval_shape(lambda: init_state(model, tx, config))
    estimate = memory.for_bytes(_tree_bytes(abstract), _local_devices(mesh))
    if _all_fit(estimate is None or estimate.fits, "hidden_size", "the model"):
        return
    levers = [f"--hidden_size ({config.hidden_size})", f"--num_layers ({config.num_layers})"]
    if config.embed_dim:
        levers.append(f"--embed_dim ({config.embed_dim})")
    raise ConfigError(
        "hidden_size",
        f"the model's parameters and optimizer state would need {estimate.describe()}. "
        f"Lower {', '.join(levers[:-1])} or {levers[-1]}{_pool_levers(estimate)}. Nothing "
        f"was trained; {memory.ENV}=0 skips this check",
    )


def _local_devices(mesh) -> list:
    """This process's devices of ``mesh`` (a multi-host mesh holds the others' too),
    or the default device (where :func:`rnn_jax.parallel.place_state` puts the state)."""
    if mesh is None:
        return jax.devices()[:1]
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def _all_fit(fits: bool, flag: str, what: str) -> bool:
    """``fits`` of this process; in a multi-process run, ConfigError(``flag``) on every
    process when another's ``what`` does not fit (a process left running alone would
    wait at the first collective)."""
    verdicts = _gathered(int(fits))
    if fits and not all(verdicts):
        refused = [i for i, ok in enumerate(verdicts) if not ok]
        raise ConfigError(
            flag,
            f"{what} does not fit in the memory of process(es) "
            f"{', '.join(map(str, refused))} (their errors say how much it needs); "
            f"nothing was trained",
        )
    return fits


def _gathered(value: int) -> list[int]:
    """``value`` of every process, in process order (a gather every process must
    reach); this process's alone in a one-process run."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    return [int(x) for x in np.ravel(multihost_utils.process_allgather(np.int32(value)))]


def _tree_bytes(tree) -> int:
    """Bytes of the arrays of ``tree`` (arrays, or ``jax.eval_shape``'s shapes)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def memory_refusal(config: TrainConfig, estimate: memory.Estimate) -> ConfigError:
    """The ConfigError of a training step that does not fit: how much it needs, what
    is free, and the flags that shrink it."""
    levers = (
        f"Lower --batch_size ({config.batch_size}), --num_steps ({config.num_steps}) "
        f"or --hidden_size ({config.hidden_size})"
    )
    if not config.remat and config.implementation != "wavefront":
        levers += ", or set --remat (recompute the activations in the backward pass)"
    return ConfigError(
        "batch_size",
        f"the training step would need {estimate.describe()} (XLA's plan of the "
        f"compiled step: activations, gradients and workspace). {levers}"
        f"{_pool_levers(estimate)}. Nothing was trained; {memory.ENV}=0 skips this check",
    )


def _pool_levers(estimate: memory.Estimate) -> str:
    """What else sets the memory a refusal counted as free: a sweep's share of host
    memory, or JAX's share of an accelerator."""
    if memory.BUDGET_ENV in estimate.pool:
        return (
            f"; {memory.BUDGET_ENV} sets this process's share of host memory (a sweep's "
            f"--parallel=N gives each trial 1/N of what was free: run fewer at once)"
        )
    if estimate.pool != "host memory":
        return "; JAX's share of the device is XLA_PYTHON_CLIENT_MEM_FRACTION"
    return ""


def _mesh(config: TrainConfig):
    mesh = parallel.data_mesh(config.data_parallel)
    if mesh is not None and config.batch_size % mesh.size:
        raise ConfigError(
            "batch_size",
            f"{config.batch_size} does not split over {mesh.size} devices; use a multiple "
            f"of {mesh.size} or --data_parallel=false",
        )
    return mesh


# --- run directory -------------------------------------------------------------------


def _corpus_record(config: TrainConfig, ids: np.ndarray) -> dict[str, Any]:
    """What the run learns from: the token ids' count and SHA-256 (``corpus.json``), so
    that a resume notices a data file whose text changed under the same path."""
    digest = hashlib.sha256(np.ascontiguousarray(ids, np.int32).tobytes()).hexdigest()
    return {"data": config.data, "tokens": len(ids), "sha256": digest}


def _describe_corpus(record: Any) -> str:
    if not isinstance(record, dict):
        return "not a corpus record"
    return f"{record.get('tokens')} tokens, sha256 {str(record.get('sha256'))[:12]}..."


def _check_workdir(
    workdir: Path, config: TrainConfig, vocab: text.Vocab, corpus: dict[str, Any]
) -> None:
    """Checks, writing nothing, that ``workdir`` is new or holds this run: the same
    model, data and optimizer-state flags, vocabulary and corpus, and a checkpoint
    folder that is a folder.

    Raises:
      ConfigError: naming ``workdir`` (or ``data``) and what differs.
    """
    from rnn_jax import runs  # (imports orbax: only when training)

    folder, config_path, vocab_path, corpus_path = (
        workdir / name for name in ("checkpoints", "config.json", "vocab.json", "corpus.json")
    )
    if folder.exists() and not folder.is_dir():
        raise ConfigError("workdir", f"{folder} exists and is not a folder")
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError("workdir", f"cannot write to {folder}: checkpoints could not be saved")
    if not (folder.is_dir() and any(folder.iterdir())):
        return  # nothing trained yet (new, or an attempt that stopped before its first
        # checkpoint): the run starts afresh under these flags and rewrites its files
    try:  # what the run directory already holds (None: not written yet)
        saved = runs.read_settings(config_path) if config_path.exists() else None
        saved_vocab = runs.read_vocab(vocab_path) if vocab_path.exists() else None
        saved_corpus = runs.read_json(corpus_path) if corpus_path.exists() else None
    except ValueError as e:
        raise ConfigError("workdir", str(e)) from None
    if saved is not None:
        conflicts = resume_conflicts(saved, dataclasses.asdict(config))  # checkpointed
        if conflicts:
            raise ConfigError(
                "workdir",
                f"{workdir} holds a run with different model/data flags "
                f"({'; '.join(conflicts)}); use another --workdir or the original flags and "
                f"data",
            )
    if saved_vocab is not None and saved_vocab.to_json() != vocab.to_json():
        raise ConfigError(
            "data",
            f"the text's vocabulary ({len(vocab)} tokens) differs from the one of the run "
            f"in {workdir} ({len(saved_vocab)} tokens, {vocab_path}): the data changed; "
            f"use another --workdir",
        )
    if saved_corpus is not None and (
        not isinstance(saved_corpus, dict) or saved_corpus.get("sha256") != corpus["sha256"]
    ):
        raise ConfigError(
            "data",
            f"the text ({corpus['tokens']} tokens) is not the one the run in {workdir} "
            f"learned from ({corpus_path}: {_describe_corpus(saved_corpus)}): the data "
            f"changed; use another --workdir",
        )


def _text_as_trained(workdir: Path, config: TrainConfig, refusal: ConfigError):
    """``(ids, vocab, corpus)`` of ``--data`` read with its leading byte-order mark
    as a character, where that is how the run in ``workdir`` read it; else raises
    ``refusal``, the data's mismatch."""
    if refusal.flag != "data" or not text.starts_with_bom(config.data or None):
        raise refusal
    ids, vocab = text.load_corpus(config.data, config.tokens, config.min_freq, keep_bom=True)
    corpus = _corpus_record(config, ids)
    try:
        _check_workdir(workdir, config, vocab, corpus)
    except ConfigError:
        raise refusal from None
    return ids, vocab, corpus


def _saved_step(workdir: Path) -> int:
    """The step a run stopped before training stays at: its newest saved one, or 0."""
    return _newest_saved_step(workdir / "checkpoints") or 0


def _newest_saved_step(folder: Path) -> int | None:
    """The newest step in a checkpoint folder that finished saving (it has its
    integrity manifest), from the file names alone; None if there is none."""
    from rnn_jax.checkpoint import MANIFEST_SUFFIX

    names = (p.name[: -len(MANIFEST_SUFFIX)] for p in folder.glob(f"*{MANIFEST_SUFFIX}"))
    return max((int(n) for n in names if n.isdigit() and (folder / n).is_dir()), default=None)


def _epochs_error(config: TrainConfig, workdir: Path, trained: int, steps_per_epoch: int):
    return ConfigError(
        "epochs",
        f"{config.epochs} epochs are {steps_per_epoch * config.epochs} steps, but the run in "
        f"{workdir} has trained {trained} steps ({trained / steps_per_epoch:g} epochs); "
        f"expected --epochs >= {math.ceil(trained / steps_per_epoch)}",
    )


def _check_progress(workdir: Path, config: TrainConfig, ids: np.ndarray) -> None:
    """From the checkpoint names of the run in ``workdir``, before anything is
    restored or compiled (a newest step that turns out unusable on restore is
    checked again there): refuses ``--epochs`` fewer than it has trained, and, when
    it has trained all its steps, a change to a setting of
    :data:`rnn_jax.config.OUTCOME_KEYS` (nothing would train with it, and its
    ``config.json`` must keep the settings the parameters were trained with)."""
    from rnn_jax import runs

    trained = _newest_saved_step(workdir / "checkpoints")
    if trained is None:
        return
    windows = data.make_windows(ids, config.num_steps, config.num_train, config.num_val)
    steps_per_epoch = data.steps_per_epoch(windows, config.batch_size, config.partition)
    total = steps_per_epoch * config.epochs
    if trained > total:
        raise _epochs_error(config, workdir, trained, steps_per_epoch)
    if trained < total or not (workdir / "config.json").is_file():
        return
    try:
        saved = runs.read_settings(workdir / "config.json")
    except ValueError as e:
        raise ConfigError("workdir", str(e)) from None
    changes = changed_settings(saved, dataclasses.asdict(config))
    if changes:
        flag = next(iter(changes))
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
        raise ConfigError(
            flag,
            f"the run in {workdir} has a checkpoint at its last step ({total}), trained with "
            f"other settings ({listed}), so nothing would train with these; use another "
            f"--workdir, raise --epochs to train it further with them, or "
            f"experiments.generate for samples",
        )


def _write_workdir(
    workdir: Path,
    config: TrainConfig,
    vocab: text.Vocab,
    corpus: dict[str, Any],
    fresh: bool = False,
    step: int = 0,
    settings: bool = True,
) -> None:
    """Writes the run's ``config.json`` (the settings now in force), and ``vocab.json``
    and ``corpus.json`` where missing (checked by :func:`_check_workdir`) or where the
    run starts afresh (``fresh``: no checkpoint, so nothing of an earlier attempt stays).

    A resume at ``step`` that changes settings of :data:`rnn_jax.config.OUTCOME_KEYS`
    (a learning rate, say) adds ``{"step": step, flag: [before, after], ...}`` to the
    ``"changes"`` list that config.json carries over from the saved one, so the file
    still says what each stretch of the run was trained with. Without ``settings``
    only the vocabulary and corpus files are written."""
    from rnn_jax import runs

    workdir.mkdir(parents=True, exist_ok=True)
    current: dict[str, Any] = dataclasses.asdict(config)
    path = workdir / "config.json"
    if settings and not fresh and path.is_file():
        try:
            saved = runs.read_settings(path)
        except ValueError:
            saved = {}
        history = saved.get("changes")
        history = list(history) if isinstance(history, list) else []
        changes = changed_settings(saved, current, epochs=True)
        if changes:
            history.append({"step": step, **changes})
        if history:
            current["changes"] = history
    if settings:
        _write_json_atomic(path, current)
    if fresh or not (workdir / "vocab.json").exists():
        files.write_atomic(workdir / "vocab.json", vocab.to_json())
    if fresh or not (workdir / "corpus.json").exists():
        _write_json_atomic(workdir / "corpus.json", corpus)


def _set_aside_unusable(ckpt, start: int, workdir: Path, echo: Callable[[str], None]) -> None:
    """After a resume from ``start``, moves the newer steps (every one of them failed
    its integrity check) to ``workdir/checkpoints.unusable/``: kept for inspection,
    and out of orbax's count, which would otherwise delete the good step first.

    In a multi-process run process 0 moves them, between two barriers: every process
    lists the steps before any is moved, and reloads the listing once they are.

    Raises:
      ConfigError: naming ``--workdir`` on every process, when a step cannot be
        moved (it would be deleted before the good one).
    """
    import shutil

    from rnn_jax.checkpoint import MANIFEST_SUFFIX

    newer = [s for s in ckpt.all_steps() if s > start]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("rnn_jax: checkpoint steps listed")
    aside = workdir / "checkpoints.unusable"
    problem = None
    if newer and jax.process_index() == 0:
        try:
            aside.mkdir(exist_ok=True)
            for step in newer:
                for name in (str(step), f"{step}{MANIFEST_SUFFIX}"):
                    source = Path(ckpt.directory) / name
                    if source.exists():
                        shutil.move(str(source), str(_free_path(aside, name)))
        except OSError as e:
            problem = f"{type(e).__name__}: {e}"
    # (the gather is the second barrier: every process hears of a failure)
    if not all(_gathered(int(problem is None))) and problem is None:
        problem = "process 0 could not move them (its error says why)"
    if problem is not None:
        steps = ", ".join(map(str, newer))
        raise ConfigError(
            "workdir",
            f"resuming from step {start}: the unusable newer step(s) {steps} could not be "
            f"moved to {aside} ({problem}); orbax would delete the good step before them. "
            f"Nothing was trained; move them away by hand, or make {aside} a folder",
        )
    if newer:
        ckpt.reload()
        echo(f"moved unusable step(s) {', '.join(map(str, newer))} to {aside}")


def _warn_rescheduled(
    workdir: Path, config: TrainConfig, start: int, steps_per_epoch: int, echo
) -> None:
    """A resume with other ``--epochs`` rebuilds a cosine or linear schedule over the
    new step count: says so, with the learning rate at ``start`` before and after."""
    from rnn_jax import runs

    try:
        saved = runs.read_settings(workdir / "config.json")
    except (OSError, ValueError):
        return
    before = saved.get("epochs")
    if config.schedule == "constant" or not isinstance(before, int) or before == config.epochs:
        return
    try:  # the schedule the run had: its own lr, warm-up and schedule, not the new ones
        was = dataclasses.replace(
            config,
            epochs=before,
            **{k: saved[k] for k in ("lr", "warmup_steps", "schedule") if k in saved},
        )
        old = learning_rate(was, steps_per_epoch * before)
        old_lr = float(old(start)) if callable(old) else float(old)
    except (TypeError, ValueError):
        return
    new = learning_rate(config, steps_per_epoch * config.epochs)
    echo(
        f"warning: --epochs {before} -> {config.epochs} rebuilds the {config.schedule} "
        f"schedule over {steps_per_epoch * config.epochs} steps: at step {start} the "
        f"learning rate is {float(new(start)):.3g} (it was {old_lr:.3g}), so this "
        f"run differs from an uninterrupted one of {config.epochs} epochs (a constant "
        f"--schedule extends a run exactly)"
    )


def _keep_previous_result(workdir: Path) -> str:
    """Before result.json becomes result.previous.json: an earlier
    result.previous.json (a run trained further more than once, or resumed from an
    older checkpoint after its newest proved corrupt) moves to
    ``result.previous.step<N>.json`` (N: the step it reports), never overwritten.
    Returns a note of that move for the log ('' if there was none)."""
    previous = workdir / "result.previous.json"
    if not previous.exists():
        return ""
    try:
        step = json.loads(previous.read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        step = None
    stem = f"result.previous.step{step}" if isinstance(step, int) else "result.previous.old"
    target = _free_path(workdir, stem, ".json")
    os.replace(previous, target)
    return f" (and the one before to {target})"


def _free_path(folder: Path, stem: str, suffix: str = "") -> Path:
    """``folder/<stem><suffix>``, or the first of ``<stem>.2<suffix>``, ``<stem>.3<suffix>``,
    ... that does not exist: a place to move a file to without overwriting one."""
    target, n = folder / f"{stem}{suffix}", 1
    while target.exists():
        n += 1
        target = folder / f"{stem}.{n}{suffix}"
    return target


def _write_json_atomic(path: Path, obj: Any) -> None:
    files.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _load_history(path: Path, upto: int, rewrite: bool = True) -> list[dict]:
    """Metrics already logged up to step ``upto``; later lines (after the checkpoint
    a resumed run restarts from) are dropped so the file never holds a step twice
    (``rewrite``: the file too, else only the returned list)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if record.get("step", 0) <= upto:
            records.append(record)
    if rewrite:
        files.write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def _plot(history: list[dict], path: Path, echo: Callable[[str], None]) -> None:
    if not history:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        echo("matplotlib is not installed (pip install 'rnn_jax[plot]'): no curves.png")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in history]
    marker = "." if len(history) < 30 else None  # (a line of one point draws nothing)
    ax.plot(epochs, [r["train_ppl"] for r in history], label="train", marker=marker)
    ax.plot(epochs, [r["val_ppl"] for r in history], label="validation", marker=marker)
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _count(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
