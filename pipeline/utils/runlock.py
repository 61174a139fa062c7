"""One job per run directory: an exclusive lock, taken before any work starts.

Two jobs on one run directory would both run, the second redoing the first's work and failing late. A job
therefore holds :func:`run_lock` on its run directory for its whole life: a second job on the same directory
exits at once (:class:`RunDirLocked`, exit status 1) with a message naming the holder's pid, host, start time
and command.

The lock is ``fcntl.flock`` on a lock file — ``<dir>/.runlock``, or ``<parent>/.<name>.lock`` beside an output
folder that is published by rename (``sibling=True``) — so the operating system releases it when the holder
dies, however it dies. The file holds the holder's pid, host, start time and command (JSON), for the message.
A clean exit removes it; a file left by a killed holder (SIGKILL, OOM, a lost node) is stale — nobody holds
its flock — and the next job takes it over, saying whose it was. On NFS, Linux implements flock with the
server's byte-range locks, so the lock holds across machines that share the storage.

Holding the lock, the job removes the temporaries that killed writers left behind
(:func:`pipeline.utils.atomic.clean_stale_temporaries`): they cannot be a live job's.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .atomic import RUN_LOCK_NAME, clean_stale_temporaries


class RunDirLocked(SystemExit):
    """Another live process holds the run directory's lock. A ``SystemExit``: uncaught, the job exits with
    status 1 and prints the message (no traceback). ``holder`` is the lock file's record (may be empty)."""

    def __init__(self, path: Path, lock_file: Path, holder: dict) -> None:
        self.path, self.lock_file, self.holder = path, lock_file, holder
        pid, host = holder.get("pid", "?"), holder.get("host", "?")
        since = f", since {holder['started']}" if holder.get("started") else ""
        command = f": {holder['command']}" if holder.get("command") else ""
        super().__init__(f"error: {path} is in use by another job — pid {pid} on host {host}{since}{command} "
                         f"(lock {lock_file}). Wait for it to finish, or stop it; a killed job's lock is released "
                         f"on its own.")


def lock_file_for(path: str | Path, *, sibling: bool = False) -> Path:
    """The lock file of run directory ``path``: inside it, or beside it (``sibling``)."""
    path = Path(path)
    return path.parent / f".{path.name}.lock" if sibling else path / RUN_LOCK_NAME


def read_holder(lock_file: str | Path) -> dict:
    """The record in a lock file (``{}`` if missing or unreadable)."""
    try:
        return _parse(Path(lock_file).read_bytes())
    except OSError:
        return {}


def _parse(data: bytes) -> dict:
    try:
        record = json.loads(data.decode() or "{}")
    except (UnicodeDecodeError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _read_fd(fd: int) -> dict:
    return _parse(os.pread(fd, 1 << 16, 0))


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _holder_record(fd: int) -> dict:
    """The record of the process holding the flock on ``fd``'s file; it writes it right after taking the flock,
    so an empty file is read again for a moment."""
    holder = _read_fd(fd)
    for _ in range(20):
        if holder:
            break
        time.sleep(0.05)
        holder = _read_fd(fd)
    return holder


def _acquire(lock_file: Path, path: Path) -> tuple[int, dict]:
    """Open and flock ``lock_file``; returns (fd, the previous record if the file was left behind)."""
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _holder_record(fd)
            os.close(fd)
            raise RunDirLocked(path, lock_file, holder) from None
        if _same_file(fd, lock_file):
            return fd, _read_fd(fd)
        os.close(fd)  # a releasing holder unlinked it between our open and flock: open the new one


def refuse_if_locked(path: str | Path, *, sibling: bool = False) -> None:
    """Raise :class:`RunDirLocked` now if a live process holds ``path``'s lock; create nothing.

    A cheap early check for the jobs, before they import the model libraries and resolve their config: a second
    job on a busy run directory is told so at once. :func:`run_lock` remains the lock that counts (the holder may
    finish, or another job start, between this check and that one)."""
    path = Path(path)
    lock_file = lock_file_for(path, sibling=sibling)
    try:
        fd = os.open(lock_file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no lock file (or no folder): nobody holds it
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirLocked(path, lock_file, _holder_record(fd)) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def run_lock(path: str | Path, *, sibling: bool = False, clean: bool = True,
             log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the exclusive lock on run directory ``path`` for the ``with`` block; yields the lock file.

    ``sibling=True`` for an output folder that is replaced by rename (``jobs/generate_pairs.py --out``): the
    lock file is ``<parent>/.<name>.lock`` and the folder itself is not created. Otherwise ``path`` is created
    and the lock file is ``path/.runlock``. Raises :class:`RunDirLocked` at once if another live process holds
    it. With ``clean`` (default), the temporaries killed writers left in ``path`` are removed once the lock is
    held. ``log`` (default: stderr) gets a line when a stale lock is taken over or leftovers are removed.
    """
    path = Path(path)
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    lock_file = lock_file_for(path, sibling=sibling)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd, previous = _acquire(lock_file, path)
    try:
        if previous:
            say(f"{path}: taking over the stale lock of pid {previous.get('pid', '?')} on host "
                f"{previous.get('host', '?')} (started {previous.get('started', '?')}; it is no longer running)")
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "start_time": time.time(),
                  "command": shlex.join([sys.executable, *sys.argv])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        if clean:
            removed = (clean_stale_temporaries(path.parent, name=path.name) if sibling
                       else clean_stale_temporaries(path))
            if removed:
                say(f"{path}: cleaned up {len(removed)} leftover(s) of interrupted writes: "
                    + ", ".join(str(p.relative_to(path.parent)) for p in removed[:5])
                    + (" …" if len(removed) > 5 else ""))
        yield lock_file
    finally:
        if _same_file(fd, lock_file):
            try:
                lock_file.unlink()  # while still holding the flock; a waiter that opened it retries
            except FileNotFoundError:
                pass
        os.close(fd)
