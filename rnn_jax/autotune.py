"""Times the candidate implementations of one training step and caches the fastest.

``implementation="auto"`` (:func:`rnn_jax.networks.choose_implementation`) and
``unroll=None`` (:func:`rnn_jax.networks.default_unroll`) are fixed rules drawn from
measurements on a few shapes. :func:`tune` measures instead, for the exact run: it
compiles the language model's training step (forward, backward, optimiser update)
once per candidate ``(implementation, unroll, directions)``, times a few steps of
each on random token ids, and keeps the fastest. The choice is cached in a JSON file keyed by
everything that decides it (device kind and count, jax version, the model, batch
and sequence shape, matmul type and the candidate list), so a second run of the
same shape costs nothing. Every candidate is compiled first, then timed in
alternating rounds (a slow spell of a shared machine hits all of them). A candidate
whose compiled step needs more memory than the device has free
(:mod:`rnn_jax.memory`) is skipped without running, like one that fails.
Candidates (:func:`candidates`):

* implementations: ``fused``, ``scan``, ``wavefront`` (deep unidirectional networks
  without dropout or remat), ``pallas`` (on GPUs, for the cells it supports);
* unrolls: 1 and 2 on CPU, 4, 8 and 16 elsewhere (``pallas`` ignores unroll: 1);
* for a bidirectional network, how the fused layers run the two directions:
  ``vmap`` and ``separate`` (:data:`rnn_jax.networks.DIRECTIONS`; which is faster
  depends on the CPU, not only on the shape: see
  :func:`rnn_jax.networks.separate_directions`). ``pallas`` keeps its grid over
  both directions and ``scan`` its vmapped step.

What the caller fixed stays fixed: a config whose ``implementation`` is not
``"auto"`` times only that implementation, a config with ``unroll > 0`` only that
unroll, one whose ``directions`` is not ``"auto"`` only that layout. The timed
batch is one device's share of ``batch_size`` under data parallelism.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax import data, fused, memory, models, native, persistent, train
from rnn_jax.config import TrainConfig, model_config

CACHE_VERSION = 2  # 2: the directions of bidirectional layers are tuned too


class Candidate(NamedTuple):
    """One configuration :func:`tune` times."""

    implementation: str
    unroll: int
    directions: str = "auto"

    @property
    def name(self) -> str:
        """``"impl:unroll"``, with ``":directions"`` when that is not ``"auto"``."""
        base = f"{self.implementation}:{self.unroll}"
        return base if self.directions == "auto" else f"{base}:{self.directions}"


class Choice(NamedTuple):
    """The tuned ``implementation``, ``unroll`` and ``directions``, the median step
    time of every candidate timed (:attr:`Candidate.name` -> ms; failures as
    ``None``) and whether it came from the cache."""

    implementation: str
    unroll: int
    ms: dict[str, float | None]
    cached: bool
    directions: str = "auto"

    def describe(self) -> str:
        """``"fused unroll 1"``, ``"fused unroll 1, directions separate"``."""
        text = f"{self.implementation} unroll {self.unroll}"
        return text if self.directions == "auto" else f"{text}, directions {self.directions}"


def default_cache_path() -> Path:
    """``$RNN_JAX_AUTOTUNE_CACHE``, else ``$XDG_CACHE_HOME/rnn_jax/autotune.json``
    (``~/.cache`` when unset)."""
    if os.environ.get("RNN_JAX_AUTOTUNE_CACHE"):
        return Path(os.environ["RNN_JAX_AUTOTUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rnn_jax" / "autotune.json"


def candidates(config: TrainConfig, backend: str | None = None) -> list[Candidate]:
    """The configurations :func:`tune` times for ``config``."""
    backend = backend or jax.default_backend()
    cell = model_config(config, 2).make_cell()
    unrolls = (1, 2) if backend == "cpu" else (4, 8, 16)
    if config.unroll:
        unrolls = (config.unroll,)
    impls = ["scan"]
    if fused.supports(cell):
        impls.insert(0, "fused")
        deep = config.num_layers > 1 and not (
            config.bidirectional or config.dropout or config.remat
        )
        if deep:
            impls.append("wavefront")
        if backend == "gpu" and persistent.unsupported(cell) is None:
            impls.append("pallas")
        if (
            backend == "cpu"
            and config.matmul_dtype == "float32"  # else the kernels run the XLA loops
            and native.unsupported(cell) is None
            and not native.unavailable()
        ):
            impls.append("native")
    if config.matmul_dtype != "float32" and "scan" in impls:
        impls.remove("scan")  # the reference computes float32 only
    if config.implementation != "auto":
        impls = [config.implementation]

    def layouts(impl: str) -> tuple[str, ...]:
        if config.directions != "auto" and impl != "scan":
            return (config.directions,)
        if config.bidirectional and impl in ("fused", "native"):
            return ("vmap", "separate")
        return ("auto",)

    found = [
        Candidate(i, 1 if i in ("pallas", "native") else u, d)
        for i in impls
        for u in unrolls
        for d in layouts(i)
    ]
    return list(dict.fromkeys(found))  # pallas and native have no unroll: once


def cache_key(config: TrainConfig, vocab_size: int, rows: int) -> str:
    """What decides the choice, as a JSON string."""
    device = jax.devices()[0]
    fields = (
        "cell hidden_size num_layers bidirectional reset_after pin_reset pin_update "
        "activation embed_dim dropout remat matmul_dtype directions num_steps"
    ).split()
    key = {
        "version": CACHE_VERSION,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "vocab_size": vocab_size,
        "rows": rows,
        **{f: getattr(config, f) for f in fields},
        "candidates": [c.name for c in candidates(config)],
    }
    return json.dumps(key, sort_keys=True)


def _devices(config: TrainConfig) -> list[Any]:
    """The devices the run's step spreads over: every device under data parallelism
    (:func:`rnn_jax.parallel.data_mesh`), else the default one."""
    return jax.devices() if config.data_parallel else jax.devices()[:1]


def _rows(config: TrainConfig) -> int:
    """One device's share of the batch under data parallelism."""
    return max(1, -(-config.batch_size // len(_devices(config))))


def _compiled_step(config: TrainConfig, vocab_size: int, rows: int) -> Callable[[], Any]:
    """One training step of ``config`` on ``rows`` random windows, compiled (by its
    first call); each call runs a step and waits for it."""
    config = dataclasses.replace(config, batch_size=rows, partition="windows")
    model = models.language_model(model_config(config, vocab_size))
    tx = train.make_optimizer(config, 1000)
    train_step, _ = train.make_steps(model, tx, config, steps_per_epoch=1)
    state = train.init_state(model, tx, config)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab_size, size=(rows, config.num_steps + 1), dtype=np.int32)
    batch = data.Batch(
        jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:]), jnp.ones((rows,), jnp.float32)
    )

    if memory.enabled():  # a candidate too large for the devices is skipped, not run
        # timed on one device, it runs on each of the run's: CPU devices add up
        estimate = memory.estimate(train_step.lower(state, batch).compile(), _devices(config))
        if estimate is not None and not estimate.fits:
            raise memory.DoesNotFit(estimate)

    def step():
        nonlocal state
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)

    step()
    return step


def _timed(step: Callable[[], Any], repeats: int, min_time_s: float) -> list[float]:
    """Seconds of ``repeats`` calls of ``step``, more until ``min_time_s`` passed."""
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_time_s and len(times) < 100):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def _parse_cache(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(entries, None)``: ``{}`` when there is no file or an empty one (a cache not
    yet written); ``(None, why)`` for a file that is not an autotune cache."""
    try:
        content = path.read_text()
    except FileNotFoundError:
        return {}, None
    except OSError as e:
        return None, str(e)
    if not content:
        return {}, None
    try:
        cache = json.loads(content)
    except ValueError as e:
        return None, str(e)
    return (cache, None) if isinstance(cache, dict) else (None, "not a JSON object")


def _read_cache(path: Path, echo: Callable[[str], None]) -> dict[str, Any] | None:
    """The cache's entries (``{}`` if there is no file yet), or ``None`` for a file that
    is not an autotune cache: it is not fatal, but that file is never written over
    (the cache is written atomically, so it is someone else's file, not a torn one)."""
    cache, why = _parse_cache(path)
    if cache is None:
        echo(f"autotune: ignoring unreadable cache {path} ({why}); it is left as it is")
    return cache


def check_cache_path(path: str | Path) -> str | None:
    """Why ``path`` cannot be an autotune cache (``None`` if it can): a folder, or an
    existing file that is not one (which the cache would write over)."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a directory; expected a JSON file path"
    _, why = _parse_cache(path)
    return None if why is None else f"{path} exists and is not an autotune cache ({why})"


def _write_cache(path: Path, cache: dict[str, Any], echo: Callable[[str], None]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file
    except OSError as e:
        echo(f"autotune: could not write the cache {path} ({e}); the choice is not kept")


def tune(
    config: TrainConfig,
    vocab_size: int,
    *,
    cache_path: str | Path | None = None,
    refresh: bool = False,
    repeats: int = 5,
    rounds: int = 2,
    min_time_s: float = 0.2,
    echo: Callable[[str], None] = print,
) -> Choice:
    """The fastest :class:`Candidate` for ``config``'s training step.

    Args:
      config: a validated :class:`rnn_jax.config.TrainConfig`.
      vocab_size: the model's vocabulary size.
      cache_path: the JSON cache (default :func:`default_cache_path`).
      refresh: time again even if the cache has this key (and overwrite it).
      repeats: timed steps per candidate and round (at least; more until
        ``min_time_s``), after the compiling one.
      rounds: rounds over all candidates; a candidate's time is the median of all
        its steps.
      echo: progress lines.

    Raises:
      ValueError: bad ``repeats`` / ``rounds`` / ``min_time_s``.
      RuntimeError: every candidate failed to compile or run.
      rnn_jax.config.ConfigError: no candidate fits in the device's free memory
        (:func:`rnn_jax.train.memory_refusal`).
    """
    for name, value in (("repeats", repeats), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if isinstance(min_time_s, bool) or not isinstance(min_time_s, (int, float)) or min_time_s < 0:
        raise ValueError(f"min_time_s: expected a number >= 0, got {min_time_s!r}")
    path = Path(cache_path) if cache_path else default_cache_path()
    options = candidates(config)
    if len(options) == 1:  # nothing to choose: no compile, no cache entry
        only = options[0]
        choice = Choice(only.implementation, only.unroll, {}, False, only.directions)
        echo(f"autotune: {choice.describe()} (the only candidate)")
        return choice
    rows = _rows(config)
    key = cache_key(config, vocab_size, rows)
    cache = _read_cache(path, echo)
    # a file that is not a cache is never written over, except at the default path,
    # which is rnn_jax's own (a cache there that cannot be read is rebuilt)
    writable = cache is not None or not cache_path
    cache = cache or {}
    hit = cache.get(key)
    if hit and not refresh:
        choice = Choice(
            hit["implementation"], hit["unroll"], hit["ms"], True, hit.get("directions", "auto")
        )
        echo(f"autotune: {choice.describe()} (cached in {path})")
        return choice
    steps, timings, by_name = {}, {}, {}
    too_large: list[memory.Estimate] = []
    for option in options:  # compile every candidate first
        name = option.name
        by_name[name] = option
        try:
            tuned = dataclasses.replace(
                config,
                implementation=option.implementation,
                unroll=option.unroll,
                directions=option.directions,
            )
            steps[name] = _compiled_step(tuned, vocab_size, rows)
        except Exception as e:  # noqa: BLE001  a candidate that fails is skipped
            timings[name] = None
            if isinstance(e, memory.DoesNotFit):
                too_large.append(e.estimate)
            echo(f"autotune: {name} failed ({type(e).__name__}: {str(e)[:200]})")
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):  # alternate, so that a slow spell of the machine hits all
        for name, step in steps.items():
            samples[name] += _timed(step, repeats, min_time_s)
    for name, times in samples.items():
        timings[name] = 1e3 * statistics.median(times)
        echo(f"autotune: {name} {timings[name]:.3g} ms/step ({len(times)} steps)")
    measured = {k: v for k, v in timings.items() if v is not None}
    if not measured and too_large and len(too_large) == len(timings):
        # the run's configuration does not fit: a bad flag, not a failure
        raise train.memory_refusal(config, min(too_large, key=lambda e: e.need))
    if not measured:
        raise RuntimeError(f"autotune: every candidate failed: {sorted(timings)}")
    best = by_name[min(measured, key=measured.get)]
    choice = Choice(best.implementation, best.unroll, timings, False, best.directions)
    entry = {
        "implementation": choice.implementation,
        "unroll": choice.unroll,
        "directions": choice.directions,
        "ms": timings,
    }
    cache[key] = {**entry, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if writable:
        _write_cache(path, cache, echo)
    echo(f"autotune: picked {choice.describe()} ({measured[best.name]:.3g} ms/step)")
    return choice
