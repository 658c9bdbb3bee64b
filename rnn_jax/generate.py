"""Text generation from a language model, as one compiled scan.

A unidirectional model reads the prefix once (one network call over ``[P]`` tokens),
then a ``lax.scan`` of ``num_tokens`` steps feeds each chosen token back with the
carried state. A bidirectional model has no such state (its backward direction
needs the future), so each step reruns the network on the text so far (a fixed
buffer with a length) and reads the logits at its last position: what the book
does, and why its samples are nonsense.

``temperature == 0`` picks the most likely token (greedy, as in the book);
``temperature > 0`` samples from ``softmax(logits / temperature)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax import models, networks, text

Array = jax.Array

_MAX_TEMPERATURE = float(np.finfo(np.float32).max)
MAX_TOKENS = 10_000_000  # one compiled scan holds them all
# A bidirectional model reruns the network over the whole text for every token: time
# grows with the square of the length (3,000 characters took 21 s on a 2-core CPU for
# the book's bidirectional GRU, 100 took 2.5 s).
MAX_TOKENS_BIDIRECTIONAL = 10_000


def _choose(logits: Array, temperature: Array, key: Array) -> Array:
    greedy = jnp.argmax(logits, axis=-1)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def _check_temperature(temperature) -> None:
    value = np.asarray(temperature)
    if value.shape != () or not (
        np.issubdtype(value.dtype, np.number) and 0 <= float(value) < math.inf
    ):
        raise ValueError(f"temperature: expected a finite number >= 0, got {temperature!r}")
    if float(value) > _MAX_TEMPERATURE:  # float32 would make it inf
        raise ValueError(
            f"temperature: expected at most {_MAX_TEMPERATURE:.4g} (float32's largest "
            f"number), got {float(value):g}"
        )


def generate_ids(
    model: models.Model,
    params,
    prefix: Array,
    num_tokens: int,
    temperature: float | Array = 0.0,
    key: Array | None = None,
) -> Array:
    """Continues ``prefix <int32>[P]`` (P >= 1) by ``num_tokens`` ids: ``<int32>[num_tokens]``.

    ``temperature`` 0 decodes greedily, > 0 samples from ``softmax(logits / T)``; a
    concrete number must be in ``[0, 3.4e38]`` (finite in float32, the type it is
    used in); a traced one <= 0 decodes greedily.

    A concrete ``prefix`` must hold ids of the vocabulary (``[0, V)``; ValueError
    otherwise); a traced one is not checked, and an id outside it reads as a zero
    input vector (the networks' rule for ids).

    Pure and traceable; compile it with ``model`` and ``num_tokens`` bound, e.g.
    ``jax.jit(functools.partial(generate_ids, model, num_tokens=100))``.
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)):
        raise ValueError(f"num_tokens: expected an int >= 1, got {num_tokens!r}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens: expected >= 1, got {num_tokens}")
    prefix = networks._as_array(prefix)  # a list, under jax.jit a list of tracers
    if prefix.ndim != 1 or prefix.shape[0] < 1 or not jnp.issubdtype(prefix.dtype, jnp.integer):
        raise ValueError(
            f"prefix: expected token ids <int32>[P] with P >= 1, got "
            f"{prefix.dtype}{list(prefix.shape)}"
        )
    if not isinstance(prefix, jax.core.Tracer):
        ids = np.asarray(prefix)
        vocab = model.config.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            bad = int(ids[(ids < 0) | (ids >= vocab)][0])
            raise ValueError(f"prefix: ids must be in [0, {vocab}) (the vocabulary), got {bad}")
    if not isinstance(temperature, jax.core.Tracer):  # a concrete value is checked here
        _check_temperature(temperature)
    key = jax.random.key(0) if key is None else key
    temperature = jnp.asarray(temperature, jnp.float32)
    keys = jax.random.split(key, num_tokens)
    if model.config.bidirectional:
        return _generate_by_rerun(model, params, prefix, keys, temperature)
    logits, carry = model.apply(params, prefix[None])
    first = _choose(logits[0, -1], temperature, keys[0])

    def body(state, k):
        token, carry = state
        logits, carry = model.apply(params, token[None, None], carry)
        nxt = _choose(logits[0, -1], temperature, k)
        return (nxt, carry), token

    # each step emits the token it feeds in, so the last chosen one is in the state
    (last, _), tokens = jax.lax.scan(body, (first, carry), keys[1:])
    return jnp.concatenate([tokens, last[None]])


def _generate_by_rerun(model, params, prefix, keys, temperature):
    p, n = prefix.shape[0], keys.shape[0]
    buffer = jnp.zeros((p + n,), jnp.int32).at[:p].set(prefix)

    def logits_at(buffer, length):
        logits, _ = model.apply(params, buffer[None], lengths=length[None])
        return logits[0, length - 1]

    def body(buffer, inp):
        i, k = inp
        length = p + i
        token = _choose(logits_at(buffer, length), temperature, k)
        return buffer.at[length].set(token), token

    _, tokens = jax.lax.scan(body, buffer, (jnp.arange(n), keys))
    return tokens


def generate_text(
    model: models.Model,
    params,
    vocab: text.Vocab,
    prefix: str,
    num_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """``prefix`` followed by ``num_tokens`` generated tokens, as text.

    The prefix goes through the vocabulary's preprocessing (lower-case letters and
    spaces for ``char``); the model reads tokens outside the vocabulary as ``<unk>``
    (the text returned keeps the prefix as it was preprocessed).

    Compiled once per model, ``num_tokens`` and prefix length: later calls (other
    prefixes of that length, temperatures, seeds) reuse the program.

    Raises:
      ValueError: ``vocab`` is not the model's (another size: the model would read
        its ids as other tokens), an empty prefix, a bad temperature.
    """
    size = model.config.vocab_size
    if len(vocab) != size:
        raise ValueError(
            f"vocab: {len(vocab)} tokens, but the model reads {size}; pass the vocabulary "
            f"the model was trained with (its run directory's vocab.json)"
        )
    _check_temperature(temperature)  # here: generate_ids below sees a traced one
    tokens = text.tokenize(prefix, vocab.mode) if prefix else []
    if not tokens:
        raise ValueError(f"prefix: expected at least one token after preprocessing, got {prefix!r}")
    ids = jnp.asarray(vocab.to_ids(tokens), jnp.int32)
    out = _generate_jit(
        model, params, ids, num_tokens, temperature=temperature, key=jax.random.key(seed)
    )
    return vocab.join(tokens + vocab.to_tokens(np.asarray(out)))


# one compiled program per (model, num_tokens, prefix shape); a Model is hashable
# (its network is static, its functions compare by identity)
_generate_jit = jax.jit(generate_ids, static_argnames=("model", "num_tokens"))
