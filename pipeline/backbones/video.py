"""What the video backbones (Wan, CogVideoX) share: the clip size they generate and train at, and the layout.

Canonical layout everywhere in the pipeline: videos (B, 3, F, H, W) in [-1, 1], latents (B, C, F, H, W). A
backbone whose denoiser wants another layout (CogVideoX: B, F, C, H, W) permutes inside its ``_denoise``.

Unlike the image models, a video transformer's config does not say what size it generates at, so the backbone
holds a clip size ``video_size = (frames, height, width)`` in pixels: the pipeline's own defaults for the family
(Wan2.1: 81 × 480 × 832; CogVideoX: the transformer's ``sample_frames`` × ``sample_height``·8 × ``sample_width``·8),
overridden by a ``"_video_size": [frames, height, width]`` entry in the folder's ``model_index.json`` (a private
key: diffusers' ``from_pretrained`` ignores keys starting with ``_``, and an export copies the file unchanged), by
``load_backbone(..., video_size=...)``, or by :meth:`VideoBackbone.set_video_size`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from torch import Tensor

from .base import Backbone
from . import vae as vae_lib

VIDEO_SIZE_KEY = "_video_size"


def folder_video_size(path: str | Path) -> tuple[int, int, int] | None:
    """The ``_video_size`` a model folder's ``model_index.json`` declares, or None."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    size = json.loads(index.read_text()).get(VIDEO_SIZE_KEY)
    if size is None:
        return None
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(v, int) for v in size)):
        raise ValueError(f"{index}: {VIDEO_SIZE_KEY}={size!r}: expected [frames, height, width] (integers)")
    return tuple(size)


class VideoBackbone(Backbone):
    """A text-to-video backbone: latents (B, C, F, H, W), videos (B, 3, F, H, W)."""

    is_video = True
    denoiser_subfolder = "transformer"
    video_size: tuple[int, int, int]

    # ------------------------------------------------------------------ geometry
    @property
    def vae_temporal_scale_factor(self) -> int:
        """Frames per latent frame after the first (4 for Wan's and CogVideoX's VAEs, 1 in pixel space)."""
        return vae_lib.temporal_scale_factor(self.vae)

    def _spatial_patch(self) -> int:
        """The denoiser's spatial patch size: latent height and width must be multiples of it."""
        raise NotImplementedError

    def set_video_size(self, frames: int, height: int, width: int) -> None:
        """Generate and train at ``frames`` × ``height`` × ``width`` pixels (checked against the VAE's compression
        and the transformer's patch size)."""
        frames, height, width = int(frames), int(height), int(width)
        r, s, p = self.vae_temporal_scale_factor, self.vae_scale_factor, self._spatial_patch()
        if frames < 1 or (frames - 1) % r:
            raise ValueError(f"video_size: {frames} frames; the VAE maps 1 + k·{r} frames to 1 + k latent frames, "
                             f"so frames must be 1 + a multiple of {r}")
        for name, v in (("height", height), ("width", width)):
            if v < 1 or v % (s * p):
                raise ValueError(f"video_size: {name}={v} must be a positive multiple of {s * p} "
                                 f"(VAE factor {s} × patch size {p})")
        self.video_size = (frames, height, width)

    def latent_frames(self, frames: int | None = None) -> int:
        frames = self.video_size[0] if frames is None else frames
        return (frames - 1) // self.vae_temporal_scale_factor + 1

    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, F, H, W) of one latent clip at ``video_size``."""
        frames, height, width = self.video_size
        s = self.vae_scale_factor
        return (int(self.denoiser.config.in_channels), self.latent_frames(frames), height // s, width // s)

    # ------------------------------------------------------------------ pixels
    def encode_images(self, images: Tensor) -> Tensor:
        """Videos (B, 3, F, H, W) in [-1, 1] → latents (B, C, F', H', W')."""
        if images.dim() != 5:
            raise ValueError(f"{type(self).__name__}.encode_images: expected videos (B, 3, F, H, W), "
                             f"got shape {tuple(images.shape)}")
        return super().encode_images(images)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Latents (B, C, F', H', W') → videos (B, 3, F, H, W) in [-1, 1]."""
        if latents.dim() != 5:
            raise ValueError(f"{type(self).__name__}.decode_latents: expected latents (B, C, F, H, W), "
                             f"got shape {tuple(latents.shape)}")
        return super().decode_latents(latents)

    def _init_video_size(self, video_size: Sequence[int] | None, default: Sequence[int]) -> None:
        self.set_video_size(*(video_size if video_size is not None else default))
