"""Pick the backbone class for a local model folder from its ``model_index.json`` (or its subfolders)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .base import Backbone
from .cogvideox import CogVideoXBackbone
from .sd3 import SD3Backbone
from .sdxl import SDXLBackbone
from .unet import UNetBackbone, check_model_folder
from .video import VideoBackbone
from .wan import WanBackbone

#: diffusers pipeline class names (model_index.json "_class_name") → backbone class
PIPELINE_CLASSES: dict[str, type[Backbone]] = {
    "StableDiffusionPipeline": UNetBackbone,
    "ToyWorldReference": UNetBackbone,
    "StableDiffusionXLPipeline": SDXLBackbone,
    "StableDiffusion3Pipeline": SD3Backbone,
    "WanPipeline": WanBackbone,
    "CogVideoXPipeline": CogVideoXBackbone,
}

#: transformer ``_class_name`` → backbone class, for folders without ``model_index.json``
TRANSFORMER_CLASSES: dict[str, type[Backbone]] = {
    "SD3Transformer2DModel": SD3Backbone,
    "WanTransformer3DModel": WanBackbone,
    "CogVideoXTransformer3DModel": CogVideoXBackbone,
}


def backbone_class(path: str | Path) -> type[Backbone]:
    path = check_model_folder(path, required=())
    index = path / "model_index.json"
    if index.is_file():
        try:
            name = json.loads(index.read_text()).get("_class_name")
        except json.JSONDecodeError as err:
            raise ValueError(f"{index} is not valid JSON: {err}") from err
        if name in PIPELINE_CLASSES:
            return PIPELINE_CLASSES[name]
        raise ValueError(f"{index}: pipeline class {name!r} is not supported; expected one of {sorted(PIPELINE_CLASSES)}")
    if (path / "transformer").is_dir():
        config = path / "transformer" / "config.json"
        name = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
        return TRANSFORMER_CLASSES.get(name, SD3Backbone)
    if (path / "text_encoder_2").is_dir():
        return SDXLBackbone
    return UNetBackbone


def load_backbone(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  lora_rank: int = 0, weights: str | Path = "", video_size: tuple[int, int, int] | None = None) -> Backbone:
    """Load any supported local model folder.

    ``weights`` is a trained denoiser (``denoiser.safetensors`` written by the trainer) loaded strictly on
    top of the folder's — how a round's policy is restored for sampling and evaluation. (Training sets its
    reference explicitly; see ``pipeline/training/reference.py``.) ``lora_rank > 0`` trains LoRA adapters.
    ``video_size`` = (frames, height, width) in pixels sets a video backbone's clip size (default: the folder's
    ``_video_size``, else the family's; see :mod:`.video`); image backbones refuse it.
    """
    cls = backbone_class(path)
    kw = {}
    if video_size is not None:
        if not issubclass(cls, VideoBackbone):
            raise ValueError(f"video_size={video_size!r}: {path} is an image model ({cls.__name__})")
        kw["video_size"] = tuple(video_size)
    backbone = cls.from_pretrained(path, device=device, dtype=dtype, **kw)
    if lora_rank:
        backbone.enable_lora(rank=lora_rank)
    if weights:
        weights = Path(weights)
        if not weights.is_file():
            raise FileNotFoundError(f"denoiser weights {weights} do not exist")
        backbone.denoiser.load_state_dict(load_file(str(weights), device=str(device)), strict=True)
    return backbone
