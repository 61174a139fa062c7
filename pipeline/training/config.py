"""The training section of the config tree: ``train`` → ``objective`` → ``safeguard``.

β and μ are two leaves of one tree — ``train.objective.beta``, ``train.objective.safeguard.mu`` — and
:meth:`ObjectiveSpec.build` turns the section into the pure-maths :class:`~pipeline.objectives.ObjectiveConfig`
(``pipeline/objectives`` knows nothing of config files). Leaves left ``None`` keep the named method's preset
for the backbone family (``pipeline/objectives/objective.py``: ``PRESETS``, ``FAMILY_OVERRIDES``).
Checks raise ``ValueError("field=value: expected …")``; :func:`pipeline.config.build` adds the dotted path.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from ..config import absolute_paths, sections
from ..objectives import preset
from ..objectives.objective import PRESETS
from ..toyworld.reference import REFERENCE_DIR
from ..utils.placement import check_placement


@dataclass(frozen=True)
class SafeguardSpec:
    """Diffusion-SDPO's safeguard: slack ``mu`` in [0, 1), λ in output or exact parameter space, per micro-batch
    (the authors' code) or per sample."""

    mu: float = 0.9
    space: Literal["output", "parameter"] = "output"
    scope: Literal["batch", "sample"] = "batch"

    def __post_init__(self):
        if not 0.0 <= self.mu < 1.0:
            raise ValueError(f"mu={self.mu!r}: expected a slack in [0, 1) (turn the safeguard off with safeguard=null)")
        if self.space == "parameter" and self.scope != "batch":
            raise ValueError("scope='sample' with space='parameter': the exact λ is one per micro-batch, use scope='batch'")


@dataclass(frozen=True)
class ObjectiveSpec:
    """A named method (``name``: one of ``PRESETS``) for a backbone ``family``; every other leaf overrides the
    preset when set (this library's β convention, docs/objectives.md)."""

    name: str = "sipo"
    family: Literal["sd15", "sdxl", "sd3", "sana"] = "sd15"
    beta: float | None = None
    epsilon: float | None = None  # SIPO / DPO-C&M clip range of importance weights
    tau: float | None = None  # DPO-C&M mask threshold
    dmpo_alpha: float | None = None
    pair_reduce: Literal["min", "mean", "winner"] | None = None
    detach_weights: bool | None = None
    beta_timestep_factor: Literal["none", "T"] | None = None
    dspo_form: Literal["sd15", "sdxl"] | None = None
    timestep_weighting: Literal["none", "linear"] | None = None
    residual_space: Literal["model", "x0"] | None = None
    anchor: float | None = None  # weight of the squared distance to the reference's outputs (0 = off)
    sft: float | None = None  # weight of the winner's own denoising loss (RPO's NLL term; 0 = off)
    t_min: float | None = None  # train only at noise levels t ≥ t_min·T (0 = every step)
    safeguard: SafeguardSpec | None = None  # None: off

    def __post_init__(self):
        sections(self, safeguard=SafeguardSpec)
        if self.name not in PRESETS:
            raise ValueError(f"name={self.name!r}: expected one of {sorted(PRESETS)}")
        try:
            self.build()
        except ValueError as err:  # the objective's own checks, e.g. "objective.beta=-1: expected …"
            raise ValueError(str(err).removeprefix("objective.")) from err

    def build(self):
        """The :class:`~pipeline.objectives.ObjectiveConfig` this section describes."""
        overrides = {f.name: getattr(self, f.name) for f in fields(self)
                     if f.name not in ("name", "family", "safeguard") and getattr(self, f.name) is not None}
        cfg = preset(self.name, family=self.family, **overrides)
        if self.safeguard is not None:
            sg = self.safeguard
            cfg = cfg.with_safeguard(mu=sg.mu, space=sg.space, scope=sg.scope)
        return cfg


@dataclass(frozen=True)
class TrainConfig:
    model: str = str(REFERENCE_DIR)
    init_weights: str = ""  # denoiser.safetensors of a previous round's policy ("" = the model's own weights)
    reference_weights: str = ""  # the reference's denoiser ("" = the model folder's own weights)
    init_optimizer: str = ""  # a previous run's optimizer state (torch file, full state dict; "" = a fresh AdamW)
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    lora_rank: int = 0
    lr: float = 1e-5
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    max_steps: int = 100  # optimizer steps
    batch_size: int = 8  # pairs per worker micro-batch
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0 = off
    ema_decay: float = 0.0  # 0 = off
    bf16: bool = True  # autocast on GPU (loss math stays fp32)
    # FSDP2 options (pipeline/training/parallel.py, docs/scale.md): bf16 parameters with fp32 gradient reduction and
    # a bf16 reference on GPU (ignored on CPU, like bf16); recompute the repeated blocks' activations in backward;
    # keep shards, gradients and AdamW state in host memory (needs a process group; CPU devices only for now)
    fsdp_mixed_precision: bool = True
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    num_workers: int = 1
    use_gpu: bool = False
    # placement of the Ray Train workers on a cluster: custom resources each reserves (on top of its CPU or GPU)
    # and node labels it selects (pipeline/utils/placement.py); empty = any node with room
    worker_resources: dict[str, float] = field(default_factory=dict)
    worker_labels: dict[str, str] = field(default_factory=dict)
    log_every: int = 10  # optimizer steps between metric reports (independent of checkpoints)
    report_to: tuple[Literal["tensorboard", "mlflow", "wandb"], ...] = ("tensorboard",)  # where the metrics go
    mlflow_uri: str = ""  # MLflow tracking URI ("" = a local file store in the run's tensorboard/mlruns)
    checkpoint_every: int = 25
    # copy each checkpoint's shards to storage in the background (Ray Train's asynchronous upload) while training
    # goes on, instead of waiting for the copy at every checkpoint; the shards are written locally first
    async_checkpoint_upload: bool = False
    # False: every worker holds the whole pairs table (exact resume, the same order as in-process); True: each
    # worker streams its split of the Parquet files epoch by epoch (tables larger than a worker's memory)
    stream_pairs: bool = False
    shuffle_buffer: int = 1024  # pairs in the local shuffle buffer when streaming (0 = file order)
    stream_buffer_mb: int = 256  # object store a streamed read may fill ahead of the workers (Ray Data's budget)
    torch_threads: int = 0  # per worker; 0 = Ray's default (one thread per reserved CPU)
    seed: int = 0

    def __post_init__(self):
        sections(self, objective=ObjectiveSpec)
        absolute_paths(self, "model", "init_weights", "reference_weights", "init_optimizer")
        for name, ok, expected in [
            ("lr", self.lr > 0, "> 0"), ("max_steps", self.max_steps >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"), ("grad_accum", self.grad_accum >= 1, ">= 1"),
            ("num_workers", self.num_workers >= 1, ">= 1"), ("torch_threads", self.torch_threads >= 0, ">= 0"),
            ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
            ("shuffle_buffer", self.shuffle_buffer >= 0, ">= 0 (0 = file order)"),
            ("stream_buffer_mb", self.stream_buffer_mb >= 1, ">= 1"), ("log_every", self.log_every >= 1, ">= 1"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"), ("grad_clip", self.grad_clip >= 0, ">= 0 (0 = off)"),
            ("ema_decay", 0.0 <= self.ema_decay < 1.0, "in [0, 1)"),
            ("lora_rank", self.lora_rank >= 0, ">= 0 (0 = full fine-tuning)"),
            ("reference_weights", not (self.reference_weights and self.lora_rank), "'' with LoRA (adapters off)"),
            *((name, isinstance(getattr(self, name), bool), "true or false")
              for name in ("fsdp_mixed_precision", "activation_checkpointing", "cpu_offload")),
        ]:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected {expected}")
        check_placement(self, "worker_resources", "worker_labels")

    @property
    def safeguard_on(self) -> bool:
        return self.objective.safeguard is not None

    def objective_config(self):
        return self.objective.build()
