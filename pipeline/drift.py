"""Drift statistics of an evaluation's images: the raw material of a reward-hacking guard.

A policy optimised against a reward can learn to game it instead of following the prompt. Three cheap,
reward-free statistics of the images themselves reveal the usual ways, each one value per prompt
(samples of one prompt are averaged, so they bootstrap over prompts like every other metric):

* ``background_brightness`` — the background is lit up (a washed-out or grey frame, or the prompt's
  colour flooding it);
* ``colour_entropy`` — the palette collapses to one hue ("paint everything red") or explodes into
  colour noise (stray blobs of every hue, clutter that collects partial credit);
* ``seed_diversity`` — the samples of one prompt collapse to one image whatever the seed (mode collapse
  onto the reward's favourite picture).

None of them is good or bad on its own: they are read as drift against the reference's evaluation, which
uses the same prompts and seeds. Pure torch, any image size; images are ``(N, 3, H, W)`` in [-1, 1],
prompt-major (``per_prompt`` consecutive samples per prompt), as :func:`.sampling.sample` returns them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import rgb_to_grayscale

HUE_BINS = 12             # 30° bins centred on 0°, 30°, …: the six primaries/secondaries sit mid-bin
MIN_SATURATION = 0.3      # a pixel is chromatic when its HSV saturation and value both reach these
MIN_VALUE = 0.3
DIVERSITY_SIDE = 16       # samples are compared at (at most) 16×16: layout, not pixel noise
CHUNK = 64                # images per step, to bound the memory of the per-pixel temporaries

STATISTICS = ("background_brightness", "colour_entropy", "seed_diversity")
LABELS = {"background_brightness": "background brightness", "colour_entropy": "colour entropy (bits)",
          "seed_diversity": "seed diversity (RMS)"}  # for tables


def _background_brightness(unit: torch.Tensor) -> torch.Tensor:
    """Per image: the mean luminance (Rec. 601, in [0, 1]) of its darkest half of pixels.

    The background is defined as the darkest half because that works for any image without a segmentation:
    in the toy world objects cover at most ~30 % of the frame, so the darkest half is pure background (0 on
    black); in a natural image it is its shadows. A policy that brightens the background, washes the frame
    out, or floods it with colour raises it. (A border ring would miss a bright frame whose objects touch
    the edges, and is fooled by a hack that only lights the border.)"""
    lum = rgb_to_grayscale(unit).flatten(1)
    k = max(1, lum.shape[1] // 2)
    return lum.sort(dim=1).values[:, :k].mean(dim=1)


def _hsv(unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HSV of ``(N, 3, H, W)`` RGB in [0, 1]: hue in degrees [0, 360) (0 where grey), saturation and value
    in [0, 1], each ``(N, H, W)``."""
    r, g, b = unit.unbind(1)
    value, _ = unit.max(dim=1)
    chroma = value - unit.min(dim=1).values
    c = chroma.clamp_min(1e-12)
    hue = torch.where(value == r, ((g - b) / c) % 6, torch.where(value == g, (b - r) / c + 2, (r - g) / c + 4))
    hue = torch.where(chroma > 0, hue * 60.0, torch.zeros_like(hue))
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-12), torch.zeros_like(value))
    return hue, saturation, value


def _colour_entropy(unit: torch.Tensor) -> torch.Tensor:
    """Per image: Shannon entropy (bits) of the hue histogram (:data:`HUE_BINS` bins) of its chromatic
    pixels (saturation ≥ :data:`MIN_SATURATION`, value ≥ :data:`MIN_VALUE`); 0 with no chromatic pixel.

    Grey, black and dark pixels carry no reliable hue and are left out, so a brighter grey background does
    not move it. A toy image (one colour) is ~0, a six-colour image ~log2 6 = 2.58, at most log2 12 = 3.58.
    A drop means the palette collapsed (everything painted in one hue), a rise means colour noise or
    clutter."""
    hue, sat, val = _hsv(unit)
    chromatic = (sat >= MIN_SATURATION) & (val >= MIN_VALUE)
    width = 360.0 / HUE_BINS
    bins = ((hue + width / 2) // width).long() % HUE_BINS
    counts = torch.zeros(len(unit), HUE_BINS, dtype=torch.float64, device=unit.device)
    counts.scatter_add_(1, bins.flatten(1), chromatic.flatten(1).double())
    p = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    return -(p * torch.log2(p.where(p > 0, torch.ones_like(p)))).sum(dim=1)


def _seed_diversity(small: torch.Tensor) -> torch.Tensor:
    """Per prompt, from ``(prompts, samples, D)`` flattened downsampled images in [0, 1]: the mean over
    pairs of samples of their RMS pixel difference (in [0, 1]); 0 with one sample per prompt.

    The seeds differ, so the samples of one prompt should too (the toy renderer moves and resizes its
    objects with the seed); a policy collapsing onto one picture per prompt drives it towards 0. Images are
    compared at :data:`DIVERSITY_SIDE` px so that pixel-level sampling noise does not count as
    diversity."""
    k = small.shape[1]
    if k < 2:
        return torch.zeros(small.shape[0], dtype=torch.float64, device=small.device)
    rms = (small[:, :, None] - small[:, None]).pow(2).mean(-1).sqrt()   # (prompts, k, k), zero diagonal
    return rms.sum(dim=(1, 2)).double() / (k * (k - 1))


def drift_statistics(images, per_prompt: int) -> dict[str, np.ndarray]:
    """The drift statistics (:data:`STATISTICS`) of an evaluation's images, each a float64 array of one value
    per prompt (``(num_prompts,)``): per-image values are averaged over the prompt's samples.

    ``images``: ``(N, 3, H, W)`` in [-1, 1] (a tensor on any device, or an array), ordered prompt-major with
    ``per_prompt`` consecutive samples per prompt, ``N = num_prompts · per_prompt``."""
    images = torch.as_tensor(images).detach()
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) images, got shape {tuple(images.shape)}")
    if per_prompt < 1 or len(images) % per_prompt:
        raise ValueError(f"{len(images)} images are not a whole number of prompts × {per_prompt} samples")
    bright, entropy, small = [], [], []
    side = (min(DIVERSITY_SIDE, images.shape[2]), min(DIVERSITY_SIDE, images.shape[3]))
    for chunk in images.split(CHUNK):
        unit = ((chunk.float() + 1) / 2).clamp(0, 1)
        bright.append(_background_brightness(unit).double())
        entropy.append(_colour_entropy(unit))
        small.append(F.adaptive_avg_pool2d(unit, side).flatten(1))
    shape = (len(images) // per_prompt, per_prompt)

    def per_prompt_mean(values: list[torch.Tensor]) -> np.ndarray:
        return torch.cat(values).reshape(shape).mean(dim=1).cpu().numpy()

    return {
        "background_brightness": per_prompt_mean(bright),
        "colour_entropy": per_prompt_mean(entropy),
        "seed_diversity": _seed_diversity(torch.cat(small).reshape(*shape, -1)).cpu().numpy(),
    }
