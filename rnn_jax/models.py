"""Language models: token ids -> input features -> recurrent network -> logits.

::

    X_t = onehot(token_t)            (the book)   or   E[token_t]   (embedding)
    H_t = network(X_1..X_t)          any cell, depth and direction
    O_t = H_t W_hq + b_q             <float32>[V] logits of the next token

Params: ``{"embed": <float32>[V, E]`` (only with an embedding),
``"network": ...`` (``networks.network``'s params), ``"output": {"W_hq":
<float32>[H_out, V], "b_q": <float32>[V]}}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax import cells, networks

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What defines a language model's function and its parameter shapes.

    Attributes:
      vocab_size: V.
      cell: ``"rnn"``, ``"gru"`` or ``"lstm"``.
      hidden_size: H of every layer and direction.
      num_layers: depth.
      bidirectional: backward direction in every layer (a poor next-token model).
      reset_after: GRU form (``False``: the seed's equations).
      pin_reset, pin_update: GRU gate ablations (see :func:`rnn_jax.cells.gru`).
      activation: plain RNN nonlinearity.
      init: cell initialisation scheme, ``"default"`` or ``"uniform"`` (PyTorch's;
        then the output layer is PyTorch's ``nn.Linear`` default too).
      forget_bias: LSTM forget-gate bias at initialisation, added to ``b_f``'s draw
        under either scheme (0 for PyTorch's exact initialisation).
      embed_dim: 0 for one-hot input (the book), else a learned embedding of that size.
      dropout: between layers (and on the last layer's output), training only.
      unroll, remat, hoist_input, implementation, matmul_dtype, directions: passed
        to :func:`rnn_jax.networks.network`.
    """

    vocab_size: int
    cell: str = "lstm"
    hidden_size: int = 256
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
    unroll: int | None = None
    remat: bool = False
    hoist_input: bool | None = None
    implementation: str = "auto"
    matmul_dtype: str = "float32"
    directions: str = "auto"

    def make_cell(self) -> cells.Cell:
        options = {
            "gru": {
                "reset_after": self.reset_after,
                "pin_reset": self.pin_reset,
                "pin_update": self.pin_update,
            },
            "rnn": {"activation": self.activation},
            "lstm": {"forget_bias": self.forget_bias},
        }
        return cells.make(self.cell, self.hidden_size, self.init, **options.get(self.cell, {}))


class Model(NamedTuple):
    """A language model as pure functions.

    Attributes:
      config: its :class:`ModelConfig`.
      network: the recurrent :class:`rnn_jax.networks.Network`.
      init: ``(key) -> params``.
      initial_carry: ``(batch_size) -> carry`` zeros with a leading batch axis.
      apply: ``(params, ids <int32>[B, T], carry=None, *, lengths=None,
        dropout_key=None, time_major_logits=False) -> (logits <float32>[B, T, V],
        final carry)``; ``lengths <int32>[B]`` as in ``Network.apply_batch``; with
        ``time_major_logits`` the logits come as ``<float32>[T, B, V]``, which
        saves the fused layers two transposes of their outputs (what the training
        loss uses: the sum over tokens does not care about their order).
    """

    config: ModelConfig
    network: networks.Network
    init: Callable[[Array], dict[str, Any]]
    initial_carry: Callable[[int], Any]
    apply: Callable[..., tuple[Array, Any]]


jax.tree_util.register_static(Model)  # a static value to JAX, as cells.Cell


def language_model(config: ModelConfig) -> Model:
    """Builds the model of ``config``; raises ValueError on bad options."""
    for name, minimum in (("vocab_size", 1), ("embed_dim", 0)):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            extra = " (0 = one-hot)" if name == "embed_dim" else ""
            raise ValueError(f"{name}: expected an int >= {minimum}{extra}, got {value!r}")
    net = networks.network(
        config.make_cell(),
        config.num_layers,
        config.bidirectional,
        # between layers; the model applies its own after the last one (below)
        dropout=config.dropout if config.num_layers > 1 else 0.0,
        unroll=config.unroll,
        remat=config.remat,
        hoist_input=config.hoist_input,
        implementation=config.implementation,
        matmul_dtype=config.matmul_dtype,
        directions=config.directions,
    )
    v, e = config.vocab_size, config.embed_dim

    def init(key: Array) -> dict[str, Any]:
        k_embed, k_net, k_out = jax.random.split(key, 3)
        k_w, k_b = jax.random.split(k_out)
        if config.init == "uniform":  # nn.Linear: U(-k, k), k = 1/sqrt(fan_in)
            out_init = cells.uniform_init(net.output_size)
            w_hq, b_q = out_init(k_w, (net.output_size, v)), out_init(k_b, (v,))
        else:
            w_hq = jax.nn.initializers.lecun_normal()(k_w, (net.output_size, v))
            b_q = jnp.zeros((v,), jnp.float32)
        params = {"network": net.init(k_net, e or v), "output": {"W_hq": w_hq, "b_q": b_q}}
        if e:
            params["embed"] = jax.random.normal(k_embed, (v, e), jnp.float32)
        return params

    def initial_carry(batch_size: int) -> Any:
        return jax.tree.map(
            lambda c: jnp.broadcast_to(c, (batch_size, *c.shape)), net.initial_carry()
        )

    def apply(params, ids, carry=None, *, lengths=None, dropout_key=None, time_major_logits=False):
        if jnp.ndim(ids) != 2 or not jnp.issubdtype(jnp.asarray(ids).dtype, jnp.integer):
            raise ValueError(
                f"ids: expected <int>[B, T], got {jnp.asarray(ids).dtype}{jnp.shape(ids)}"
            )
        xs = cells.gather_rows(params["embed"], ids) if e else ids  # else ids as one-hot input
        k_net = k_out = None
        if dropout_key is not None:
            k_net, k_out = jax.random.split(dropout_key)
        ys, final = net.apply_batch(params["network"], xs, lengths, carry, dropout_key=k_net)
        if k_out is not None and config.dropout > 0:
            ys = networks.apply_dropout(k_out, config.dropout, ys)
        if time_major_logits:
            # The fused layers run time-major and transpose their outputs last; XLA
            # cancels that transpose and this one, so the output layer reads the
            # layers' own <[T, B, H]> and its gradient goes back without a copy.
            # Measured on the 2-core Xeon, training step, one core, A/B in one
            # process, median ms (batch-major vs time-major logits): d2l GRU 17.1
            # vs 16.3, d2l LSTM 21.5 vs 20.3, medium LSTM level (44.4 vs 44.0).
            ys = jnp.swapaxes(ys, 0, 1)
        logits = ys @ params["output"]["W_hq"] + params["output"]["b_q"]
        return logits, final

    return Model(config, net, init, initial_carry, apply)


def token_losses(logits: Array, targets: Array) -> Array:
    """Cross-entropy ``-log softmax(logits)[target]``: ``<float32>[B, T]``.

    A target outside ``[0, V)`` gives NaN there (``take_along_axis`` fills, it does not
    clamp to a real class), so a bad id shows as a non-finite loss, which training
    stops at, naming the step, instead of a plausible number."""
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
