"""The toy video world's verifiable reward as a :class:`~pipeline.rewards.base.RewardModel`.

Wraps :func:`pipeline.toyworld.video.score`: the image world's detector on every frame (colour,
shape, count) plus motion direction from tracked centroids and temporal consistency; ``reward`` in
[0, 1] is ``5/6 * (dimensions right) / 5 + 1/6 * soft`` (see :mod:`pipeline.toyworld.video.detector`).
Videos ``(N, 3, F, H, W)`` in [-1, 1] are moved to the CPU (the detector is NumPy / SciPy); prompts are
toy video prompts ("two red circles moving left"). No weights, no files:
``build_reward({"name": "toy_video"})``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import RewardModel, check_inputs


class ToyVideoReward(RewardModel):
    name = "toy_video"
    video = True

    def __init__(self, batch_size: int = 64, device: Any = None) -> None:
        super().__init__(batch_size=batch_size, device=None)  # the detector runs on the CPU

    def to(self, device: Any) -> "ToyVideoReward":
        return self  # nothing to move; inputs are copied to the CPU per chunk

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from pipeline.toyworld.video import score

        result = score(images.detach().float().cpu(), prompts)
        return torch.as_tensor(result.reward, dtype=torch.float32)

    def dimensions(self, videos: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per-dimension judgements (colour, shape, count, motion, consistency, overall: 0/1 floats) and
        the reward, for evaluation reports."""
        from pipeline.toyworld.video import DIMENSIONS, score

        videos, prompts = check_inputs(videos, prompts, video=True)
        result = score(videos.detach().float().cpu(), prompts)
        return {name: torch.as_tensor(getattr(result, name), dtype=torch.float32)
                for name in (*DIMENSIONS, "overall", "reward")}
