"""SD3-style flow-matching transformer (``SD3Transformer2DModel``) with CLIP-L, CLIP-G and optional T5.

Folder (``StableDiffusion3Pipeline.save_pretrained``): ``tokenizer/``, ``tokenizer_2/``, ``text_encoder/``,
``text_encoder_2/`` (both ``CLIPTextModelWithProjection``), optional ``tokenizer_3/`` + ``text_encoder_3/``
(``T5EncoderModel``; without them the T5 tokens are zeros, as diffusers does when T5 is dropped),
``transformer/``, ``vae/`` (16-channel ``AutoencoderKL`` with a shift factor), ``scheduler/``
(``FlowMatchEulerDiscreteScheduler``). The model predicts the velocity ``ε − x0``.

Prompt encoding follows the SD3 recipe: penultimate hidden states of both CLIPs concatenated along
features and zero-padded to T5's width, then concatenated with the T5 tokens along the sequence; the
pooled projection is both CLIPs' projected embeddings side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

from ..objectives import DiffusionProcess
from .base import Backbone, Conditioning
from .unet import check_model_folder

REQUIRED = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "transformer", "vae", "scheduler")
T5_MAX_LENGTH = 256


class SD3Backbone(Backbone):
    denoiser_subfolder = "transformer"

    def __init__(self, tokenizers: Sequence, text_encoders: Sequence[nn.Module], transformer: SD3Transformer2DModel,
                 scheduler_config: dict, vae: AutoencoderKL, t5_max_length: int = T5_MAX_LENGTH):
        super().__init__()
        if len(tokenizers) != len(text_encoders) or len(tokenizers) not in (2, 3):
            raise ValueError("SD3 needs two CLIP tokenizer/encoder pairs and optionally a T5 pair")
        self.tokenizers = list(tokenizers)
        self.text_encoders = [e.requires_grad_(False).eval() for e in text_encoders]
        self.denoiser = transformer
        self.vae = vae.requires_grad_(False).eval()
        self.scheduler_config = dict(scheduler_config)
        self.t5_max_length = t5_max_length
        self.process = DiffusionProcess.from_scheduler(FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "SD3Backbone":
        path = check_model_folder(path, REQUIRED)
        kw = dict(local_files_only=True)
        tokenizers = [AutoTokenizer.from_pretrained(path / name, **kw) for name in ("tokenizer", "tokenizer_2")]
        encoders = [CLIPTextModelWithProjection.from_pretrained(path / n, torch_dtype=dtype, **kw)
                    for n in ("text_encoder", "text_encoder_2")]
        if (path / "text_encoder_3").is_dir():
            tokenizers.append(AutoTokenizer.from_pretrained(path / "tokenizer_3", **kw))
            encoders.append(T5EncoderModel.from_pretrained(path / "text_encoder_3", torch_dtype=dtype, **kw))
        backbone = cls(
            tokenizers, encoders,
            SD3Transformer2DModel.from_pretrained(path / "transformer", torch_dtype=dtype, **kw),
            FlowMatchEulerDiscreteScheduler.load_config(path / "scheduler", **kw),
            AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype, **kw),
        )
        return backbone.to(device)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        for i, (tok, enc) in enumerate(zip(self.tokenizers, self.text_encoders)):
            suffix = "" if i == 0 else f"_{i + 1}"
            tok.save_pretrained(path / f"tokenizer{suffix}")
            enc.save_pretrained(path / f"text_encoder{suffix}")
        self.denoiser.save_pretrained(path / "transformer")
        self.vae.save_pretrained(path / "vae")
        FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config).save_pretrained(path / "scheduler")

    def to(self, device) -> "SD3Backbone":
        for module in (*self.text_encoders, self.denoiser, self.vae, self._reference):
            if module is not None:
                module.to(device)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        prompts = list(prompts)
        clip_states, pooled = [], []
        for tok, enc in zip(self.tokenizers[:2], self.text_encoders[:2]):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            clip_states.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        width = self.denoiser.config.joint_attention_dim
        clip = torch.cat(clip_states, dim=-1)
        clip = F.pad(clip, (0, width - clip.shape[-1]))
        if len(self.text_encoders) == 3:
            ids = self.tokenizers[2](prompts, padding="max_length", max_length=self.t5_max_length, truncation=True,
                                     return_tensors="pt").input_ids.to(self.device)
            t5 = self.text_encoders[2](ids).last_hidden_state
        else:
            t5 = clip.new_zeros(len(prompts), self.t5_max_length, width)
        return {"encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
                "pooled_projections": torch.cat(pooled, dim=-1)}

    def _denoise(self, module: nn.Module, x_t: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        dtype = next(module.parameters()).dtype
        return module(hidden_states=x_t.to(dtype), timestep=timesteps.to(dtype),
                      encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                      pooled_projections=cond["pooled_projections"].to(dtype)).sample
