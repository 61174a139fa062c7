"""ImageReward on transformers' BLIP classes: a tiny checkpoint written in the official
``ImageReward.pt`` key naming (BLIP ViT ``blip.visual_encoder.*``, BLIP med.py BERT
``blip.text_encoder.*`` with cross-attention, ``mlp.layers.*``) is converted and loaded strictly;
its scores are checked against an independent functional forward written from the official
keys, and missing / extra keys, wrong folders and corrupt files raise clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.rewards import CheckpointKeyError, RewardModelError, build_reward
from pipeline.rewards.imagereward import (IMAGEREWARD_MEAN, IMAGEREWARD_STD, convert_checkpoint,
                                          vision_key_to_model, vision_key_to_official)

V_WIDTH, V_DEPTH, V_HEADS, PATCH, IMAGE = 48, 2, 4, 8, 32
T_WIDTH, T_DEPTH, T_HEADS, T_INTER, MAX_POS = 32, 2, 2, 64, 40
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "two", "three", "red", "blue", "green", "circle",
         "square", "triangle", "##s", "on", "the", "left", "right", "at", "top", "bottom"]
VOCAB = len(WORDS) + 2  # BLIP adds [DEC] and [ENC]
PROMPTS = ["two red circles on the left", "a blue square at the top", "three green triangles at the bottom",
           "a red circle on the right", "two red circles on the left"]


def official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the official ImageReward.pt key names and shapes (tiny sizes)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int, std: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def ln(prefix: str, dim: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + w(dim, std=0.1), f"{prefix}.bias": w(dim, std=0.1)}

    def lin(prefix: str, out: int, inp: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": w(out, inp, std=1 / math.sqrt(inp)), f"{prefix}.bias": w(out, std=0.05)}

    sd: dict[str, torch.Tensor] = {}
    v = "blip.visual_encoder."
    sd[v + "cls_token"] = w(1, 1, V_WIDTH)
    sd[v + "pos_embed"] = w(1, (IMAGE // PATCH) ** 2 + 1, V_WIDTH)
    sd[v + "patch_embed.proj.weight"] = w(V_WIDTH, 3, PATCH, PATCH, std=0.1)
    sd[v + "patch_embed.proj.bias"] = w(V_WIDTH, std=0.05)
    for i in range(V_DEPTH):
        b = f"{v}blocks.{i}."
        sd.update(ln(b + "norm1", V_WIDTH))
        sd.update(lin(b + "attn.qkv", 3 * V_WIDTH, V_WIDTH))
        sd.update(lin(b + "attn.proj", V_WIDTH, V_WIDTH))
        sd.update(ln(b + "norm2", V_WIDTH))
        sd.update(lin(b + "mlp.fc1", 4 * V_WIDTH, V_WIDTH))
        sd.update(lin(b + "mlp.fc2", V_WIDTH, 4 * V_WIDTH))
    sd.update(ln(v + "norm", V_WIDTH))
    t = "blip.text_encoder."
    sd[t + "embeddings.position_ids"] = torch.arange(MAX_POS).unsqueeze(0)
    sd[t + "embeddings.word_embeddings.weight"] = w(VOCAB, T_WIDTH, std=0.5)
    sd[t + "embeddings.position_embeddings.weight"] = w(MAX_POS, T_WIDTH, std=0.5)
    sd.update(ln(t + "embeddings.LayerNorm", T_WIDTH))
    for i in range(T_DEPTH):
        b = f"{t}encoder.layer.{i}."
        for kind, kv_width in (("attention", T_WIDTH), ("crossattention", V_WIDTH)):
            sd.update(lin(b + f"{kind}.self.query", T_WIDTH, T_WIDTH))
            sd.update(lin(b + f"{kind}.self.key", T_WIDTH, kv_width))
            sd.update(lin(b + f"{kind}.self.value", T_WIDTH, kv_width))
            sd.update(lin(b + f"{kind}.output.dense", T_WIDTH, T_WIDTH))
            sd.update(ln(b + f"{kind}.output.LayerNorm", T_WIDTH))
        sd.update(lin(b + "intermediate.dense", T_INTER, T_WIDTH))
        sd.update(lin(b + "output.dense", T_WIDTH, T_INTER))
        sd.update(ln(b + "output.LayerNorm", T_WIDTH))
    sd.update(lin("blip.vision_proj", 256, V_WIDTH))  # ITC projections: in the file, unused
    sd.update(lin("blip.text_proj", 256, T_WIDTH))
    for idx, (out, inp) in zip((0, 2, 4, 6, 7), ((1024, T_WIDTH), (128, 1024), (64, 128), (16, 64), (1, 16))):
        sd.update(lin(f"mlp.layers.{idx}", out, inp))
    return sd


MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "hidden_size": T_WIDTH, "initializer_range": 0.02,
              "intermediate_size": T_INTER, "layer_norm_eps": 1e-12, "max_position_embeddings": MAX_POS,
              "model_type": "bert", "num_attention_heads": T_HEADS, "num_hidden_layers": T_DEPTH,
              "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": VOCAB, "encoder_width": V_WIDTH,
              "add_cross_attention": True}


def write_folder(root: Path, state: dict[str, torch.Tensor], med: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    torch.save(state, root / "ImageReward.pt")
    (root / "med_config.json").write_text(json.dumps(med or MED_CONFIG))
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("imagereward") / "ImageReward", official_state_dict())


@pytest.fixture(scope="module")
def scorer(folder: Path):
    return build_reward({"name": "imagereward", "path": str(folder), "vision_num_heads": V_HEADS, "batch_size": 2})


def _images(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 48, 40, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- reference forward


def reference_scores(sd: dict[str, torch.Tensor], pixels: torch.Tensor, ids: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """BLIP ViT + med.py BERT-with-cross-attention + MLP, written directly on the official keys."""
    def lin(x, p):
        return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])

    def ln(x, p, eps):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)

    def heads(x, n):
        return x.reshape(x.shape[0], x.shape[1], n, -1).transpose(1, 2)

    def merge(x):
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)

    v = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[v + "pos_embed"]
    for i in range(V_DEPTH):
        b = f"{v}blocks.{i}."
        q, k, val = lin(ln(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, dim=-1)
        q, k, val = heads(q, V_HEADS), heads(k, V_HEADS), heads(val, V_HEADS)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        x = x + lin(merge(att @ val), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image = ln(x, v + "norm", 1e-6)

    t = "blip.text_encoder."
    h = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    h = ln(h, t + "embeddings.LayerNorm", 1e-12)
    bias = (1.0 - mask[:, None, None, :].float()) * -1e9

    def attention(p, hq, hkv, key_bias):
        q, k, val = (heads(lin(hq, p + ".self.query"), T_HEADS), heads(lin(hkv, p + ".self.key"), T_HEADS),
                     heads(lin(hkv, p + ".self.value"), T_HEADS))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + key_bias
        return ln(lin(merge(torch.softmax(scores, dim=-1) @ val), p + ".output.dense") + hq, p + ".output.LayerNorm", 1e-12)

    for i in range(T_DEPTH):
        b = f"{t}encoder.layer.{i}."
        h = attention(b + "attention", h, h, bias)
        h = attention(b + "crossattention", h, image, 0.0)
        h = ln(lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense") + h, b + "output.LayerNorm", 1e-12)
    r = h[:, 0]
    for idx in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{idx}")
    return ((r.squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).float()


# ----------------------------------------------------------------------------- tests


def test_key_mapping_round_trip() -> None:
    assert vision_key_to_model("blocks.3.attn.qkv.weight") == "encoder.layers.3.self_attn.qkv.weight"
    assert vision_key_to_model("blocks.0.attn.proj.bias") == "encoder.layers.0.self_attn.projection.bias"
    assert vision_key_to_model("cls_token") == "embeddings.class_embedding"
    assert vision_key_to_model("norm.weight") == "post_layernorm.weight"
    assert vision_key_to_model("head.weight") is None
    assert vision_key_to_official("encoder.layers.7.mlp.fc2.bias") == "blip.visual_encoder.blocks.7.mlp.fc2.bias"
    conv = convert_checkpoint(official_state_dict())
    assert sorted(conv.unused) == ["blip.text_encoder.embeddings.position_ids", "blip.text_proj.bias",
                                   "blip.text_proj.weight", "blip.vision_proj.bias", "blip.vision_proj.weight"]


def test_converted_weights_land_in_the_right_modules(scorer) -> None:
    sd = official_state_dict()
    m = scorer.model
    assert torch.equal(m.vision.encoder.layers[1].self_attn.qkv.weight, sd["blip.visual_encoder.blocks.1.attn.qkv.weight"])
    assert torch.equal(m.vision.embeddings.position_embedding, sd["blip.visual_encoder.pos_embed"])
    assert torch.equal(m.vision.post_layernorm.bias, sd["blip.visual_encoder.norm.bias"])
    cross = m.text.encoder.layer[1].crossattention.self.key.weight
    assert cross.shape == (T_WIDTH, V_WIDTH)
    assert torch.equal(cross, sd["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"])
    assert torch.equal(m.mlp.layers[7].weight, sd["mlp.layers.7.weight"])
    assert m.vision.config.num_attention_heads == V_HEADS and m.vision.config.image_size == IMAGE
    assert m.vision.config.layer_norm_eps == 1e-6


def test_scores_match_the_reference_forward(scorer) -> None:
    images = _images()
    enc = scorer.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert enc["input_ids"].shape == (5, 35) and (enc["input_ids"][:, 0] == 2).all()  # [CLS] first
    expected = reference_scores(official_state_dict(), scorer.preprocess(images), enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(scorer(images, PROMPTS), expected, atol=1e-4, rtol=1e-4)


def test_preprocessing_is_blip_transform(scorer) -> None:
    from torchvision.transforms import CenterCrop, InterpolationMode, Normalize, Resize

    images = _images(2)
    unit = (images + 1) / 2
    expected = Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))(
        CenterCrop(IMAGE)(Resize(IMAGE, InterpolationMode.BICUBIC, antialias=True)(unit).clamp(0, 1)))
    torch.testing.assert_close(scorer.preprocess(images), expected, atol=1e-5, rtol=1e-5)


def test_scorer_contract(folder: Path, scorer) -> None:
    images = _images()
    scores = scorer(images, PROMPTS)
    assert scores.shape == (5,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert torch.equal(scores, scorer(images, PROMPTS))
    single = build_reward({"name": "imagereward", "path": str(folder / "ImageReward.pt"),
                           "vision_num_heads": V_HEADS, "batch_size": 5})  # the .pt file as path
    torch.testing.assert_close(single(images, PROMPTS), scores, atol=1e-5, rtol=1e-5)
    assert scorer(images, [PROMPTS[0]] * 5).unique().numel() == 5
    assert scores[0] != scorer(images[:1], ["a blue square at the top"])[0], "sensitive to the prompt"
    raw = build_reward({"name": "imagereward", "path": str(folder), "vision_num_heads": V_HEADS, "normalize": False})
    torch.testing.assert_close(raw(images, PROMPTS), scores * IMAGEREWARD_STD + IMAGEREWARD_MEAN, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", ["blip.visual_encoder.blocks.1.attn.qkv.weight",
                                 "blip.text_encoder.encoder.layer.0.crossattention.self.key.weight",
                                 "mlp.layers.6.bias"])
def test_missing_key_is_named(tmp_path: Path, key: str) -> None:
    sd = official_state_dict()
    del sd[key]
    folder = write_folder(tmp_path / "ir", sd)
    with pytest.raises(CheckpointKeyError, match=key.replace(".", r"\.")):
        build_reward({"name": "imagereward", "path": str(folder), "vision_num_heads": V_HEADS})


@pytest.mark.parametrize("key", ["blip.visual_encoder.head.weight", "blip.itm_decoder.weight", "text_encoder.x"])
def test_extra_key_is_named(tmp_path: Path, key: str) -> None:
    sd = official_state_dict()
    sd[key] = torch.zeros(2)
    folder = write_folder(tmp_path / "ir", sd)
    with pytest.raises(CheckpointKeyError, match=key.replace(".", r"\.")):
        build_reward({"name": "imagereward", "path": str(folder), "vision_num_heads": V_HEADS})


def test_unexpected_text_key_and_shape_mismatch(tmp_path: Path) -> None:
    sd = official_state_dict()
    sd["blip.text_encoder.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointKeyError, match=r"unexpected keys: blip\.text_encoder\.encoder\.layer\.0\.attention\.self\.rotary"):
        build_reward({"name": "imagereward", "path": str(write_folder(tmp_path / "a", sd)), "vision_num_heads": V_HEADS})
    med = {**MED_CONFIG, "intermediate_size": 2 * T_INTER}
    with pytest.raises(CheckpointKeyError, match=r"shape mismatches: blip\.text_encoder\.encoder\.layer\.0\.intermediate"):
        build_reward({"name": "imagereward", "path": str(write_folder(tmp_path / "b", official_state_dict(), med)),
                      "vision_num_heads": V_HEADS})


def test_wrong_files(tmp_path: Path, folder: Path) -> None:
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (clip / "model.safetensors").write_bytes(b"")
    with pytest.raises(RewardModelError, match="transformers model folder"):
        build_reward({"name": "imagereward", "path": str(clip)})
    bogus = write_folder(tmp_path / "bogus", {"x": torch.zeros(1)})
    (bogus / "ImageReward.pt").write_text("not a checkpoint")
    with pytest.raises(RewardModelError, match=f"{bogus / 'ImageReward.pt'}.*not a readable PyTorch checkpoint"):
        build_reward({"name": "imagereward", "path": str(bogus)})
    with pytest.raises(RewardModelError, match="add_cross_attention"):
        build_reward({"name": "imagereward", "path": str(folder),
                      "med_config": str(write_med(tmp_path, {**MED_CONFIG, "add_cross_attention": False}))})
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        build_reward({"name": "imagereward", "path": str(folder), "tokenizer_path": str(tmp_path / "nope")})
    with pytest.raises(CheckpointKeyError, match="not an ImageReward checkpoint"):
        torch.save({"mlp.layers.0.weight": torch.zeros(1, 1)}, tmp_path / "other.pt")
        build_reward({"name": "imagereward", "path": str(tmp_path / "other.pt"),
                      "med_config": str(folder / "med_config.json"), "tokenizer_path": str(folder / "tokenizer")})


def write_med(tmp_path: Path, med: dict) -> Path:
    p = tmp_path / "med.json"
    p.write_text(json.dumps(med))
    return p
