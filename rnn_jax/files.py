"""Writing files so that a kill never leaves a half-written one."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, content: str) -> None:
    """Writes ``content`` to ``path`` through a temporary file beside it: a reader sees
    the old file or the new one, and a failed write leaves no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(content)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
