"""CLIP score: image-text cosine similarity of a local CLIP model.

Formula (default ``variant="cosine"``)::

    score = cos(image_emb, text_emb)

with the projected, L2-normalised embeddings of a transformers ``CLIPModel``
(``get_image_features`` / ``get_text_features``). This is the raw cosine that the SDPO /
Diffusion-DPO line of papers reports as "CLIP score" (values ~0.3-0.36 for ViT-H/14 or
ViT-L/14 on good generations).

``variant="clipscore"`` gives Hessel et al.'s CLIPScore (EMNLP 2021, "CLIPScore: A
Reference-free Evaluation Metric for Image Captioning")::

    score = 2.5 * max(cos, 0)

(``w = 2.5``; their paper also prefixes captions with "A photo depicts", available as
``prompt_prefix``; the default adds nothing). Some papers report ``100 * cos`` — multiply
yourself.

Preprocessing: the folder's CLIP image processor (``preprocessor_config.json``; OpenAI CLIP:
shortest side 224, bicubic, centre crop, CLIP mean/std) in torch; tokenizer truncates to the
text tower's context (77).

Local folder: a ``CLIPModel`` folder with its processor files, e.g. a local copy of
``openai/clip-vit-large-patch14`` or ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._clip import image_embeddings, load_clip, text_embeddings
from .base import RewardModel, resolve_dtype

VARIANTS = ("cosine", "clipscore")


class CLIPScore(RewardModel):
    name = "clip_score"

    def __init__(self, path: Any, variant: str = "cosine", prompt_prefix: str = "",
                 processor_path: Any = None, batch_size: int = 32, device: Any = None,
                 dtype: Any = None) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"CLIP score variant must be one of {VARIANTS}, got {variant!r}")
        super().__init__(batch_size=batch_size, device=device)
        self.variant = variant
        self.prompt_prefix = str(prompt_prefix)
        self.clip = load_clip(path, "CLIP score", resolve_dtype(dtype), processor_path)
        self._finish_init()

    def modules(self) -> list[nn.Module]:
        return [self.clip.model]

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if self.prompt_prefix:
            prompts = [f"{self.prompt_prefix} {p}" for p in prompts]
        cos = (image_embeddings(self.clip, images) * text_embeddings(self.clip, prompts)).sum(dim=-1)
        if self.variant == "clipscore":
            return 2.5 * cos.clamp_min(0.0)
        return cos
