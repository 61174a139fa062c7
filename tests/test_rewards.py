"""Reward models: tiny random stand-ins built from the real classes, saved to a temporary folder
and loaded back through the code path a real model folder uses; the mixture; the toy reward;
the error messages. ImageReward's checkpoint conversion is in test_rewards_imagereward.py."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.rewards import (RewardModel, RewardModelError, Standardized, WeightedMixture,
                              build_reward, known_rewards)
from pipeline.rewards.base import (CLIP_MEAN, CLIP_STD, AestheticMLP, resize_longest_pad,
                                   resize_shortest_center_crop)

PROMPTS = ["two red circles on the left", "a blue square at the top", "three green triangles at the bottom",
           "a cyan circle on the right", "two red circles on the left", "a magenta square on the right"]


def _images(n: int = 6, h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1


# ----------------------------------------------------------------------------- tiny models


def _write_clip_tokenizer(folder: Path) -> tuple[int, int, int]:
    """A tiny byte-level BPE CLIP tokenizer (the real CLIPTokenizer class), saved to ``folder``."""
    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("t", "w"), ("tw", "o</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(str(folder))
    return len(vocab), vocab["<|startoftext|>"], vocab["<|endoftext|>"]


def _write_tiny_clip(folder: Path, seed: int = 0) -> None:
    """CLIPModel (vision 32 px / patch 8, projection 16) + tokenizer + CLIPImageProcessor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    vocab_size, bos, eos = _write_clip_tokenizer(folder)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos,
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))


TINY_OPEN_CLIP = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import open_clip

    root = tmp_path_factory.mktemp("reward_models")
    _write_tiny_clip(root / "clip")
    # HPS: an open_clip config registered from a json file + a checkpoint in HPS's format
    cfg = root / "tiny-hps-test.json"
    cfg.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(cfg)
    torch.manual_seed(1)
    model = open_clip.create_model("tiny-hps-test", pretrained=None)
    (root / "hps").mkdir()
    torch.save({"state_dict": model.state_dict()}, root / "hps" / "HPS_v2.1_compressed.pt")
    # aesthetic head (16-d input to match the tiny CLIP's projection) next to a clip/ folder
    torch.manual_seed(2)
    head = AestheticMLP(16)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    (root / "aesthetic").mkdir()
    torch.save(head.state_dict(), root / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth")
    (root / "aesthetic" / "clip").symlink_to(root / "clip", target_is_directory=True)
    return root


def _spec(models_dir: Path, name: str, **extra) -> dict:
    base = {
        "pickscore": {"name": "pickscore", "path": str(models_dir / "clip")},
        "clip_score": {"name": "clip_score", "path": str(models_dir / "clip")},
        "aesthetic": {"name": "aesthetic", "path": str(models_dir / "aesthetic")},
        "hps": {"name": "hps", "path": str(models_dir / "hps"),
                "model_config": str(models_dir / "tiny-hps-test.json")},
    }[name]
    return {**base, **extra}


@pytest.fixture(scope="module")
def scorers(models_dir: Path) -> dict[str, RewardModel]:
    return {name: build_reward(_spec(models_dir, name, batch_size=4))
            for name in ("pickscore", "clip_score", "aesthetic", "hps")}


# ----------------------------------------------------------------------------- common contract


@pytest.mark.parametrize("name", ["pickscore", "clip_score", "aesthetic", "hps"])
def test_scorer_contract(models_dir: Path, scorers: dict[str, RewardModel], name: str) -> None:
    scorer = scorers[name]
    images = _images()
    scores = scorer(images, PROMPTS)
    assert scores.shape == (6,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert torch.isfinite(scores).all()
    assert torch.equal(scores, scorer(images, PROMPTS)), "deterministic"
    one_by_one = build_reward(_spec(models_dir, name, batch_size=1))(images, PROMPTS)
    torch.testing.assert_close(one_by_one, scores, atol=1e-5, rtol=1e-5)  # batch-size invariant
    same_prompt = scorer(images, [PROMPTS[0]] * 6)
    assert same_prompt.unique().numel() == 6, "different images must get different scores"
    assert scorer(images[:0], []).shape == (0,)
    if torch.cuda.is_available():  # pragma: no cover - exercised on GPU machines
        on_gpu = build_reward(_spec(models_dir, name, device="cuda"))(images, PROMPTS)
        torch.testing.assert_close(on_gpu, scores, atol=1e-3, rtol=1e-3)


def test_dtype_and_device_options(models_dir: Path, scorers: dict[str, RewardModel]) -> None:
    images = _images()
    half = build_reward(_spec(models_dir, "clip_score", dtype="bfloat16", device="auto"))
    assert half.clip.model.dtype == torch.bfloat16
    scores = half(images, PROMPTS)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, scorers["clip_score"](images, PROMPTS), atol=0.05, rtol=0.05)
    assert half.to("cpu") is half and half.device == torch.device("cpu")


def test_inputs_are_validated(scorers: dict[str, RewardModel]) -> None:
    scorer = scorers["clip_score"]
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer(_images(2), ["a"])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        scorer(torch.zeros(2, 32, 32), ["a", "b"])
    with pytest.raises(TypeError, match="single string"):
        scorer(_images(1), "a red circle")


# ----------------------------------------------------------------------------- formulas


def test_pickscore_is_scaled_cosine(scorers: dict[str, RewardModel]) -> None:
    scorer = scorers["pickscore"]
    model, clip = scorer.clip.model, scorer.clip
    images = _images(3)
    enc = clip.tokenizer(PROMPTS[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    pixel_values=clip.preprocess(images))
    # CLIPModel's own logits are logit_scale.exp() * cos(image, text)
    torch.testing.assert_close(scorer(images, PROMPTS[:3]), out.logits_per_image.diagonal(), atol=1e-4, rtol=1e-4)


def test_clip_score_variants(models_dir: Path, scorers: dict[str, RewardModel]) -> None:
    images = _images()
    cos = scorers["clip_score"](images, PROMPTS)
    torch.testing.assert_close(cos, scorers["pickscore"](images, PROMPTS)
                               / scorers["pickscore"].clip.model.logit_scale.exp(), atol=1e-5, rtol=1e-4)
    assert (cos.abs() <= 1).all()
    hessel = build_reward(_spec(models_dir, "clip_score", variant="clipscore"))(images, PROMPTS)
    torch.testing.assert_close(hessel, 2.5 * cos.clamp_min(0))
    with pytest.raises(ValueError, match="variant"):
        build_reward(_spec(models_dir, "clip_score", variant="nope"))


def test_aesthetic_is_mlp_on_normalised_embedding(scorers: dict[str, RewardModel]) -> None:
    scorer = scorers["aesthetic"]
    images = _images()
    with torch.no_grad():
        emb = scorer.clip.model.get_image_features(pixel_values=scorer.clip.preprocess(images))
        emb = emb if isinstance(emb, torch.Tensor) else emb.pooler_output
        expected = scorer.mlp(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(scorer(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(scorer(images, PROMPTS), scorer(images, ["x"] * 6)), "the prompt is ignored"


def test_hps_is_plain_cosine_on_padded_images(scorers: dict[str, RewardModel]) -> None:
    scorer = scorers["hps"]
    images = _images(3)
    pixels = scorer.preprocess(images)
    assert pixels.shape == (3, 3, 32, 32)
    # 40x56 -> longest side 32: 23x32 (round(40 * 32 / 56) = 23), padded 4 rows above, 5 below with black
    black = ((0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels[:, :, :4], black.expand(3, 3, 4, 32))
    torch.testing.assert_close(pixels[:, :, -5:], black.expand(3, 3, 5, 32))
    assert not torch.allclose(pixels[:, :, 4], black[:, :, 0].expand(3, 3, 32))
    with torch.no_grad():
        img = scorer.model.encode_image(pixels, normalize=True)
        txt = scorer.model.encode_text(scorer.tokenizer(PROMPTS[:3]), normalize=True)
    torch.testing.assert_close(scorer(images, PROMPTS[:3]), (img * txt).sum(-1), atol=1e-5, rtol=1e-5)


def test_hps_accepts_bare_and_prefixed_state_dicts(models_dir: Path, tmp_path: Path, scorers) -> None:
    state = torch.load(models_dir / "hps" / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    scorer = build_reward(_spec(models_dir, "hps", path=str(tmp_path / "ddp.pt")))
    images = _images(2)
    torch.testing.assert_close(scorer(images, PROMPTS[:2]), scorers["hps"](images, PROMPTS[:2]))
    del state["visual.proj"]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(RewardModelError, match="visual.proj"):
        build_reward(_spec(models_dir, "hps", path=str(tmp_path / "bad.pt")))


def test_clip_preprocessing_matches_the_image_processor(scorers: dict[str, RewardModel]) -> None:
    """Our torch resize / crop / normalise against transformers' CLIPImageProcessor on the same
    uint8 images (the processor rounds to uint8 after resizing and may use another resize
    backend: agreement to a few grey levels)."""
    from transformers import CLIPImageProcessor

    clip = scorers["pickscore"].clip
    processor = CLIPImageProcessor.from_pretrained(str(clip.folder), local_files_only=True)
    u8 = (torch.rand(2, 40, 56, 3, generator=torch.Generator().manual_seed(3)) * 255).round().to(torch.uint8)
    # smooth images: resize kernels differ most on pixel noise
    u8 = torch.nn.functional.avg_pool2d(u8.permute(0, 3, 1, 2).float(), 5, 1, 2).round().to(torch.uint8)
    ours = clip.preprocess(u8.float() / 127.5 - 1)
    theirs = processor(images=[x.permute(1, 2, 0).numpy() for x in u8], return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert (ours - theirs).abs().mean() < 0.01 and (ours - theirs).abs().max() < 0.05


def test_hps_preprocessing_matches_open_clip_longest_resize(scorers: dict[str, RewardModel]) -> None:
    """HPS's ResizeMaxSize survives in open_clip as ``resize_mode="longest"`` (ResizeKeepRatio
    + CenterCropOrPad, fill 0); compare on smooth uint8 PIL images."""
    from open_clip import image_transform
    from PIL import Image

    u8 = (torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(4)) * 255)
    u8 = torch.nn.functional.avg_pool2d(u8, 5, 1, 2).round().to(torch.uint8)
    transform = image_transform(32, is_train=False, resize_mode="longest")
    theirs = torch.stack([transform(Image.fromarray(x.permute(1, 2, 0).numpy())) for x in u8])
    ours = scorers["hps"].preprocess(u8.float() / 127.5 - 1)
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert (ours - theirs).abs().mean() < 0.01 and (ours - theirs).abs().max() < 0.05


def test_resize_helpers() -> None:
    x = torch.rand(1, 3, 40, 56)
    assert resize_shortest_center_crop(x, 32).shape == (1, 3, 32, 32)
    assert resize_shortest_center_crop(x, 20, 16).shape == (1, 3, 16, 16)
    y = resize_longest_pad(x, 28, fill=0.0)
    assert y.shape == (1, 3, 28, 28) and y[..., :4, :].abs().sum() == 0 and y[..., -4:, :].abs().sum() == 0
    square = torch.rand(1, 3, 8, 8)
    assert torch.equal(resize_longest_pad(square, 8), square)


# ----------------------------------------------------------------------------- mixtures


class _Stub(RewardModel):
    """score = mean pixel value * factor + offset (deterministic, image-dependent)."""

    def __init__(self, name: str, factor: float, offset: float = 0.0, batch_size: int = 2) -> None:
        super().__init__(batch_size=batch_size)
        self.name, self.factor, self.offset = name, factor, offset

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3)) * self.factor + self.offset


def test_weighted_mixture() -> None:
    images = _images(5)
    a, b = _Stub("a", 1.0, 3.0), _Stub("b", -2.0, 1.0, batch_size=3)
    sa, sb = a(images, PROMPTS[:5]), b(images, PROMPTS[:5])
    mix = WeightedMixture([(a, 0.5), (b, 2.0)])
    torch.testing.assert_close(mix(images, PROMPTS[:5]), 0.5 * sa + 2.0 * sb)
    assert set(mix.component_scores(images, PROMPTS[:5])) == {"a", "b"}
    z = WeightedMixture([(a, 0.5), (b, 2.0)], standardize="batch")(images, PROMPTS[:5])
    za = (sa - sa.mean()) / (sa.std(unbiased=False) + 1e-6)
    zb = (sb - sb.mean()) / (sb.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(z, 0.5 * za + 2.0 * zb)
    assert WeightedMixture([(a, 1.0)], standardize=True)(images[:1], PROMPTS[:1]).item() == 0.0
    torch.testing.assert_close(Standardized(a, mean=3.0, std=0.5)(images, PROMPTS[:5]), (sa - 3.0) / 0.5)
    with pytest.raises(ValueError):
        WeightedMixture([])
    with pytest.raises(ValueError, match="standardize"):
        WeightedMixture([(a, 1.0)], standardize="rank")


def test_build_reward_mixture_from_specs(models_dir: Path, scorers: dict[str, RewardModel]) -> None:
    images = _images(4)
    mix = build_reward([_spec(models_dir, "clip_score", weight=2.0),
                        {"name": "toy", "weight": 0.5},
                        _spec(models_dir, "aesthetic", weight=-1.0, mean=1.0, std=4.0)])
    assert isinstance(mix, WeightedMixture) and [w for _, w in mix.components] == [2.0, 0.5, -1.0]
    toy = build_reward({"name": "toy"})(images, PROMPTS[:4])
    expected = (2.0 * scorers["clip_score"](images, PROMPTS[:4]) + 0.5 * toy
                - (scorers["aesthetic"](images, PROMPTS[:4]) - 1.0) / 4.0)
    torch.testing.assert_close(mix(images, PROMPTS[:4]), expected, atol=1e-5, rtol=1e-5)
    single = build_reward({"name": "toy", "weight": 3.0})
    assert isinstance(single, WeightedMixture)
    batch = build_reward({"components": [{"name": "toy"}], "standardize": "batch"})
    assert isinstance(batch, WeightedMixture) and batch.standardize == "batch"


# ----------------------------------------------------------------------------- toy world


def test_toy_reward_ranks_correct_above_wrong() -> None:
    from pipeline.toyworld import render, to_tensor

    toy = build_reward({"name": "toy", "batch_size": 2})
    prompt = "two red circles on the left"
    right = np.stack([render(prompt, seed) for seed in range(3)])
    wrong = np.stack([render(p, 0) for p in ("two blue circles on the left", "three red squares at the top",
                                               "a red circle on the right")])
    scores = toy(to_tensor(np.concatenate([right, wrong])), [prompt] * 6)
    assert scores.shape == (6,) and scores.dtype == torch.float32
    assert scores[:3].min() > scores[3:].max()
    assert scores[:3].min() >= 0.8


# ----------------------------------------------------------------------------- errors


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown reward model 'pickscor'.*pickscore") as e:
        build_reward({"name": "pickscor", "path": "/nowhere"})
    for name in known_rewards():
        assert name in str(e.value)
    with pytest.raises(ValueError, match="needs a 'name'"):
        build_reward({"path": "/x"})
    with pytest.raises(ValueError, match="unknown spec keys \\['pth'\\]"):
        build_reward({"name": "pickscore", "pth": "/x"})


@pytest.mark.parametrize("name", ["pickscore", "clip_score", "aesthetic", "hps", "imagereward"])
def test_missing_path_is_named(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_reward({"name": name, "path": str(missing)})


def test_wrong_kind_of_folder(models_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardModelError, match="no config.json"):
        build_reward({"name": "pickscore", "path": str(tmp_path / "empty")})
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(RewardModelError, match="model_type 'bert'"):
        build_reward({"name": "clip_score", "path": str(tmp_path / "bert")})
    with pytest.raises(RewardModelError, match="transformers model folder"):  # CLIP folder given to HPS
        build_reward({"name": "hps", "path": str(models_dir / "clip")})
    with pytest.raises(RewardModelError, match="is a file"):
        build_reward({"name": "pickscore", "path": str(models_dir / "hps" / "HPS_v2.1_compressed.pt")})


def test_corrupt_checkpoint_is_named(models_dir: Path, tmp_path: Path) -> None:
    bogus = tmp_path / "HPS_v2.1_compressed.pt"
    bogus.write_text("this is not a checkpoint\n")
    with pytest.raises(RewardModelError, match=f"{bogus}.*not a readable PyTorch checkpoint"):
        build_reward(_spec(models_dir, "hps", path=str(bogus)))
    head = tmp_path / "head.pth"
    torch.save({"weight": torch.zeros(2)}, head)
    with pytest.raises(RewardModelError, match="not an aesthetic-predictor head"):
        build_reward({"name": "aesthetic", "path": str(head), "clip_path": str(models_dir / "clip")})
