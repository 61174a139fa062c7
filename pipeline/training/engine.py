"""The one training engine: every preference-training run in the project goes through :class:`TrainEngine`.

The Ray Train worker (``worker.py``), the in-process runs of the benchmarks and of the claims report, and the
sweep's trials all build an engine and call :meth:`TrainEngine.train_step` / :meth:`TrainEngine.run`, so a
number measured anywhere is a number about the product's own loop.

One optimizer step = ``grad_accum`` micro-batches of :func:`preference_step` (backward of loss / accum), a
finiteness check of the loss and of the gradient (all ranks agree, then stop with an error naming the step
and the pairs), gradient clipping, AdamW with warm-up + constant/cosine lr, and the weight EMA.

Everything that determines the rest of a run is in :meth:`state_dict`: weights, optimizer, EMA, step, the
data sampler's position, and the RNG states (the noise generator and torch's global RNG), so a run resumed
from a checkpoint is bit-identical to one that never stopped (on the same machine and worker count).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file

from ..backbones import load_backbone
from ..backbones.base import Backbone
from ..data.schema import SchemaError, latents_of, validate_table
from .config import TrainConfig
from .reference import build_reference
from .parallel import any_rank, assign, distributed, gather, shard_denoiser
from .step import PairBatch, preference_step


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: deterministic, so retrying from a checkpoint would only repeat it."""


# ------------------------------------------------------------------------------------------------ data
@dataclass
class PairData:
    """A pairs dataset in memory, rows in ``pair_id`` order (independent of how the files were laid out)."""

    x0_w: torch.Tensor
    x0_l: torch.Tensor
    prompts: list[str]
    perturbed: list[str] | None
    pair_ids: list[str]

    @classmethod
    def from_table(cls, table: pa.Table) -> "PairData":
        table = table.sort_by("pair_id")
        perturbed = [str(p) for p in table.column("perturbed_prompt").to_pylist()]
        return cls(torch.from_numpy(latents_of(table, "latent_w")), torch.from_numpy(latents_of(table, "latent_l")),
                   [str(p) for p in table.column("prompt").to_pylist()], perturbed if all(perturbed) else None,
                   [str(p) for p in table.column("pair_id").to_pylist()])

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, idx: np.ndarray) -> PairBatch:
        return PairBatch(self.x0_w[idx], self.x0_l[idx], [self.prompts[i] for i in idx],
                         [self.perturbed[i] for i in idx] if self.perturbed else None, [self.pair_ids[i] for i in idx])


class PairStream:
    """Pairs streamed from a worker's split of a Ray Data dataset, epoch after epoch: training data larger than
    a worker's memory. Each epoch reads the split once in batches of ``batch_size`` (the last partial batch
    is dropped) through a local shuffle buffer seeded by (seed, epoch); every batch's values are checked as
    it arrives. The state is (epoch, batches taken in it): a resume skips that many batches of the epoch, so
    the step count and the epoch boundaries continue where they stopped, though the order inside the shuffle
    buffer (and, with several workers, which worker reads which block) may differ from a run that never
    stopped. Use :class:`PairData` when exact resume matters and the table fits."""

    def __init__(self, shard, batch_size: int, seed: int, *, shuffle_buffer: int = 0, source: str = "pairs"):
        self.shard, self.batch_size, self.seed = shard, batch_size, seed
        self.shuffle_buffer, self.source = shuffle_buffer, source
        self.epoch, self.offset = 0, 0
        self._it: Iterator | None = None

    def _epoch(self, skip: int) -> Iterator[PairBatch]:
        batches = self.shard.iter_batches(
            batch_size=self.batch_size, batch_format="pyarrow", drop_last=True,
            local_shuffle_buffer_size=max(self.shuffle_buffer, self.batch_size) if self.shuffle_buffer else None,
            local_shuffle_seed=self.seed * 1000 + self.epoch if self.shuffle_buffer else None)
        for i, table in enumerate(batches):
            if i < skip:
                continue
            data = PairData.from_table(validate_table(table, f"{self.source} (epoch {self.epoch}, batch {i})",
                                                      images=False))
            yield data.batch(np.arange(len(data)))

    def next_batch(self) -> PairBatch:
        for _ in range(2):
            if self._it is None:
                self._it = self._epoch(self.offset)
            batch = next(self._it, None)
            if batch is not None:
                self.offset += 1
                return batch
            if self.offset == 0:
                break  # an epoch with no full batch
            self.epoch, self.offset, self._it = self.epoch + 1, 0, None
        raise SchemaError(f"{self.source}: this worker's split holds fewer than one batch of {self.batch_size} pairs")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset, self._it = int(state["epoch"]), int(state["offset"]), None


class PairSampler:
    """Deterministic, resumable epochs: epoch ``e`` is a permutation seeded by ``(seed, e)``; rank ``r`` of ``w``
    takes every ``w``-th index of it, in batches of ``batch_size`` (the last partial batch is dropped), so each
    pair is seen once per epoch by exactly one rank. The state is two integers."""

    def __init__(self, n: int, batch_size: int, seed: int, *, rank: int = 0, world: int = 1):
        self.per_rank = (n // world) // batch_size
        if self.per_rank < 1:
            raise ValueError(f"{n} pairs are fewer than one batch per worker ({batch_size} × {world} workers)")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.offset = 0, 0

    def next_indices(self) -> np.ndarray:
        if self.offset >= self.per_rank:
            self.epoch, self.offset = self.epoch + 1, 0
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)[self.rank::self.world]
        idx = perm[self.offset * self.batch_size:(self.offset + 1) * self.batch_size]
        self.offset += 1
        return idx

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


# ------------------------------------------------------------------------------------------------ engine
class TrainEngine:
    """A policy, its frozen reference, the optimizer, the EMA and the step counter — built from a config."""

    def __init__(self, cfg: TrainConfig, *, device: torch.device | str = "cpu", rank: int = 0, world: int = 1):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.device = torch.device(device)
        torch.manual_seed(cfg.seed + rank)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.backbone: Backbone = load_backbone(cfg.model, device=self.device)
        self.reference = build_reference(self.backbone, weights=cfg.reference_weights, lora=bool(cfg.lora_rank))
        if cfg.lora_rank:
            self.backbone.enable_lora(rank=cfg.lora_rank)
        if cfg.init_weights:  # a previous round's policy (with LoRA: base + adapter keys, as the trainer saves them)
            self.backbone.denoiser.load_state_dict(load_file(cfg.init_weights, device=str(self.device)), strict=True)
        fsdp = dict(mixed_precision=cfg.fsdp_mixed_precision, cpu_offload=cfg.cpu_offload)
        self.parallel = shard_denoiser(self.backbone.denoiser, self.device,
                                       activation_checkpointing=cfg.activation_checkpointing, **fsdp)
        if self.reference is not None:
            shard_denoiser(self.reference, self.device, frozen=True, **fsdp)
        self.named = [(n, p) for n, p in self.backbone.denoiser.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        if cfg.init_optimizer:  # carried over from a previous round: Adam's moments and step count continue
            self._load_optimizer(torch.load(cfg.init_optimizer, map_location="cpu", weights_only=True))
        self.ema = {n: p.detach().clone() for n, p in self.named} if cfg.ema_decay else None
        self.objective = cfg.objective_config()
        self.generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
        self.step = 0
        self.history: list[dict] = []  # one entry per log_every steps (window means), kept across resumes
        self.sampler: PairSampler | None = None
        self._autocast = cfg.bf16 and self.device.type == "cuda"

    # ------------------------------------------------------------------ one step
    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.lr_schedule == "cosine":
            return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * min(step / cfg.max_steps, 1.0)))
        return cfg.lr * warm

    def train_step(self, batches: Sequence[PairBatch], generators: Sequence[torch.Generator] | None = None) -> dict:
        """One optimizer step over ``batches`` (the accumulation micro-batches); returns its metrics.

        ``generators`` (one per micro-batch) replace the engine's own noise generator for this step — how a
        benchmark gives every pair the same timestep and noise whichever worker holds it.
        """
        lr = self.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        metrics: list[dict] = []
        bad_loss = None
        for i, batch in enumerate(batches):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._autocast):
                out = preference_step(self.backbone, self.objective, batch, reference=self.reference,
                                      generator=self.generator if generators is None else generators[i])
            if not torch.isfinite(out.loss.detach()).all() and bad_loss is None:
                bad_loss = (float(out.loss.detach()), list(batch.pair_ids or []))
            (out.loss / len(batches)).backward()
            metrics.append({k: float(v) for k, v in out.metrics.items()})
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if any_rank(bad_loss is not None or not math.isfinite(grad_norm), self.device):
            self.optimizer.zero_grad(set_to_none=True)
            where = f"optimizer step {self.step + 1}"
            if bad_loss is not None:
                raise TrainingDiverged(f"{where}: non-finite loss {bad_loss[0]} on rank {self.rank} (pair ids "
                                       f"{bad_loss[1][:8]}); the weights were not updated and are not published")
            raise TrainingDiverged(f"{where}: non-finite gradient norm ({grad_norm}) — a loss on some rank was "
                                   f"non-finite; the weights were not updated and are not published")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                for n, p in self.named:
                    self.ema[n].lerp_(p.detach(), 1.0 - self.cfg.ema_decay)
        self.step += 1
        mean = {k: float(np.mean([m[k] for m in metrics if k in m])) for k in metrics[-1]}
        return {**mean, "grad_norm": grad_norm, "lr": lr, "step": self.step}

    # ------------------------------------------------------------------ the loop
    def _new_sampler(self, data: PairData) -> PairSampler:
        return PairSampler(len(data), self.cfg.batch_size, self.cfg.seed, rank=self.rank, world=self.world)

    def batches(self, data: PairData | PairStream) -> Iterator[list[PairBatch]]:
        """The micro-batches of each optimizer step, from the engine's resumable sampler (or the stream)."""
        if isinstance(data, PairStream):
            self.sampler = data
            while True:
                yield [data.next_batch() for _ in range(self.cfg.grad_accum)]
        if self.sampler is None:
            self.sampler = self._new_sampler(data)
        while True:
            yield [data.batch(self.sampler.next_indices()) for _ in range(self.cfg.grad_accum)]

    def run(self, data: PairData | PairStream, *, on_log: Callable[[dict], None] | None = None,
            on_checkpoint: Callable[[dict], None] | None = None) -> list[dict]:
        """Train until ``max_steps``; every ``log_every`` steps the window's mean metrics go to ``on_log`` (and
        the history), every ``checkpoint_every`` steps (and at the end) ``on_checkpoint`` gets them too."""
        cfg = self.cfg
        window: list[dict] = []
        t0, pairs = time.time(), 0
        resumed_from = self.step
        feed = self.batches(data)
        while self.step < cfg.max_steps:
            m = self.train_step(next(feed))
            window.append(m)
            pairs += cfg.batch_size * cfg.grad_accum * self.world
            last = self.step == cfg.max_steps
            if self.step % cfg.log_every == 0 or self.step % cfg.checkpoint_every == 0 or last:
                metrics = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
                metrics.update(step=self.step, lr=m["lr"], pairs_per_s=pairs / max(time.time() - t0, 1e-9),
                               resumed_from_step=resumed_from)
                self.history.append(metrics)
                window, t0, pairs = [], time.time(), 0
                if (self.step % cfg.checkpoint_every == 0 or last) and on_checkpoint is not None:
                    on_checkpoint(metrics)
                elif on_log is not None:
                    on_log(metrics)
        return self.history

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The engine's state as it lives on this rank: under FSDP2 the model, optimizer and EMA entries are this
        rank's shards (DTensors), not gathered copies (``checkpoint.py`` writes them with DCP; in one process
        they are the full tensors). The tensors are the live ones, not copies."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model = get_model_state_dict(self.backbone.denoiser)
        optim = get_optimizer_state_dict(self.backbone.denoiser, self.optimizer)
        return {"model": model, "optimizer": optim, "ema": dict(self.ema) if self.ema is not None else None,
                "step": self.step, "history": list(self.history),
                "sampler": self.sampler.state_dict() if self.sampler else None,
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict, data: PairData | PairStream | None = None) -> None:
        """Restore what :meth:`state_dict` returned (sharded like this engine, or full tensors in one process)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(self.backbone.denoiser, state["model"])
        if state.get("optimizer") is not None:
            set_optimizer_state_dict(self.backbone.denoiser, self.optimizer, state["optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            for n, e in self.ema.items():
                if state["ema"][n] is not e:
                    assign(e, state["ema"][n])
        self.step = int(state["step"])
        self.history = list(state.get("history") or [])
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"])
        if state.get("torch_rng") is not None:
            torch.set_rng_state(state["torch_rng"])
        if state.get("sampler") is not None and data is not None:
            self.sampler = data if isinstance(data, PairStream) else self._new_sampler(data)
            self.sampler.load_state_dict(state["sampler"])

    def reseed(self) -> None:
        """Fresh noise and dropout streams for this rank at this step — after resuming onto another number of
        workers, where the saved per-rank streams no longer map onto the ranks."""
        self.generator.manual_seed((self.cfg.seed * 1000 + self.rank) * 1_000_003 + self.step)
        torch.manual_seed(self.cfg.seed + self.rank + 1_000_003 * self.step)

    def _load_optimizer(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.backbone.denoiser, self.optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))

    def policy_weights(self) -> dict[str, torch.Tensor]:
        """The weights to evaluate and ship: the full denoiser with the trainable parameters replaced by their
        EMA when the run keeps one (a collective under FSDP2)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(self.backbone.denoiser,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.ema is not None:
            weights.update({n: gather(e) for n, e in self.ema.items()})
        return weights

    def apply_policy_weights(self) -> Backbone:
        """Load :meth:`policy_weights` into the backbone (single process) and return it, ready to evaluate."""
        if distributed():
            raise RuntimeError("apply_policy_weights is for single-process runs; export the checkpoint instead")
        self.backbone.denoiser.load_state_dict(self.policy_weights(), strict=True)
        return self.backbone


def train_in_process(cfg: TrainConfig, data: PairData, *, device: str = "cpu", init: dict | None = None,
                     on_log: Callable[[dict], None] | None = None) -> TrainEngine:
    """The engine without Ray (benchmarks, claims, tests): same steps, same data order as one Ray Train worker."""
    engine = TrainEngine(cfg, device=device)
    if init is not None:
        engine.backbone.denoiser.load_state_dict(init, strict=True)
    engine.run(data, on_log=on_log)
    return engine
