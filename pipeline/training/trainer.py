"""Run the worker loop under Ray Train's ``TorchTrainer`` (Train V2): scaling, storage, failures, resume.

Relaunching with the same ``storage`` and ``name`` resumes from the latest checkpoint (Ray Train V2
restores the run's state from its storage path); a worker that dies mid-run is restarted from the last
checkpoint up to ``max_failures`` times. A deterministic failure inside the workers (see ``worker.py``)
is raised here at once, without retries.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import ray
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from ..config import to_dict
from ..data.schema import TRAIN_SCHEMA, SchemaError, scan_pairs
from ..utils.placement import train_worker_resources
from ..utils.progress import tail_training
from .config import TrainConfig
from .engine import TrainingDiverged
from .tracking import MetricsTracker
from .worker import FATAL_FILE, config_dict, train_loop_per_worker


class TrainingFailed(RuntimeError):
    """The workers stopped on a deterministic error (the message is theirs)."""


def _read_pairs_dataset(files: list[str]) -> ray.data.Dataset:
    """The training columns of the Parquet parts as a lazily read Ray dataset. Reading is I/O and Arrow decoding,
    run beside the training workers that hold the CPUs: the read tasks reserve no CPU (on a machine whose every
    CPU is a worker's, a read task reserving one would never be scheduled). Ray Data's file-based reader
    (``use_datasource_v2``) plans a file-listing task that reserves a CPU whatever the read arguments say, so
    this read plans with the reader that lists files on the driver (file names only)."""
    ctx = ray.data.DataContext.get_current()
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(files, num_cpus=0).select_columns(TRAIN_SCHEMA.names)
    finally:
        ctx.use_datasource_v2 = v2


def run_training(cfg: TrainConfig, pairs: str | Path | Sequence[str | Path], storage: str | Path, name: str, *,
                 max_failures: int = 2, logdir: str | Path | None = None, progress: bool = True,
                 keep_checkpoints: int | None = 2):
    """Train on a pairs dataset (or several, concatenated: replayed rounds); returns Ray Train's ``Result``
    (``result.checkpoint`` is the last one).

    Every ``log_every`` steps the metrics go to TensorBoard event files and ``progress.jsonl`` in ``logdir``
    (default ``<storage>/<name>/tensorboard``); with ``progress`` this process prints them as step lines
    (``pipeline/utils/progress.py``: ``tail_training``). ``keep_checkpoints``: how many to keep (None = all,
    for checkpoint selection)."""
    sources = [pairs] if isinstance(pairs, (str, Path)) else list(pairs)
    # the driver checks checksums, schema and size from the files' metadata and never loads the table: the
    # workers read the Parquet parts themselves (and check the values they read)
    infos = [scan_pairs(p, values=False) for p in sources]
    pairs = ", ".join(str(p) for p in sources)
    if len({i.latent_shape for i in infos if i.latent_shape}) > 1:
        raise SchemaError(f"{pairs}: the datasets' latent shapes differ "
                          f"({', '.join(f'{p}: {i.latent_shape}' for p, i in zip(sources, infos))})")
    rows = sum(i.num_rows for i in infos)
    if rows < cfg.batch_size * cfg.num_workers:
        raise ValueError(f"{pairs}: {rows} pairs, fewer than one batch per worker "
                         f"({cfg.batch_size} × {cfg.num_workers} workers)")
    files = [str(Path(f).resolve()) for i in infos for f in i.files]
    data = {}
    if cfg.stream_pairs:  # each worker streams its split through Ray Data; in memory every worker reads the files
        ingest = DataConfig.default_ingest_options()
        ingest.preserve_order = True  # a stream re-reads the files in the same order every epoch and after a restart
        # read ahead only this far: the object store holds a window, not the dataset
        ingest.resource_limits = ingest.resource_limits.copy(object_store_memory=cfg.stream_buffer_mb << 20)
        data = dict(datasets={"train": _read_pairs_dataset(files)},
                    dataset_config=DataConfig(datasets_to_split="all", execution_options=ingest))
    fatal_path = (Path(storage) / name / FATAL_FILE).resolve()
    fatal_path.unlink(missing_ok=True)  # a previous attempt's; this one starts clean
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config_dict(cfg, fatal_path=fatal_path, files=[] if cfg.stream_pairs else files),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,  # placement: docs/jobs.md
                                     resources_per_worker=train_worker_resources(cfg),
                                     label_selector=cfg.worker_labels or None),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(Path(storage).resolve()),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
                             callbacks=[MetricsTracker(Path(logdir or Path(storage) / name / "tensorboard").resolve(),
                                                       cfg.report_to, run_name=name, mlflow_uri=cfg.mlflow_uri,
                                                       params=to_dict(cfg), max_steps=cfg.max_steps)]),
        # in memory, every worker reads every pair and the engine's sampler gives each rank its share
        # deterministically; streamed, each worker reads its own split of the files
        **data,
    )
    tail = nullcontext() if not progress else tail_training(
        Path(logdir or Path(storage) / name / "tensorboard").resolve(), cfg.max_steps, label=name,
        pairs_per_step=cfg.batch_size * cfg.grad_accum * cfg.num_workers)
    with tail:
        result = trainer.fit()
    fatal = json.loads(fatal_path.read_text())["error"] if fatal_path.exists() else None
    if fatal:
        cls = TrainingDiverged if fatal.startswith(TrainingDiverged.__name__) else TrainingFailed
        raise cls(f"training stopped ({Path(storage) / name}): {fatal}")
    return result
