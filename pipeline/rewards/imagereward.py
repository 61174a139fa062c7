"""ImageReward (Xu et al., "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation", NeurIPS 2023; checkpoint ``ImageReward.pt`` + ``med_config.json``
of the ``THUDM/ImageReward`` release), rebuilt on transformers' maintained BLIP classes.

Architecture (the authors' ``ImageReward/ImageReward.py``): BLIP ViT-L/16 image encoder
(``BLIP_Pretrain(vit="large")``: 24 blocks, width 1024, 16 heads, patch 16, 224 px, LayerNorm
eps 1e-6) -> BLIP's BERT-base text encoder with cross-attention to the image tokens in every
layer (``med_config.json``), run on the prompt; the final hidden state of the first ([CLS])
token -> MLP ``768 -> 1024 -> 128 -> 64 -> 16 -> 1`` (dropouts 0.2/0.2/0.1, no activations).
Here: ``transformers.BlipVisionModel`` + ``transformers.BlipTextModel(add_pooling_layer=False)``
(config ``is_decoder=True`` so that each layer builds its cross-attention, called with
``is_decoder=False`` for a bidirectional self-attention mask, exactly as BLIP's encoder mode)
+ :class:`pipeline.rewards.base.AestheticMLP`.

Score (published normalisation)::

    reward = (MLP(h_CLS) - 0.16717362830052426) / 1.0333394966054072

(``self.mean`` / ``self.std`` in the official ``ImageReward`` class; ``normalize=False`` returns
the raw head output).

Preprocessing (official ``_transform(224)``): bicubic resize of the shortest side to 224, centre
crop 224, OpenAI CLIP mean/std; in torch. Text: ``bert-base-uncased`` tokenizer with BLIP's two
added special tokens (``[DEC]`` as bos, ``[ENC]``; vocabulary 30524), ``padding="max_length"``,
``truncation=True``, ``max_length=35``, the [CLS]-first ids fed as is.

Checkpoint conversion (:func:`convert_checkpoint`), strict: every checkpoint key is either
converted or listed in :data:`UNUSED_KEYS` / :data:`UNUSED_PREFIXES`, every model key is filled,
otherwise :class:`~pipeline.rewards.base.CheckpointKeyError` names the keys.

* ``blip.visual_encoder.*`` (BLIP / timm ViT naming) -> ``BlipVisionModel``:
  ``cls_token -> embeddings.class_embedding``, ``pos_embed -> embeddings.position_embedding``,
  ``patch_embed.proj -> embeddings.patch_embedding``, ``blocks.N.norm1/norm2 ->
  encoder.layers.N.layer_norm1/layer_norm2``, ``blocks.N.attn.qkv -> ...self_attn.qkv`` (same
  fused [q; k; v] layout), ``blocks.N.attn.proj -> ...self_attn.projection``,
  ``blocks.N.mlp.fc1/fc2 -> ...mlp.fc1/fc2``, ``norm -> post_layernorm``.
* ``blip.text_encoder.*`` (BLIP ``med.py`` BERT naming, incl. ``crossattention``) ->
  ``BlipTextModel`` one to one (the transformers classes keep med.py's names).
* ``mlp.layers.*`` -> the MLP head one to one.
* unused: ``blip.vision_proj`` / ``blip.text_proj`` (ITC projections, not used for the reward),
  the saved ``position_ids`` buffer, and — should a checkpoint carry them — BLIP pre-training
  heads (``itm_head``, ``text_decoder``, momentum encoders ``*_m``, queues, ``temp``).

The vision config is read off the checkpoint (width, depth, patch, image size, MLP width); the
number of heads is not stored and defaults to BLIP's (16 for width 1024, 12 for 768, else
width // 64); ``vision_num_heads`` overrides it.

Local folder layout (``path``)::

    ImageReward/
        ImageReward.pt        # official checkpoint (torch.load(weights_only=True))
        med_config.json       # official BLIP text-encoder config
        tokenizer/            # bert-base-uncased tokenizer files (vocab.txt [+ tokenizer_config.json,
                              #   tokenizer.json]); "bert-base-uncased/" is accepted as well

``path`` may also be the ``.pt`` file (the other two are then looked up beside it);
``med_config`` and ``tokenizer_path`` override the defaults.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .base import (CLIP_MEAN, CLIP_STD, AestheticMLP, CheckpointKeyError, RewardModel,
                   RewardModelError, find_one_file, load_state_dict_file, load_strict,
                   read_json, require_path, resize_shortest_center_crop, resolve_dtype, to_unit, _short)
from .base import normalize as normalize_pixels

WHAT = "ImageReward"
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
MAX_TEXT_LENGTH = 35

VISION_PREFIX = "blip.visual_encoder."
TEXT_PREFIX = "blip.text_encoder."
MLP_PREFIX = "mlp."
UNUSED_KEYS = ("blip.text_encoder.embeddings.position_ids", "blip.image_queue", "blip.text_queue",
               "blip.idx_queue", "blip.ptr_queue", "blip.queue_ptr", "blip.temp")
UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.", "blip.itm_head.", "blip.text_decoder.",
                   "blip.visual_encoder_m.", "blip.text_encoder_m.", "blip.vision_proj_m.",
                   "blip.text_proj_m.", "blip.text_encoder.pooler.")

# (official key under blip.visual_encoder., BlipVisionModel key); {i} block index, {p} weight|bias
_VISION_RULES = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "encoder.layers.{i}.self_attn.qkv.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.projection.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layers.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layers.{i}.mlp.fc2.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
)
_GROUPS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)"}


def _compile(template: str) -> "re.Pattern[str]":
    out, pos = "", 0
    for m in re.finditer(r"\{(\w)\}", template):
        out += re.escape(template[pos:m.start()]) + _GROUPS[m.group(1)]
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]))


_FORWARD = tuple((_compile(src), dst) for src, dst in _VISION_RULES)
_BACKWARD = tuple((_compile(dst), src) for src, dst in _VISION_RULES)


def _apply(rules: Any, key: str) -> "str | None":
    for pattern, template in rules:
        m = pattern.fullmatch(key)
        if m:
            return template.format(**m.groupdict())
    return None


def vision_key_to_model(official: str) -> "str | None":
    """``blocks.3.attn.qkv.weight`` -> ``encoder.layers.3.self_attn.qkv.weight`` (None: no rule)."""
    return _apply(_FORWARD, official)


def vision_key_to_official(model_key: str) -> str:
    src = _apply(_BACKWARD, model_key)
    return VISION_PREFIX + (src if src is not None else f"<no rule for {model_key}>")


def is_unused_key(key: str) -> bool:
    return key in UNUSED_KEYS or key.startswith(UNUSED_PREFIXES)


@dataclass
class ConvertedCheckpoint:
    vision: dict[str, torch.Tensor] = field(default_factory=dict)
    text: dict[str, torch.Tensor] = field(default_factory=dict)
    mlp: dict[str, torch.Tensor] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)


def convert_checkpoint(state: Mapping[str, torch.Tensor]) -> ConvertedCheckpoint:
    """Split and rename an official ``ImageReward.pt`` state dict (see module docs); raises
    ``CheckpointKeyError`` naming every key it cannot place."""
    out, unmapped = ConvertedCheckpoint(), []
    for key, value in state.items():
        if is_unused_key(key):
            out.unused.append(key)
        elif key.startswith(VISION_PREFIX):
            new = vision_key_to_model(key[len(VISION_PREFIX):])
            if new is None:
                unmapped.append(key)
            else:
                out.vision[new] = value
        elif key.startswith(TEXT_PREFIX):
            out.text[key[len(TEXT_PREFIX):]] = value
        elif key.startswith(MLP_PREFIX):
            out.mlp[key[len(MLP_PREFIX):]] = value
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointKeyError(f"{WHAT}: {len(unmapped)} checkpoint keys have no mapping and are not "
                                 f"listed as unused: {_short(unmapped)}")
    if not out.vision or not out.text or not out.mlp:
        lacking = [p for p, d in ((VISION_PREFIX, out.vision), (TEXT_PREFIX, out.text), (MLP_PREFIX, out.mlp)) if not d]
        raise CheckpointKeyError(f"{WHAT}: checkpoint has no keys under {lacking} - not an ImageReward checkpoint?")
    return out


def vision_config_from_checkpoint(vision: Mapping[str, torch.Tensor], num_heads: "int | None" = None) -> dict[str, Any]:
    """BlipVisionConfig kwargs read off converted vision weights (see module docs)."""
    need = ("embeddings.class_embedding", "embeddings.position_embedding", "embeddings.patch_embedding.weight",
            "encoder.layers.0.mlp.fc1.weight")
    lacking = [vision_key_to_official(k) for k in need if k not in vision]
    if lacking:
        raise CheckpointKeyError(f"{WHAT}: checkpoint lacks {lacking}")
    hidden = int(vision["embeddings.class_embedding"].shape[-1])
    patch = int(vision["embeddings.patch_embedding.weight"].shape[-1])
    n_pos = int(vision["embeddings.position_embedding"].shape[1])
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        raise RewardModelError(f"{WHAT}: pos_embed has {n_pos} positions, not 1 + a square grid")
    depth = 1 + max(int(m.group(1)) for k in vision if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    if num_heads is None:
        num_heads = {1024: 16, 768: 12}.get(hidden, max(1, hidden // 64))
    return dict(hidden_size=hidden, intermediate_size=int(vision["encoder.layers.0.mlp.fc1.weight"].shape[0]),
                num_hidden_layers=depth, num_attention_heads=int(num_heads), image_size=grid * patch,
                patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0)


_MED_TO_BLIP = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "hidden_act", "layer_norm_eps", "hidden_dropout_prob",
                "attention_probs_dropout_prob", "pad_token_id")


def text_config_from_med(med: Mapping[str, Any], encoder_width: int, source: Any = "med_config") -> dict[str, Any]:
    """BlipTextConfig kwargs from BLIP's ``med_config.json`` (BERT config + ``add_cross_attention``);
    like BLIP, ``encoder_width`` is set to the vision width."""
    if not med.get("add_cross_attention", False):
        raise RewardModelError(f"{WHAT}: {source} has no add_cross_attention=true; not BLIP's med_config.json")
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise RewardModelError(f"{WHAT}: {source}: only absolute position embeddings are supported")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in med]
    if missing:
        raise RewardModelError(f"{WHAT}: {source} lacks {missing}")
    kwargs = {k: med[k] for k in _MED_TO_BLIP if k in med}
    for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps"):
        if k in kwargs:
            kwargs[k] = float(kwargs[k])
    kwargs.update(encoder_hidden_size=int(encoder_width), is_decoder=True, use_cache=False)
    return kwargs


class ImageRewardModel(nn.Module):
    """BLIP vision encoder + cross-attending BLIP text encoder + MLP head -> raw reward."""

    def __init__(self, vision_config: Mapping[str, Any], text_config: Mapping[str, Any], mlp_input: int = 768) -> None:
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        self.vision = BlipVisionModel(BlipVisionConfig(**vision_config))
        self.text = BlipTextModel(BlipTextConfig(**text_config), add_pooling_layer=False)
        self.mlp = AestheticMLP(mlp_input)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_atts, is_decoder=False)
        features = out.last_hidden_state[:, 0, :].float()
        return self.mlp(features).squeeze(-1)


def load_imagereward_model(state: Mapping[str, torch.Tensor], med: Mapping[str, Any],
                           vision_num_heads: "int | None" = None, source: Any = "checkpoint") -> ImageRewardModel:
    """Convert an official state dict and load it strictly into :class:`ImageRewardModel`."""
    conv = convert_checkpoint(state)
    vcfg = vision_config_from_checkpoint(conv.vision, vision_num_heads)
    tcfg = text_config_from_med(med, vcfg["hidden_size"])
    if "layers.0.weight" not in conv.mlp:
        raise CheckpointKeyError(f"{WHAT}: checkpoint lacks mlp.layers.0.weight")
    model = ImageRewardModel(vcfg, tcfg, int(conv.mlp["layers.0.weight"].shape[1]))
    if model.mlp.input_size != tcfg["hidden_size"]:
        raise RewardModelError(f"{WHAT}: MLP input {model.mlp.input_size} != text hidden size {tcfg['hidden_size']}")
    load_strict(model.vision, conv.vision, f"{WHAT} {source} (vision)", vision_key_to_official)
    load_strict(model.text, conv.text, f"{WHAT} {source} (text)", lambda k: TEXT_PREFIX + k)
    load_strict(model.mlp, conv.mlp, f"{WHAT} {source} (mlp)", lambda k: MLP_PREFIX + k)
    return model


def _tokenizer_dir(folder: Path, tokenizer_path: Any) -> Path:
    if tokenizer_path is not None:
        p = require_path(tokenizer_path, f"{WHAT} tokenizer")
    else:
        candidates = [folder / "tokenizer", folder / "bert-base-uncased"]
        found = [c for c in candidates if c.is_dir()]
        if not found:
            raise FileNotFoundError(f"{WHAT}: no tokenizer folder ({', '.join(str(c) for c in candidates)}); "
                                    f"put the bert-base-uncased tokenizer files there or pass tokenizer_path")
        p = found[0]
    if not p.is_dir() or not ((p / "vocab.txt").is_file() or (p / "tokenizer.json").is_file()):
        raise RewardModelError(f"{WHAT}: {p} is not a BERT tokenizer folder (needs vocab.txt or tokenizer.json)")
    return p


def load_blip_tokenizer(folder: Path) -> Any:
    """bert-base-uncased + BLIP's ``init_tokenizer`` additions (``[DEC]`` bos, ``[ENC]``)."""
    from transformers import BertTokenizer

    try:
        tok = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise RewardModelError(f"{WHAT}: could not load the BERT tokenizer from {folder} ({type(e).__name__}: {e})") from e
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageReward(RewardModel):
    name = "imagereward"

    def __init__(self, path: Any, med_config: Any = None, tokenizer_path: Any = None,
                 vision_num_heads: "int | None" = None, normalize: bool = True, batch_size: int = 32,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(batch_size=batch_size, device=device)
        p = require_path(path, WHAT)
        if p.is_dir():
            folder = p
            ckpt = folder / "ImageReward.pt"
            if not ckpt.is_file():
                ckpt = find_one_file(folder, ("*.pt", "*.pth"), WHAT)
        else:
            folder, ckpt = p.parent, p
        med_file = require_path(med_config if med_config is not None else folder / "med_config.json",
                                f"{WHAT} med_config")
        med = read_json(med_file, f"{WHAT} med_config")
        tok_dir = _tokenizer_dir(folder, tokenizer_path)
        state = load_state_dict_file(ckpt, WHAT)
        self.model = load_imagereward_model(state, med, vision_num_heads, source=ckpt)
        self.tokenizer = load_blip_tokenizer(tok_dir)
        vocab = self.model.text.config.vocab_size
        if len(self.tokenizer) > vocab:
            raise RewardModelError(f"{WHAT}: tokenizer in {tok_dir} has {len(self.tokenizer)} tokens, more than "
                                   f"the text encoder's vocab_size {vocab} (wrong tokenizer?)")
        self.image_size = int(self.model.vision.config.image_size)
        self.normalize = bool(normalize)
        self.checkpoint = ckpt
        self.model.vision.to(resolve_dtype(dtype))
        self.model.text.to(resolve_dtype(dtype))  # the MLP head stays float32, as in the original
        self._finish_init()

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_shortest_center_crop(to_unit(images), self.image_size, self.image_size, mode="bicubic")
        return normalize_pixels(x, CLIP_MEAN, CLIP_STD)

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.preprocess(images).to(self.model.vision.dtype)
        enc = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH,
                             return_tensors="pt")
        raw = self.model(pixels, enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD if self.normalize else raw
