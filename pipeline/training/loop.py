"""The Ray Train (V2) worker loop: FSDP2-sharded denoiser, pairs from a Ray Data shard, any objective.

Each worker loads the backbone from its local folder, takes the frozen reference before sharding (a full
replica, or the same weights with LoRA adapters off), wraps the denoiser's blocks and root with
``torch.distributed.fsdp.fully_shard`` on a 1-D device mesh (gloo on CPU, NCCL on GPU), and trains with
gradient accumulation, warm-up + constant/cosine learning rate, bf16 autocast on GPU, gradient clipping
and optional EMA. Every ``checkpoint_every`` optimizer steps rank 0 writes the full (gathered) state —
denoiser, optimizer, EMA, step, and the metrics of every report so far (``history.json``: Ray Train's
``Result.metrics_dataframe`` holds only the retained checkpoints) — into a Ray Train checkpoint; on
restart the loop resumes from the latest.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..backbones import load_backbone
from ..objectives import preset
from ..objectives.objective import SafeguardConfig
from ..toyworld.reference import REFERENCE_DIR
from .step import PairBatch, preference_step

STATE_FILE = "training_state.pt"
WEIGHTS_FILE = "denoiser.safetensors"
EMA_FILE = "ema.safetensors"  # EMA of the trainable parameters, by name
HISTORY_FILE = "history.json"  # every report's metrics up to this checkpoint (survives resumes)


@dataclass
class TrainConfig:
    model: str = str(REFERENCE_DIR)
    init_weights: str = ""  # denoiser.safetensors of a previous round's policy ("" = the model's own weights)
    reference_weights: str = ""  # the reference's denoiser ("" = the model folder's own weights)
    objective: str = "sipo"
    objective_overrides: dict = field(default_factory=dict)  # e.g. {"beta": 2000}
    sdpo_mu: float = -1.0  # >= 0 enables the SDPO safeguard with this slack
    sdpo_space: str = "output"
    lora_rank: int = 0
    lr: float = 1e-5
    lr_schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    max_steps: int = 100  # optimizer steps
    batch_size: int = 8  # pairs per worker micro-batch
    grad_accum: int = 1
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 = off
    bf16: bool = True  # autocast on GPU (loss math stays fp32)
    num_workers: int = 1
    use_gpu: bool = False
    checkpoint_every: int = 25
    torch_threads: int = 0  # per worker; 0 = Ray's default (one thread per reserved CPU)
    seed: int = 0

    def __post_init__(self):
        for name, ok, expected in [
            ("lr", self.lr > 0, "> 0"), ("max_steps", self.max_steps >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"), ("grad_accum", self.grad_accum >= 1, ">= 1"),
            ("lr_schedule", self.lr_schedule in ("constant", "cosine"), "'constant' or 'cosine'"),
            ("num_workers", self.num_workers >= 1, ">= 1"), ("torch_threads", self.torch_threads >= 0, ">= 0"), ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
            ("ema_decay", 0.0 <= self.ema_decay < 1.0, "in [0, 1)"),
            ("reference_weights", not (self.reference_weights and self.lora_rank), "'' with LoRA (adapters off)"),
        ]:
            if not ok:
                raise ValueError(f"train.{name}={getattr(self, name)!r}: expected {expected}")
        self.objective_config()  # validates objective, overrides and safeguard

    def objective_config(self):
        cfg = preset(self.objective, **self.objective_overrides)
        if self.sdpo_mu >= 0:
            cfg = cfg.with_safeguard(mu=self.sdpo_mu, space=self.sdpo_space)
        return cfg


def _blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 shards one by one (UNet down/mid/up blocks, transformer blocks)."""
    blocks = []
    for name in ("down_blocks", "up_blocks", "transformer_blocks"):
        blocks += list(getattr(module, name, []))
    if getattr(module, "mid_block", None) is not None:
        blocks.append(module.mid_block)
    return blocks


def shard_denoiser(denoiser: torch.nn.Module, device: torch.device) -> None:
    """FSDP2: shard each block, then the root, over all workers (a no-op without a process group or with
    one worker: sharding over one rank saves nothing but adds DTensor parameters, all-gather copies and
    hooks to every step)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in _blocks(denoiser):
        fully_shard(block, mesh=mesh)
    fully_shard(denoiser, mesh=mesh)


def _full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def _load_full_state(model, optimizer, model_sd, optim_sd) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=opts)
    if optim_sd is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)


def _lr_factor(cfg: TrainConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.lr_schedule == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * min(step / cfg.max_steps, 1.0)))
    return warm


def _batches(shard, batch_size: int, seed: int):
    """Endless epochs over this worker's shard of the pairs, as PairBatch objects."""
    epoch = 0
    while True:
        for b in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                    local_shuffle_buffer_size=max(4 * batch_size, 64), local_shuffle_seed=seed + epoch):
            shape = tuple(int(x) for x in b["latent_shape"][0])
            x0_w = torch.from_numpy(np.stack(b["latent_w"]).astype(np.float32).reshape(-1, *shape))
            x0_l = torch.from_numpy(np.stack(b["latent_l"]).astype(np.float32).reshape(-1, *shape))
            yield PairBatch(x0_w, x0_l, [str(p) for p in b["prompt"]], [str(p) for p in b["perturbed_prompt"]])
        epoch += 1


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg.seed + rank)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    device = ray.train.torch.get_device()
    backbone = load_backbone(cfg.model, device=device)
    if not cfg.lora_rank:
        with backbone.reference_module() as ref:  # the frozen reference, taken before sharding
            if cfg.reference_weights:  # a refreshed reference (e.g. last round's policy)
                ref.load_state_dict(load_file(cfg.reference_weights, device=str(device)), strict=True)
    if cfg.lora_rank:
        backbone.enable_lora(rank=cfg.lora_rank)
    if cfg.init_weights:  # a previous round's policy (with LoRA: base + adapter keys, as the trainer saves them)
        backbone.denoiser.load_state_dict(load_file(cfg.init_weights, device=str(device)), strict=True)
    shard_denoiser(backbone.denoiser, device)
    named = [(n, p) for n, p in backbone.denoiser.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ema = {n: p.detach().clone() for n, p in named} if cfg.ema_decay else None

    step = 0
    history: list[dict] = []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
            _load_full_state(backbone.denoiser, optimizer, load_file(str(Path(d) / WEIGHTS_FILE)), state["optimizer"])
            step = int(state["step"])
            if (Path(d) / HISTORY_FILE).exists():
                history = json.loads((Path(d) / HISTORY_FILE).read_text())
            if ema is not None and (Path(d) / EMA_FILE).exists():
                saved = load_file(str(Path(d) / EMA_FILE))
                for n, e in ema.items():
                    _assign(e, saved[n])

    resumed_from_step = step  # 0 on a fresh start, else the checkpoint's step (a restart after a failure, or a resume)
    objective = cfg.objective_config()
    batches = _batches(ray.train.get_dataset_shard("train"), cfg.batch_size, cfg.seed + rank)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank + step)
    use_autocast = cfg.bf16 and device.type == "cuda"
    window: list[dict] = []
    t0, pairs = time.time(), 0
    while step < cfg.max_steps:
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * _lr_factor(cfg, step)
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                out = preference_step(backbone, objective, batch, generator=generator)
            (out.loss / cfg.grad_accum).backward()
            pairs += len(batch.prompts)
            window.append({k: float(v) for k, v in out.metrics.items()})
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for (n, p) in named:
                    ema[n].lerp_(p.detach(), 1.0 - cfg.ema_decay)
        step += 1
        window[-1]["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            metrics = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
            metrics.update(step=step, lr=optimizer.param_groups[0]["lr"], pairs_per_s=pairs * ctx.get_world_size() / (time.time() - t0),
                           resumed_from_step=resumed_from_step)
            history.append(metrics)
            _report(backbone, optimizer, ema, step, metrics, rank, history)
            window, t0, pairs = [], time.time(), 0


def _assign(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into a plain or FSDP2-sharded (DTensor) one."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(target, DTensor):
            target.copy_(distribute_tensor(full.to(target.device), target.device_mesh, target.placements))
        else:
            target.copy_(full.to(target.device))


def _gather(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def _report(backbone, optimizer, ema, step: int, metrics: dict, rank: int, history: list[dict]) -> None:
    """Gather the full state (collectives: every rank calls them), rank 0 writes the checkpoint, all report."""
    import ray.train

    model_sd, optim_sd = _full_state(backbone.denoiser, optimizer)
    ema_full = {n: _gather(e) for n, e in ema.items()} if ema is not None else None
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            save_file({k: v.contiguous() for k, v in model_sd.items()}, os.path.join(d, WEIGHTS_FILE))
            if ema_full is not None:
                save_file({k: v.contiguous() for k, v in ema_full.items()}, os.path.join(d, EMA_FILE))
            torch.save({"optimizer": optim_sd, "step": step}, os.path.join(d, STATE_FILE))
            Path(d, "metrics.json").write_text(json.dumps(metrics))
            Path(d, HISTORY_FILE).write_text(json.dumps(history))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def config_dict(cfg: TrainConfig) -> dict:
    return {"train": asdict(cfg)}
