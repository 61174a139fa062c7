"""Shared loading and preprocessing for the transformers-``CLIPModel`` based scorers
(PickScore, CLIP score, the LAION aesthetic predictor's image tower).

A CLIP folder is what ``CLIPModel.save_pretrained`` writes (``config.json`` with
``model_type: "clip"`` and ``model.safetensors`` / ``pytorch_model.bin``) plus, for the processor,
``preprocessor_config.json`` and the tokenizer files (``tokenizer.json``, or ``vocab.json`` +
``merges.txt``, with ``tokenizer_config.json``) — the layout of the Hugging Face model repos.

The image processor's settings are read from ``preprocessor_config.json`` (``CLIPImageProcessor``
keys: ``size`` / ``crop_size`` / ``resample`` / ``image_mean`` / ``image_std`` / ``do_*``) and
applied in torch (see :mod:`pipeline.rewards.base`); without that file the OpenAI CLIP defaults
are used (shortest side to the vision tower's ``image_size``, bicubic, centre crop, CLIP
mean/std), which is what every CLIP checkpoint used here was trained with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .base import (CLIP_MEAN, CLIP_STD, RewardModelError, _resize, center_crop, normalize, read_json,
                   require_path, require_transformers_folder, resize_shortest, to_unit)

logger = logging.getLogger(__name__)

_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL codes used by transformers


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize (shortest edge, or to an exact ``(h, w)``), centre crop, normalise — in torch."""

    shortest_edge: "int | None" = 224
    exact_size: "tuple[int, int] | None" = None
    crop: "tuple[int, int] | None" = (224, 224)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    mode: str = "bicubic"
    do_normalize: bool = True

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (N, 3, H, W) in [-1, 1] -> normalised pixel values (float32)."""
        x = to_unit(images)
        if self.exact_size is not None:
            x = _resize(x, self.exact_size, self.mode)
        elif self.shortest_edge is not None:
            x = resize_shortest(x, self.shortest_edge, self.mode)
        if self.crop is not None:
            x = center_crop(x, self.crop)
        return normalize(x, self.mean, self.std) if self.do_normalize else x

    @classmethod
    def from_processor_config(cls, cfg: dict[str, Any], what: str) -> "ImagePreprocess":
        def hw(value: Any) -> "tuple[int, int] | None":
            if value is None:
                return None
            if isinstance(value, int):
                return (value, value)
            if isinstance(value, dict) and "height" in value and "width" in value:
                return (int(value["height"]), int(value["width"]))
            raise RewardModelError(f"{what}: unsupported size spec {value!r} in preprocessor_config.json")

        shortest, exact = None, None
        if cfg.get("do_resize", True):
            size = cfg.get("size", 224)
            if isinstance(size, int):
                shortest = size
            elif isinstance(size, dict) and "shortest_edge" in size:
                shortest = int(size["shortest_edge"])
            else:
                exact = hw(size)
        crop = hw(cfg.get("crop_size", 224)) if cfg.get("do_center_crop", True) else None
        resample = cfg.get("resample", 3)
        mode = _RESAMPLE.get(resample, "bicubic") if isinstance(resample, int) else str(resample).lower()
        if mode not in ("nearest", "bilinear", "bicubic"):
            logger.warning("%s: resample %r not supported, using bicubic", what, resample)
            mode = "bicubic"
        return cls(shortest_edge=shortest, exact_size=exact, crop=crop,
                   mean=tuple(float(v) for v in cfg.get("image_mean", CLIP_MEAN)),
                   std=tuple(float(v) for v in cfg.get("image_std", CLIP_STD)),
                   mode=mode, do_normalize=bool(cfg.get("do_normalize", True)))


def load_preprocess(folder: Path, vision_image_size: int, what: str) -> ImagePreprocess:
    cfg_file = folder / "preprocessor_config.json"
    if cfg_file.is_file():
        return ImagePreprocess.from_processor_config(read_json(cfg_file, what), what)
    logger.warning("%s: no preprocessor_config.json in %s; using the OpenAI CLIP preprocessing "
                   "(shortest side %d, bicubic, centre crop, CLIP mean/std)", what, folder, vision_image_size)
    return ImagePreprocess(shortest_edge=vision_image_size, crop=(vision_image_size, vision_image_size))


def load_tokenizer(folder: Path, what: str, hint: str = "") -> Any:
    if not (folder / "tokenizer.json").is_file() and not (
            (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        raise RewardModelError(f"{what}: no CLIP tokenizer in {folder} (expected tokenizer.json, or "
                               f"vocab.json + merges.txt){hint}")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise RewardModelError(f"{what}: could not load the tokenizer from {folder} ({type(e).__name__}: {e})") from e


@dataclass
class LoadedClip:
    model: Any  # transformers.CLIPModel
    preprocess: ImagePreprocess
    tokenizer: Any
    max_length: int
    folder: Path


def load_clip(path: Any, what: str, dtype: torch.dtype = torch.float32, processor_path: Any = None,
              need_tokenizer: bool = True, tokenizer_hint: str = "") -> LoadedClip:
    """Load a local ``CLIPModel`` folder (and its processor files, from ``processor_path`` or
    the model folder). Existence and kind are checked before ``from_pretrained`` is called, and
    ``local_files_only=True`` is passed, so nothing can fall through to a hub lookup."""
    folder, cfg = require_transformers_folder(path, what, ("clip",))
    proc = folder if processor_path is None else require_path(processor_path, f"{what} processor")
    if not proc.is_dir():
        raise RewardModelError(f"{what}: processor_path {proc} is not a folder")
    vision = cfg.get("vision_config") or {}
    text = cfg.get("text_config") or {}
    preprocess = load_preprocess(proc, int(vision.get("image_size", 224)), what)
    tokenizer = load_tokenizer(proc, what, tokenizer_hint) if need_tokenizer else None
    from transformers import CLIPModel
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
    except Exception as e:
        raise RewardModelError(f"{what}: could not load a CLIPModel from {folder} ({type(e).__name__}: {e})") from e
    return LoadedClip(model=model, preprocess=preprocess, tokenizer=tokenizer,
                      max_length=int(text.get("max_position_embeddings", 77)), folder=folder)


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4.x) or an output object (5.x)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"unexpected CLIP feature output {type(out).__name__}")


def image_embeddings(clip: LoadedClip, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised projected image embeddings (float32) of images in [-1, 1]."""
    model = clip.model
    pixels = clip.preprocess(images).to(model.dtype)
    emb = _features(model.get_image_features(pixel_values=pixels)).float()
    return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def text_embeddings(clip: LoadedClip, prompts: Sequence[str]) -> torch.Tensor:
    """L2-normalised projected text embeddings (float32), one row per prompt; each distinct
    prompt is encoded once (rollouts repeat prompts K times)."""
    unique = list(dict.fromkeys(prompts))
    enc = clip.tokenizer(unique, padding=True, truncation=True, max_length=clip.max_length,
                         return_tensors="pt")
    device = clip.model.device
    emb = _features(clip.model.get_text_features(input_ids=enc["input_ids"].to(device),
                                                 attention_mask=enc["attention_mask"].to(device))).float()
    emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    position = {p: i for i, p in enumerate(unique)}
    index = torch.tensor([position[p] for p in prompts], device=emb.device)
    return emb[index]
