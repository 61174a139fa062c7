"""Pixels ↔ latents through a diffusers autoencoder, or identity in pixel space.

One normalization covers the families: ``latents = (z − shift)·scale`` with ``z`` the posterior mean, where

* SD / SDXL / SD3 / CogVideoX (``AutoencoderKL``, ``AutoencoderKLCogVideoX``): scalar ``shift_factor`` (0 when
  absent) and ``scaling_factor``;
* Wan (``AutoencoderKLWan``): per-channel ``latents_mean`` and ``1 / latents_std`` (what ``WanPipeline`` undoes
  before decoding); a config with both per-channel statistics and a ``scaling_factor`` gets
  ``(z − mean)·scaling_factor / std`` (the EDM-style SDXL convention).

Images are (B, 3, H, W); the video autoencoders take and return videos (B, 3, F, H, W) and latents
(B, C, F', H', W') — the same calls, one more dimension.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _per_channel(vae, latents: Tensor) -> tuple[Tensor, Tensor] | None:
    """(shift, scale) shaped (1, C, 1, …) when the config carries per-channel latent statistics, else None."""
    cfg = vae.config
    mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
    if mean is None or std is None:
        return None
    view = (1, -1) + (1,) * (latents.dim() - 2)
    mean = torch.tensor(mean, dtype=torch.float32, device=latents.device).view(view)
    scale = float(cfg.get("scaling_factor") or 1.0) / torch.tensor(std, dtype=torch.float32, device=latents.device)
    return mean, scale.view(view)


def encode_images(vae, images: Tensor) -> Tensor:
    """[-1, 1] images (or videos) → normalized latents; the posterior mean keeps cached latents deterministic."""
    if vae is None:
        return images.float()
    with torch.no_grad():
        latents = vae.encode(images.to(vae.dtype)).latent_dist.mean.float()
    stats = _per_channel(vae, latents)
    if stats is not None:
        return (latents - stats[0]) * stats[1]
    shift = vae.config.get("shift_factor") or 0.0
    return (latents - shift) * vae.config.scaling_factor


def decode_latents(vae, latents: Tensor) -> Tensor:
    """Normalized latents → images (or videos) in [-1, 1]."""
    if vae is None:
        return latents.float().clamp(-1, 1)
    stats = _per_channel(vae, latents)
    if stats is not None:
        raw = latents.float() / stats[1] + stats[0]
    else:
        raw = latents / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
    with torch.no_grad():
        images = vae.decode(raw.to(vae.dtype)).sample
    return images.float().clamp(-1, 1)


def scale_factor(vae) -> int:
    """Pixels per latent cell along height and width (1 in pixel space, 8 for the SD-family and video VAEs)."""
    if vae is None:
        return 1
    if vae.config.get("scale_factor_spatial"):  # Wan: its config says so (it has no block_out_channels)
        return int(vae.config.scale_factor_spatial)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def temporal_scale_factor(vae) -> int:
    """Frames per latent frame after the first (a video VAE maps 1 + k·r frames to 1 + k); 1 in pixel space."""
    if vae is None:
        return 1
    cfg = vae.config
    return int(cfg.get("scale_factor_temporal") or cfg.get("temporal_compression_ratio") or 1)
