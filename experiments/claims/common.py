"""Small helpers shared by the claims scripts: result paths, mean ± std, geometric
means, plotting setup.

Nothing here defines absl flags, so any script (or test) may import it.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
# flags that change no number of a claim's results
_NEUTRAL_FLAGS = ("outdir", "note")


def keep_committed_results(flag_values) -> None:
    """Exits 2 (one line naming ``--outdir``) when a claims script would write into
    the committed :data:`RESULTS` with any of its own flags away from its default:
    the committed files are the default flags' results, and a quick run with small
    flags (each docstring shows one) replaced them. Call first thing in ``main``."""
    import sys

    if Path(flag_values.outdir).resolve() != RESULTS:
        return
    # the script's own flags: those defined beside --outdir
    own = next(
        defined
        for defined in flag_values.flags_by_module_dict().values()
        if any(f.name == "outdir" for f in defined)
    )
    from experiments.common import as_flag

    changed = [
        as_flag(f.name, f.value)
        for f in own
        if f.name not in _NEUTRAL_FLAGS and f.value != f.default
    ]
    if changed:
        print(
            f"error: --outdir: {RESULTS} holds the committed results of the default flags; "
            f"with {' '.join(changed[:4])}{' ...' if len(changed) > 4 else ''} pass another "
            f"--outdir",
            file=sys.stderr,
        )
        sys.exit(2)


def mean_std(values: Iterable[float], fmt: str = ".3f") -> str:
    """``"m ± s"`` over the finite values (sample std; no ``±`` for one value).

    Non-finite values are left out and counted: ``"m ± s (1/3 non-finite)"``.
    """
    values = [float(v) for v in values]
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "non-finite"
    out = f"{statistics.mean(finite):{fmt}}"
    if len(finite) > 1:
        out += f" ± {statistics.stdev(finite):{fmt}}"
    if len(finite) < len(values):
        out += f" ({len(values) - len(finite)}/{len(values)} non-finite)"
    return out


def geo_mean(values: Iterable[float]) -> float:
    """Geometric mean of non-negative values (0 if one is 0, ``inf`` if one is
    infinite): the average of quantities that span orders of magnitude, where an
    arithmetic mean is just the largest value over the count."""
    values = np.asarray(list(values), dtype=np.float64)
    if (
        values.size == 0
        or np.any(~(values >= 0))
        or (np.any(values == 0) and np.any(np.isinf(values)))
    ):
        raise ValueError(f"geo_mean: expected non-negative values, got {values.tolist()}")
    with np.errstate(divide="ignore"):
        return float(np.exp(np.mean(np.log(values))))


def geo_range(values: Iterable[float], fmt: str = ".1e") -> str:
    """``"g [lo, hi]"``: geometric mean and the smallest and largest value (just
    ``"g"`` for one value)."""
    values = [float(v) for v in values]
    out = f"{geo_mean(values):{fmt}}"
    if len(values) > 1:
        out += f" [{min(values):{fmt}}, {max(values):{fmt}}]"
    return out


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Saves ``fig`` to ``path`` (creating its folder) and closes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path``, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_json(path: Path, obj: Any) -> None:
    """The raw numbers behind a markdown section, for re-analysis."""
    write_text(path, json.dumps(obj, indent=1, default=float) + "\n")


def int_list(values: Iterable[str], name: str) -> list[int]:
    """Parses a list flag of ints; raises ValueError naming the flag."""
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ValueError(f"--{name}: expected comma-separated integers, got {values!r}") from None


def positive_floats(values: Iterable[str], name: str) -> list[float]:
    """Parses a list flag of finite numbers > 0; raises ValueError naming the flag."""
    values = list(values)
    try:
        out = [float(v) for v in values]
    except ValueError:
        out = []
    if not out or not all(math.isfinite(v) and v > 0 for v in out):
        raise ValueError(f"--{name}: expected numbers > 0, got {','.join(values)!r}")
    return out
