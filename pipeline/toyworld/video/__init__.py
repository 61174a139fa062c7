"""The toy video world: motion prompts, a deterministic clip renderer and a verifiable video reward
(colour, shape, count, motion direction and temporal consistency), built on the image world.

Videos are ``(N, 3, F, H, W)`` float tensors in [-1, 1] (the project's video layout); ``to_tensor`` /
``from_tensor`` convert from / to the renderer's uint8 ``(N, F, H, W, 3)``. See docs/toyworld.md.

The reference text-to-video model (:mod:`.reference`, a pixel-space Wan folder) is imported on first use of
``VIDEO_REFERENCE_DIR`` from here: the reward (this package's detector) does not need it.
"""

from .detector import (DIMENSIONS, VideoDetection, VideoScoreResult, detect, detect_batch, judge,
                       score, to_frames)
from .grammar import (ATTRIBUTES, DIRECTIONS, MOTION_PHRASES, MOTION_VECTORS, MOTIONS, REVERSED,
                      VideoSpec, all_specs, as_spec, corrupt_spec, differ_in, fit_specs,
                      heldout_motion_pairs, heldout_specs, is_heldout, parse_prompt, train_specs,
                      validation_specs)
from .renderer import FRAMES, Track, default_speed, from_tensor, layout, render, render_batch, to_tensor

__all__ = [
    "DIMENSIONS", "VideoDetection", "VideoScoreResult", "detect", "detect_batch", "judge", "score",
    "to_frames", "ATTRIBUTES", "DIRECTIONS", "MOTION_PHRASES", "MOTION_VECTORS", "MOTIONS", "REVERSED",
    "VideoSpec", "all_specs", "as_spec", "corrupt_spec", "differ_in", "fit_specs", "heldout_motion_pairs",
    "heldout_specs", "is_heldout", "parse_prompt", "train_specs", "validation_specs", "FRAMES", "Track",
    "default_speed", "from_tensor", "layout", "render", "render_batch", "to_tensor", "VIDEO_REFERENCE_DIR",
]


def __getattr__(name: str):
    if name == "VIDEO_REFERENCE_DIR":
        from .reference import VIDEO_REFERENCE_DIR

        return VIDEO_REFERENCE_DIR
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
