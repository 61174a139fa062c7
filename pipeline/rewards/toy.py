"""The toy world's verifiable reward as a :class:`~pipeline.rewards.base.RewardModel`.

Wraps :func:`pipeline.toyworld.score` (a GenEval-style detector for colour, shape, count and
position; see :mod:`pipeline.toyworld.detector` for the formula): ``reward`` in [0, 1] is
``0.8 * (attributes correct) / 4 + 0.2 * soft``. Images (N, 3, H, W) in [-1, 1] are moved to
the CPU (the detector is NumPy / SciPy); prompts are toy-world prompt strings. No weights, no
files: ``build_reward({"name": "toy"})``.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import RewardModel


class ToyReward(RewardModel):
    name = "toy"

    def __init__(self, batch_size: int = 256, device: Any = None) -> None:
        super().__init__(batch_size=batch_size, device=None)  # the detector runs on the CPU

    def to(self, device: Any) -> "ToyReward":
        return self  # nothing to move; inputs are copied to the CPU per chunk

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from pipeline.toyworld import score

        result = score(images.detach().float().cpu(), prompts)
        return torch.as_tensor(result.reward, dtype=torch.float32)
