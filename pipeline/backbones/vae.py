"""Image ↔ latent through a diffusers ``AutoencoderKL`` (SD, SDXL, SD3 conventions), or identity in pixel space."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import Tensor


def encode_images(vae: AutoencoderKL | None, images: Tensor) -> Tensor:
    """[-1, 1] images → latents ``(mean - shift) · scale``; the posterior mean keeps cached latents deterministic."""
    if vae is None:
        return images.float()
    with torch.no_grad():
        latents = vae.encode(images.to(vae.dtype)).latent_dist.mean
    shift = vae.config.get("shift_factor") or 0.0
    return (latents.float() - shift) * vae.config.scaling_factor


def decode_latents(vae: AutoencoderKL | None, latents: Tensor) -> Tensor:
    if vae is None:
        return latents.float().clamp(-1, 1)
    shift = vae.config.get("shift_factor") or 0.0
    with torch.no_grad():
        images = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample
    return images.float().clamp(-1, 1)


def scale_factor(vae: AutoencoderKL | None) -> int:
    """Pixels per latent cell (1 in pixel space, 8 for the SD-family VAEs)."""
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
