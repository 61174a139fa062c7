"""Per-step training metrics to TensorBoard (default), MLflow (optional) and a JSON-lines progress file.

A Ray Train ``UserCallback``: Ray calls :meth:`after_report` on its controller after every
``ray.train.report`` of the workers (every ``log_every`` steps, see ``engine.py``), with each worker's
metrics. Rank 0's metrics are written at their ``step``:

* ``tensorboard`` — event files (tensorboardX, the writer Ray Tune's own TensorBoard logger uses) in ``logdir``;
* ``mlflow`` — one MLflow run per training run, metrics at their step, the config as params; the tracking URI
  is ``train.mlflow_uri`` or, by default, a local file store in ``<logdir>/mlruns`` (nothing leaves the
  machine unless the user points it at a server); needs ``pip install mlflow-skinny``;
* ``wandb`` — Weights & Biases in offline mode (``<logdir>/wandb``; ``wandb sync`` uploads it later, if the
  user wants); needs ``pip install wandb``;
* always ``progress.jsonl`` in ``logdir``: one line per report, which the driver tails to print step lines
  (``pipeline/utils/progress.py``), so the console shows training progress while Ray's own output stays in
  its log files.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ray.train import UserCallback

PROGRESS_FILE = "progress.jsonl"
BACKENDS = ("tensorboard", "mlflow", "wandb")


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric scalar entries of a metrics dict (strings and nested values are skipped)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, Mapping) else {key: str(v)[:500]})
    return out


class MetricsTracker(UserCallback):
    """Writes rank 0's reported metrics to the chosen backends (see the module docstring)."""

    def __init__(self, logdir: str | Path, report_to: Sequence[str] = ("tensorboard",), *, run_name: str = "train",
                 mlflow_uri: str = "", params: Mapping[str, Any] | None = None, max_steps: int = 0):
        unknown = sorted(set(report_to) - set(BACKENDS))
        if unknown:
            raise ValueError(f"report_to: unknown backend(s) {unknown}; expected a subset of {list(BACKENDS)}")
        for backend, package, install in (("mlflow", "mlflow", "mlflow-skinny"), ("wandb", "wandb", "wandb")):
            if backend in report_to:
                try:
                    __import__(package)
                except ImportError as err:
                    raise ValueError(f"report_to: {backend!r} needs the {package} package (pip install {install})") from err
        self.logdir, self.report_to, self.run_name = str(logdir), tuple(report_to), run_name
        self.mlflow_uri = mlflow_uri or Path(logdir, "mlruns").resolve().as_uri()
        self.params, self.max_steps = dict(params or {}), max_steps
        self._tb = None
        self._mlflow = self._mlflow_run = None  # the client, and the run it writes to
        self._wandb = None

    def _open(self) -> None:
        Path(self.logdir).mkdir(parents=True, exist_ok=True)
        if "tensorboard" in self.report_to and self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self.logdir, flush_secs=5)
        if "mlflow" in self.report_to and self._mlflow_run is None:
            from mlflow.tracking import MlflowClient

            if self.mlflow_uri.startswith("file:"):  # MLflow 3 keeps the file store in maintenance mode, behind a switch
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self._mlflow = client = MlflowClient(self.mlflow_uri)
            experiment = client.get_experiment_by_name(self.run_name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.run_name)
            self._mlflow_run = client.create_run(experiment_id, run_name=self.run_name).info.run_id
            for k, v in _flat(self.params).items():
                client.log_param(self._mlflow_run, k, v)
        if "wandb" in self.report_to and self._wandb is None:
            import wandb

            self._wandb = wandb.init(project="diffusion-preference", name=self.run_name, dir=self.logdir,
                                     mode="offline", config=self.params)

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
        if self._mlflow_run is not None:
            from mlflow.entities import Metric

            client = self._mlflow
            now = int(time.time() * 1000)
            client.log_batch(self._mlflow_run, metrics=[Metric(f"train/{k}", v, now, step) for k, v in values.items()
                                                        if k != "step" and math.isfinite(v)])
            if self.max_steps and step >= self.max_steps:
                client.set_terminated(self._mlflow_run)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in values.items() if k != "step"}, step=step)
            if self.max_steps and step >= self.max_steps:
                self._wandb.finish()
                self._wandb = None
        with open(Path(self.logdir) / PROGRESS_FILE, "a") as f:
            f.write(json.dumps(values) + "\n")

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics:
            self.log(metrics[0])
