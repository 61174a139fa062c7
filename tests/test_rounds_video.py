"""SIPO on video end to end: the world registry and its prompt sources, the shipped configs/toy_video.yaml, a video
evaluation's per-dimension scores and frame-strip grids, the engine on 5-D latents, and one real online round (local
Ray) of a tiny random Wan pixel-space model on the toy video world."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.prompts import load_prompts
from pipeline.rounds import RoundsConfig
from pipeline.toyworld.worlds import (WORLDS, get_world, parse_source, prompt_sources, resolve_model,
                                      world_of_dimensions, world_of_prompts, world_of_reward)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "toy_video.yaml"
VIDEO_SIZE = (4, 16, 16)  # frames, height, width of the tiny model's clips

sys.path.insert(0, str(ROOT / "jobs"))
import iterative_sipo  # noqa: E402


# ------------------------------------------------------------------------------------------------ the registry
def test_world_registry_and_prompt_sources():
    from pipeline.toyworld import heldout_specs, train_specs
    from pipeline.toyworld.video import DIMENSIONS
    from pipeline.toyworld.video import heldout_specs as video_heldout, train_specs as video_train

    assert set(WORLDS) == {"toy", "toy_video"}
    image, video = get_world("toy"), get_world("toy_video")
    assert image.dimensions == ("colour", "shape", "count", "position") and not image.video
    assert video.dimensions == DIMENSIONS == ("colour", "shape", "count", "motion", "consistency") and video.video
    assert (image.reward, video.reward) == ("toy", "toy_video")
    # every toy:* source reads as before; the video world's splits through the same door
    assert [r["prompt"] for r in load_prompts("toy:train")] == [s.text for s in train_specs()]
    assert [r["prompt"] for r in load_prompts("toy:heldout", limit=5)] == [s.text for s in heldout_specs()[:5]]
    assert [r["prompt"] for r in load_prompts("toy_video:train")] == [s.text for s in video_train()]
    assert [r["prompt"] for r in load_prompts("toy_video:heldout")] == [s.text for s in video_heldout()]
    sizes = {s: len(load_prompts(s)) for s in prompt_sources()}
    assert sizes["toy_video:fit"] + sizes["toy_video:val"] == sizes["toy_video:train"] == 192
    assert sizes["toy_video:train"] + sizes["toy_video:heldout"] == sizes["toy_video:all"] == 270
    assert sizes["toy:train"] == 168 and sizes["toy:heldout"] == 48
    train = {r["prompt"] for r in load_prompts("toy_video:train")}
    assert not train & {r["prompt"] for r in load_prompts("toy_video:heldout")}
    with pytest.raises(ValueError, match="toy_video:nope.*splits train, fit, val, heldout, all"):
        load_prompts("toy_video:nope")
    with pytest.raises(FileNotFoundError, match="toy_video:heldout"):  # the error lists the world sources
        load_prompts("no_such_file.txt")
    assert parse_source("s3://bucket/prompts.txt") is None and parse_source("toy_video:val")[1] == "val"
    # the reward names a world; a mixture, or any other reward, does not
    assert world_of_reward({"name": "toy_video"}) is video and world_of_reward({"name": "toy"}) is image
    assert world_of_reward({"name": "toy", "weight": 2.0}) is None and world_of_reward({"name": "pickscore"}) is None
    assert world_of_prompts(["two red circles moving left"]) is video
    assert world_of_prompts(["two red circles on the left"]) is image and world_of_prompts(["a cat"]) is None
    assert world_of_dimensions(DIMENSIONS) is video and world_of_dimensions([]) is None
    assert resolve_model("toy_video:reference").endswith("pipeline/toyworld/video/reference_model")
    assert resolve_model("/models/wan") == "/models/wan"


def test_world_scores_rendered_clips_per_dimension():
    from pipeline.evaluation import SampleOutput, score_samples
    from pipeline.toyworld.video import heldout_specs, render_batch, to_tensor

    specs = list(heldout_specs()[:3])
    videos = to_tensor(render_batch(specs * 2, [1, 2, 3, 4, 5, 6]))  # 3 prompts × 2 seeds, prompt-major below
    videos = videos.reshape(2, 3, *videos.shape[1:]).transpose(0, 1).reshape(6, *videos.shape[1:])
    out = SampleOutput(images=videos, latents=videos, log_probs=torch.zeros(6, 1), timesteps=torch.zeros(1))
    res = score_samples(specs, out, per_prompt=2)  # the world is the one whose grammar the prompts follow
    assert res.world == "toy_video" and list(res.attributes) == list(get_world("toy_video").dimensions)
    assert res.overall.mean == 1.0 and all(m.mean == 1.0 for m in res.attributes.values())
    assert "| model | overall (all 5 dimensions) |" in res.table()
    d = res.to_dict()  # the eval.json schema stays the image job's (the world shows in its dimension names)
    assert "world" not in d and set(d["drift"]) == {"background_brightness", "colour_entropy", "seed_diversity"}
    assert d["drift"]["background_brightness"]["mean"] < 0.05 and d["drift"]["seed_diversity"]["mean"] > 0


# ------------------------------------------------------------------------------------------------ the config
def _resolve(*argv):
    from pipeline.cli import resolve

    return resolve(iterative_sipo.parse_args(list(argv)), RoundsConfig)


def test_shipped_video_config_parses_into_rounds_config(capsys):
    from pipeline.toyworld.video.reference import VIDEO_REFERENCE_DIR

    cfg = _resolve("--config", str(CONFIG))
    assert cfg.model == cfg.generation.model == cfg.train.model == str(VIDEO_REFERENCE_DIR)
    assert cfg.generation.prompts == "toy_video:train" and cfg.eval.prompts == "toy_video:heldout"
    assert cfg.generation.reward == {"name": "toy_video"} and cfg.select.prompts == "toy_video:val"
    assert cfg.train.objective.name == "sipo" and cfg.rounds >= 1  # the rest of the recipe stays
    with pytest.raises(SystemExit) as done:
        _resolve("--config", str(CONFIG), "--print-config")
    out = capsys.readouterr().out
    assert done.value.code == 0 and "prompts: toy_video:heldout" in out and "name: toy_video" in out


# ------------------------------------------------------------------------------------------------ a tiny model
@pytest.fixture(scope="module")
def tiny_wan_dir(tmp_path_factory):
    """A random Wan pixel-space model (the toy video reference's kind, tiny), saved and loaded back by folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from pipeline.backbones import WanBackbone
    from pipeline.toyworld.reference import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=16, num_layers=1,
                                          num_heads=2, pad_token_id=0))
    transformer = WanTransformer3DModel(patch_size=(1, 4, 4), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=3, out_channels=3, text_dim=16, freq_dim=16, ffn_dim=16,
                                        num_layers=1, rope_max_seq_len=32)
    path = tmp_path_factory.mktemp("video_rounds") / "wan_pixel"
    WanBackbone(tokenizer, encoder, transformer, FlowMatchEulerDiscreteScheduler(shift=1.0),
                video_size=VIDEO_SIZE).save_pretrained(path)
    return path


def test_engine_trains_on_video_latents(tiny_wan_dir):
    """The training engine is shape-agnostic: SIPO steps on (N, 3, F, H, W) pairs change the weights, finitely."""
    from pipeline.training.config import TrainConfig
    from pipeline.training.engine import PairData, TrainEngine

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, *VIDEO_SIZE, generator=g) * 2 - 1
    prompts = [r["prompt"] for r in load_prompts("toy_video:train", limit=4)]
    data = PairData(x0_w=x, x0_l=x.flip(0), prompts=prompts, perturbed=None, pair_ids=[f"p{i}" for i in range(4)])
    engine = TrainEngine(TrainConfig(model=str(tiny_wan_dir), objective={"name": "sipo", "safeguard": {"mu": 0.9}},
                                     lr=1e-3, max_steps=2, batch_size=2, checkpoint_every=2, log_every=1))
    before = {n: p.detach().clone() for n, p in engine.backbone.denoiser.named_parameters()}
    history = engine.run(data)
    assert [m["step"] for m in history] == [1, 2] and all(np.isfinite(m["loss"]) for m in history)
    assert any(not torch.equal(before[n], p) for n, p in engine.backbone.denoiser.named_parameters())


@pytest.mark.slow
def test_one_video_round_end_to_end(local_ray, tiny_wan_dir, tmp_path):
    """configs/toy_video.yaml shrunk to seconds, on the tiny model: Ray Data rollouts of videos scored by the toy video
    reward, Ray Train on 5-D latents, the held-out evaluation per dimension, the paired frame-strip grid."""
    from pipeline.evaluation import load_samples
    from pipeline.reporting import strip_grid_geometry
    from pipeline.rounds import run_rounds

    sampler = "{num_steps: 2, guidance_scale: 2.0, eta: 1.0, batch_size: 8}"
    cfg = _resolve("--config", str(CONFIG), "--set", f"model={tiny_wan_dir}", "rounds=1",
                   "generation.prompt_limit=3", "generation.samples_per_prompt=2", "generation.min_reward_gap=0.0",
                   "generation.batch_size=6", "generation.num_actors=1", f"generation.sampler={sampler}",
                   "train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=2", "train.log_every=1",
                   "eval.num_prompts=3", "eval.samples=2", f"eval.sampler={sampler}")
    rows = run_rounds(cfg, tmp_path / "run", log=lambda *_: None)
    run = tmp_path / "run"
    manifest = json.loads((run / "round_0" / "pairs_manifest.json").read_text())
    assert manifest["num_pairs"] >= 1 and manifest["config"]["prompts"] == "toy_video:train"
    # summary.json: the paired Δ with its interval, the win rate, and every dimension of the video world
    summary = json.loads((run / "summary.json").read_text())
    assert [r["round"] for r in summary] == [r["round"] for r in rows] == ["reference", "round 0"]
    delta = summary[1]["delta_vs_ref"]
    assert set(delta) >= {"mean", "ci_low", "ci_high"} and delta["ci_low"] <= delta["mean"] <= delta["ci_high"]
    assert 0.0 <= summary[1]["win_rate_vs_ref"] <= 1.0 and summary[0]["delta_vs_ref"]["mean"] == 0.0
    dims = list(get_world("toy_video").dimensions)
    assert all(list(r["attributes"]) == dims and r["overall"] is not None for r in summary)
    assert set(summary[1]["drift"]) == {"background_brightness", "colour_entropy", "seed_diversity"}
    header = (run / "summary.md").read_text().splitlines()
    table = next(line for line in header if line.startswith("| round |"))
    assert [c.strip() for c in table.strip("|").split("|")][5:] == ["all dimensions", *dims]
    assert "scored per dimension by the toy world `toy_video`" in (run / "summary.md").read_text()
    # the paired grid: one frame strip per (prompt, seed), reference | policy, at the geometry's size
    samples = load_samples(run / "round_0" / "samples.npz")
    assert samples["images"].shape == (3, 2, *VIDEO_SIZE, 3)  # (prompts, seeds, F, H, W, RGB)
    for grid, groups in ((run / "round_0" / "paired_grid.png", 2), (run / "round_0" / "grid.png", 1)):
        geo = strip_grid_geometry(3 * 2, VIDEO_SIZE[0], groups, *VIDEO_SIZE[1:])
        width, height = Image.open(grid).size
        assert height == geo.size[1] and width > geo.size[0], (grid, (width, height), geo)
    assert (run / "final_model" / "model_index.json").is_file()


def test_a_video_prompt_limit_spreads_over_the_grammar():
    """``prompt_limit`` on the video world takes evenly spaced prompts: its grammar order puts one colour first."""
    from pipeline.data.prompts import load_prompts

    texts = [r["prompt"] for r in load_prompts("toy_video:train", limit=32)]
    train = [r["prompt"] for r in load_prompts("toy_video:train")]
    assert len(set(texts)) == 32 and [t for t in train if t in set(texts)] == texts  # a subset, in split order
    assert {t.split()[1] for t in texts} == {t.split()[1] for t in train}  # every colour …
    assert {" ".join(t.split()[3:]) for t in texts} == {" ".join(t.split()[3:]) for t in train}  # … and motion
    assert [r["prompt"] for r in load_prompts("toy:train", limit=3)] == [r["prompt"] for r in load_prompts("toy:train")][:3]
