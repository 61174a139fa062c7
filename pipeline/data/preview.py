"""Human-viewable previews of generated samples: the ``png_w`` / ``png_l`` bytes of the pair schema.

An image (3, H, W) becomes a plain PNG. A video (3, F, H, W) becomes ONE PNG frame strip — its frames side by side,
left to right, so the strip is ``F × W`` wide and ``H`` high — because every consumer of the preview columns (the
annotation app's data URIs, Label Studio tasks, a notebook opening the Parquet file) already shows a PNG, and a strip
shows all frames at once, which is what a person comparing two videos side by side needs. Long videos are
subsampled to ``max_frames`` evenly spaced frames (first and last kept) so a strip stays viewable.
:func:`video_gif` makes an animated GIF for when motion matters; it is not stored in the pairs (256-colour palette,
several times larger, and no PNG consumer would show it).

Only numpy and PIL: Ray imports this in its data workers.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

#: most frames a preview strip shows; a 81-frame 832-px-wide video would otherwise be a 67 000-px-wide PNG
MAX_PREVIEW_FRAMES = 16


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats → uint8 [0, 255], rounded (the generators' output range)."""
    return np.clip((np.asarray(x, dtype=np.float32) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def preview_frames(num_frames: int, max_frames: int = MAX_PREVIEW_FRAMES) -> np.ndarray:
    """The frame indices a preview shows: all, or ``max_frames`` evenly spaced ones (first and last included)."""
    if max_frames <= 0 or num_frames <= max_frames:
        return np.arange(num_frames)
    return np.unique(np.round(np.linspace(0, num_frames - 1, max_frames)).astype(int))


def frame_strip(sample: np.ndarray, max_frames: int = MAX_PREVIEW_FRAMES) -> np.ndarray:
    """(3, H, W) → (H, W, 3) uint8; (3, F, H, W) → (H, f·W, 3) uint8 with the frames left to right, no gaps (so a
    frame is recovered by slicing ``W`` columns)."""
    sample = np.asarray(sample)
    if sample.ndim == 3 and sample.shape[0] == 3:
        return to_uint8(sample.transpose(1, 2, 0))
    if sample.ndim == 4 and sample.shape[0] == 3:
        _, _, h, w = sample.shape
        frames = sample[:, preview_frames(sample.shape[1], max_frames)]
        return to_uint8(frames.transpose(2, 1, 3, 0).reshape(h, -1, 3))  # (H, f, W, 3) → (H, f·W, 3)
    raise ValueError(f"preview: expected an image (3, H, W) or a video (3, F, H, W) in [-1, 1], "
                     f"got shape {tuple(sample.shape)}")


def preview_png(sample: np.ndarray, max_frames: int = MAX_PREVIEW_FRAMES) -> bytes:
    """PNG bytes of an image (3, H, W) or of a video's frame strip (3, F, H, W); values in [-1, 1]."""
    buf = io.BytesIO()
    Image.fromarray(frame_strip(sample, max_frames)).save(buf, format="PNG")
    return buf.getvalue()


def video_gif(video: np.ndarray, fps: float = 8.0) -> bytes:
    """An animated GIF (looping) of a video (3, F, H, W) in [-1, 1], for looking at motion."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video_gif: expected a video (3, F, H, W) in [-1, 1], got shape {tuple(video.shape)}")
    frames = [Image.fromarray(f) for f in to_uint8(video.transpose(1, 2, 3, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return buf.getvalue()
