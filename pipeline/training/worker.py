"""The Ray Train (V2) worker: a thin wrapper that feeds :class:`~pipeline.training.engine.TrainEngine`.

Each worker builds the engine (backbone from its local folder, reference, FSDP2 over all workers), takes
the pairs — the driver never loads them — and checks their values. By default every worker reads the whole
table from the Parquet parts itself (pyarrow, the files in the order the driver listed them) and the engine's
sampler picks its rank's share (the data order is the same as in-process and survives restarts); with
``stream_pairs`` each worker streams its own split epoch by epoch from its ``get_dataset_shard`` — Ray Data
reading the parts (:class:`~pipeline.training.engine.PairStream`). It reports
metrics every ``log_every`` steps and a checkpoint every ``checkpoint_every`` steps. A checkpoint holds
the engine's whole state (weights, optimizer, EMA, step, sampler position, RNG states), each rank writing
its own shards (``checkpoint.py``), so a restart — after a worker failure or a relaunch — continues
bit-identically, and a relaunch with another number of workers continues resharded.

A deterministic failure (a non-finite loss, a missing model folder, a bad dataset) is not retried:
rank 0 writes it to the run's ``fatal_error.json`` (in the Ray Train storage, which the driver sees),
every rank returns, and :func:`~pipeline.training.trainer.run_training` raises it on the driver.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa

from ..config import build, to_dict
from ..data.schema import TRAIN_SCHEMA, SchemaError, read_parts, validate_table
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .engine import PairData, PairStream, TrainEngine, TrainingDiverged

FATAL_FILE = "fatal_error.json"  # in <storage>/<name>/: a deterministic error the workers stopped on

#: errors that a retry from the last checkpoint would only repeat
DETERMINISTIC_ERRORS = (TrainingDiverged, SchemaError, FileNotFoundError, NotADirectoryError)


def _read_files(files: list[str]) -> PairData:
    """The whole table, read here: a worker that holds every pair needs no Ray Data pipeline (whose start-up, in
    each worker and on the driver, costs more than reading a few MB)."""
    tables = read_parts(files, columns=TRAIN_SCHEMA.names)
    return PairData.from_table(validate_table(pa.concat_tables(tables), "the training pairs", images=False))


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    try:
        cfg = build(TrainConfig, config["train"], "train")
        engine = TrainEngine(cfg, device=ray.train.torch.get_device(), rank=ctx.get_world_rank(),
                             world=ctx.get_world_size())
        data = (PairStream(ray.train.get_dataset_shard("train"), cfg.batch_size, cfg.seed,
                           shuffle_buffer=cfg.shuffle_buffer, source="the training pairs")
                if cfg.stream_pairs else _read_files(config["files"]))
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                load_checkpoint(engine, d, data)

        def report_checkpoint(metrics: dict) -> None:
            if cfg.async_checkpoint_upload:  # Ray Train uploads in the background and then deletes the folder
                d = tempfile.mkdtemp(prefix="checkpoint-")
                save_checkpoint(engine, d, metrics)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
                return
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(engine, d, metrics)  # every rank writes its own shards (a collective)
                # every rank reports its folder: Ray Train merges them into one checkpoint in storage
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

        engine.run(data, on_log=lambda m: ray.train.report(m), on_checkpoint=report_checkpoint)
    except DETERMINISTIC_ERRORS as err:
        if ctx.get_world_rank() == 0 and config.get("fatal_path"):
            from ..utils.atomic import atomic_write_bytes

            atomic_write_bytes(config["fatal_path"], json.dumps({"error": f"{type(err).__name__}: {err}"}).encode())


def config_dict(cfg: TrainConfig, *, fatal_path: str | Path | None = None, files: list[str] | None = None) -> dict:
    """What every worker gets: the train config, where to report a deterministic error, and (read in memory) the
    pairs' Parquet files."""
    return {"train": to_dict(cfg), "fatal_path": str(fatal_path) if fatal_path else "", "files": list(files or [])}

