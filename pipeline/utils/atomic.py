"""Atomic outputs: a reader sees the old result or the complete new one, never a half-written one."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

COMPLETE_MARKER = "_COMPLETE"


@contextmanager
def atomic_directory(dest: str | Path, *, marker: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``dest`` by rename, on error it is removed.

    With ``marker=True`` a ``_COMPLETE`` file is written last, so a rerun can trust only marked folders
    even if something else copied a folder half-way.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = dest.parent / f".{dest.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if marker:
            (tmp / COMPLETE_MARKER).write_text("ok\n")
        old = dest.parent / f".{dest.name}.old-{tag}"
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_complete(path: str | Path) -> bool:
    """True for a folder written by ``atomic_directory(..., marker=True)``."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def atomic_write_bytes(dest: str | Path, data: bytes) -> None:
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_bytes(data)
    os.replace(tmp, dest)
