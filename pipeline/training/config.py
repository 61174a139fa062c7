"""The training config: one flat dataclass validated at construction (the typed tree of issue 14 builds on it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..objectives import preset
from ..toyworld.reference import REFERENCE_DIR

#: ``sdpo_mu`` value that turns the SDPO safeguard off; any other value must lie in [0, 1).
SAFEGUARD_OFF = -1.0


@dataclass
class TrainConfig:
    model: str = str(REFERENCE_DIR)
    init_weights: str = ""  # denoiser.safetensors of a previous round's policy ("" = the model's own weights)
    reference_weights: str = ""  # the reference's denoiser ("" = the model folder's own weights)
    objective: str = "sipo"
    objective_overrides: dict = field(default_factory=dict)  # e.g. {"beta": 2000}
    sdpo_mu: float = SAFEGUARD_OFF  # the SDPO safeguard's slack μ in [0, 1); -1 = off
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
    log_every: int = 10  # optimizer steps between metric reports (independent of checkpoints)
    checkpoint_every: int = 25
    torch_threads: int = 0  # per worker; 0 = Ray's default (one thread per reserved CPU)
    seed: int = 0

    def __post_init__(self):
        for name, ok, expected in [
            ("lr", self.lr > 0, "> 0"), ("max_steps", self.max_steps >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"), ("grad_accum", self.grad_accum >= 1, ">= 1"),
            ("lr_schedule", self.lr_schedule in ("constant", "cosine"), "'constant' or 'cosine'"),
            ("num_workers", self.num_workers >= 1, ">= 1"), ("torch_threads", self.torch_threads >= 0, ">= 0"),
            ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"), ("log_every", self.log_every >= 1, ">= 1"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"), ("grad_clip", self.grad_clip >= 0, ">= 0 (0 = off)"),
            ("ema_decay", 0.0 <= self.ema_decay < 1.0, "in [0, 1)"),
            ("sdpo_mu", self.sdpo_mu == SAFEGUARD_OFF or 0.0 <= self.sdpo_mu < 1.0,
             f"a slack in [0, 1), or {SAFEGUARD_OFF:g} to turn the safeguard off"),
            ("sdpo_space", self.sdpo_space in ("output", "parameter"), "'output' or 'parameter'"),
            ("lora_rank", self.lora_rank >= 0, ">= 0 (0 = full fine-tuning)"),
            ("reference_weights", not (self.reference_weights and self.lora_rank), "'' with LoRA (adapters off)"),
        ]:
            if not ok:
                raise ValueError(f"train.{name}={getattr(self, name)!r}: expected {expected}")
        self.objective_config()  # validates objective, overrides and safeguard

    @property
    def safeguard_on(self) -> bool:
        return self.sdpo_mu != SAFEGUARD_OFF

    def objective_config(self):
        cfg = preset(self.objective, **self.objective_overrides)
        if self.safeguard_on:
            cfg = cfg.with_safeguard(mu=self.sdpo_mu, space=self.sdpo_space)
        return cfg
