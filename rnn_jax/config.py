"""The configuration of a training run, and its validation.

``TrainConfig`` is a plain frozen dataclass: ``experiments/train.py`` fills it from
absl flags (one flag per field, same name), tests and sweeps build it directly.
:func:`validate` checks every field and reads the data before anything is compiled
or written, raising :class:`ConfigError` that names the offending field (flag).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from rnn_jax import cells, data, fused, generate, models, native, networks, persistent, text

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "linear")

# Fields that define the model's function or the data it learns from: a resumed run
# must agree with the run directory on all of them.
RESUME_KEYS = (
    "data",
    "tokens",
    "min_freq",
    "num_steps",
    "num_train",
    "num_val",
    "partition",
    "cell",
    "hidden_size",
    "num_layers",
    "bidirectional",
    "reset_after",
    "pin_reset",
    "pin_update",
    "activation",
    "init",
    "forget_bias",
    "embed_dim",
    "optimizer",
    "batch_size",
    "seed",
)


# Flags that one cell, optimizer or schedule reads: ``{flag: (owner field, owner
# values, default, what has it)}``. Set for another they do nothing; a launcher warns
# (:func:`inapplicable`) rather than refuses, since a sweep over cells or optimizers
# from one flagfile (``lstm.flags`` sets ``--forget_bias=0``) sets them for all.
OWNED_FLAGS = {
    "activation": ("cell", ("rnn",), "tanh", "only the plain RNN has an activation choice"),
    "reset_after": ("cell", ("gru",), False, "only the GRU has a reset gate"),
    "forget_bias": ("cell", ("lstm",), 1.0, "only the LSTM has a forget gate"),
    "momentum": ("optimizer", ("sgd",), 0.0, "only --optimizer=sgd uses momentum"),
    "weight_decay": ("optimizer", ("adamw",), 1e-4, "only --optimizer=adamw decays weights"),
    "warmup_steps": ("schedule", ("cosine", "linear"), 0, "a constant --schedule has no warm-up"),
}


def _owned_elsewhere(name: str, settings: dict[str, Any]) -> bool:
    """Whether flag ``name`` belongs to a cell, optimizer or schedule other than
    ``settings``'."""
    owner, values, _, _ = OWNED_FLAGS[name]
    return owner in settings and settings[owner] not in values


def _unread_by_both(name: str, saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether neither run reads flag ``name`` (its owner, compared on its own, is of
    another kind in both), so a change of it changes nothing."""
    return name in OWNED_FLAGS and _owned_elsewhere(name, saved) and _owned_elsewhere(name, current)


# A sweep directory's definition file (rnn_jax.sweeps): a training run refuses to
# write there, and a sweep refuses a run directory (RUN_FILES).
SWEEP_FILE = "trials.json"
RUN_FILES = ("config.json", "checkpoints")

AUTOTUNE_MULTIHOST = (
    "each process would time on its own and could pick another program; tune on one "
    "host, then pass --implementation and --unroll"
)


class ConfigError(ValueError):
    """A bad configuration value; ``flag`` names the field / command-line flag."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"--{flag}: {message}")
        self.flag = flag


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a language-model run (defaults: a quick LSTM on the book).

    Data: ``data`` ('' = the bundled Time Machine), ``tokens`` (char, raw_char,
    word), ``min_freq``, ``num_steps`` (T), ``num_train`` / ``num_val`` (windows),
    ``partition`` (windows, sequential).
    Model: see :class:`rnn_jax.models.ModelConfig`.
    Optimisation: ``optimizer``, ``lr``, ``schedule`` (constant, cosine, linear),
    ``warmup_steps``, ``momentum`` (sgd), ``weight_decay`` (adamw), ``grad_clip``
    (global norm; 0 = off), ``batch_size``, ``epochs``, ``seed``.
    Bookkeeping: ``workdir``, ``eval_every`` / ``checkpoint_every`` (steps; 0 = once
    per epoch / only at the end), ``keep_checkpoints``, ``log_every_s``,
    ``sample_prefix``, ``sample_chars``.
    """

    data: str = ""
    tokens: str = "char"
    min_freq: int = 0
    num_steps: int = 32
    num_train: int = 10_000
    num_val: int = 5_000
    partition: str = "windows"
    cell: str = "lstm"
    hidden_size: int = 32
    num_layers: int = 1
    bidirectional: bool = False
    reset_after: bool = False
    pin_reset: float | None = None
    pin_update: float | None = None
    activation: str = "tanh"
    init: str = "default"
    forget_bias: float = 1.0
    embed_dim: int = 0
    dropout: float = 0.0
    unroll: int = 0  # 0: the backend's default (networks.default_unroll)
    remat: bool = False
    implementation: str = "auto"
    matmul_dtype: str = "float32"
    directions: str = "auto"  # bidirectional fused layers: networks.DIRECTIONS
    autotune: bool = False  # time the candidates first (rnn_jax.autotune)
    optimizer: str = "adam"
    lr: float = 0.01
    schedule: str = "cosine"
    warmup_steps: int = 0
    momentum: float = 0.0
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    batch_size: int = 256
    epochs: int = 20
    seed: int = 0
    data_parallel: bool = True
    workdir: str = "runs/default"
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    log_every_s: float = 10.0
    sample_prefix: str = "time traveller "
    sample_chars: int = 100


def model_config(config: TrainConfig, vocab_size: int) -> models.ModelConfig:
    return models.ModelConfig(
        vocab_size=vocab_size,
        cell=config.cell,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        bidirectional=config.bidirectional,
        reset_after=config.reset_after,
        pin_reset=config.pin_reset,
        pin_update=config.pin_update,
        activation=config.activation,
        init=config.init,
        forget_bias=config.forget_bias,
        embed_dim=config.embed_dim,
        dropout=config.dropout,
        unroll=config.unroll or None,
        remat=config.remat,
        implementation=config.implementation,
        matmul_dtype=config.matmul_dtype,
        directions=config.directions,
    )


# Settings whose values may change on resume but which decide the optimizer state's
# structure (so the checkpoint's): clipping on or off, momentum on or off (sgd), a
# constant learning rate or a schedule (whose step count is state).
_STATE_SHAPERS = {
    "grad_clip": lambda c: c.get("grad_clip", 0) > 0,
    "momentum": lambda c: c.get("optimizer") == "sgd" and c.get("momentum", 0) > 0,
    "schedule": lambda c: c.get("schedule") == "constant",
}


# Fields a resume may change but which change what the run trains or reports: a
# resumed run records each change in its config.json ("changes"); a finished run has
# nothing left to train with them, so a rerun that changes one is refused.
OUTCOME_KEYS = (
    "dropout",
    "matmul_dtype",
    "lr",
    "schedule",
    "warmup_steps",
    "momentum",
    "weight_decay",
    "grad_clip",
    "sample_prefix",
    "sample_chars",
)


def changed_settings(
    saved: dict[str, Any], current: dict[str, Any], epochs: bool = False
) -> dict[str, list[Any]]:
    """``{flag: [saved, current]}`` for each of :data:`OUTCOME_KEYS` (and ``epochs``,
    with ``epochs``) that differs (fields an older config.json lacks are not compared)."""
    keys = (*OUTCOME_KEYS, "epochs") if epochs else OUTCOME_KEYS
    return {
        k: [saved[k], current[k]]
        for k in keys
        if k in saved and saved[k] != current[k] and not _unread_by_both(k, saved, current)
    }


def resume_conflicts(
    saved: dict[str, Any], current: dict[str, Any], checkpointed: bool = True
) -> list[str]:
    """``"flag: saved -> current"`` for each resume-defining field that differs, and,
    when the run has a checkpoint (``checkpointed``), for each change that gives the
    optimizer state another structure (the checkpoint could not be restored)."""
    conflicts = [
        f"{k}: {saved.get(k)!r} -> {current[k]!r}"
        for k in RESUME_KEYS
        if k in saved
        and _differ(k, saved[k], current[k])
        and not _unread_by_both(k, saved, current)
    ]
    for k, shapes in _STATE_SHAPERS.items() if checkpointed else ():
        if k in saved and shapes(saved) != shapes(current):
            conflicts.append(
                f"{k}: {saved[k]!r} -> {current[k]!r} (another optimizer state structure)"
            )
    return conflicts


def _differ(key: str, saved: Any, current: Any) -> bool:
    """Whether a resume-defining setting changed; ``data`` paths are compared as the
    files they name (``../x.txt`` and ``/abs/x.txt`` are one file; the corpus hash
    catches a changed text)."""
    if key == "data" and saved and current and isinstance(saved, str):
        return os.path.realpath(saved) != os.path.realpath(current)
    return saved != current


def _positive(config: TrainConfig, *names: str, minimum: float = 1) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not value >= minimum:  # NaN too
            raise ConfigError(name, f"expected >= {minimum}, got {value!r}")


_FLOATS = ("lr", "momentum", "weight_decay", "grad_clip", "forget_bias", "dropout")


def _finite(config: TrainConfig) -> None:
    """No NaN or infinite float settings (an infinite ``lr`` would train a step of
    NaNs, a NaN ``grad_clip`` would switch clipping off and break ``config.json``);
    ``log_every_s`` may be ``inf`` (no progress lines between evaluations), not NaN
    (:func:`_positive`)."""
    for name in (*_FLOATS, "pin_reset", "pin_update"):
        value = getattr(config, name)
        if value is not None and not np.isfinite(value):
            raise ConfigError(name, f"expected a finite number, got {value!r}")


def _kind(default: Any) -> tuple[str, Any]:
    """What a field with this default holds: ``(words, check)``."""
    if isinstance(default, bool):
        return "true or false", lambda v: isinstance(v, bool)
    if isinstance(default, int):
        return "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)
    if isinstance(default, str):
        return "a string", lambda v: isinstance(v, str)
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if default is None:  # pin_reset, pin_update
        return "a number or None", lambda v: v is None or number(v)
    return "a number", number


def _types(config: TrainConfig) -> None:
    """Each field holds its kind of Python value (a config built in Python is not
    parsed by absl: ``epochs=1.5`` or ``hidden_size="32"`` failed later, some after
    the run directory was written). NumPy integers and float32 scalars are refused
    too (``np.float64`` is a Python float): config.json is plain JSON."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        words, check = _kind(field.default)
        if not check(value):
            raise ConfigError(field.name, f"expected {words}, got {value!r}")


def inapplicable(config: TrainConfig) -> list[str]:
    """A warning for each flag set away from its default that this run's cell or
    optimizer does not read (:data:`OWNED_FLAGS`)."""
    settings = dataclasses.asdict(config)
    out = []
    for name, (owner, _, default, why) in OWNED_FLAGS.items():
        if settings[name] != default and _owned_elsewhere(name, settings):
            out.append(
                f"--{name}={settings[name]!r} does nothing: {why}, and --{owner} is "
                f"{settings[owner]!r}"
            )
    return out


def _choice(config: TrainConfig, name: str, allowed) -> None:
    value = getattr(config, name)
    if value not in allowed:
        raise ConfigError(name, f"expected one of {', '.join(allowed)}; got {value!r}")


def validate(config: TrainConfig) -> tuple[np.ndarray, text.Vocab]:
    """Checks ``config`` and loads its corpus; returns ``(ids <int32>[N], vocab)``.

    Raises:
      ConfigError: naming the first offending field. Nothing is written.
    """
    _types(config)
    _finite(config)
    _choice(config, "cell", tuple(cells.CELLS))
    _choice(config, "activation", tuple(cells.ACTIVATIONS))
    _choice(config, "init", cells.INIT_SCHEMES)
    _choice(config, "implementation", networks.IMPLEMENTATIONS)
    _choice(config, "matmul_dtype", fused.MATMUL_DTYPES)
    if config.matmul_dtype != "float32" and config.implementation == "scan":
        raise ConfigError(
            "matmul_dtype",
            f"{config.matmul_dtype} needs --implementation=fused, wavefront, pallas, native "
            f"(which then runs the fused XLA loops) or auto; the reference scan computes in "
            f"float32",
        )
    problem = networks.directions_problem(
        config.directions, config.bidirectional, config.implementation
    )
    if problem:
        raise ConfigError("directions", problem)
    _choice(config, "tokens", text.MODES)
    _choice(config, "partition", data.PARTITIONS)
    _choice(config, "optimizer", OPTIMIZERS)
    _choice(config, "schedule", SCHEDULES)
    _positive(config, "hidden_size", "num_layers", "num_steps", "num_train", "num_val")
    for name, cap in (("hidden_size", 2**16), ("num_layers", 1024)):
        # far past any network that fits a machine; larger values overflowed int32
        # shapes with a traceback instead of this message
        if getattr(config, name) > cap:
            raise ConfigError(name, f"expected <= {cap}, got {getattr(config, name)!r}")
    _positive(config, "batch_size", "epochs", "keep_checkpoints", "sample_chars")
    cap = generate.MAX_TOKENS_BIDIRECTIONAL if config.bidirectional else generate.MAX_TOKENS
    for name, limit, why in (
        ("sample_chars", cap, "the sample is one compiled scan"),
        ("warmup_steps", 2**31 - 2, "step counts are int32"),
        ("seed", 2**32 - 1, "a JAX key holds 32 bits: larger seeds repeat smaller ones"),
    ):  # (larger values failed with a traceback, some after the whole run had trained)
        if getattr(config, name) > limit:
            raise ConfigError(name, f"expected <= {limit:,} ({why}), got {getattr(config, name)}")
    _positive(
        config, "unroll", "min_freq", "embed_dim", "eval_every", "checkpoint_every", minimum=0
    )
    _positive(config, "warmup_steps", "seed", "grad_clip", "weight_decay", minimum=0)
    _positive(config, "momentum", "log_every_s", minimum=0)
    for name in ("pin_reset", "pin_update"):
        value = getattr(config, name)
        if value is not None and config.cell != "gru":
            raise ConfigError(name, f"only the GRU has this gate; --cell is {config.cell!r}")
        if value is not None and not 0 <= value <= 1:
            raise ConfigError(name, f"expected a gate value in [0, 1], got {value!r}")
    if config.partition == "sequential" and config.bidirectional:
        raise ConfigError(
            "partition",
            "'sequential' carries each row's final state into its next window, which a "
            "backward direction cannot use (it would start from the end of the previous "
            "window); use --partition=windows with --bidirectional",
        )
    if not config.lr > 0:
        raise ConfigError("lr", f"expected a learning rate > 0, got {config.lr!r}")
    if not 0 <= config.dropout < 1:
        raise ConfigError("dropout", f"expected a rate in [0, 1), got {config.dropout!r}")
    if config.implementation == "wavefront":
        for name in ("bidirectional", "dropout", "remat"):
            if getattr(config, name):
                raise ConfigError(
                    name,
                    f"--implementation=wavefront runs unidirectional networks without "
                    f"dropout or remat; got {getattr(config, name)!r}",
                )
    if config.autotune:
        import jax

        if jax.process_count() > 1:
            raise ConfigError("autotune", f"not in a multi-process run: {AUTOTUNE_MULTIHOST}")
    if config.implementation == "pallas":
        reason = persistent.unsupported(model_config(config, 2).make_cell())
        if reason:
            raise ConfigError("implementation", f"'pallas': {reason}")
    if config.implementation == "native":
        cell = model_config(config, 2).make_cell()
        reason = native.unsupported(cell) or native.unavailable()
        if reason:
            raise ConfigError("implementation", f"'native': {reason}")
    if not config.workdir:
        raise ConfigError("workdir", "expected a directory path, got ''")
    workdir = Path(config.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError("workdir", f"{workdir} exists and is not a directory")
    for parent in workdir.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError("workdir", f"{parent} is a file, so {workdir} cannot be created")
    if (workdir / SWEEP_FILE).exists():
        raise ConfigError(
            "workdir",
            f"{workdir} holds a sweep ({workdir / SWEEP_FILE}), not a training run: its "
            f"runs are its trial_* folders; pass one of them or another directory",
        )
    try:
        ids, vocab = text.load_corpus(config.data or None, config.tokens, config.min_freq)
    except ValueError as e:
        raise ConfigError("data", str(e)) from None
    if len(vocab) < 2:
        flag = "min_freq" if config.min_freq > 0 else "data"
        raise ConfigError(
            flag,
            f"the vocabulary holds only {vocab.to_tokens(list(range(len(vocab))))}: no token "
            f"of the text occurs at least min_freq={config.min_freq} times",
        )
    if not text.tokenize(config.sample_prefix, config.tokens):
        raise ConfigError(
            "sample_prefix",
            f"expected at least one {config.tokens!r} token after preprocessing (the end of "
            f"run sample continues it), got {config.sample_prefix!r}",
        )
    needed = config.num_steps + 1
    if len(ids) < needed:
        raise ConfigError(
            "num_steps",
            f"the text has {len(ids)} tokens, shorter than one window of num_steps + 1 = {needed}",
        )
    available = len(ids) - config.num_steps
    if config.num_train + config.num_val > available:
        raise ConfigError(
            "num_train",
            f"num_train + num_val = {config.num_train + config.num_val} windows requested, "
            f"but the text has only {available} windows of {needed} tokens",
        )
    windows = data.make_windows(ids, config.num_steps, config.num_train, config.num_val)
    try:
        steps_per_epoch = data.steps_per_epoch(windows, config.batch_size, config.partition)
    except ValueError as e:
        raise ConfigError("batch_size", str(e)) from None
    total = steps_per_epoch * config.epochs
    if total > 2**31 - 1:  # (the step counters are int32: it overflowed in a traceback)
        raise ConfigError(
            "epochs",
            f"{config.epochs:,} epochs of {steps_per_epoch:,} steps are {total:,} steps; "
            f"expected at most {2**31 - 1:,}",
        )
    if config.partition == "windows" and config.batch_size > config.num_train:
        # a batch is rows of distinct training windows: more rows than windows would
        # only pad (and a huge value ran out of memory after the run directory existed)
        raise ConfigError(
            "batch_size",
            f"expected at most num_train = {config.num_train} (the training windows a "
            f"batch draws its rows from), got {config.batch_size}",
        )
    return ids, vocab
