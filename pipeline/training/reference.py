"""The frozen reference of preference training, owned by the trainer (not by the model object).

Full fine-tuning: a frozen copy of the denoiser, taken before any update (or loaded from a refreshed
reference's weights), sharded with FSDP2 like the policy when there are several workers, so each worker
holds a shard of it rather than a full replica. LoRA: ``None`` — the reference is the same denoiser with its
adapters disabled (no second copy at all), which :meth:`Backbone.predict` does for ``reference=True``.
"""

from __future__ import annotations

import copy

from safetensors.torch import load_file
from torch import nn

from ..backbones.base import Backbone


def build_reference(backbone: Backbone, *, weights: str = "", lora: bool = False) -> nn.Module | None:
    """The reference denoiser for a backbone whose denoiser still holds the starting weights."""
    if lora:
        if weights:
            raise ValueError("train.reference_weights with LoRA: the LoRA reference is the base model (adapters off)")
        return None
    ref = copy.deepcopy(backbone.denoiser)
    if weights:  # a refreshed reference (e.g. last round's policy)
        ref.load_state_dict(load_file(weights, device=str(backbone.device)), strict=True)
    return ref.requires_grad_(False).eval()
