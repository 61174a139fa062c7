"""Pick the backbone class for a local model folder from its ``model_index.json`` (or its subfolders)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .base import Backbone
from .unet import check_model_folder
from .video import VideoBackbone

#: diffusers pipeline class names (model_index.json "_class_name") → the backbone class ("module:Class", imported
#: when a folder names it: every Ray worker imports this package, and the video families pull in diffusers'
#: video pipelines and their text encoders)
PIPELINE_CLASSES: dict[str, str] = {
    "StableDiffusionPipeline": "unet:UNetBackbone",
    "ToyWorldReference": "unet:UNetBackbone",
    "StableDiffusionXLPipeline": "sdxl:SDXLBackbone",
    "StableDiffusion3Pipeline": "sd3:SD3Backbone",
    "WanPipeline": "wan:WanBackbone",
    "CogVideoXPipeline": "cogvideox:CogVideoXBackbone",
}

#: transformer ``_class_name`` → backbone class, for folders without ``model_index.json``
TRANSFORMER_CLASSES: dict[str, str] = {
    "SD3Transformer2DModel": "sd3:SD3Backbone",
    "WanTransformer3DModel": "wan:WanBackbone",
    "CogVideoXTransformer3DModel": "cogvideox:CogVideoXBackbone",
}


def _class(spec: str) -> type[Backbone]:
    module, name = spec.split(":")
    return getattr(importlib.import_module(f".{module}", __package__), name)


def backbone_class(path: str | Path) -> type[Backbone]:
    path = check_model_folder(path, required=())
    index = path / "model_index.json"
    if index.is_file():
        try:
            name = json.loads(index.read_text()).get("_class_name")
        except json.JSONDecodeError as err:
            raise ValueError(f"{index} is not valid JSON: {err}") from err
        if name in PIPELINE_CLASSES:
            return _class(PIPELINE_CLASSES[name])
        raise ValueError(f"{index}: pipeline class {name!r} is not supported; expected one of {sorted(PIPELINE_CLASSES)}")
    if (path / "transformer").is_dir():
        config = path / "transformer" / "config.json"
        name = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
        return _class(TRANSFORMER_CLASSES.get(name, "sd3:SD3Backbone"))
    if (path / "text_encoder_2").is_dir():
        return _class("sdxl:SDXLBackbone")
    return _class("unet:UNetBackbone")


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
