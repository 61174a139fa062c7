"""The toy video world's verifiable reward: colour, shape, count, motion and temporal consistency.

Every frame goes through the image world's detector (:func:`pipeline.toyworld.detector.detect_batch`:
hue classes, connected components, moment-based shapes), so a frame is read exactly as a toy image is.
The "prompt colour" is the spec's colour; *matching objects* are the objects of that colour in a frame.
Sizes below are fractions of the frame side ``S = max(H, W)`` per frame (at 32 px: 0.48, 0.32, 8 and
0.96 px).

* **colour / count / shape** are judged in each frame by the image rules (colour: matching objects
  exist and hold at least half of the detected mass, in a frame that is not more than half
  chromatic clutter; count: as many matching objects as the prompt says; shape: a strict majority of
  them of the prompt's shape; count and shape only where colour holds). The video attribute holds
  when it holds in a strict majority of the frames; flicker is the consistency dimension's business.
* **motion** (the verifiable analogue of VBench's dynamic degree, with a direction): matching
  objects are tracked between consecutive frames by a minimum-distance assignment of centroids
  (pairs further apart than ``MAX_STEP * S`` are not the same object). The clip's velocity is the
  mean over frame steps of the mean matched displacement. A direction holds when the velocity's
  component along it is at least ``MOVING_MIN_SPEED * S`` per frame and at least ``DOMINANCE`` times
  the component across it; ``still`` holds when the speed is at most ``STILL_MAX_SPEED * S``. It
  needs colour to hold and at least half of the frame steps tracked.
* **consistency** (the analogues of VBench's subject consistency and motion smoothness): every frame
  passes the colour rule, every frame shows the same number of matching objects with the same
  shapes, every object is tracked through every step, and every tracked displacement is within
  ``SMOOTH_TOL * S`` of the clip's velocity (no jumps, no jitter, no object moving on its own).
* **overall**: all five hold.

``reward`` in [0, 1] is ``HARD_WEIGHT * (dimensions right) / 5 + (1 - HARD_WEIGHT) * soft``, ``soft``
the mean of five continuous terms in [0, 1]: the colour's mass fraction, ``exp(-|n - count|)`` and the
mean probability of the prompt's shape (each averaged over frames); for motion
``sigmoid((along - |across|) / (MOVING_MIN_SPEED * S))`` or, for ``still``,
``exp(-speed / (STILL_MAX_SPEED * S))``; for consistency the fraction of frames showing the modal
(count, shapes) times ``exp(-rms(displacement - velocity) / (SMOOTH_TOL * S))`` (untracked: 0).
``HARD_WEIGHT = 5/6`` keeps the image reward's property with five dimensions instead of four: a clip
right in every dimension scores at least 0.833 and one wrong in any dimension at most 0.833.

Videos: uint8 ``(F, H, W, 3)`` / ``(N, F, H, W, 3)`` RGB, or float ``(3, F, H, W)`` / ``(N, 3, F, H, W)``
in [-1, 1] (NumPy or torch, any device), values outside clipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..detector import (CORE_CHROMA, CORE_SATURATION, MAX_CHROMATIC_FRACTION, Detection,
                        detect_batch as detect_frames, to_unit_rgb)
from .grammar import MOTION_VECTORS, VideoSpec, as_spec

DIMENSIONS: tuple[str, ...] = ("colour", "shape", "count", "motion", "consistency")
MOVING_MIN_SPEED = 0.015   # along the stated direction, fraction of the frame side per frame
STILL_MAX_SPEED = 0.01     # "standing still": at most this fast
DOMINANCE = 2.0            # along / across: the direction is within ~27 degrees of the stated one
MAX_STEP = 0.25            # a centroid further than this between frames is another object
SMOOTH_TOL = 0.03          # tracked displacement vs the clip's velocity
HARD_WEIGHT = 5.0 / 6.0
FRAME_CHUNK = 512          # frames per image-detector call (its cost grows faster than linearly)


def to_frames(videos: Any) -> tuple[np.ndarray, int, int]:
    """Videos in any accepted format -> (all frames in a format the image detector takes, N, F)."""
    if hasattr(videos, "detach"):  # torch tensor, without importing torch here
        videos = videos.detach().to("cpu").float().numpy()
    videos = np.asarray(videos)
    if videos.dtype == np.uint8:
        if videos.ndim == 4:
            videos = videos[None]
        if videos.ndim != 5 or videos.shape[-1] != 3:
            raise ValueError(f"uint8 videos must be (N, F, H, W, 3), got {videos.shape}")
        n, f = videos.shape[:2]
        return videos.reshape(n * f, *videos.shape[2:]), n, f
    if not np.issubdtype(videos.dtype, np.floating):
        raise ValueError(f"videos must be uint8 (N, F, H, W, 3) or float (N, 3, F, H, W) in [-1, 1], "
                         f"got {videos.dtype}")
    if videos.ndim == 4:
        videos = videos[None]
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"float videos must be (N, 3, F, H, W) in [-1, 1], got {videos.shape}")
    n, _, f, h, w = videos.shape
    return videos.transpose(0, 2, 1, 3, 4).reshape(n * f, 3, h, w), n, f


@dataclass(frozen=True)
class VideoDetection:
    """What the detector sees in one clip: each frame's objects and its fraction of chromatic pixels."""

    frames: tuple[Detection, ...]
    chromatic: np.ndarray   # (F,) fraction of object-coloured (core) pixels per frame

    @property
    def size(self) -> int:
        return max(self.frames[0].height, self.frames[0].width)


def detect_batch(videos: Any) -> list[VideoDetection]:
    """Detect the objects of every frame of every clip (one vectorised pass of the image detector)."""
    frames, n, f = to_frames(videos)
    unit = to_unit_rgb(frames)
    vmax = unit.max(axis=-1)
    chroma = vmax - unit.min(axis=-1)
    core = (chroma >= CORE_CHROMA) & (chroma >= CORE_SATURATION * vmax)
    chromatic = core.mean(axis=(1, 2)).reshape(n, f)
    per_frame = [d for i in range(0, n * f, FRAME_CHUNK) for d in detect_frames(frames[i:i + FRAME_CHUNK])]
    return [VideoDetection(tuple(per_frame[i * f:(i + 1) * f]), chromatic[i]) for i in range(n)]


def detect(video: Any) -> VideoDetection:
    """Objects in every frame of one clip (uint8 ``(F, H, W, 3)`` or float ``(3, F, H, W)``)."""
    detections = detect_batch(video)
    if len(detections) != 1:
        raise ValueError(f"detect takes one video, got a batch of {len(detections)}")
    return detections[0]


@dataclass(frozen=True)
class VideoScoreResult:
    """Per-clip judgement of a batch; every field is a length-N array (``velocity`` is (N, 2))."""

    colour: np.ndarray       # bool
    shape: np.ndarray        # bool
    count: np.ndarray        # bool
    motion: np.ndarray       # bool
    consistency: np.ndarray  # bool
    overall: np.ndarray      # bool, all five
    reward: np.ndarray       # float64 in [0, 1]
    num_objects: np.ndarray  # int, modal number of matching objects per frame
    velocity: np.ndarray     # float64 (N, 2): px/frame (x right, y down); NaN where nothing was tracked

    def summary(self) -> dict[str, float]:
        """Mean of each boolean dimension and of the reward."""
        return {name: float(np.mean(getattr(self, name))) for name in (*DIMENSIONS, "overall", "reward")}


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def _judge(det: VideoDetection, spec: VideoSpec) -> tuple[list[bool], list[float], int, np.ndarray]:
    """(the five hard judgements, the five soft terms, modal count, velocity) of one clip."""
    n_frames, size = len(det.frames), det.size
    colour_f = np.zeros(n_frames, dtype=bool)
    count_f = np.zeros(n_frames, dtype=bool)
    shape_f = np.zeros(n_frames, dtype=bool)
    soft_colour, soft_count, soft_shape = np.zeros(n_frames), np.zeros(n_frames), np.zeros(n_frames)
    points: list[np.ndarray] = []
    signatures: list[tuple[int, tuple[str, ...]]] = []
    for f, frame in enumerate(det.frames):
        match = frame.of_colour(spec.colour)
        n = len(match)
        mass_all = sum(o.mass for o in frame.objects)
        frac = sum(o.mass for o in match) / mass_all if mass_all > 0 else 0.0
        colour_f[f] = det.chromatic[f] <= MAX_CHROMATIC_FRACTION and n > 0 and frac >= 0.5
        count_f[f] = colour_f[f] and n == spec.count
        shape_f[f] = colour_f[f] and sum(o.shape == spec.shape for o in match) > n / 2.0
        soft_colour[f] = frac
        soft_count[f] = np.exp(-abs(n - spec.count))
        soft_shape[f] = np.mean([o.shape_probs[spec.shape] for o in match]) if n else 0.0
        points.append(np.array([[o.x, o.y] for o in match], dtype=np.float64).reshape(n, 2))
        signatures.append((n, tuple(sorted(o.shape for o in match))))

    majority = n_frames / 2.0
    colour = bool(colour_f.sum() > majority)
    count = bool(count_f.sum() > majority)
    shape = bool(shape_f.sum() > majority)

    # track matching objects between consecutive frames
    step_velocity: list[np.ndarray] = []
    displacements: list[np.ndarray] = []
    every_object_tracked = True
    for a, b in zip(points[:-1], points[1:]):
        if len(a) == 0 or len(b) == 0:
            every_object_tracked = False
            continue
        cost = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
        rows, cols = linear_sum_assignment(cost)
        near = cost[rows, cols] <= MAX_STEP * size
        if near.sum() < max(len(a), len(b)):
            every_object_tracked = False
        if near.any():
            d = b[cols[near]] - a[rows[near]]
            displacements.append(d)
            step_velocity.append(d.mean(axis=0))

    tracked = len(step_velocity) >= (n_frames - 1) / 2.0 and len(step_velocity) > 0
    velocity = np.mean(step_velocity, axis=0) if step_velocity else np.full(2, np.nan)
    ux, uy = MOTION_VECTORS[spec.motion]
    motion, soft_motion = False, 0.0
    if tracked:
        if spec.motion == "still":
            speed = float(np.hypot(*velocity))
            motion = speed <= STILL_MAX_SPEED * size
            soft_motion = float(np.exp(-speed / (STILL_MAX_SPEED * size)))
        else:
            along = float(velocity[0] * ux + velocity[1] * uy)
            across = abs(float(velocity[0] * uy - velocity[1] * ux))
            motion = along >= MOVING_MIN_SPEED * size and along >= DOMINANCE * across
            soft_motion = _sigmoid((along - across) / (MOVING_MIN_SPEED * size))

    modal = max(set(signatures), key=lambda s: (signatures.count(s), s))
    agree = sum(s == modal for s in signatures) / n_frames
    consistency, soft_consistency = False, 0.0
    if displacements:
        deviation = np.linalg.norm(np.concatenate(displacements) - velocity, axis=1)
        soft_consistency = agree * float(np.exp(-np.sqrt(np.mean(deviation ** 2)) / (SMOOTH_TOL * size)))
        consistency = (bool(colour_f.all()) and agree == 1.0 and modal[0] > 0 and every_object_tracked
                       and bool(deviation.max() <= SMOOTH_TOL * size))
    hard = [colour, shape, count, bool(motion), consistency]
    soft = [float(soft_colour.mean()), float(soft_shape.mean()), float(soft_count.mean()),
            soft_motion, soft_consistency]
    return hard, soft, modal[0], velocity


def judge(detections: Sequence[VideoDetection], prompts: Sequence["str | VideoSpec"]) -> VideoScoreResult:
    """Judge already detected clips against their prompts (to score one detection against many prompts)."""
    specs = [as_spec(p) for p in prompts]
    if len(specs) != len(detections):
        raise ValueError(f"{len(detections)} videos but {len(specs)} prompts")
    n = len(specs)
    hard = np.zeros((n, len(DIMENSIONS)), dtype=bool)
    soft = np.zeros((n, len(DIMENSIONS)))
    num = np.zeros(n, dtype=np.int64)
    velocity = np.zeros((n, 2))
    for i, (det, spec) in enumerate(zip(detections, specs)):
        h, s, num[i], velocity[i] = _judge(det, spec)
        hard[i], soft[i] = h, s
    reward = HARD_WEIGHT * hard.mean(axis=1) + (1.0 - HARD_WEIGHT) * soft.mean(axis=1)
    cols = {name: hard[:, k] for k, name in enumerate(DIMENSIONS)}
    return VideoScoreResult(**cols, overall=hard.all(axis=1), reward=np.clip(reward, 0.0, 1.0),
                            num_objects=num, velocity=velocity)


def score(videos: Any, prompts: Sequence["str | VideoSpec"]) -> VideoScoreResult:
    """Judge each clip against its prompt (text or ``VideoSpec``); see the module docs."""
    return judge(detect_batch(videos), prompts)
