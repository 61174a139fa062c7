"""Human Preference Score v2 / v2.1 (Wu et al., "Human Preference Score v2: A Solid Benchmark
for Evaluating Human Preferences of Text-to-Image Synthesis", 2023; checkpoints
``HPS_v2_compressed.pt`` and ``HPS_v2.1_compressed.pt`` of the ``xswu/HPSv2`` release).

Model: open_clip ``ViT-H-14`` built with ``open_clip.create_model("ViT-H-14", pretrained=None)``
(nothing downloaded) and the HPS checkpoint's ``state_dict`` loaded strictly (the file holds
``{"state_dict": ...}``; a bare state dict, a ``module.`` prefix or a stale ``attn_mask``
buffer entry are accepted too). Loaded with ``torch.load(weights_only=True)``.

Formula (the authors' ``hpsv2/img_score.py``)::

    score = <image_features, text_features>

with both features L2-normalised by the model (``output_dict=True`` forward), i.e. the plain
cosine similarity: **no logit scale** is applied (the learned ``logit_scale`` is only used in
training). Typical values ~0.25-0.32.

Preprocessing (HPS's ``image_transform(..., is_train=False, resize_longest_max=True)``,
open_clip's ``ResizeMaxSize``): resize so the **longest** side is 224 (bicubic, new size
``round(dim * 224 / max)``), pad to 224x224 with black (fill 0, image centred), then OpenAI CLIP
mean/std normalisation — no centre crop. Applied in torch.

Tokenizer: ``open_clip.get_tokenizer("ViT-H-14")`` — open_clip's ``SimpleTokenizer`` whose BPE
vocabulary (``bpe_simple_vocab_16e6.txt.gz``) ships inside the open_clip package, so it needs
no download; context length 77.

``model_name`` selects the open_clip architecture (default ``ViT-H-14``); ``model_config`` may
name a JSON config file (open_clip's format: ``embed_dim`` / ``vision_cfg`` / ``text_cfg``),
which is registered with ``open_clip.add_model_config`` under its file stem — the supported way
to add architectures (tests use a tiny one).

Local only: a ``model_name`` with open_clip's ``hf-hub:`` schema, or a model config (the file's or
a built-in one's) that names a hub resource — a Hugging Face text tower or tokenizer
(``text_cfg.hf_model_name`` / ``hf_tokenizer_name``) that is not a local folder, any ``hf-hub:``
value, a ``pretrained`` tag that is not a local file, or the ``syntax`` reduction mask (it downloads
nltk data) — is refused with a :class:`RewardModelError` naming the field, before open_clip sees it.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import (CLIP_MEAN, CLIP_STD, RewardModel, RewardModelError, find_one_file,
                   load_state_dict_file, load_strict, normalize, require_path, resize_longest_pad,
                   resolve_dtype, strip_prefix, to_unit)

WHAT = "HPS"
_REGISTER_LOCK = threading.Lock()


#: open_clip config keys whose value is a Hugging Face model / tokenizer id (a hub lookup unless local)
_HF_NAME_KEYS = ("hf_model_name", "hf_tokenizer_name", "hf_processor_name")
_HUB_PREFIX = "hf-hub:"


def hub_references(config: Any, prefix: str = "") -> list[str]:
    """The fields of an open_clip model config that name something off this machine, as
    ``"text_cfg.hf_model_name='roberta-base'"`` strings (empty: the config is local only)."""
    found: list[str] = []
    if isinstance(config, dict):
        for key, value in config.items():
            field = f"{prefix}{key}"
            if isinstance(value, (dict, list)):
                found += hub_references(value, f"{field}.")
            elif not isinstance(value, str) or not value:
                continue
            elif value.startswith(_HUB_PREFIX):
                found.append(f"{field}={value!r}")
            elif key in _HF_NAME_KEYS and not Path(value).expanduser().exists():
                found.append(f"{field}={value!r} (a Hugging Face hub id, not a local folder)")
            elif (key == "pretrained" or key.endswith("_pretrained")) and not Path(value).expanduser().is_file():
                found.append(f"{field}={value!r} (a pretrained tag, not a local file)")
            elif key == "reduction_mask" and value == "syntax":
                found.append(f"{field}='syntax' (downloads nltk data)")
    elif isinstance(config, list):
        for i, value in enumerate(config):
            found += hub_references(value, f"{prefix}{i}.")
    return found


def _refuse_hub(found: list[str], source: str) -> None:
    if found:
        raise RewardModelError(f"{WHAT}: {source} names a hub resource: {'; '.join(found)}. Reward models load "
                               f"from local paths only — point the field at a local folder/file or drop it")


def register_open_clip_config(config_file: Any) -> str:
    """Register an open_clip model-config JSON; returns the model name (the file stem). A config that
    names a hub resource (:func:`hub_references`) is refused, naming the field."""
    import open_clip

    p = require_path(config_file, f"{WHAT} model_config")
    if not p.is_file() or p.suffix != ".json":
        raise RewardModelError(f"{WHAT}: model_config {p} must be an open_clip config .json file")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RewardModelError(f"{WHAT}: model_config {p} is not a JSON file ({e})") from e
    _refuse_hub(hub_references(data), f"model_config {p}")
    with _REGISTER_LOCK:
        open_clip.add_model_config(p)
    name = p.stem
    if open_clip.get_model_config(name) is None:
        raise RewardModelError(f"{WHAT}: {p} is not an open_clip model config "
                               f"(needs 'embed_dim', 'vision_cfg', 'text_cfg')")
    return name


class HPSv2(RewardModel):
    name = "hps"

    def __init__(self, path: Any, model_name: str = "ViT-H-14", model_config: Any = None,
                 batch_size: int = 32, device: Any = None, dtype: Any = None) -> None:
        import open_clip

        super().__init__(batch_size=batch_size, device=device)
        p = require_path(path, WHAT)
        if p.is_dir():
            if (p / "config.json").is_file():
                raise RewardModelError(f"{WHAT}: {p} looks like a transformers model folder (config.json); "
                                       f"HPS expects the HPS checkpoint (HPS_v2*_compressed.pt) or a folder holding it")
            ckpt = find_one_file(p, ("*.pt", "*.pth", "*.safetensors"), WHAT)
        else:
            ckpt = p
        if model_config is not None:
            model_name = register_open_clip_config(model_config)
        elif str(model_name).startswith(_HUB_PREFIX):
            raise RewardModelError(f"{WHAT}: model_name={model_name!r} names a hub resource (open_clip's "
                                   f"{_HUB_PREFIX} schema); reward models load from local paths only — pass "
                                   f"model_config=<path to a config .json> and a local checkpoint")
        arch = open_clip.get_model_config(model_name)
        if arch is None:
            raise RewardModelError(f"{WHAT}: unknown open_clip model config {model_name!r}; pass "
                                   f"model_config=<path to a config .json>")
        _refuse_hub(hub_references(arch), f"model_name={model_name!r} (its open_clip model config)")
        state = strip_prefix(load_state_dict_file(ckpt, WHAT))
        if "visual.class_embedding" not in state and "visual.conv1.weight" not in state:
            raise RewardModelError(f"{WHAT}: {ckpt} is not an open_clip CLIP checkpoint "
                                   f"(no visual.* keys; keys {sorted(state)[:6]})")
        model = open_clip.create_model(model_name, pretrained=None, pretrained_image=False,
                                       pretrained_text=False, load_weights=False)
        # drop entries for non-persistent buffers (older open_clip saved ``attn_mask``)
        persistent = set(model.state_dict())
        buffers = {n for n, _ in model.named_buffers()} - persistent
        state = {k: v for k, v in state.items() if k not in buffers}
        load_strict(model, state, f"{WHAT} {ckpt} into open_clip {model_name}")
        self.model = model.to(resolve_dtype(dtype))
        self.tokenizer = open_clip.get_tokenizer(model_name)
        size = model.visual.image_size
        self.image_size = int(size if isinstance(size, int) else max(size))
        self.checkpoint = Path(ckpt)
        self._finish_init()

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_longest_pad(to_unit(images), self.image_size, fill=0.0, mode="bicubic")
        return normalize(x, CLIP_MEAN, CLIP_STD)

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        pixels = self.preprocess(images).to(dtype)
        img = self.model.encode_image(pixels, normalize=True).float()
        unique = list(dict.fromkeys(prompts))
        tokens = self.tokenizer(unique).to(self.device)
        txt = self.model.encode_text(tokens, normalize=True).float()
        position = {p: i for i, p in enumerate(unique)}
        txt = txt[torch.tensor([position[p] for p in prompts], device=txt.device)]
        return (img * txt).sum(dim=-1)
