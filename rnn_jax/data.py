"""Token ids -> numpy batches, as pure functions of ``(seed, epoch, step)``.

A batch depends on nothing but its arguments, so a run resumed at ``(epoch, step)``
sees exactly the batches an uninterrupted run sees. Only numpy is used here.

Windows (Dive into Deep Learning's TimeMachine dataset): every overlapping window of
``num_steps + 1`` tokens, one starting at each position ``i`` (stride 1), gives
``x = ids[i : i + num_steps]`` and ``y = ids[i + 1 : i + num_steps + 1]``. Windows
``0 .. num_train - 1`` are for training, the next ``num_val`` for validation::

    windows = make_windows(ids, num_steps=32, num_train=10_000, num_val=5_000)

Two ways to cut training batches (``partition``):

* ``"windows"``: each epoch shuffles the training windows with
  ``np.random.default_rng([seed, epoch]).permutation(num_train)`` and takes
  ``batch_size`` at a time. The last batch of an epoch may be partial: it is padded
  to ``batch_size`` by repeating its valid rows, and the padding rows get
  ``weight`` 0, so shapes never change (no recompilation) and a weighted per-token
  mean loss equals the book's mean over the partial batch.
* ``"sequential"`` (truncated backpropagation through time): the tokens the
  training windows cover, ``ids[: num_train + num_steps]``, start at a random
  offset ``o`` in ``[0, num_steps)`` drawn from ``default_rng([seed, epoch])`` and
  are split into ``batch_size`` contiguous streams; batch ``i`` is columns
  ``[i * num_steps, (i + 1) * num_steps)`` of every stream, so row ``r`` of batch
  ``i + 1`` continues row ``r`` of batch ``i`` and the recurrent state can be
  carried over. Every epoch has the same number of batches (the count for the
  worst offset): ``num_train // (batch_size * num_steps)``. All weights are 1.

Evaluation (:func:`eval_batches`) walks the validation (or training) windows in
order with the same padding and weights, in both partitions, so validation
perplexities are comparable between them.

Every batch is a :class:`Batch` of ``x <int32>[B, T]``, ``y <int32>[B, T]`` and
``weight <float32>[B]``, with ``B = batch_size`` and ``T = num_steps``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

PARTITIONS = ("windows", "sequential")
SPLITS = ("train", "val")


class Batch(NamedTuple):
    """One batch: inputs, targets (inputs shifted by one token) and row weights.

    Attributes:
      x: ``<int32>[B, T]`` input ids.
      y: ``<int32>[B, T]`` target ids, ``y[:, t]`` is the token after ``x[:, t]``.
      weight: ``<float32>[B]`` 1 for real rows, 0 for padding rows.
    """

    x: np.ndarray
    y: np.ndarray
    weight: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class Windows:
    """A corpus cut into overlapping windows of ``num_steps + 1`` tokens.

    Build it with :func:`make_windows`. Windows are not materialized: window ``i``
    is read from ``ids`` when a batch asks for it.

    Attributes:
      ids: ``<int32>[N]`` the corpus (a read-only copy).
      num_steps: T, the tokens per input row.
      num_train: training windows, those starting at ``0 .. num_train - 1``.
      num_val: validation windows, those starting at
        ``num_train .. num_train + num_val - 1``.
    """

    ids: np.ndarray
    num_steps: int
    num_train: int = 10_000
    num_val: int = 5_000

    def __post_init__(self):
        for name in ("num_steps", "num_train", "num_val"):
            _check_int(name, getattr(self, name), minimum=1)
        object.__setattr__(self, "ids", _as_ids(self.ids))
        n, t = len(self.ids), self.num_steps
        if n < t + 1:
            raise ValueError(
                f"the text has {n} tokens, shorter than one window of num_steps + 1 = "
                f"{t + 1} tokens; lower num_steps"
            )
        wanted = self.num_train + self.num_val
        if self.num_windows < wanted:
            raise ValueError(
                f"num_train + num_val = {self.num_train} + {self.num_val} = {wanted} windows "
                f"requested, but the text ({n} tokens) has only {self.num_windows} windows "
                f"of num_steps + 1 = {t + 1} tokens; lower num_train or num_val"
            )

    @property
    def num_windows(self) -> int:
        """How many windows the whole text has: ``len(ids) - num_steps``."""
        return len(self.ids) - self.num_steps

    @property
    def train_tokens(self) -> np.ndarray:
        """``<int32>[num_train + num_steps]`` the tokens the training windows cover."""
        return self.ids[: self.num_train + self.num_steps]

    def take(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The windows starting at ``starts <int>[B]``: ``(x, y)``, each ``<int32>[B, T]``."""
        cols = np.asarray(starts)[:, None] + np.arange(self.num_steps)
        return self.ids[cols], self.ids[cols + 1]


def make_windows(
    ids: np.ndarray, num_steps: int, num_train: int = 10_000, num_val: int = 5_000
) -> Windows:
    """Cuts ``ids <int>[N]`` into training and validation windows (see :class:`Windows`).

    Raises:
      ValueError: if an argument is not a positive integer, the text is shorter than
        one window (``num_steps``), or it has fewer than ``num_train + num_val``
        windows.
    """
    return Windows(ids, num_steps, num_train, num_val)


# --- training batches -------------------------------------------------------


def steps_per_epoch(windows: Windows, batch_size: int, partition: str = "windows") -> int:
    """Training batches per epoch; the same for every epoch.

    ``"windows"``: ``ceil(num_train / batch_size)``. ``"sequential"``:
    ``num_train // (batch_size * num_steps)``.

    Raises:
      ValueError: for a bad ``batch_size`` or ``partition``, or a sequential
        partition with no batch at all.
    """
    _check_int("batch_size", batch_size, minimum=1)
    if _check_partition(partition) == "windows":
        return math.ceil(windows.num_train / batch_size)
    return _sequential_steps(windows, batch_size)


def train_batch(
    windows: Windows,
    batch_size: int,
    seed: int,
    epoch: int,
    step: int,
    partition: str = "windows",
) -> Batch:
    """Training batch ``step`` of ``epoch``; a pure function of its arguments.

    Args:
      windows: from :func:`make_windows`.
      batch_size: B, rows per batch.
      seed, epoch: choose the epoch's shuffle (windows) or offset (sequential);
        integers >= 0.
      step: the batch within the epoch, ``0 <= step < steps_per_epoch(...)``.
      partition: ``"windows"`` or ``"sequential"`` (see the module docstring).

    Returns:
      ``Batch(x <int32>[B, T], y <int32>[B, T], weight <float32>[B])``.

    Raises:
      ValueError: for an argument out of range or an unknown partition.
    """
    steps = steps_per_epoch(windows, batch_size, partition)
    _check_int("seed", seed, minimum=0)
    _check_int("epoch", epoch, minimum=0)
    _check_int("step", step, minimum=0)
    if step >= steps:
        raise ValueError(f"step must be < steps_per_epoch = {steps}; got {step}")
    if partition == "windows":
        order = _epoch_order(windows.num_train, seed, epoch)
        return _padded_batch(
            windows, order[step * batch_size : (step + 1) * batch_size], batch_size
        )
    rng = np.random.default_rng([seed, epoch])
    return _sequential_batch(windows, batch_size, int(rng.integers(windows.num_steps)), step)


@functools.lru_cache(maxsize=4)
def _epoch_order(num_train: int, seed: int, epoch: int) -> np.ndarray:
    """The windows' order in an epoch: ``default_rng([seed, epoch]).permutation``,
    kept for the epoch's later batches (drawn per batch, an epoch of a million
    windows cost 15 ms per batch, a minute per epoch; ten million, 0.35 s per batch).
    Read-only: a caller cannot change a later batch."""
    order = np.random.default_rng([seed, epoch]).permutation(num_train)
    order.flags.writeable = False
    return order


def _padded_batch(windows: Windows, starts: np.ndarray, batch_size: int) -> Batch:
    """The windows at ``starts <int>[n]``, n <= B, padded to B rows by repeating them."""
    n = len(starts)
    x, y = windows.take(np.resize(starts, batch_size))
    weight = (np.arange(batch_size) < n).astype(np.float32)
    return Batch(x, y, weight)


def _sequential_steps(windows: Windows, batch_size: int) -> int:
    """Batches per sequential epoch, for the worst offset ``num_steps - 1``."""
    t = windows.num_steps
    steps = windows.num_train // (batch_size * t)
    if steps == 0:
        raise ValueError(
            f"the sequential partition has 0 batches per epoch: each of the batch_size = "
            f"{batch_size} streams needs num_steps = {t} tokens (plus one target), so "
            f"num_train must be >= batch_size * num_steps = {batch_size * t}, but it is "
            f"{windows.num_train}; lower batch_size or num_steps"
        )
    return steps


def _sequential_batch(windows: Windows, batch_size: int, offset: int, step: int) -> Batch:
    """Batch ``step`` of the streams that start at ``offset``.

    The streams are ``stream_len = steps * T`` tokens long, stream ``r`` starting at
    ``offset + r * stream_len``; the worst offset ``T - 1`` still leaves the one extra
    token the last target needs.
    """
    t = windows.num_steps
    stream_len = _sequential_steps(windows, batch_size) * t
    starts = offset + np.arange(batch_size) * stream_len + step * t
    x, y = windows.take(starts)
    return Batch(x, y, np.ones(batch_size, np.float32))


# --- evaluation -------------------------------------------------------------


def eval_steps(windows: Windows, batch_size: int, split: str = "val") -> int:
    """How many batches :func:`eval_batches` yields: ``ceil(windows in split / B)``."""
    _check_int("batch_size", batch_size, minimum=1)
    return math.ceil(len(_split_range(windows, split)) / batch_size)


def eval_batches(windows: Windows, batch_size: int, split: str = "val") -> Iterator[Batch]:
    """The windows of ``split`` (``"train"`` or ``"val"``) in order, B at a time.

    The last batch is padded like a partial training batch (padding rows weigh 0),
    so summing ``weight``-weighted token losses over all batches and dividing by
    ``sum(weight) * T`` is the mean loss over the split.

    Returns:
      An iterator of ``Batch(x <int32>[B, T], y <int32>[B, T], weight <float32>[B])``.

    Raises:
      ValueError: for a bad ``batch_size`` or ``split``, when called (not when the
        first batch is drawn).
    """
    starts, count = _split_range(windows, split), eval_steps(windows, batch_size, split)
    return (
        _padded_batch(windows, starts[i * batch_size : (i + 1) * batch_size], batch_size)
        for i in range(count)
    )


def _split_range(windows: Windows, split: str) -> np.ndarray:
    """The starting positions of the windows of ``split``."""
    if split == "train":
        return np.arange(windows.num_train)
    if split == "val":
        return np.arange(windows.num_train, windows.num_train + windows.num_val)
    raise ValueError(f"unknown split {split!r}: split must be one of {', '.join(SPLITS)}")


# --- checks -----------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}; got {value!r}")


def _check_partition(partition: str) -> str:
    if partition not in PARTITIONS:
        raise ValueError(
            f"unknown partition {partition!r}: partition must be one of {', '.join(PARTITIONS)}"
        )
    return partition


def _as_ids(ids: object) -> np.ndarray:
    """``ids`` as a read-only ``<int32>[N]`` copy; rejects non-integer or non-1-D
    input, and ids that are negative or beyond int32 (they wrapped around)."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"ids must be 1-D <int>[N]; got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids must be integers; got dtype {arr.dtype}")
    if arr.size:
        low, high = arr.min(), arr.max()  # one pass each over the corpus
        if low < 0 or high > np.iinfo(np.int32).max:
            bad = low if low < 0 else high
            raise ValueError(f"ids must be in [0, 2**31): token ids of a vocabulary; got {bad}")
    out = arr.astype(np.int32, copy=True)
    out.flags.writeable = False
    return out
