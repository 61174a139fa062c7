"""LAION improved aesthetic predictor (Schuhmann, "improved-aesthetic-predictor", the
``sac+logos+ava1-l14-linearMSE.pth`` head used to build LAION-Aesthetics V2).

Formula (the published ``simple_inference.py``)::

    e = CLIP_ViT-L/14.encode_image(x);  e = e / ||e||_2
    score = MLP(e)

``MLP`` is ``Linear(768, 1024) -> Dropout(0.2) -> Linear(1024, 128) -> Dropout(0.2) ->
Linear(128, 64) -> Dropout(0.1) -> Linear(64, 16) -> Linear(16, 1)`` (no activations; see
:class:`pipeline.rewards.base.AestheticMLP`). Scores are on the AVA-like 1-10 scale (~5-7 for
typical generations); no further normalisation. The prompt is ignored.

CLIP: OpenAI CLIP ViT-L/14, loaded as a transformers ``CLIPModel`` (a local copy of
``openai/clip-vit-large-patch14``, the same weights as OpenAI's ``ViT-L/14``);
``get_image_features`` is ``encode_image`` (768-d projected embedding).
Preprocessing: OpenAI CLIP's (shortest side 224, bicubic, centre crop 224, CLIP mean/std), from
the CLIP folder's ``preprocessor_config.json``, applied in torch.

Local layout (choose either)::

    path = .../aesthetic/                      # a folder holding
        sac+logos+ava1-l14-linearMSE.pth       #   the head (the only *.pth/*.pt/*.safetensors file)
        clip/                                  #   a CLIPModel folder (clip-vit-large-patch14)
    path = .../sac+logos+ava1-l14-linearMSE.pth, clip_path = .../clip-vit-large-patch14

The head loads with ``torch.load(weights_only=True)`` (or safetensors), strictly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._clip import image_embeddings, load_clip
from .base import (AestheticMLP, RewardModel, RewardModelError, find_one_file, load_state_dict_file,
                   load_strict, require_path, resolve_dtype)

WHAT = "LAION aesthetic"


class AestheticScore(RewardModel):
    name = "aesthetic"

    def __init__(self, path: Any, clip_path: Any = None, batch_size: int = 32, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__(batch_size=batch_size, device=device)
        p = require_path(path, WHAT)
        if p.is_dir():
            head_file = find_one_file(p, ("*.pth", "*.pt", "*.safetensors"), WHAT)
            if clip_path is None:
                clip_path = p / "clip"
                if not clip_path.exists():
                    raise FileNotFoundError(f"{WHAT}: no clip_path given and no CLIP folder at {clip_path}")
        else:
            head_file = p
            if clip_path is None:
                raise ValueError(f"{WHAT}: path {p} is the head file; pass clip_path (a CLIP ViT-L/14 folder)")
        state = load_state_dict_file(head_file, WHAT)
        if "layers.0.weight" not in state:
            raise RewardModelError(f"{WHAT}: {head_file} is not an aesthetic-predictor head "
                                   f"(no 'layers.0.weight'; keys {sorted(state)[:6]})")
        self.mlp = AestheticMLP(int(state["layers.0.weight"].shape[1]))
        load_strict(self.mlp, state, f"{WHAT} head {head_file}")
        self.clip = load_clip(clip_path, WHAT, resolve_dtype(dtype), need_tokenizer=False)
        proj = int(self.clip.model.config.projection_dim)
        if proj != self.mlp.input_size:
            raise RewardModelError(f"{WHAT}: the head expects {self.mlp.input_size}-d CLIP embeddings but "
                                   f"{Path(str(clip_path))} gives {proj}-d (the head is for CLIP ViT-L/14)")
        self._finish_init()

    def modules(self) -> list[nn.Module]:
        return [self.clip.model, self.mlp]

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        emb = image_embeddings(self.clip, images)  # float32, L2-normalised
        return self.mlp(emb).squeeze(-1)
