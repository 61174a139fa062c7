"""Deterministic renderer of the toy video world: coloured shapes gliding over a black background.

``render(spec, seed)`` is the ground truth for the video reward and for any video model trained on
this world. Each object is drawn by the image renderer's own code (same shapes, anti-aliasing, size
range, gap and colour jitter; :mod:`pipeline.toyworld.renderer`), and moves by exactly ``speed``
pixels per frame in the stated direction (``still``: not at all). Geometry:

* objects form a row across the motion axis (a column for left/right, a row for up/down; a random
  axis for ``still``), with the image world's random slots and gaps, so they never touch;
* along the motion axis each object gets its own random start, drawn so that its whole trajectory
  stays inside the frame (0.5 px off the border): every frame shows all ``count`` objects;
* the colour jitter is drawn once per video, so colour and shape are constant over time.

``speed`` defaults to ``size // 16`` px/frame (2 at 32 px): over 8 frames an object travels 14 px,
about half the frame. Output: uint8 ``(F, H, W, 3)``; ``render_batch`` stacks ``(N, F, H, W, 3)``.
The project's video layout is ``(N, 3, F, H, W)`` float in [-1, 1]: ``to_tensor`` / ``from_tensor``.
Same ``(spec, seed, size, frames, speed)`` gives bit-identical output on one NumPy version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..grammar import COLOURS, _stable_hash
from ..renderer import COLOUR_JITTER, MAX_SIZE, MIN_SIZE, Placement, _coverage, _geometry
from .grammar import MOTION_VECTORS, VideoSpec, as_spec

FRAMES = 8
MIN_FRAMES = 2


def default_speed(size: int) -> int:
    """Pixels per frame when none is given: 2 at 32 px, scaled with the frame."""
    return max(1, size // 16)


@dataclass(frozen=True)
class Track:
    """One object: its box at frame 0 and its constant velocity (pixels per frame)."""

    start: Placement
    vx: float
    vy: float

    def at(self, frame: int) -> Placement:
        """The object's box in ``frame``."""
        p = self.start
        return Placement(p.shape, p.x0 + self.vx * frame, p.y0 + self.vy * frame, p.s)


def _check(size: int, frames: int, speed: float, seed: int) -> None:
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}], got {size}")
    if frames < MIN_FRAMES:
        raise ValueError(f"frames must be >= {MIN_FRAMES} (motion needs two frames), got {frames}")
    if speed <= 0:
        raise ValueError(f"speed must be positive (pixels per frame), got {speed}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")


def layout(spec: "VideoSpec | str", seed: int, size: int = 32, frames: int = FRAMES,
           speed: "float | None" = None) -> list[Track]:
    """The objects ``render`` draws, as tracks, without drawing them."""
    spec = as_spec(spec)
    speed = default_speed(size) if speed is None else float(speed)
    _check(size, frames, speed, seed)
    rng = np.random.default_rng([int(seed), _stable_hash("video", spec.text)])
    s_min, s_max, gap, margin = _geometry(size)
    travel = speed * (frames - 1)
    room = size - 2 * margin - travel            # along the motion axis, for one object's side
    if room < s_min:
        raise ValueError(f"no room to move: {frames} frames at {speed:g} px/frame travel {travel:g} px, "
                         f"leaving {room:.1f} px for objects of >= {s_min:.1f} px in a {size} px frame; "
                         "lower speed or frames")
    n = spec.count
    long_len = size - 2 * margin                 # the row of objects runs across the motion axis
    s_max = max(s_min, min(s_max, room, (long_len - (n - 1) * gap) / n))
    ux, uy = MOTION_VECTORS[spec.motion]
    if spec.motion == "still":
        vertical_row = bool(rng.random() < 0.5)
    else:
        vertical_row = ux != 0                   # moving sideways: objects stacked in a column
    sides = s_min + (s_max - s_min) * rng.random(n)
    free = long_len - sides.sum() - (n - 1) * gap
    slots = np.diff(np.concatenate([[0.0], np.sort(rng.random(n)), [1.0]])) * free
    tracks = []
    across_pos = margin
    for i in range(n):
        across_pos += slots[i]
        lo = margin + (size - 2 * margin - travel - sides[i]) * rng.random()   # trajectory's low end
        direction = ux + uy                      # +1 right/down, -1 left/up, 0 still
        along = lo + travel if direction < 0 else lo
        x0, y0 = (along, across_pos) if vertical_row else (across_pos, along)
        tracks.append(Track(Placement(spec.shape, float(x0), float(y0), float(sides[i])),
                            float(ux * speed), float(uy * speed)))
        across_pos += sides[i] + gap
    order = rng.permutation(n)
    return [tracks[i] for i in order]


def render(spec: "VideoSpec | str", seed: int, size: int = 32, frames: int = FRAMES,
           speed: "float | None" = None) -> np.ndarray:
    """Draw ``spec`` as a uint8 ``(frames, size, size, 3)`` RGB clip, deterministically in ``seed``."""
    spec = as_spec(spec)
    tracks = layout(spec, seed, size, frames, speed)
    rng = np.random.default_rng([int(seed), _stable_hash("video", spec.text), 1])
    colour = np.clip(np.array(COLOURS[spec.colour], dtype=np.float32)
                     + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3), 0, 255)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for f in range(frames):
        cover = np.zeros((size, size), dtype=np.float32)
        for track in tracks:
            cover += _coverage(track.at(f), size)
        out[f] = np.round(np.clip(cover, 0.0, 1.0)[:, :, None] * colour).astype(np.uint8)
    return out


def render_batch(specs: Sequence["VideoSpec | str"], seeds: Sequence[int], size: int = 32,
                 frames: int = FRAMES, speed: "float | None" = None) -> np.ndarray:
    """``render`` for each ``(spec, seed)`` pair: uint8 ``(N, frames, size, size, 3)``."""
    if len(specs) != len(seeds):
        raise ValueError(f"{len(specs)} specs but {len(seeds)} seeds")
    out = np.zeros((len(specs), frames, size, size, 3), dtype=np.uint8)
    for i, (spec, seed) in enumerate(zip(specs, seeds)):
        out[i] = render(spec, int(seed), size, frames, speed)
    return out


def to_tensor(videos: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, F, H, W, 3)`` (or one ``(F, H, W, 3)``) -> float32 ``(N, 3, F, H, W)`` in [-1, 1]:
    the project's canonical video layout (channels first, then time, as video VAEs take it)."""
    videos = np.asarray(videos)
    if videos.dtype != np.uint8:
        raise ValueError(f"expected uint8 videos, got {videos.dtype}")
    if videos.ndim == 4:
        videos = videos[None]
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"expected (N, F, H, W, 3) videos, got shape {videos.shape}")
    t = torch.from_numpy(np.ascontiguousarray(videos)).permute(0, 4, 1, 2, 3).float()
    return t / 127.5 - 1.0


def from_tensor(videos: "torch.Tensor | np.ndarray") -> np.ndarray:
    """float ``(N, 3, F, H, W)`` in [-1, 1] (clamped) -> uint8 ``(N, F, H, W, 3)``."""
    if isinstance(videos, torch.Tensor):
        videos = videos.detach().to("cpu", torch.float32).numpy()
    videos = np.asarray(videos, dtype=np.float32)
    if videos.ndim == 4:
        videos = videos[None]
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"expected (N, 3, F, H, W) videos, got shape {videos.shape}")
    scaled = (np.clip(videos, -1.0, 1.0) + 1.0) * 127.5
    return np.round(scaled).astype(np.uint8).transpose(0, 2, 3, 4, 1)
