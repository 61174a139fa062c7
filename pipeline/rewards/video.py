"""Video rewards: scorers of ``(N, 3, F, H, W)`` videos in [-1, 1] behind the same :class:`RewardModel` interface.

* :class:`FrameAverage` (``frame_average``) scores every frame with ANY image scorer spec (PickScore, CLIP score,
  HPS, ImageReward, aesthetic, a mixture of them) and averages over frames — the per-frame image metrics video
  preference papers report (e.g. per-frame PickScore / CLIP score). One generic wrapper instead of a video copy of
  each model, so every image scorer and its preprocessing is reused unchanged.
* :class:`TemporalConsistency` (``temporal_consistency``) is the mean cosine similarity of consecutive frames'
  CLIP image embeddings: 1 for a static video, lower as the content changes between frames (the VBench
  "subject / background consistency" idea; ``mode="vbench"`` gives VBench's exact averaging).

A video scorer's ``batch_size`` counts videos (one chunk is moved to the device at a time); the image scorer
inside :class:`FrameAverage` keeps its own ``batch_size`` in frames.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ._clip import image_embeddings, load_clip
from .base import RewardModel, WeightedMixture, check_inputs, resolve_dtype


def frame_indices(num_frames: int, max_frames: int = 0) -> torch.Tensor:
    """All frames, or ``max_frames`` evenly spaced ones (first and last included) when the video is longer:
    per-frame scoring costs one image forward per frame, and neighbouring frames of an 81-frame video add little."""
    if max_frames <= 0 or num_frames <= max_frames:
        return torch.arange(num_frames)
    return torch.linspace(0, num_frames - 1, max_frames).round().long().unique()


def _frames(videos: torch.Tensor, index: "torch.Tensor | None" = None) -> torch.Tensor:
    """``(n, 3, F, H, W)`` -> ``(n * f, 3, H, W)``, video-major (the frames of video 0 first)."""
    if index is not None:
        videos = videos.index_select(2, index.to(videos.device))
    n, c, f, h, w = videos.shape
    return videos.transpose(1, 2).reshape(n * f, c, h, w)


class FrameAverage(RewardModel):
    """``score(video) = mean_f inner(frame_f, prompt)`` for any image scorer ``inner``.

    ``inner``: a reward spec (dict or list of dicts, as for ``build_reward``) or a built image
    :class:`RewardModel`. ``max_frames``: score at most this many evenly spaced frames (0 = all).
    ``device`` moves the inner scorer. A batch-standardised inner mixture is refused: its z-scores would be taken
    over the frames of one chunk, making a video's score depend on its chunk-mates — standardise in the outer
    mixture instead.
    """

    name = "frame_average"
    video = True

    def __init__(self, inner: "Mapping[str, Any] | Sequence[Mapping[str, Any]] | RewardModel", max_frames: int = 0,
                 batch_size: int = 4, device: Any = None) -> None:
        from . import build_reward  # the registry imports this module lazily

        super().__init__(batch_size=batch_size, device=device)
        if int(max_frames) < 0:
            raise ValueError(f"frame_average: max_frames must be >= 0 (0 = every frame), got {max_frames}")
        model = build_reward(inner)
        if model.video:
            raise ValueError(f"frame_average wraps an image scorer; {model.name!r} already scores videos "
                             f"(N, 3, F, H, W): use it directly")
        if isinstance(model, WeightedMixture) and model.standardize == "batch":
            raise ValueError("frame_average: the inner mixture standardises over the batch, which here would be the "
                             "frames of a chunk; put 'standardize': 'batch' on the outer mixture instead")
        self.inner, self.max_frames = model, int(max_frames)
        self.name = f"frame_average({model.name})"
        self._device = model.device
        self._finish_init()

    def modules(self) -> list[nn.Module]:
        return self.inner.modules()

    def to(self, device: "str | torch.device") -> "FrameAverage":
        self.inner.to(device)
        self._device = self.inner.device  # a CPU-only inner (toy) stays on the CPU
        return self

    def _chunk_frame_scores(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        index = frame_indices(videos.shape[2], self.max_frames)
        f = len(index)
        scores = self.inner(_frames(videos, index), [p for p in prompts for _ in range(f)])
        return scores.view(videos.shape[0], f)

    def frame_scores(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The per-frame scores ``(N, f)`` (float32, CPU) whose row means are the video scores — for logging."""
        videos, prompts = check_inputs(videos, prompts, video=True)
        f = len(frame_indices(videos.shape[2], self.max_frames))
        out = [self._chunk_frame_scores(videos[s:s + self.batch_size], prompts[s:s + self.batch_size])
               for s in range(0, videos.shape[0], self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, f, dtype=torch.float32)

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self._chunk_frame_scores(images, prompts).mean(dim=1)

    def __repr__(self) -> str:
        return f"FrameAverage({self.inner!r}, max_frames={self.max_frames}, batch_size={self.batch_size})"


MODES = ("adjacent", "vbench")


class TemporalConsistency(RewardModel):
    """Frame-to-frame consistency from CLIP image embeddings ``e_t`` (projected, L2-normalised); the prompt is ignored.

    ``mode="adjacent"`` (default): ``mean_{t=1}^{F-1} cos(e_{t-1}, e_t)``.
    ``mode="vbench"``: VBench's subject / background consistency averaging,
    ``mean_{t=1}^{F-1} (max(0, cos(e_{t-1}, e_t)) + max(0, cos(e_0, e_t))) / 2`` (VBench uses DINO features for
    subjects and CLIP for backgrounds; here the features are always the given CLIP folder's).

    1 for a static video; every frame must be scored, so there is no frame subsampling. Videos need F >= 2.
    ``frame_batch_size``: frames per CLIP forward (``batch_size`` counts videos).
    """

    name = "temporal_consistency"
    video = True

    def __init__(self, path: Any, mode: str = "adjacent", processor_path: Any = None, batch_size: int = 4,
                 frame_batch_size: int = 64, device: Any = None, dtype: Any = None) -> None:
        if mode not in MODES:
            raise ValueError(f"temporal_consistency mode must be one of {MODES}, got {mode!r}")
        if int(frame_batch_size) < 1:
            raise ValueError(f"frame_batch_size must be >= 1, got {frame_batch_size}")
        super().__init__(batch_size=batch_size, device=device)
        self.mode, self.frame_batch_size = mode, int(frame_batch_size)
        self.clip = load_clip(path, "temporal consistency", resolve_dtype(dtype), processor_path,
                              need_tokenizer=False)
        self._finish_init()

    def modules(self) -> list[nn.Module]:
        return [self.clip.model]

    def frame_embeddings(self, videos: torch.Tensor) -> torch.Tensor:
        """``(n, F, D)`` L2-normalised CLIP image embeddings (float32) of every frame."""
        frames = _frames(videos)
        emb = torch.cat([image_embeddings(self.clip, frames[s:s + self.frame_batch_size])
                         for s in range(0, frames.shape[0], self.frame_batch_size)])
        return emb.view(videos.shape[0], videos.shape[2], -1)

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.shape[2] < 2:
            raise ValueError(f"temporal_consistency needs at least 2 frames per video (N, 3, F, H, W), got "
                             f"F={images.shape[2]} in a chunk of shape {tuple(images.shape)}")
        emb = self.frame_embeddings(images)
        adjacent = (emb[:, 1:] * emb[:, :-1]).sum(dim=-1)  # (n, F - 1)
        if self.mode == "adjacent":
            return adjacent.mean(dim=1)
        to_first = (emb[:, 1:] * emb[:, :1]).sum(dim=-1)
        return ((adjacent.clamp_min(0.0) + to_first.clamp_min(0.0)) / 2).mean(dim=1)
