"""The Ray Train (V2) worker: a thin wrapper that feeds :class:`~pipeline.training.engine.TrainEngine`.

Each worker builds the engine (backbone from its local folder, reference, FSDP2 over all workers), takes
the pairs from its ``get_dataset_shard`` (every worker sees the whole dataset and the engine's sampler
picks its rank's share, so the data order is the same as in-process and survives restarts), and reports
metrics every ``log_every`` steps and a checkpoint every ``checkpoint_every`` steps. A checkpoint holds
the engine's whole state (weights, optimizer, EMA, step, sampler position, RNG states; rank 0 writes the
gathered copy), so a restart — after a worker failure or a relaunch — continues bit-identically.

A deterministic failure (a non-finite loss, a missing model folder, a bad dataset) is not retried:
rank 0 writes it to the run's ``fatal_error.json`` (in the Ray Train storage, which the driver sees),
every rank returns, and :func:`~pipeline.training.trainer.run_training` raises it on the driver.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from ..config import build, to_dict
from ..data.schema import SchemaError
from .config import TrainConfig
from .engine import PairData, TrainEngine, TrainingDiverged

STATE_FILE = "training_state.pt"
WEIGHTS_FILE = "denoiser.safetensors"
EMA_FILE = "ema.safetensors"  # EMA of the trainable parameters, by name
HISTORY_FILE = "history.json"  # every logged window's metrics up to this checkpoint (survives resumes)
FATAL_FILE = "fatal_error.json"  # in <storage>/<name>/: a deterministic error the workers stopped on

#: errors that a retry from the last checkpoint would only repeat
DETERMINISTIC_ERRORS = (TrainingDiverged, SchemaError, FileNotFoundError, NotADirectoryError)


def _read_shard(shard) -> PairData:
    tables = [b for b in shard.iter_batches(batch_size=4096, batch_format="pyarrow")]
    return PairData.from_table(pa.concat_tables(tables))


def save_checkpoint(engine: TrainEngine, folder: str | Path, metrics: dict) -> None:
    """Write the engine's state into ``folder`` (call :meth:`TrainEngine.state_dict` on every rank first)."""
    folder = Path(folder)
    state = engine.state_dict()
    if engine.rank != 0:
        return
    save_file({k: v.contiguous() for k, v in state.pop("model").items()}, str(folder / WEIGHTS_FILE))
    ema = state.pop("ema")
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.items()}, str(folder / EMA_FILE))
    (folder / HISTORY_FILE).write_text(json.dumps(state.pop("history")))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    torch.save(state, folder / STATE_FILE)


def load_checkpoint(engine: TrainEngine, folder: str | Path, data: PairData) -> None:
    folder = Path(folder)
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    state["model"] = load_file(str(folder / WEIGHTS_FILE))
    state["ema"] = load_file(str(folder / EMA_FILE)) if (folder / EMA_FILE).exists() else None
    state["history"] = json.loads((folder / HISTORY_FILE).read_text()) if (folder / HISTORY_FILE).exists() else []
    engine.load_state_dict(state, data)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    try:
        cfg = build(TrainConfig, config["train"], "train")
        engine = TrainEngine(cfg, device=ray.train.torch.get_device(), rank=ctx.get_world_rank(),
                             world=ctx.get_world_size())
        data = _read_shard(ray.train.get_dataset_shard("train"))
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                load_checkpoint(engine, d, data)

        def report_checkpoint(metrics: dict) -> None:
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(engine, d, metrics)  # collectives: every rank calls it
                checkpoint = ray.train.Checkpoint.from_directory(d) if engine.rank == 0 else None
                ray.train.report(metrics, checkpoint=checkpoint)

        engine.run(data, on_log=lambda m: ray.train.report(m), on_checkpoint=report_checkpoint)
    except DETERMINISTIC_ERRORS as err:
        if ctx.get_world_rank() == 0 and config.get("fatal_path"):
            from ..utils.atomic import atomic_write_bytes

            atomic_write_bytes(config["fatal_path"], json.dumps({"error": f"{type(err).__name__}: {err}"}).encode())


def config_dict(cfg: TrainConfig, *, fatal_path: str | Path | None = None) -> dict:
    return {"train": to_dict(cfg), "fatal_path": str(fatal_path) if fatal_path else ""}

