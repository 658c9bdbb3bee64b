r"""One benchmark measurement, in a process of its own; prints one JSON line.

``experiments/benchmark.py`` starts this module once per (case, implementation,
round)::

    python -m experiments.bench_worker '{"impl": "rnn_jax", "cell": "gru", ...}'

and parses the last line of its stdout, a JSON object (everything else goes to
stderr). One process per measurement keeps the implementations' thread pools apart
(PyTorch's and XLA's slow each other down in one process), makes the compile time a
cold one, and makes the process's max RSS belong to that one case.

What it times: one full training step of the character language model, one-hot
input -> recurrent network -> output layer -> mean cross-entropy -> gradients ->
``clip_by_global_norm(1)`` -> SGD update, on one fixed random batch of token ids:

* ``rnn_jax``: the real jitted step of ``rnn_jax.train.make_steps`` (with
  ``make_optimizer``'s ``chain(clip_by_global_norm(1), sgd(lr))``), compiled ahead
  of time with ``train_step.lower(state, batch).compile()``;
* ``flax``: ``flax.linen`` ``nn.RNN`` over ``nn.OptimizedLSTMCell`` / ``nn.GRUCell`` /
  ``nn.SimpleCell`` (``nn.Bidirectional``, stacked layers), ``nn.Dense`` output, the
  same optax chain, compiled the same way;
* ``torch``: ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (``batch_first``, ``num_layers``,
  ``bidirectional``; cuDNN on a GPU), ``nn.Linear`` output, ``F.cross_entropy``,
  ``clip_grad_norm_(1)``, ``torch.optim.SGD``.

After compiling (JAX) the worker runs ``warmup`` untimed steps (the first one's
time is reported as ``first_step_s``), then times ``iters`` steps one by one, each
ending with a device sync, stopping early once ``max_time_s`` have been spent (but
after at least ``min_iters``). ``step_s`` is the median step time.

The spec's keys and defaults are :data:`DEFAULTS`; :func:`run` does the work and is
callable in-process (tests), :func:`main` sets up threads first (see
:func:`configure_threads`) and must run before jax or torch is imported.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
import traceback
from typing import Any

IMPLS = ("rnn_jax", "flax", "torch")

DEFAULTS: dict[str, Any] = {
    "impl": "rnn_jax",
    "vocab_size": 28,
    "hidden_size": 32,
    "batch_size": 1024,
    "num_steps": 32,
    "cell": "lstm",
    "num_layers": 1,
    "bidirectional": False,
    "reset_after": True,  # GRU form: True is PyTorch's / cuDNN's / flax.linen's
    "unroll": None,  # rnn_jax network options (peers keep their library defaults);
    # unroll None: networks.default_unroll()
    "remat": False,
    "hoist_input": "auto",  # "auto" | "true" | "false"
    "implementation": "auto",  # rnn_jax: "auto" | "fused" | "scan" | "wavefront"
    "matmul_dtype": "float32",  # rnn_jax: "float32" | "bfloat16"
    "directions": "auto",  # rnn_jax, bidirectional fused layers: "auto" | "vmap" | "separate"
    "tune_malloc": False,  # rnn_jax.allocator.tune_malloc() before anything runs
    "lr": 1.0,
    "seed": 0,
    "warmup": 2,
    "iters": 10,
    "min_iters": 3,
    "max_time_s": 20.0,
    "compile_only": False,  # JAX only: lower + compile + memory analysis, no steps
    "device": "auto",  # "auto" | "cpu" | "gpu"
    # CPU devices of the JAX workers ("auto" or a count; rnn_jax.parallel.split_cpu):
    # the batch is split over them (data parallelism), as experiments.train does
    "cpu_devices": "auto",  # rnn_jax: its launcher's default
    "flax_cpu_devices": "1",  # flax.linen: one device, as its users get it
}

_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class Skip(Exception):
    """The implementation cannot run here (package missing, no GPU): skip, don't fail."""


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def configure_threads(threads: int) -> dict[str, Any]:
    """Restricts this process to ``threads`` CPUs (0: all it may use); call before imports.

    XLA's CPU thread pool is sized by the CPUs the process may run on, so the
    affinity mask limits it; OpenMP/MKL/OpenBLAS read the environment variables;
    the torch worker also calls ``torch.set_num_threads``.
    """
    available = sorted(os.sched_getaffinity(0))
    if threads and threads < len(available):
        os.sched_setaffinity(0, available[:threads])
    n = len(os.sched_getaffinity(0))
    for var in _THREAD_ENV:
        os.environ[var] = str(n)
    return {"threads": n, "cpus": sorted(os.sched_getaffinity(0))}


def thread_info() -> dict[str, Any]:
    return {
        "affinity_cpus": len(os.sched_getaffinity(0)),
        **{var: os.environ.get(var) for var in _THREAD_ENV},
        "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
    }


def _hoist(value: Any) -> bool | None:
    if value in (None, "auto"):
        return None
    if isinstance(value, bool):
        return value
    return {"true": True, "false": False}[str(value).lower()]


def _batch_ids(spec: dict[str, Any]):
    """``(x, y) <int32>[B, T]``: random ids, ``y`` is ``x`` shifted by one token."""
    import numpy as np

    rng = np.random.default_rng(spec["seed"])
    ids = rng.integers(0, spec["vocab_size"], (spec["batch_size"], spec["num_steps"] + 1))
    ids = ids.astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


def _time_steps(step, sync, loss_value, spec: dict[str, Any]) -> dict[str, Any]:
    """Warm-up, then timed steps.

    ``step() -> out`` runs one training step, ``sync(out)`` waits for the device,
    ``loss_value(out) -> float`` reads the loss (outside the timed region).
    """
    t = time.perf_counter()
    out = step()
    sync(out)
    first = time.perf_counter() - t
    loss_first = loss_value(out)
    for _ in range(max(spec["warmup"], 1) - 1):
        sync(step())
    times: list[float] = []
    for i in range(spec["iters"]):
        t = time.perf_counter()
        out = step()
        sync(out)
        times.append(time.perf_counter() - t)
        if sum(times) > spec["max_time_s"] and i + 1 >= spec["min_iters"]:
            break
    step_s = statistics.median(times) if times else None
    tokens = spec["batch_size"] * spec["num_steps"]
    return {
        "first_step_s": first,
        "step_s": step_s,
        "step_times_s": times,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / step_s if step_s else None,
        "loss_first": loss_first,
        "loss_last": loss_value(out),
        "steps_run": max(spec["warmup"], 1) + len(times),
    }


# --- JAX implementations -------------------------------------------------------------


def _rnn_jax_step(spec: dict[str, Any]):
    """The real train step of ``rnn_jax.train``: ``(jitted, state, batch, loss_of, n)``."""
    import jax.numpy as jnp

    from rnn_jax import data, models, networks, persistent, train
    from rnn_jax.config import TrainConfig

    model = models.language_model(
        models.ModelConfig(
            vocab_size=spec["vocab_size"],
            cell=spec["cell"],
            hidden_size=spec["hidden_size"],
            num_layers=spec["num_layers"],
            bidirectional=spec["bidirectional"],
            reset_after=spec["reset_after"],
            unroll=spec["unroll"],
            remat=spec["remat"],
            hoist_input=_hoist(spec["hoist_input"]),
            implementation=spec["implementation"],
            matmul_dtype=spec["matmul_dtype"],
            directions=spec["directions"] if spec["bidirectional"] else "auto",
        )
    )
    config = TrainConfig(
        cell=spec["cell"],
        hidden_size=spec["hidden_size"],
        num_layers=spec["num_layers"],
        bidirectional=spec["bidirectional"],
        reset_after=spec["reset_after"],
        batch_size=spec["batch_size"],
        num_steps=spec["num_steps"],
        optimizer="sgd",
        schedule="constant",
        lr=spec["lr"],
        momentum=0.0,
        grad_clip=1.0,
        dropout=0.0,
        partition="windows",
        seed=spec["seed"],
    )
    tx = train.make_optimizer(config, total_steps=1)
    train_step, _ = train.make_steps(model, tx, config, steps_per_epoch=1)
    state = train.init_state(model, tx, config)
    x, y = _batch_ids(spec)
    batch = data.Batch(jnp.asarray(x), jnp.asarray(y), jnp.ones((spec["batch_size"],), jnp.float32))

    def loss_of(metrics):
        return float(metrics["loss_sum"]) / float(metrics["count"])

    impl = model.network.implementation
    if impl == "auto":
        net = model.network
        impl = networks.choose_implementation(
            net.cell,
            spec["batch_size"],
            remat=net.remat,
            num_layers=net.num_layers,
            bidirectional=net.bidirectional,
            dropout=net.dropout,
            matmul_dtype=net.matmul_dtype,
        )
    info = {
        "hoist_input": model.network.hoist_input,
        "implementation": impl,
        "unroll": model.network.unroll,
        "matmul_dtype": model.network.matmul_dtype,
    }
    net = model.network
    if net.bidirectional and impl in ("fused", "pallas", "native"):
        separate = networks.separate_directions(
            networks.loop_kernel(impl), directions=net.directions
        )
        info["directions"] = "separate" if separate else "vmap"
    if impl == "pallas":
        exchange = persistent.plan_exchange(spec["batch_size"], model.network.cell.hidden_size)
        if exchange:
            info["pallas_exchange"] = exchange
    return train_step, state, batch, loss_of, state["params"], info


def _flax_step(spec: dict[str, Any]):
    """The same step with flax.linen's RNN layers."""
    try:
        import flax.linen as nn
    except ImportError as e:
        raise Skip(f"flax is not installed ({e})") from None
    import jax
    import jax.numpy as jnp
    import optax

    vocab, hidden = spec["vocab_size"], spec["hidden_size"]
    cell_cls = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell, "rnn": nn.SimpleCell}[spec["cell"]]

    class LanguageModel(nn.Module):
        @nn.compact
        def __call__(self, ids):
            x = jax.nn.one_hot(ids, vocab)
            for _ in range(spec["num_layers"]):
                if spec["bidirectional"]:
                    x = nn.Bidirectional(
                        nn.RNN(cell_cls(features=hidden)), nn.RNN(cell_cls(features=hidden))
                    )(x)
                else:
                    x = nn.RNN(cell_cls(features=hidden))(x)
            return nn.Dense(vocab)(x)

    model = LanguageModel()
    x, y = _batch_ids(spec)
    x, y = jnp.asarray(x), jnp.asarray(y)
    params = model.init(jax.random.key(spec["seed"]), x)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(spec["lr"]))

    def loss_fn(params, x, y):
        logits = model.apply(params, x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    @jax.jit
    def train_step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return train_step, (params, tx.init(params)), (x, y), float, params, {}


def spec_macs(spec: dict[str, Any]) -> int:
    """The recurrent work per step of a spec's shape (``rnn_jax.parallel.recurrent_macs``),
    which decides the CPU device split under ``auto``."""
    from rnn_jax import parallel

    return parallel.recurrent_macs(
        spec["cell"],
        spec["hidden_size"],
        spec["batch_size"],
        spec["num_steps"],
        spec["num_layers"],
        spec["bidirectional"],
    )


def split_devices(spec: dict[str, Any]) -> None:
    """Splits the CPU into the devices ``spec``'s implementation runs on (its
    ``cpu_devices``, or ``flax_cpu_devices`` for flax.linen), before JAX's backends
    start (:func:`rnn_jax.parallel.split_cpu`)."""
    from experiments.common import resolve_cpu_devices
    from rnn_jax import parallel

    key = "cpu_devices" if spec["impl"] == "rnn_jax" else "flax_cpu_devices"
    macs = spec_macs(spec)
    parallel.split_cpu(resolve_cpu_devices(spec[key], spec["batch_size"], True, key, macs))


def on_mesh(state: Any, batch: Any) -> tuple[Any, Any, Any]:
    """``(mesh, state, batch)``: the batch over all devices, parameters replicated, as
    ``experiments.train`` runs (``mesh`` None, and nothing moved, with one device)."""
    import jax

    from rnn_jax import parallel

    mesh = parallel.data_mesh()
    if mesh is not None:
        state = jax.device_put(state, parallel.replicated(mesh))
        batch = parallel.shard_batch(batch, mesh)
    return mesh, state, batch


def _run_jax(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["device"] == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # only effective before jax's import
    import jax

    rss_import = _max_rss_bytes()
    from rnn_jax import parallel

    split_devices(spec)
    platform = jax.default_backend()  # the backends start here, after split_cpu
    if spec["device"] == "gpu" and platform != "gpu":
        raise Skip(f"JAX has no GPU backend here (default backend: {platform})")
    device = jax.devices()[0]
    make = _rnn_jax_step if spec["impl"] == "rnn_jax" else _flax_step
    train_step, state, batch, loss_of, params, info = make(spec)
    mesh, state, batch = on_mesh(state, batch)
    info["devices"] = 1 if mesh is None else mesh.size
    num_params = sum(int(p.size) for p in jax.tree.leaves(params))

    t0 = time.perf_counter()
    lowered = parallel.in_mesh(mesh, train_step.lower)(state, batch)  # as train.run traces
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    stats = compiled.memory_analysis()
    memory: dict[str, Any] = {}
    if stats is not None:
        memory = {
            "temp_bytes": int(stats.temp_size_in_bytes),
            "argument_bytes": int(stats.argument_size_in_bytes),
            "output_bytes": int(stats.output_size_in_bytes),
            "alias_bytes": int(stats.alias_size_in_bytes),
        }
        memory["xla_total_bytes"] = (
            memory["temp_bytes"] + memory["argument_bytes"] + memory["output_bytes"]
        )
    result: dict[str, Any] = {
        "platform": platform,
        "device_name": device.device_kind,
        "num_params": num_params,
        "lower_s": t1 - t0,
        "compile_s": t2 - t0,  # lowering + XLA compilation
        **info,
    }
    if not spec["compile_only"]:
        box = {"state": state}

        def step():
            box["state"], out = compiled(box["state"], batch)
            return out

        def sync(out):
            jax.block_until_ready((box["state"], out))

        result.update(_time_steps(step, sync, loss_of, spec))
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        memory["peak_device_bytes"] = int(stats["peak_bytes_in_use"])
    memory["import_rss_bytes"] = rss_import
    memory["max_rss_bytes"] = _max_rss_bytes()
    result["memory"] = memory
    return result


# --- PyTorch -------------------------------------------------------------------------


def _run_torch(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["compile_only"]:
        raise Skip("torch has no ahead-of-time compilation to measure")
    try:
        import torch
        import torch.nn.functional as F
        from torch import nn
    except ImportError as e:
        raise Skip(f"torch is not installed ({e})") from None

    rss_import = _max_rss_bytes()
    want_gpu = spec["device"] == "gpu" or (spec["device"] == "auto" and torch.cuda.is_available())
    if want_gpu and not torch.cuda.is_available():
        raise Skip(f"torch {torch.__version__} sees no CUDA device")
    dev = torch.device("cuda" if want_gpu else "cpu")
    n = int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    torch.manual_seed(spec["seed"])
    vocab, hidden = spec["vocab_size"], spec["hidden_size"]
    rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[spec["cell"]]

    class LanguageModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn_cls(
                vocab,
                hidden,
                num_layers=spec["num_layers"],
                bidirectional=spec["bidirectional"],
                batch_first=True,
            )
            self.out = nn.Linear(hidden * (2 if spec["bidirectional"] else 1), vocab)

        def forward(self, ids):
            ys, _ = self.rnn(F.one_hot(ids, vocab).float())
            return self.out(ys)

    model = LanguageModel().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"])
    x, y = _batch_ids(spec)
    x = torch.as_tensor(x, dtype=torch.long, device=dev)
    y = torch.as_tensor(y, dtype=torch.long, device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.detach()

    def sync(_):
        if dev.type == "cuda":
            torch.cuda.synchronize()

    result: dict[str, Any] = {
        "platform": "gpu" if dev.type == "cuda" else "cpu",
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "num_params": sum(p.numel() for p in model.parameters()),
        "compile_s": None,
        "torch_threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        result["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.enabled else None
    result.update(_time_steps(step, sync, lambda loss: float(loss.item()), spec))
    memory = {"import_rss_bytes": rss_import, "max_rss_bytes": _max_rss_bytes()}
    if dev.type == "cuda":
        memory["peak_device_bytes"] = int(torch.cuda.max_memory_allocated(dev))
    result["memory"] = memory
    return result


# --- entry points --------------------------------------------------------------------


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Measures ``spec`` (missing keys from :data:`DEFAULTS`) in this process.

    Returns ``{"ok": True, ...numbers}``, or ``{"ok": False, "skip": bool,
    "error": str}`` when the implementation is missing (``skip``) or failed.
    """
    unknown = sorted(set(spec) - set(DEFAULTS))
    if unknown:
        return {"ok": False, "skip": False, "error": f"unknown spec keys {unknown}"}
    spec = {**DEFAULTS, **spec}
    if spec["impl"] not in IMPLS:
        return {"ok": False, "skip": False, "error": f"impl: expected one of {IMPLS}"}
    try:
        result = _run_torch(spec) if spec["impl"] == "torch" else _run_jax(spec)
    except Skip as e:
        return {"ok": False, "skip": True, "impl": spec["impl"], "error": str(e)}
    except Exception as e:  # report, don't crash: the parent goes on with other cases
        traceback.print_exc(file=sys.stderr)
        return {
            "ok": False,
            "skip": False,
            "impl": spec["impl"],
            "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
        }
    return {"ok": True, "impl": spec["impl"], **result, "thread_info": thread_info()}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m experiments.bench_worker '<json spec>'", file=sys.stderr)
        return 2
    spec = json.loads(argv[1])
    if spec.get("tune_malloc"):  # before JAX or PyTorch allocate anything
        from rnn_jax import allocator

        spec["tune_malloc"] = allocator.tune_malloc()
    threads = configure_threads(int(spec.pop("threads", 0) or 0))
    result = run(spec)
    result["threads"] = threads["threads"]
    result["tune_malloc"] = bool(spec.get("tune_malloc"))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
