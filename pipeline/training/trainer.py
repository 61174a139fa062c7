"""Run the worker loop under Ray Train's ``TorchTrainer`` (Train V2): scaling, storage, failures, resume.

Relaunching with the same ``storage`` and ``name`` resumes from the latest checkpoint (Ray Train V2
restores the run's state from its storage path); a worker that dies mid-run is restarted from the last
checkpoint up to ``max_failures`` times.
"""

from __future__ import annotations

from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from ..data.schema import read_pairs
from .loop import TrainConfig, config_dict, train_loop_per_worker


def run_training(cfg: TrainConfig, pairs: str | Path, storage: str | Path, name: str, *, max_failures: int = 2):
    """Train on a pairs dataset; returns Ray Train's ``Result`` (``result.checkpoint`` is the last one)."""
    table = read_pairs(pairs)  # validate the schema before any worker starts
    if table.num_rows < cfg.batch_size * cfg.num_workers:
        raise ValueError(f"{pairs}: {table.num_rows} pairs, fewer than one batch per worker "
                         f"({cfg.batch_size} × {cfg.num_workers} workers)")
    dataset = ray.data.from_arrow(table.drop(["png_w", "png_l"]))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config_dict(cfg),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(Path(storage).resolve()),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": dataset},
    )
    return trainer.fit()
