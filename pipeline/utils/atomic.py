"""Atomic outputs: a reader sees the old result or the complete new one, never a half-written one."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

COMPLETE_MARKER = "_COMPLETE"


class NotOurOutput(FileExistsError):
    """The destination holds something this project did not write (or did not finish): it is never removed."""


def _describe(folder: Path, limit: int = 5) -> str:
    names = sorted(p.name for p in folder.iterdir())
    shown = ", ".join(names[:limit]) + (f", … ({len(names)} entries)" if len(names) > limit else "")
    return shown


def check_replaceable(dest: str | Path) -> None:
    """Refuse a destination that exists and is neither empty nor a finished output of this project.

    Only folders that ``atomic_directory(..., marker=True)`` completed may be replaced: anything else at the
    destination may be a user's data, so it is left alone and the error names it and what it holds.
    """
    dest = Path(dest)
    if not dest.exists() and not dest.is_symlink():
        return
    if not dest.is_dir():
        raise NotOurOutput(f"{dest} exists and is not a folder; choose another output path")
    if any(dest.iterdir()) and not is_complete(dest):
        raise NotOurOutput(f"{dest} already exists and is not a finished output of this project (it holds: "
                           f"{_describe(dest)}); nothing was removed — choose another output path or empty it")


@contextmanager
def atomic_directory(dest: str | Path, *, marker: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``dest`` by rename, on error it is removed.

    With ``marker=True`` a ``_COMPLETE`` file is written last, so a rerun can trust only marked folders
    even if something else copied a folder half-way. An existing ``dest`` is replaced only when it is empty
    or a marked folder (:func:`check_replaceable`); it is checked before the work starts and again before
    the rename.
    """
    dest = Path(dest)
    check_replaceable(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = dest.parent / f".{dest.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if marker:
            (tmp / COMPLETE_MARKER).write_text("ok\n")
        check_replaceable(dest)
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


# -- leftovers of interrupted writes -------------------------------------------------------------------------
#: The lock file that :mod:`pipeline.utils.runlock` keeps inside a locked run directory; a sibling-locked
#: output ``<parent>/<name>`` has ``<parent>/.<name>.lock`` instead.
RUN_LOCK_NAME = ".runlock"


def clean_stale_temporaries(folder: str | Path, *, name: str | None = None, recursive: bool = True) -> list[Path]:
    """Remove what interrupted atomic writes left in ``folder``; returns the paths removed or put back.

    Leftovers are ``.<name>.tmp-<hex>`` and ``.<name>.old-<hex>`` (folders of :func:`atomic_directory`, files
    of :func:`atomic_write_bytes`) and ``.<name>.<8 chars>.tmp`` files (``tempfile.mkstemp`` writes). A kill
    between the two renames of :func:`atomic_directory` leaves ``dest`` missing beside a finished
    ``.tmp-<tag>`` and the previous ``.old-<tag>``: then the finished one is renamed into place instead of
    removed (or, without it, the previous one), so no finished output is ever lost.

    ``name`` restricts the clean-up to the temporaries of ``folder/name`` (and what is inside it).
    ``recursive`` walks sub-folders too, except those that hold their own run lock (:data:`RUN_LOCK_NAME`)
    and the temporaries of outputs with a sibling lock (``.<name>.lock``): those belong to another job.

    Call it only while holding the run-directory lock (:func:`pipeline.utils.runlock.run_lock` does): a
    running writer's temporaries look exactly like a dead one's.
    """
    import re

    swap = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<tag>[0-9a-f]{8})$")
    mkstemp = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
    done: list[Path] = []

    def remove(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        done.append(path)

    def walk(dirpath: Path, only: str | None) -> None:
        try:
            entries = sorted(os.scandir(dirpath), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return
        names = {e.name for e in entries}
        swaps: dict[tuple[str, str], dict[str, Path]] = {}
        leftovers: list[Path] = []
        for e in entries:
            m = swap.match(e.name) or mkstemp.match(e.name)
            if m is None or (only is not None and m["name"] != only):
                continue
            if m["name"] != only and f".{m['name']}.lock" in names:
                continue  # an output with a sibling lock (not the caller's): its own job cleans it
            if m.re is swap and e.is_dir(follow_symlinks=False):
                swaps.setdefault((m["name"], m["tag"]), {})[m["kind"]] = Path(e.path)
            leftovers.append(Path(e.path))
        for (target, _tag), kinds in swaps.items():
            dest = dirpath / target
            if dest.exists() or dest.is_symlink() or "old" not in kinds:
                continue
            keep = kinds.get("tmp", kinds["old"])  # the finished new output, else the previous one
            os.replace(keep, dest)
            leftovers.remove(keep)
            done.append(dest)
        for path in leftovers:
            remove(path)
        if not recursive:
            return
        for e in entries:
            sub = Path(e.path)
            if (only is not None and e.name != only) or sub in leftovers or not e.is_dir(follow_symlinks=False):
                continue
            if (sub / RUN_LOCK_NAME).exists():
                continue  # another job's run directory: it cleans its own
            walk(sub, None)

    walk(Path(folder), name)
    return done
