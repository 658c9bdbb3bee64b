"""Reading a run directory written by :func:`rnn_jax.train.run`.

Layout: ``config.json`` (resolved flags; ``"changes"``: the step and values of each
setting a resume changed), ``vocab.json``, ``corpus.json`` (the token count and the
SHA-256 of the int32 token ids), ``metrics.jsonl``, ``checkpoints/`` (see
:mod:`rnn_jax.checkpoint`), ``curves.png``, ``result.json`` (and earlier results:
``result.previous.json``, ``result.previous.step<N>.json``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import jax

from rnn_jax import checkpoint, models, parallel, text
from rnn_jax.config import TrainConfig, model_config


class Run(NamedTuple):
    """A trained run: its config, vocabulary, model and the newest usable checkpoint's
    state (``skipped``: newer steps that failed their integrity check)."""

    config: TrainConfig
    vocab: text.Vocab
    model: models.Model
    step: int
    state: dict[str, Any]
    skipped: tuple[int, ...] = ()

    @property
    def params(self) -> dict[str, Any]:
        return self.state["params"]


def read_json(path: Path) -> Any:
    """A run directory's JSON file; ValueError naming it if it is not a file of JSON."""
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} exists and is not a file")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({e})") from None


def read_settings(path: Path) -> dict[str, Any]:
    """A run's ``config.json`` as a dict (ValueError naming the file otherwise)."""
    saved = read_json(path)
    if not isinstance(saved, dict):
        raise ValueError(f"{path} does not hold a run's settings")
    return saved


def read_vocab(path: Path) -> text.Vocab:
    """A run's ``vocab.json`` (ValueError naming the file if it is not one)."""
    try:
        return text.Vocab.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a vocabulary ({e})") from None


def load_config(workdir: Path) -> TrainConfig:
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{workdir} is not a run directory (no config.json)")
    saved = read_settings(path)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


def load(workdir: Path) -> Run:
    """The newest verified checkpoint of ``workdir``.

    Raises:
      ValueError: not a run directory, no usable checkpoint in it, or checkpoints of
        another model than its config.json and vocab.json describe.
    """
    from rnn_jax import train  # the optimiser defines the checkpoint's structure

    workdir = Path(workdir)
    config = load_config(workdir)
    vocab_path = workdir / "vocab.json"
    if not vocab_path.is_file():
        raise ValueError(f"{workdir} is not a complete run directory (no vocab.json)")
    vocab = read_vocab(vocab_path)
    if not (workdir / "checkpoints").is_dir():  # the checkpointer would create it
        raise ValueError(f"{workdir / 'checkpoints'} holds no usable checkpoint (no such folder)")
    model = models.language_model(model_config(config, len(vocab)))
    tx = train.make_optimizer(config, 1)  # the schedule's length does not shape the state
    abstract = jax.eval_shape(lambda: train.init_state(model, tx, config))
    abstract = parallel.abstract_state(abstract, None)  # onto this process's first device
    with checkpoint.Checkpointer(workdir / "checkpoints", read_only=True) as ckpt:
        try:
            restored = ckpt.restore_latest(abstract)
        except RuntimeError as e:  # intact steps of another shape than the settings'
            raise ValueError(
                f"{workdir / 'checkpoints'}: intact checkpoints that do not restore into the "
                f"model its config.json and vocab.json describe ({config.cell}, hidden_size "
                f"{config.hidden_size}, {config.num_layers} layer(s), vocabulary of "
                f"{len(vocab)}): were those files changed? ({e.__cause__ or e})"
            ) from e
        steps = ckpt.all_steps()
    if restored is None:
        raise ValueError(f"{workdir / 'checkpoints'} holds no usable checkpoint")
    step, state, _ = restored
    return Run(config, vocab, model, step, state, tuple(s for s in steps if s > step))
