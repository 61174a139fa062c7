"""The toy video world's reference model: built by the pretraining job's own code path (``--world video``), written
as a pixel-space ``WanPipeline`` folder, loaded back through ``load_backbone``, sampled and scored with the
``toy_video`` reward; and the shipped folder is that architecture."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pipeline.backbones import WanBackbone, load_backbone
from pipeline.objectives import Parameterization
from pipeline.rewards import build_reward
from pipeline.sampling import SamplerConfig, sample
from pipeline.toyworld.video import heldout_specs, train_specs
from pipeline.toyworld.video.reference import (VIDEO_REFERENCE_DIR, VIDEO_SIZE, build_scheduler, build_text_encoder,
                                               build_tokenizer, build_transformer, vocabulary)
from pipeline.utils.atomic import COMPLETE_MARKER

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import pretrain_toy  # noqa: E402

PROMPTS = [train_specs()[0].text, heldout_specs()[0].text]


def _public(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


def test_tokenizer_covers_the_video_grammar():
    tok = build_tokenizer()
    unk = tok.unk_token_id
    for spec in (*train_specs(), *heldout_specs()):
        ids = tok(spec.text).input_ids
        assert unk not in ids and len(ids) <= tok.model_max_length, spec.text
    assert len(tok) == len(vocabulary())


def test_pretrain_job_writes_a_wan_folder_that_loads_samples_and_scores(tmp_path):
    out = tmp_path / "ref"
    args = pretrain_toy.parse_args(["--world", "video", "--steps", "3", "--batch-size", "2", "--warmup", "1",
                                    "--out", str(out)])
    summary = pretrain_toy.pretrain(args)
    assert summary["world"] == "video" and summary["params"]["transformer"] > 0
    assert (out / COMPLETE_MARKER).is_file() and not (out / "vae").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["_video_size"] == list(VIDEO_SIZE)
    record = json.loads((out / "pretraining.json").read_text())
    assert record["args"]["world"] == "video" and len(record["history"]["loss"]) >= 1

    bb = load_backbone(out)
    assert type(bb) is WanBackbone and bb.vae is None and bb.is_video
    assert bb.process.parameterization is Parameterization.FLOW
    assert bb.latent_shape() == (3, *VIDEO_SIZE)
    videos = sample(bb, PROMPTS, [0, 1], SamplerConfig(num_steps=2, guidance_scale=2.0, eta=0.0)).images
    assert videos.shape == (2, 3, 8, 32, 32) and torch.isfinite(videos).all()
    assert float(videos.abs().max()) <= 1.0
    rewards = build_reward({"name": "toy_video"})(videos, PROMPTS)
    assert rewards.shape == (2,) and bool(((rewards >= 0) & (rewards <= 1)).all())


def test_shipped_reference_is_the_architecture():
    assert (VIDEO_REFERENCE_DIR / COMPLETE_MARKER).is_file(), "train it: python jobs/pretrain_toy.py --world video"
    bb = load_backbone(VIDEO_REFERENCE_DIR)
    assert type(bb) is WanBackbone and bb.vae is None and bb.video_size == VIDEO_SIZE
    assert _public(bb.denoiser.config) == _public(build_transformer().config)
    shipped, built = bb.text_encoder.config, build_text_encoder().config
    assert type(bb.text_encoder) is type(build_text_encoder())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "projection_dim", "pad_token_id", "bos_token_id", "eos_token_id"):
        assert getattr(shipped, key) == getattr(built, key), key
    assert _public(bb.scheduler_config) == _public(build_scheduler().config)
    assert bb.tokenizer.get_vocab() == build_tokenizer().get_vocab()
    record = json.loads((VIDEO_REFERENCE_DIR / "pretraining.json").read_text())
    assert record["world"] == "video" and record["args"]["steps"] == pretrain_toy.VIDEO_STEPS
    size = sum(f.stat().st_size for f in VIDEO_REFERENCE_DIR.rglob("*") if f.is_file())
    assert size < 8_000_000  # ships in the package
