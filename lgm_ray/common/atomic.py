"""Files written whole or not at all: write beside the target, then rename over it.

A reader — a resumed sweep, the driver polling trial folders, a browser reloading the report — sees the
old file or the whole new one, never half of it, even when the writer is killed mid-write. The
temporary name carries the process id (two processes writing the same file do not interleave) and the
target's suffix (writers that pick the format from it, such as matplotlib and torchvision, keep working).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def replace_with(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it over ``path``.

    Args:
        path: the file to (re)place; its folder is created.
        write: writes the whole file to the path it is given.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return replace_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save a matplotlib figure to ``path`` atomically (format from the suffix); the caller closes it."""
    return replace_with(path, fig.savefig)
