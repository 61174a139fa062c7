"""SDXL: two CLIP text encoders and size conditioning on top of the UNet backbone.

Folder (``StableDiffusionXLPipeline.save_pretrained``): ``tokenizer/``, ``tokenizer_2/``, ``text_encoder/``
(``CLIPTextModel``), ``text_encoder_2/`` (``CLIPTextModelWithProjection``), ``unet/``, ``vae/``, ``scheduler/``.

Conditioning follows the SDXL recipe: the penultimate hidden states of both encoders concatenated along
features, the second encoder's projected pooled embedding, and ``time_ids`` = (original size, crop
top-left, target size) — here always the native resolution with no crop, as for generated data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from .base import Conditioning
from .unet import UNetBackbone, check_model_folder

REQUIRED = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet", "vae", "scheduler")


class SDXLBackbone(UNetBackbone):
    def __init__(self, tokenizer, text_encoder: CLIPTextModel, tokenizer_2, text_encoder_2: CLIPTextModelWithProjection,
                 unet: UNet2DConditionModel, scheduler_config: dict, vae: AutoencoderKL):
        super().__init__(tokenizer, text_encoder, unet, scheduler_config, vae)
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "SDXLBackbone":
        path = check_model_folder(path, REQUIRED)
        kw = dict(local_files_only=True)
        backbone = cls(
            AutoTokenizer.from_pretrained(path / "tokenizer", **kw),
            CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype, **kw),
            AutoTokenizer.from_pretrained(path / "tokenizer_2", **kw),
            CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", torch_dtype=dtype, **kw),
            UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype, **kw),
            DDPMScheduler.load_config(path / "scheduler", **kw),
            AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype, **kw),
        )
        return backbone.to(device)

    def save_pretrained(self, path: str | Path) -> None:
        super().save_pretrained(path)
        self.tokenizer_2.save_pretrained(Path(path) / "tokenizer_2")
        self.text_encoder_2.save_pretrained(Path(path) / "text_encoder_2")

    def to(self, device) -> "SDXLBackbone":
        super().to(device)
        self.text_encoder_2.to(device)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        states, pooled = [], None
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            if isinstance(enc, CLIPTextModelWithProjection):
                pooled = out.text_embeds
        size = self.latent_shape()[1] * self.vae_scale_factor
        time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32, device=self.device)
        return {
            "encoder_hidden_states": torch.cat(states, dim=-1),
            "text_embeds": pooled,
            "time_ids": time_ids.repeat(len(prompts), 1),
        }

    def _denoise(self, module: nn.Module, x_t: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        dtype = next(module.parameters()).dtype
        added = {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)}
        return module(x_t.to(dtype), timesteps, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                      added_cond_kwargs=added).sample
