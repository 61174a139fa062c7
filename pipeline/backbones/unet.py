"""Text-conditioned UNet backbones in diffusers folder format: the toy world and SD 1.x / 2.x.

Expected folder (what ``StableDiffusionPipeline.save_pretrained`` writes)::

    model/
      tokenizer/       any transformers tokenizer (CLIP BPE for SD, word-level for the toy world)
      text_encoder/    transformers CLIPTextModel
      unet/            diffusers UNet2DConditionModel
      scheduler/       a DDPM-family scheduler config (DDPM, DDIM, PNDM, Euler …); its prediction_type counts
      vae/             optional diffusers AutoencoderKL; absent means the UNet works in pixel space

Every component loads with its library's own ``from_pretrained`` from the local folder only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPTextModel

from ..objectives import DiffusionProcess
from .base import Backbone, Conditioning

REQUIRED = ("tokenizer", "text_encoder", "unet", "scheduler")


def check_model_folder(path: str | Path, required: Sequence[str] = REQUIRED) -> Path:
    """Fail early, naming the folder and what is missing, instead of letting a loader try a model hub."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model folder {path} does not exist (models load from local paths only)")
    if not path.is_dir():
        raise NotADirectoryError(f"model path {path} is a file; expected a diffusers-format folder")
    missing = [name for name in required if not (path / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"model folder {path} lacks {', '.join(m + '/' for m in missing)}; expected a diffusers-format "
            f"folder with {', '.join(r + '/' for r in required)} (see docs/models.md)"
        )
    return path


class UNetBackbone(Backbone):
    """A CLIP-text-conditioned ``UNet2DConditionModel``, in pixel space or on VAE latents."""

    def __init__(self, tokenizer, text_encoder: CLIPTextModel, unet: UNet2DConditionModel, scheduler_config: dict,
                 vae: AutoencoderKL | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.denoiser = unet
        self.vae = vae.requires_grad_(False).eval() if vae is not None else None
        self.scheduler_config = dict(scheduler_config)
        self.process = DiffusionProcess.from_scheduler(DDPMScheduler.from_config(self.scheduler_config))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "UNetBackbone":
        path = check_model_folder(path)
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True, torch_dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True, torch_dtype=dtype)
        scheduler_config = DDPMScheduler.load_config(path / "scheduler", local_files_only=True)
        vae = None
        if (path / "vae").is_dir():
            vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True, torch_dtype=dtype)
        backbone = cls(tokenizer, text_encoder, unet, scheduler_config, vae)
        return backbone.to(device)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the folder layout above (the trained denoiser with the unchanged other components)."""
        path = Path(path)
        self.tokenizer.save_pretrained(path / "tokenizer")
        self.text_encoder.save_pretrained(path / "text_encoder")
        self.denoiser.save_pretrained(path / "unet")
        DDPMScheduler.from_config(self.scheduler_config).save_pretrained(path / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(path / "vae")

    def to(self, device: str | torch.device) -> "UNetBackbone":
        for module in (self.text_encoder, self.denoiser, self.vae, self._reference):
            if module is not None:
                module.to(device)
        return self

    # ------------------------------------------------------------------ text and images
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.device)
        return {"encoder_hidden_states": self.text_encoder(ids).last_hidden_state}

    def _denoise(self, module: nn.Module, x_t: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        dtype = next(module.parameters()).dtype
        states = cond["encoder_hidden_states"].to(dtype)
        return module(x_t.to(dtype), timesteps, encoder_hidden_states=states).sample
