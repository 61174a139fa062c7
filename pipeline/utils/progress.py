"""The jobs' own progress lines: one line per update, readable in a terminal, a pipe or a CI log.

* :class:`Stage` — ``[    42s] round 0 · generate · 512/672 rollouts · 14.2/s · ETA 11s``: at most every
  ``every`` seconds while it runs, and once at the end.
* :func:`bar` — ``tqdm`` on a terminal, :class:`Stage` lines elsewhere.
* :func:`watch_data_operator` — feeds a :class:`Stage` the rows one Ray Data operator has output so far.
* :func:`tail_training` — a background thread, around ``TorchTrainer.fit()``, that tails ``progress.jsonl``
  (rank 0's metrics every ``log_every`` steps, written on the Ray Train controller by
  :class:`~pipeline.training.tracking.MetricsTracker`) and prints
  ``[   130s] train · step 40/150 · loss 0.652 · acc 0.61 · 9.8 pairs/s · ETA 1m12s``.

Lines start with the seconds since :func:`reset_clock` (called by :func:`~pipeline.utils.driver.start_ray`,
so they line up with the jobs' :class:`~pipeline.utils.driver.ElapsedLog` lines) and are printed with
``flush=True``; off a terminal nothing here redraws a line (no carriage returns), so a log file holds exactly
what a user saw.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")

_T0 = time.time()


def reset_clock(t0: float | None = None) -> None:
    """Make the lines' elapsed seconds count from ``t0`` (default: now)."""
    global _T0
    _T0 = time.time() if t0 is None else t0


def elapsed() -> float:
    return time.time() - _T0


def emit(msg: str) -> None:
    """Print ``[    42s] msg`` (the format of :class:`~pipeline.utils.driver.ElapsedLog`)."""
    print(f"[{elapsed():6.0f}s] {msg}", flush=True)


def duration(seconds: float) -> str:
    """``11s``, ``1m12s``, ``2h05m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Stage:
    """Progress of one stage with a known total: ``update(n)`` / ``set(done)``, then ``close(note)``.

    A line at most every ``every`` seconds (the first after ``every`` seconds too, so a fast stage prints only
    its final line) and exactly one final line; usable as a context manager (closes on exit, without the
    final line when the block raised)."""

    def __init__(self, name: str, total: int, unit: str, *, every: float = 10.0,
                 printer: Callable[[str], None] = emit):
        self.name, self.total, self.unit, self.every, self.printer = name, int(total), unit, every, printer
        self.done, self.t0 = 0, time.time()
        self._last = self.t0
        self._closed = self._started = False
        self._lock = threading.Lock()

    def _line(self, now: float, final: bool, note: str = "") -> str:
        secs = now - self.t0
        rate = self.done / secs if secs > 0 else 0.0
        speed = f"{rate:.1f}/s" if self.done or final else "starting"
        parts = [self.name, f"{self.done}/{self.total} {self.unit}", speed]
        if final:
            parts.append(f"done in {duration(secs)}")
        elif rate > 0 and self.total > self.done:
            parts.append(f"ETA {duration((self.total - self.done) / rate)}")
        if note:
            parts.append(note)
        return " · ".join(parts)

    def set(self, done: int) -> None:
        with self._lock:
            if self._closed:
                return
            self.done = int(done)
            now = time.time()
            if now - self._last >= self.every and self.done < self.total and (self.done or not self._started):
                self._last, self._started = now, True  # "starting" (nothing done yet) is said once
                self.printer(self._line(now, final=False))

    def update(self, n: int = 1) -> None:
        self.set(self.done + n)

    def close(self, note: str = "", *, done: int | None = None) -> None:
        """The final line (once); ``done`` overrides the count (e.g. the stage's real output)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if done is not None:
                self.done = int(done)
            self.printer(self._line(time.time(), final=True, note=note))

    def __enter__(self) -> "Stage":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True


def bar(iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it", every: float = 10.0,
        disable: bool = False) -> Iterable[T]:
    """``tqdm`` on a terminal; on a pipe or in a CI log, :class:`Stage` lines instead (one line per update, at
    most every ``every`` seconds, no carriage returns)."""
    if disable:
        return iterable
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit)
    return _stage_iter(iterable, Stage(desc, len(iterable) if total is None else total, unit, every=every))


def _stage_iter(iterable: Iterable[T], stage: Stage) -> Iterator[T]:
    with stage:
        for item in iterable:
            yield item
            stage.update()


# -- Ray Data: rows out of one operator ------------------------------------------------------------
try:  # an internal Ray Data interface; without it the stages print only their start and final lines
    from ray.data._internal.execution.execution_callback import ExecutionCallback as _ExecutionCallback
except ImportError:  # pragma: no cover - another Ray version
    _ExecutionCallback = None

_WATCHED: list[tuple[str, Stage, int]] = []  # (operator-name substring, stage, items per row) of the executions running


if _ExecutionCallback is not None:
    class RayDataProgress(_ExecutionCallback):
        """Ray Data calls this at every step of a streaming execution (on the driver): the rows the watched
        operators' tasks have output so far go to their :class:`Stage`. A module-level class (Ray Data
        copies its DataContext, callback classes included, to the workers, where nothing is watched)."""

        def on_execution_step(self, executor) -> None:
            if not _WATCHED:
                return
            try:
                ops = list(getattr(executor, "_topology", None) or {})
                for substring, stage, per_row in list(_WATCHED):
                    stage.set(per_row * sum(int(op.metrics.rows_task_outputs_generated or 0)
                                            for op in ops if substring in op.name))
            except Exception:  # progress never breaks the pipeline it watches
                pass


@contextlib.contextmanager
def watch_data_operator(substring: str, stage: Stage, per_row: int = 1) -> Iterator[None]:
    """While the block runs, Ray Data executions started in it report the rows output by their operators whose
    name contains ``substring`` (e.g. ``"GenerateImages"``) to ``stage``, each counted ``per_row`` times (a row of
    K rollouts). Datasets capture the current DataContext when they are created: create them inside the block."""
    if _ExecutionCallback is None:
        yield
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = ctx.custom_execution_callback_classes
    ctx.custom_execution_callback_classes = [*before, RayDataProgress]
    _WATCHED.append((substring, stage, per_row))
    try:
        yield
    finally:
        _WATCHED.remove((substring, stage, per_row))
        ctx.custom_execution_callback_classes = before


def training_line(label: str, row: dict, max_steps: int, steps_per_s: float | None) -> str:
    step = int(row["step"])
    parts = [label, f"step {step}/{max_steps}"] if label else [f"step {step}/{max_steps}"]
    if "loss" in row:
        parts.append(f"loss {row['loss']:.3f}")
    if "implicit_acc" in row:
        parts.append(f"acc {row['implicit_acc']:.2f}")
    if "pairs_per_s" in row:
        parts.append(f"{row['pairs_per_s']:.1f} pairs/s")
    if steps_per_s and step < max_steps:
        parts.append(f"ETA {duration((max_steps - step) / steps_per_s)}")
    return " · ".join(parts)


class _Tail(threading.Thread):
    def __init__(self, path: Path, max_steps: int, label: str, pairs_per_step: int | None, poll: float,
                 printer: Callable[[str], None]):
        super().__init__(name="tail-training", daemon=True)
        self.path, self.max_steps, self.label, self.pairs_per_step = path, max_steps, label, pairs_per_step
        self.poll, self.printer = poll, printer
        self.stop = threading.Event()
        self.offset = path.stat().st_size if path.is_file() else 0  # a resumed run: only the new lines
        self.first: tuple[float, int] | None = None  # (time, step) of the first line seen
        self.last_step = 0
        self.t0 = time.time()

    def _read(self) -> None:
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        if size < self.offset:  # replaced: start over
            self.offset = 0
        if size == self.offset:
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        end = chunk.rfind(b"\n") + 1  # complete lines only; a partial one is read next time
        self.offset += end
        for raw in chunk[:end].splitlines():
            try:
                row = json.loads(raw)
            except ValueError:
                continue
            if "step" in row:
                self._print(row)

    def _print(self, row: dict) -> None:
        now, step = time.time(), int(row["step"])
        if step <= self.last_step:  # a report at a step already shown (a checkpoint at a logging step)
            return
        self.last_step = step
        rate = None
        if self.first is None:
            self.first = (now, step)
            if self.pairs_per_step and row.get("pairs_per_s"):
                rate = row["pairs_per_s"] / self.pairs_per_step
        elif step > self.first[1] and now > self.first[0]:
            rate = (step - self.first[1]) / (now - self.first[0])  # wall clock: checkpoints and reports included
        self.printer(training_line(self.label, row, self.max_steps, rate))

    def run(self) -> None:
        while not self.stop.wait(self.poll):
            self._read()
        self._read()  # what the controller wrote before fit() returned


@contextlib.contextmanager
def tail_training(logdir: str | Path, max_steps: int, *, label: str = "train", pairs_per_step: int | None = None,
                  poll: float = 0.5, printer: Callable[[str], None] = emit) -> Iterator[None]:
    """Print rank 0's step lines from ``<logdir>/progress.jsonl`` while the block runs (around ``fit()``).

    Only lines appended after entry are shown (a resumed run does not repeat its earlier steps); at exit the
    file is read to its end and, when the block succeeded, a final ``<label> · done · step 150/150 in 5m38s``
    line follows. ``pairs_per_step`` (batch × grad_accum × workers) gives the first line an ETA from the window's rate;
    later ETAs come from the wall clock between step lines."""
    from ..training.tracking import PROGRESS_FILE

    tail = _Tail(Path(logdir) / PROGRESS_FILE, max_steps, label, pairs_per_step, poll, printer)
    tail.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        tail.stop.set()
        tail.join(timeout=10)
        if ok:
            state = "stopped" if 0 < tail.last_step < max_steps else "done"  # stopped: a worker's fatal error
            step = f"step {tail.last_step}/{max_steps} " if tail.last_step else ""
            printer(" · ".join([*([label] if label else []), state, f"{step}in {duration(time.time() - tail.t0)}"]))
