"""The backbone interface: everything data generation, training and evaluation need from a model.

A backbone bundles a text encoder, a denoiser (UNet or transformer), an optional autoencoder and the
diffusion process of its scheduler. Callers never touch the components directly, so the embedded toy
world and real SD / SDXL / flow models are interchangeable — and so are the video models (Wan, CogVideoX).

One layout everywhere: images are (B, 3, H, W) and image latents (B, C, H, W); videos are (B, 3, F, H, W) and
video latents (B, C, F, H, W), all in [-1, 1] in pixel space. A video backbone (``is_video``) takes and returns
videos where an image backbone takes images; everything else (noising, objectives, sampling) is
shape-agnostic, reducing over every non-batch dimension.

Conditioning is a ``dict`` of batch-first tensors passed to the denoiser as keyword arguments (for SDXL
it also carries pooled embeddings and size ids), so it can be concatenated, repeated and indexed
without knowing what is inside.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..objectives import DiffusionProcess
from . import vae as vae_lib

Conditioning = dict[str, Tensor]


def cat_conditioning(parts: Sequence[Conditioning]) -> Conditioning:
    """Concatenate conditionings along the batch dimension (e.g. [cond, uncond] for CFG)."""
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def index_conditioning(cond: Conditioning, index: Tensor | slice) -> Conditioning:
    return {k: v[index] for k, v in cond.items()}


class Backbone(ABC):
    """A text-to-image diffusion model seen through the operations the pipeline needs."""

    #: noising, targets and transitions of the model's own scheduler
    process: DiffusionProcess
    #: the trainable denoiser (UNet or transformer); what the trainer wraps with FSDP2
    denoiser: nn.Module
    #: the diffusers scheduler config the model was trained with (samplers are built from it)
    scheduler_config: dict
    #: the autoencoder, or None for a pixel-space model
    vae = None
    #: whether samples are videos (B, 3, F, H, W) and latents (B, C, F, H, W) rather than images
    is_video: bool = False
    #: the model-folder subfolder holding the denoiser (what an export replaces)
    denoiser_subfolder: str = "unet"

    def __init__(self):
        self._reference: nn.Module | None = None
        self._lora = False

    # ------------------------------------------------------------------ text and images
    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Conditioning for a batch of prompts (no gradient: text encoders are frozen)."""

    def empty_conditioning(self, n: int) -> Conditioning:
        """The unconditional branch of classifier-free guidance: the empty prompt."""
        return self.encode_prompts([""] * n)

    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [-1, 1], NCHW (videos: B, 3, F, H, W) → the latents the denoiser works on (identity in pixel
        space)."""
        return vae_lib.encode_images(self.vae, images)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Latents → images in [-1, 1], NCHW (videos: B, 3, F, H, W)."""
        return vae_lib.decode_latents(self.vae, latents)

    def latent_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one latent at the backbone's native resolution (from the denoiser's config); video
        backbones return (C, F, H, W)."""
        cfg = self.denoiser.config
        return (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (1 in pixel space, 8 for the SD-family VAEs)."""
        return vae_lib.scale_factor(self.vae)

    # ------------------------------------------------------------------ prediction
    @abstractmethod
    def _denoise(self, module: nn.Module, x_t: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        """Run a denoiser module; ``timesteps`` are the values the network is conditioned on."""

    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning, *, reference: bool | nn.Module = False) -> Tensor:
        """The network output (in the process's parameterization) at training-grid indices ``t``.

        ``reference=True`` runs the frozen reference without gradient; a module runs that module instead (the
        reference a trainer built and owns, see ``pipeline/training/reference.py``).
        """
        return self.predict_at(x_t, self.process.model_input_timesteps(t), cond, reference=reference)

    def predict_at(self, x_t: Tensor, timesteps: Tensor, cond: Conditioning, *,
                   reference: bool | nn.Module = False) -> Tensor:
        """Like :meth:`predict` with the network's own timestep values (samplers step off the grid)."""
        timesteps = timesteps.to(x_t.device)
        if isinstance(reference, nn.Module):
            with torch.no_grad():
                return self._denoise(reference, x_t, timesteps, cond)
        if reference:
            with torch.no_grad(), self.reference_module() as ref:
                return self._denoise(ref, x_t, timesteps, cond)
        return self._denoise(self.denoiser, x_t, timesteps, cond)

    # ------------------------------------------------------------------ reference model
    @contextmanager
    def reference_module(self) -> Iterator[nn.Module]:
        """The frozen reference.

        With LoRA it is the denoiser itself with its adapters disabled (no second copy in memory);
        otherwise a frozen copy of the denoiser taken when first needed, or one set explicitly.
        """
        if self._lora and self._reference is None:
            self.denoiser.disable_adapters()
            try:
                yield self.denoiser
            finally:
                self.denoiser.enable_adapters()
            return
        if self._reference is None:
            self._reference = copy.deepcopy(self.denoiser).requires_grad_(False).eval()
        yield self._reference

    # ------------------------------------------------------------------ fine-tuning modes
    def enable_lora(self, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
                    target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0")) -> None:
        """Train LoRA adapters (peft) instead of the full denoiser. B starts at zero, so the policy
        starts equal to the reference, and the reference is the same model with adapters off."""
        from peft import LoraConfig

        if rank < 1:
            raise ValueError(f"lora.rank={rank}: expected >= 1")
        self.denoiser.requires_grad_(False)
        self.denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout,
                                             target_modules=list(target_modules)))
        self._lora = True

    @property
    def uses_lora(self) -> bool:
        return self._lora

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device
