"""PickScore (Kirstain et al., "Pick-a-Pic: An Open Dataset of User Preferences for
Text-to-Image Generation", NeurIPS 2023; weights ``yuvalkirstain/PickScore_v1``, a CLIP-H/14
fine-tuned on Pick-a-Pic).

Formula (the authors' published inference example)::

    score = logit_scale.exp() * cos(image_emb, text_emb)

with ``image_emb = CLIPModel.get_image_features``, ``text_emb = CLIPModel.get_text_features``
(projected embeddings, L2-normalised) and the model's own learned ``logit_scale`` (exp ~ 100),
so typical values are ~18-23. No further normalisation; softmax over the scores of several
images for one prompt gives the paper's preference probabilities (not done here).

Preprocessing: the CLIP image processor the authors pair with the model (that of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``): shortest side to 224, bicubic, centre crop 224,
OpenAI CLIP mean/std; read from ``preprocessor_config.json`` and applied in torch. Text:
the CLIP tokenizer, padded, truncated to 77 tokens.

Local folder: ``path`` is a ``CLIPModel`` folder (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``); the tokenizer / preprocessor files live in the same folder or in
``processor_path`` (e.g. a local copy of the laion CLIP-ViT-H-14 repo's processor files).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._clip import image_embeddings, load_clip, text_embeddings
from .base import RewardModel, resolve_dtype


class PickScore(RewardModel):
    name = "pickscore"

    def __init__(self, path: Any, processor_path: Any = None, batch_size: int = 32,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(batch_size=batch_size, device=device)
        self.clip = load_clip(path, "PickScore", resolve_dtype(dtype), processor_path,
                              tokenizer_hint="; PickScore_v1 uses the processor of "
                                             "laion/CLIP-ViT-H-14-laion2B-s32B-b79K: copy its tokenizer "
                                             "and preprocessor files into the folder or pass processor_path")
        self._finish_init()

    def modules(self) -> list[nn.Module]:
        return [self.clip.model]

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img = image_embeddings(self.clip, images)
        txt = text_embeddings(self.clip, prompts)
        scale = self.clip.model.logit_scale.float().exp()
        return scale * (img * txt).sum(dim=-1)
