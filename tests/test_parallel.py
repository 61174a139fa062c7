"""FSDP2 options of the training engine (``pipeline/training/parallel.py``): activation checkpointing changes
neither the loss nor the gradients, CPU offload trains, and the config fields validate.

The two-worker test shards the tiny toy UNet over two gloo processes through ``TrainEngine`` (the product's own
sharding of the policy and the reference) and compares, on one fixed micro-batch per rank, the loss and the full
gradients of two engines: plain FSDP2, and FSDP2 with activation checkpointing and CPU offload; then the second
takes a whole engine step.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

OBJECTIVE = {"name": "diffusion-dpo", "safeguard": {"mu": 0.5}}
WORLD = 2


def _config(model_dir, **kw):
    from pipeline.training import TrainConfig

    return TrainConfig(**{"model": str(model_dir), "objective": OBJECTIVE, "lr": 1e-3, "max_steps": 1, "batch_size": 2,
                          **kw})


def _batch(rank: int):
    from pipeline.training import PairBatch

    gen = torch.Generator().manual_seed(10 + rank)
    return PairBatch(torch.randn(2, 3, 32, 32, generator=gen), torch.randn(2, 3, 32, 32, generator=gen),
                     ["two red circles on the left", "one blue square at the top"])


def _loss_and_grads(engine, rank: int) -> tuple[float, dict[str, torch.Tensor]]:
    """One micro-batch through the product's step and backward; full (gathered) gradients by name."""
    from pipeline.training import preference_step
    from pipeline.training.parallel import gather

    out = preference_step(engine.backbone, engine.objective, _batch(rank), reference=engine.reference,
                          generator=torch.Generator().manual_seed(3 + rank))
    out.loss.backward()
    grads = {n: gather(p.grad) for n, p in engine.named}
    engine.optimizer.zero_grad(set_to_none=True)
    return float(out.loss.detach()), grads


def _max_rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) / max(float(a[k].abs().max()), 1e-12) for k in a)


def test_fsdp_config_fields_validate(tiny_toy_model_dir):
    from pipeline.config import build
    from pipeline.training import TrainConfig

    for name in ("fsdp_mixed_precision", "activation_checkpointing", "cpu_offload"):
        with pytest.raises(ValueError, match=f"^{name}='yes': expected true or false"):
            _config(tiny_toy_model_dir, **{name: "yes"})
    cfg = build(TrainConfig, {"activation_checkpointing": "true", "cpu_offload": "false"})
    assert cfg.activation_checkpointing is True and cfg.cpu_offload is False and cfg.fsdp_mixed_precision is True


def test_activation_checkpointing_single_process_and_offload_needs_a_group(tiny_toy_model_dir):
    """Without a process group: checkpointing still applies (same loss and gradients), mixed precision on CPU
    is ignored and says so, CPU offload is refused (it needs FSDP2)."""
    from pipeline.training import TrainEngine

    torch.set_num_threads(1)
    plain = TrainEngine(_config(tiny_toy_model_dir))
    ckpt = TrainEngine(_config(tiny_toy_model_dir, activation_checkpointing=True))
    assert "activation checkpointing" in ckpt.parallel and "mixed precision ignored on CPU" in plain.parallel
    loss_p, grads_p = _loss_and_grads(plain, 0)
    loss_c, grads_c = _loss_and_grads(ckpt, 0)
    assert loss_c == pytest.approx(loss_p, rel=1e-6)
    assert _max_rel(grads_p, grads_c) < 1e-5
    assert all(not p.dtype.is_floating_point or p.dtype == torch.float32 for p in plain.reference.parameters())
    with pytest.raises(RuntimeError, match="cpu_offload=True needs FSDP2"):
        TrainEngine(_config(tiny_toy_model_dir, cpu_offload=True))
    # the exact parameter-space λ on a checkpointed denoiser (the split method: forward AD, the default's, cannot
    # run through blocks that recompute) gives the same loss and gradients as the JVP on a plain one
    exact = {"name": "diffusion-dpo", "safeguard": {"mu": 0.5, "space": "parameter"}}
    loss_p, grads_p = _loss_and_grads(TrainEngine(_config(tiny_toy_model_dir, objective=exact)), 0)
    loss_c, grads_c = _loss_and_grads(TrainEngine(_config(tiny_toy_model_dir, objective=exact,
                                                          activation_checkpointing=True)), 0)
    assert loss_c == pytest.approx(loss_p, rel=1e-6)
    assert _max_rel(grads_p, grads_c) < 1e-5


def _worker(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from pipeline.training import TrainEngine

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        res: dict = {}
        for name, kw in [("plain", {}), ("offload", {"activation_checkpointing": True, "cpu_offload": True})]:
            engine = TrainEngine(_config(model_dir, **kw), rank=rank, world=WORLD)
            assert all(isinstance(p, DTensor) for _, p in engine.named), "the policy is not sharded"
            assert all(isinstance(p, DTensor) for p in engine.reference.parameters()), "the reference is not sharded"
            res[f"{name}_parallel"] = engine.parallel
            res[f"{name}_loss"], res[f"{name}_grads"] = _loss_and_grads(engine, rank)
            if name == "offload":  # a whole engine step: clipping, AdamW on the host shards, EMA
                before = {n: p.detach().to_local().clone() for n, p in engine.named}
                m = engine.train_step([_batch(rank)])
                res["offload_step_loss"] = m["loss"]
                res["offload_moved"] = max(float((p.detach().to_local() - before[n]).abs().max()) for n, p in engine.named)
                res["offload_devices"] = sorted({str(p.to_local().device) for _, p in engine.named})
            del engine
        if rank == 0:
            torch.save(res, Path(out_dir) / "rank0.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two spawned processes: ≈30 s of work, more on a busy machine
@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="needs torch.distributed with gloo")
def test_two_workers_checkpointing_and_offload_match_plain_fsdp2(tmp_path, tiny_toy_model_dir):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(_free_port(), str(tiny_toy_model_dir), str(tmp_path)), nprocs=WORLD, join=True)
    res = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert res["plain_parallel"].startswith("FSDP2 over 2 rank(s)")
    assert "activation checkpointing" in res["offload_parallel"] and "CPU offload" in res["offload_parallel"]
    assert res["offload_loss"] == pytest.approx(res["plain_loss"], rel=1e-6)
    assert _max_rel(res["plain_grads"], res["offload_grads"]) < 1e-5
    assert torch.isfinite(torch.tensor(res["offload_step_loss"])) and res["offload_moved"] > 0
    assert res["offload_devices"] == ["cpu"]
