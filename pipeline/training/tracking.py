"""Per-step training metrics to TensorBoard and to a JSON-lines progress file.

A Ray Train ``UserCallback``: Ray calls :meth:`after_report` on its controller after every
``ray.train.report`` of the workers (every ``log_every`` steps, see ``engine.py``), with each worker's
metrics. Rank 0's metrics are written at their ``step``:

* TensorBoard event files (tensorboardX, the writer Ray Tune's own TensorBoard logger uses) in ``logdir``;
* ``progress.jsonl`` in ``logdir``: one line per report, which the driver tails to print step lines
  (``pipeline/utils/progress.py``), so the console shows training progress while Ray's own output stays in its
  log files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ray.train import UserCallback

PROGRESS_FILE = "progress.jsonl"
BACKENDS = ("tensorboard",)  # MLflow / W&B: not yet (docs/jobs.md)


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite-or-not scalar entries of a metrics dict (strings and nested values are skipped)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MetricsTracker(UserCallback):
    """Writes rank 0's reported metrics to the chosen backends (see the module docstring)."""

    def __init__(self, logdir: str | Path, report_to: Sequence[str] = ("tensorboard",)):
        unknown = sorted(set(report_to) - set(BACKENDS))
        if unknown:
            raise ValueError(f"report_to: unknown backend(s) {unknown}; expected a subset of {list(BACKENDS)}")
        self.logdir, self.report_to = str(logdir), tuple(report_to)
        self._tb = None

    def _open(self) -> None:
        Path(self.logdir).mkdir(parents=True, exist_ok=True)
        if "tensorboard" in self.report_to and self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self.logdir, flush_secs=5)

    def log(self, metrics: dict[str, Any]) -> None:
        values = scalars(metrics)
        if "step" not in values:
            return
        self._open()
        step = int(values["step"])
        if self._tb is not None:
            for k, v in values.items():
                if k != "step":
                    self._tb.add_scalar(f"train/{k}", v, step)
            self._tb.flush()
        with open(Path(self.logdir) / PROGRESS_FILE, "a") as f:
            f.write(json.dumps(values) + "\n")

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics:
            self.log(metrics[0])
