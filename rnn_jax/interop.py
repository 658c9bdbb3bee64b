"""Weight conversion between rnn_jax networks and PyTorch's nn.RNN / nn.GRU / nn.LSTM.

PyTorch keeps, per layer ``k`` and direction (suffix ``""`` or ``"_reverse"``)::

    weight_ih_l{k}{sfx}  <[G*H, I_k]>    weight_hh_l{k}{sfx}  <[G*H, H]>
    bias_ih_l{k}{sfx}    <[G*H]>          bias_hh_l{k}{sfx}    <[G*H]>

applied as ``x W_ihᵀ + b_ih + h W_hhᵀ + b_hh``, gate blocks in the order
``[i, f, g, o]`` (LSTM), ``[r, z, n]`` (GRU), one block (RNN). rnn_jax applies
``x @ W_x + b`` with ``W_x <[I, G, H]>`` and gate orders ``(i, f, o, c)`` and
``(r, z, h)``, so ``W_x[:, k] = W_ih[block k]ᵀ``.

Biases: rnn_jax has one bias per gate, so the two PyTorch biases are summed, except
for the GRU's candidate, whose recurrent bias sits inside ``R * (h W_hn + b_hn)``
and is kept as ``b_hn``; only ``cells.gru(H, reset_after=True)`` has it, and only
that GRU computes PyTorch's function. ``to_torch`` writes the summed bias into
``bias_ih`` and zeros into ``bias_hh`` (``b_hn`` for the GRU candidate), so
``from_torch(to_torch(p))`` returns ``p`` exactly, and ``to_torch(from_torch(sd))``
computes the same function as ``sd``.

PyTorch's ``nonlinearity`` of nn.RNN is not in the state dict: build the cell with
the same ``activation``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rnn_jax import cells
from rnn_jax.networks import Network

# Position in PyTorch's block order of each of rnn_jax's gates.
_TORCH_BLOCK = {"lstm": [0, 1, 3, 2], "gru": [0, 1, 2], "rnn": [0]}


def _to_numpy(value: Any) -> np.ndarray:
    """A float32 copy: the result never shares memory with the caller's tensor."""
    if hasattr(value, "detach"):  # a torch.Tensor, without importing torch
        # .float() first: numpy has no bfloat16, so .numpy() would refuse one.
        value = value.detach().cpu().float().numpy()
    return np.array(value, dtype=np.float32)


def _suffixes(net: Network) -> list[tuple[str, str | None]]:
    if net.bidirectional:
        return [("", "forward"), ("_reverse", "backward")]
    return [("", None)]


def _check_convertible(net: Network) -> None:
    if not isinstance(net, Network):
        raise ValueError(f"net: expected a networks.Network, got {net!r}")
    if net.cell.name == "gru" and not net.cell.options["reset_after"]:
        raise ValueError(
            "net: PyTorch's nn.GRU computes the reset_after=True GRU; build the network "
            "with cells.gru(hidden_size, reset_after=True) to load or export its weights"
        )
    for pin in ("pin_reset", "pin_update"):
        if net.cell.options.get(pin) is not None:
            raise ValueError(
                f"net: the cell's {pin}={net.cell.options[pin]} fixes a gate that "
                f"PyTorch's nn.GRU computes; its weights would give another function"
            )
    if not cells.is_builtin(net.cell):
        raise ValueError(
            f"net: the {net.cell.name!r} cell was changed with _replace, so PyTorch's "
            f"module computes another function; convert with the cell rnn_jax.cells built"
        )


def _expected_shapes(net: Network, input_size: int, layer: int) -> dict[str, tuple]:
    gh = max(len(net.cell.gates), 1) * net.cell.hidden_size
    size = input_size if layer == 0 else net.output_size
    hidden = net.cell.hidden_size
    return {
        "weight_ih": (gh, size),
        "weight_hh": (gh, hidden),
        "bias_ih": (gh,),
        "bias_hh": (gh,),
    }


def _to_blocks(w: np.ndarray, name: str, hidden: int) -> np.ndarray:
    """``<[G*H, K]> -> <[K, G, H]>`` in rnn_jax's gate order."""
    blocks = w.reshape(-1, hidden, w.shape[-1])[_TORCH_BLOCK[name]]
    return blocks.transpose(2, 0, 1)


def _from_blocks(w: np.ndarray, name: str) -> np.ndarray:
    """Inverse of :func:`_to_blocks`: ``<[K, G, H]> -> <[G*H, K]>``."""
    order = np.argsort(_TORCH_BLOCK[name])
    k, _, h = w.shape
    return w.transpose(1, 2, 0)[order].reshape(-1, k)


def from_torch(state_dict: Any, net: Network, *, prefix: str = "") -> dict[str, Any]:
    """Converts a PyTorch ``nn.RNN``/``nn.GRU``/``nn.LSTM`` state dict into ``net``'s params.

    Args:
      state_dict: mapping of PyTorch key to tensor or numpy array. A module built
        with ``bias=False`` (no ``bias_*`` keys) gives zero biases, the same function.
        ``proj_size > 0`` (``weight_hr_l*`` keys) is refused: rnn_jax's LSTM has no
        projection.
      net: the rnn_jax network of the same cell, hidden size, depth and direction
        (``batch_first`` does not matter).
      prefix: prepended to every key (e.g. ``"rnn."`` for a submodule's weights).

    Returns:
      ``net``'s params (numpy float32 arrays; ``jax.numpy`` takes them as they are).

    Raises:
      ValueError: naming the key that is missing, unexpected or mis-shaped.
    """
    _check_convertible(net)
    if hasattr(state_dict, "state_dict") and callable(state_dict.state_dict):
        raise ValueError(
            f"state_dict: expected a mapping of keys to tensors, got a "
            f"{type(state_dict).__name__} module; pass module.state_dict()"
        )
    sd = {k: v for k, v in dict(state_dict).items() if k.startswith(prefix)}
    first = f"{prefix}weight_ih_l0"
    if first not in sd:
        raise ValueError(f"state_dict: missing key {first!r}; keys are {sorted(sd)[:8]}")
    if any(k.startswith(f"{prefix}weight_hr_l") for k in sd):
        raise ValueError(
            "state_dict: holds weight_hr_l* keys, an nn.LSTM with proj_size > 0, whose "
            "projected hidden state rnn_jax's LSTM does not have"
        )
    if not any(k.startswith((f"{prefix}bias_ih_l", f"{prefix}bias_hh_l")) for k in sd):
        # a module built with bias=False computes what zero biases compute
        for key in [k for k in sd if k.startswith(f"{prefix}weight_ih_l")]:
            rows = _to_numpy(sd[key]).shape[0]
            for kind in ("bias_ih", "bias_hh"):
                sd[key.replace("weight_ih", kind, 1)] = np.zeros((rows,), np.float32)
    input_size = int(_to_numpy(sd[first]).shape[-1])
    name, hidden = net.cell.name, net.cell.hidden_size
    params: dict[str, Any] = {}
    used = set()
    for layer in range(net.num_layers):
        shapes = _expected_shapes(net, input_size, layer)
        layer_params = {}
        for sfx, direction in _suffixes(net):
            arrays = {}
            for base, shape in shapes.items():
                key = f"{prefix}{base}_l{layer}{sfx}"
                if key not in sd:
                    raise ValueError(f"state_dict: missing key {key!r} (expected shape {shape})")
                arrays[base] = _to_numpy(sd[key])
                if arrays[base].shape != shape:
                    raise ValueError(
                        f"state_dict: key {key!r} has shape {arrays[base].shape}, expected "
                        f"{shape} for {name} hidden_size={hidden}"
                    )
                used.add(key)
            p = _convert_in(arrays, name, hidden)
            if direction is None:
                layer_params = p
            else:
                layer_params[direction] = p
        params[f"layer_{layer}"] = layer_params
    extra = sorted(set(sd) - used)
    if extra:
        raise ValueError(
            f"state_dict: unexpected keys {extra} (does net have the same num_layers, "
            "bidirectional and no projection?)"
        )
    return params


def _convert_in(a: dict[str, np.ndarray], name: str, hidden: int) -> dict[str, np.ndarray]:
    if name == "rnn":
        return {
            "W_x": np.ascontiguousarray(a["weight_ih"].T),
            "W_h": np.ascontiguousarray(a["weight_hh"].T),
            "b": a["bias_ih"] + a["bias_hh"],
        }
    order = _TORCH_BLOCK[name]
    b_ih = a["bias_ih"].reshape(-1, hidden)[order]
    b_hh = a["bias_hh"].reshape(-1, hidden)[order]
    p = {
        "W_x": np.ascontiguousarray(_to_blocks(a["weight_ih"], name, hidden)),
        "W_h": np.ascontiguousarray(_to_blocks(a["weight_hh"], name, hidden)),
    }
    if name == "gru":  # b_hn stays inside the reset gate's product
        p["b"] = np.concatenate([b_ih[:2] + b_hh[:2], b_ih[2:]])
        p["b_hn"] = b_hh[2]
    else:
        p["b"] = b_ih + b_hh
    return p


def _check_params_of(params: Any, net: Network) -> None:
    """``params`` has the keys and shapes ``net.init`` gives, else ValueError naming
    the first path that differs (the layers and directions by the state dict's
    terms first, then the network's own check): a state dict of other sizes would
    otherwise load into nothing or the wrong module."""
    kind = "bidirectional" if net.bidirectional else "unidirectional"
    path = ["layer_0", *(["forward"] if net.bidirectional else []), "W_x"]
    node = params
    for i, key in enumerate(path):
        if not isinstance(node, dict) or key not in node:
            where = "".join(f"[{k!r}]" for k in path[: i + 1])
            raise ValueError(
                f"params{where}: missing; expected the params of net.init for this {kind} "
                f"{net.cell.name} network of {net.num_layers} layer(s)"
            )
        node = node[key]
    for layer in range(net.num_layers):
        if f"layer_{layer}" not in params:
            raise ValueError(
                f"params['layer_{layer}']: missing; this network has {net.num_layers} layer(s)"
            )
    net.check_params(params)


def to_torch(
    params: Any, net: Network, *, prefix: str = "", bias: bool = True
) -> dict[str, np.ndarray]:
    """Converts ``net``'s params into a PyTorch state dict of numpy float32 arrays.

    Load it with ``module.load_state_dict({k: torch.from_numpy(v) ...})`` into an
    ``nn.RNN``/``nn.GRU``/``nn.LSTM`` of the same sizes.

    Args:
      params: ``net``'s params.
      net: the rnn_jax network (a reset-after GRU, no pinned gates).
      prefix: prepended to every key (``"rnn."`` for a module's ``rnn`` submodule).
      bias: False for a module built with ``bias=False``: no ``bias_*`` keys are
        written (a strict ``load_state_dict`` refuses keys it does not have), which
        needs every bias to be zero.

    Raises:
      ValueError: params not of ``net``; with ``bias=False``, naming the first
        nonzero bias (a module without biases cannot compute that function).
    """
    _check_convertible(net)
    if not isinstance(prefix, str):
        raise ValueError(f"prefix: expected a str, got {prefix!r}")
    _check_params_of(params, net)
    name = net.cell.name
    out: dict[str, np.ndarray] = {}
    for layer in range(net.num_layers):
        for sfx, direction in _suffixes(net):
            where = f"['layer_{layer}']" + ("" if direction is None else f"['{direction}']")
            try:
                p = params[f"layer_{layer}"]
                p = p if direction is None else p[direction]
                p = {k: np.asarray(v, np.float32) for k, v in p.items()}
            except (KeyError, TypeError, AttributeError):
                kind = "bidirectional" if net.bidirectional else "unidirectional"
                raise ValueError(
                    f"params{where}: missing; expected the params of net.init for this {kind} "
                    f"network of {net.num_layers} layer(s)"
                ) from None
            if not bias:
                for key in ("b", "b_hn"):
                    if key in p and np.any(p[key] != 0):
                        raise ValueError(
                            f"params{where}[{key!r}]: nonzero, but bias=False writes no "
                            f"biases; a module without them computes another function"
                        )
            if name == "rnn":
                w_ih, w_hh, b_ih = p["W_x"].T, p["W_h"].T, p["b"]
                b_hh = np.zeros_like(b_ih)
            else:
                w_ih, w_hh = _from_blocks(p["W_x"], name), _from_blocks(p["W_h"], name)
                order = np.argsort(_TORCH_BLOCK[name])
                b_ih = p["b"][order].reshape(-1)
                b_hh = np.zeros_like(p["b"])
                if name == "gru":
                    b_hh[2] = p["b_hn"]
                b_hh = b_hh[order].reshape(-1)
            arrays = [("weight_ih", w_ih), ("weight_hh", w_hh)]
            if bias:
                arrays += [("bias_ih", b_ih), ("bias_hh", b_hh)]
            for base, value in arrays:
                # a fresh, writable array: never a view of the caller's params
                out[f"{prefix}{base}_l{layer}{sfx}"] = np.array(value, np.float32, order="C")
    return out
