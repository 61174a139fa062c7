"""Wan2.1-style text-to-video flow transformer (``WanTransformer3DModel``), on VAE latents or in pixel space.

Folder (``WanPipeline.save_pretrained``)::

    model/
      tokenizer/       any transformers tokenizer (UMT5's for Wan2.1)
      text_encoder/    UMT5EncoderModel (Wan2.1); T5EncoderModel and CLIPTextModel load too (small stand-ins)
      transformer/     diffusers WanTransformer3DModel
      vae/             diffusers AutoencoderKLWan; absent means the transformer works in pixel space
      scheduler/       Wan's UniPCMultistepScheduler with flow sigmas and ``flow_shift``, or a FlowMatchEuler config

The model predicts the velocity ``ε − x0`` on the path ``x_t = (1 − σ)·x0 + σ·ε`` and is conditioned on
``σ·1000``. Wan ships a multistep *sampler* config (UniPC with ``use_flow_sigmas`` and ``flow_shift``); the
training process is the flow-matching process that config samples: ``FlowMatchEulerDiscreteScheduler`` with
``shift = flow_shift`` (the same shifted-σ map), which is also what ``scheduler_config`` holds for the samplers. The
folder's own scheduler config is kept in ``folder_scheduler_config`` and written back unchanged.

Prompt encoding follows ``WanPipeline``: the cleaned prompt padded to ``max_sequence_length`` tokens (512, or the
tokenizer's ``model_max_length`` when that is smaller), the encoder run with the attention mask and the padded
positions' states set to zero.

A pixel-space folder (no ``vae/``; the toy video world's) must say its clip size (``"_video_size"`` in
``model_index.json``, see :mod:`.video`); it cannot load with ``WanPipeline``, which needs a VAE.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel, UMT5EncoderModel

from ..objectives import DiffusionProcess
from .base import Conditioning
from .unet import check_model_folder
from .video import VIDEO_SIZE_KEY, VideoBackbone, folder_video_size

REQUIRED = ("tokenizer", "text_encoder", "transformer", "scheduler")
#: WanPipeline's defaults (Wan2.1 T2V at 480p)
DEFAULT_VIDEO_SIZE = (81, 480, 832)
MAX_SEQUENCE_LENGTH = 512
#: text-encoder ``model_type`` → class
TEXT_ENCODERS = {"umt5": UMT5EncoderModel, "t5": T5EncoderModel, "clip_text_model": CLIPTextModel}


def flow_scheduler(config: dict) -> FlowMatchEulerDiscreteScheduler:
    """The flow-matching training scheduler of a Wan folder's scheduler config."""
    name = config.get("_class_name", "")
    multistep = config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction"
    if name.startswith("FlowMatch") or (not name and "shift" in config and not multistep):
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    if multistep:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                                               shift=float(config.get("flow_shift") or 1.0))
    raise ValueError(f"Wan scheduler {name or config!r}: expected a flow-matching config (FlowMatchEulerDiscreteScheduler, "
                     "or a multistep scheduler with use_flow_sigmas / prediction_type='flow_prediction')")


def load_text_encoder(path: Path, dtype: torch.dtype) -> nn.Module:
    """The text encoder class named by its config's ``model_type``."""
    config = path / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if model_type not in TEXT_ENCODERS:
        raise ValueError(f"{path}: text encoder model_type {model_type!r} is not supported; expected one of "
                         f"{sorted(TEXT_ENCODERS)}")
    return TEXT_ENCODERS[model_type].from_pretrained(path, torch_dtype=dtype, local_files_only=True)


def scheduler_from_config(config: dict):
    """The scheduler instance a folder's config names (for writing the folder back); without a class name, the
    flow-matching training scheduler."""
    import diffusers

    cls = getattr(diffusers, config.get("_class_name", ""), None)
    return cls.from_config(config) if cls is not None else flow_scheduler(config)


class WanBackbone(VideoBackbone):
    def __init__(self, tokenizer, text_encoder: nn.Module, transformer: WanTransformer3DModel, scheduler_config,
                 vae: AutoencoderKLWan | None = None, *, video_size: Sequence[int] | None = None,
                 max_sequence_length: int | None = None):
        """``scheduler_config`` is the folder's scheduler config (a dict) or a scheduler instance."""
        super().__init__()
        if hasattr(scheduler_config, "config"):  # an instance: keep its class name for save_pretrained
            scheduler_config = {**scheduler_config.config, "_class_name": type(scheduler_config).__name__}
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.denoiser = transformer
        self.vae = vae.requires_grad_(False).eval() if vae is not None else None
        self.folder_scheduler_config = dict(scheduler_config)
        scheduler = flow_scheduler(self.folder_scheduler_config)
        self.scheduler_config = dict(scheduler.config)
        self.process = DiffusionProcess.from_scheduler(scheduler)
        self.max_sequence_length = int(max_sequence_length or min(MAX_SEQUENCE_LENGTH, tokenizer.model_max_length))
        if video_size is None and vae is None:
            raise ValueError(f"a pixel-space Wan model (no vae/) has no default clip size: give video_size or "
                             f"'{VIDEO_SIZE_KEY}': [frames, height, width] in its model_index.json")
        self._init_video_size(video_size, DEFAULT_VIDEO_SIZE)

    def _spatial_patch(self) -> int:
        return int(self.denoiser.config.patch_size[1])

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        video_size: Sequence[int] | None = None) -> "WanBackbone":
        path = check_model_folder(path, REQUIRED)
        kw = dict(local_files_only=True)
        vae = AutoencoderKLWan.from_pretrained(path / "vae", torch_dtype=dtype, **kw) if (path / "vae").is_dir() else None
        backbone = cls(
            AutoTokenizer.from_pretrained(path / "tokenizer", **kw),
            load_text_encoder(path / "text_encoder", dtype),
            WanTransformer3DModel.from_pretrained(path / "transformer", torch_dtype=dtype, **kw),
            FlowMatchEulerDiscreteScheduler.load_config(path / "scheduler", **kw),
            vae, video_size=video_size or folder_video_size(path),
        )
        return backbone.to(device)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the folder: with a VAE through ``WanPipeline.save_pretrained`` (so ``WanPipeline.from_pretrained``
        loads it), in pixel space component by component; ``model_index.json`` records ``video_size``."""
        path = Path(path)
        scheduler = scheduler_from_config(self.folder_scheduler_config)
        if self.vae is not None:
            WanPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae, scheduler=scheduler,
                        transformer=self.denoiser).save_pretrained(path)
            index = json.loads((path / "model_index.json").read_text())
        else:
            path.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save_pretrained(path / "tokenizer")
            self.text_encoder.save_pretrained(path / "text_encoder")
            self.denoiser.save_pretrained(path / "transformer")
            scheduler.save_pretrained(path / "scheduler")
            index = {"_class_name": "WanPipeline"}
        index[VIDEO_SIZE_KEY] = list(self.video_size)
        (path / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def to(self, device) -> "WanBackbone":
        for module in (self.text_encoder, self.denoiser, self.vae, self._reference):
            if module is not None:
                module.to(device)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        tokens = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length",
                                max_length=self.max_sequence_length, truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        states = self.text_encoder(ids, attention_mask=mask).last_hidden_state
        return {"encoder_hidden_states": states * mask.unsqueeze(-1).to(states.dtype)}

    def _denoise(self, module: nn.Module, x_t: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        dtype = next(module.parameters()).dtype
        # Timesteps stay fp32 (σ·1000 off the integer grid); Wan's time embedder casts after the sinusoid.
        return module(hidden_states=x_t.to(dtype), timestep=timesteps.float(),
                      encoder_hidden_states=cond["encoder_hidden_states"].to(dtype)).sample
