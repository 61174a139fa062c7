"""CogVideoX text-to-video transformer (``CogVideoXTransformer3DModel``) with T5 and the CogVideoX VAE.

Folder (``CogVideoXPipeline.save_pretrained``): ``tokenizer/``, ``text_encoder/`` (``T5EncoderModel``),
``transformer/``, ``vae/`` (``AutoencoderKLCogVideoX``), ``scheduler/`` (``CogVideoXDDIMScheduler`` for 2B,
``CogVideoXDPMScheduler`` for 5B).

The process is the scheduler's own: v-prediction on scaled-linear betas whose ᾱ is shifted by
``snr_shift_scale`` (ᾱ / (s + (1 − s)·ᾱ), lower SNR everywhere) and rescaled to zero terminal SNR — read from the
CogVideoX scheduler class, since a plain DDPM/DDIM scheduler would drop the shift.

What the backbone hides so that callers see the canonical layout (latents B, C, F, H, W):

* the transformer takes ``hidden_states`` as (B, F, C, H, W): permuted in and out;
* with ``use_rotary_positional_embeddings`` (5B, 1.5) it needs ``image_rotary_emb`` for the latent grid, built as
  ``CogVideoXPipeline`` builds it (cached per grid);
* with a temporal patch (``patch_size_t``, CogVideoX 1.5) the latent frame count must be a multiple of it: the
  input is padded at the front with copies of the first latent frame and those outputs dropped, as the pipeline
  pads and drops leading latent frames;
* the text is padded to the transformer's ``max_text_seq_length`` (226): the sinusoidal position table of the
  2B model spans exactly that many text tokens;
* an ``ofs`` embedding (the I2V models) gets the pipeline's value 2.0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline,
                       CogVideoXTransformer3DModel, DDIMScheduler, DDPMScheduler)
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from torch import Tensor, nn
from transformers import AutoTokenizer, T5EncoderModel

from ..objectives import DiffusionProcess
from .base import Conditioning
from .unet import check_model_folder
from .video import VIDEO_SIZE_KEY, VideoBackbone, folder_video_size

REQUIRED = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
#: scheduler ``_class_name`` → class whose ``alphas_cumprod`` is the training process (CogVideoX's shift included)
SCHEDULERS = {c.__name__: c for c in (CogVideoXDDIMScheduler, CogVideoXDPMScheduler, DDIMScheduler, DDPMScheduler)}


def training_scheduler(config: dict):
    name = config.get("_class_name", "CogVideoXDDIMScheduler")
    if name not in SCHEDULERS:
        raise ValueError(f"CogVideoX scheduler {name!r} is not supported; expected one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(config)


class CogVideoXBackbone(VideoBackbone):
    def __init__(self, tokenizer, text_encoder: T5EncoderModel, transformer: CogVideoXTransformer3DModel,
                 scheduler_config: dict, vae: AutoencoderKLCogVideoX, *, video_size: Sequence[int] | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.denoiser = transformer
        self.vae = vae.requires_grad_(False).eval()
        self.scheduler_config = dict(scheduler_config)
        self.process = DiffusionProcess.from_scheduler(training_scheduler(self.scheduler_config))
        cfg = transformer.config
        self.max_sequence_length = int(cfg.max_text_seq_length)
        self._rotary_cache: dict = {}
        s = self.vae_scale_factor
        self._init_video_size(video_size, (cfg.sample_frames, cfg.sample_height * s, cfg.sample_width * s))

    def _spatial_patch(self) -> int:
        return int(self.denoiser.config.patch_size)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        video_size: Sequence[int] | None = None) -> "CogVideoXBackbone":
        path = check_model_folder(path, REQUIRED)
        kw = dict(local_files_only=True)
        backbone = cls(
            AutoTokenizer.from_pretrained(path / "tokenizer", **kw),
            T5EncoderModel.from_pretrained(path / "text_encoder", torch_dtype=dtype, **kw),
            CogVideoXTransformer3DModel.from_pretrained(path / "transformer", torch_dtype=dtype, **kw),
            CogVideoXDDIMScheduler.load_config(path / "scheduler", **kw),
            AutoencoderKLCogVideoX.from_pretrained(path / "vae", torch_dtype=dtype, **kw),
            video_size=video_size or folder_video_size(path),
        )
        return backbone.to(device)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the folder through ``CogVideoXPipeline.save_pretrained``; ``model_index.json`` records ``video_size``."""
        import json

        path = Path(path)
        CogVideoXPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                          transformer=self.denoiser,
                          scheduler=training_scheduler(self.scheduler_config)).save_pretrained(path)
        index = json.loads((path / "model_index.json").read_text())
        index[VIDEO_SIZE_KEY] = list(self.video_size)
        (path / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def to(self, device) -> "CogVideoXBackbone":
        for module in (self.text_encoder, self.denoiser, self.vae, self._reference):
            if module is not None:
                module.to(device)
        self._rotary_cache.clear()
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_sequence_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
        return {"encoder_hidden_states": self.text_encoder(ids).last_hidden_state}

    def _rotary(self, frames: int, height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``CogVideoXPipeline._prepare_rotary_positional_embeddings`` for a latent grid (frames incl. padding)."""
        key = (frames, height, width, str(device))
        if key not in self._rotary_cache:
            cfg = self.denoiser.config
            p, p_t = cfg.patch_size, cfg.patch_size_t
            grid = (height // p, width // p)
            base_w, base_h = cfg.sample_width // p, cfg.sample_height // p
            if p_t is None:
                self._rotary_cache[key] = get_3d_rotary_pos_embed(
                    embed_dim=cfg.attention_head_dim, crops_coords=get_resize_crop_region_for_grid(grid, base_w, base_h),
                    grid_size=grid, temporal_size=frames, device=device)
            else:
                self._rotary_cache[key] = get_3d_rotary_pos_embed(
                    embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=grid,
                    temporal_size=(frames + p_t - 1) // p_t, grid_type="slice", max_size=(base_h, base_w), device=device)
        return self._rotary_cache[key]

    def _denoise(self, module: nn.Module, x_t: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        cfg = self.denoiser.config
        dtype = next(module.parameters()).dtype
        x = x_t.permute(0, 2, 1, 3, 4)  # (B, C, F, H, W) → the transformer's (B, F, C, H, W)
        pad = 0
        if cfg.patch_size_t and x.shape[1] % cfg.patch_size_t:
            pad = cfg.patch_size_t - x.shape[1] % cfg.patch_size_t
            x = torch.cat([x[:, :1].expand(-1, pad, -1, -1, -1), x], dim=1)
        rotary = (self._rotary(x.shape[1], x.shape[3], x.shape[4], x.device)
                  if cfg.use_rotary_positional_embeddings else None)
        ofs = x.new_full((x.shape[0],), 2.0) if cfg.get("ofs_embed_dim") else None
        out = module(hidden_states=x.to(dtype), encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                     timestep=timesteps, ofs=ofs, image_rotary_emb=rotary).sample
        return out[:, pad:].permute(0, 2, 1, 3, 4)
