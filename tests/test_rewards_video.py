"""Video rewards on (N, 3, F, H, W): the frame-averaging wrapper around real image scorers, the temporal consistency
score, mixtures of video scorers and the shape errors. The CLIP stand-in is the tiny real CLIPModel of
test_rewards.py, saved and loaded back through the code a real folder uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.rewards import WeightedMixture, build_reward, check_reward_spec, known_rewards
from pipeline.rewards.video import FrameAverage, TemporalConsistency, frame_indices
from test_rewards import PROMPTS, _write_tiny_clip


def _videos(n: int = 3, f: int = 4, h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, f, h, w, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("video_rewards") / "clip"
    _write_tiny_clip(folder)
    return folder


def _image_spec(clip_dir: Path, name: str = "clip_score", **extra) -> dict:
    return {"name": name, "path": str(clip_dir), **extra}


def test_names_are_registered() -> None:
    assert {"frame_average", "temporal_consistency"} <= set(known_rewards())


@pytest.mark.parametrize("inner", ["clip_score", "pickscore"])
def test_frame_average_is_the_mean_of_per_frame_scores(clip_dir: Path, inner: str) -> None:
    videos, prompts = _videos(), PROMPTS[:3]
    scorer = build_reward({"name": "frame_average", "inner": _image_spec(clip_dir, inner, batch_size=5),
                           "batch_size": 2})
    assert isinstance(scorer, FrameAverage) and scorer.video and scorer.name == f"frame_average({inner})"
    image = build_reward(_image_spec(clip_dir, inner))
    per_frame = torch.stack([image(videos[:, :, f], prompts) for f in range(videos.shape[2])], dim=1)
    scores = scorer(videos, prompts)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, per_frame.mean(dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scorer.frame_scores(videos, prompts), per_frame, atol=1e-5, rtol=1e-5)
    assert scorer(videos[:0], []).shape == (0,) and scorer.frame_scores(videos[:0], []).shape == (0, 4)
    # a static video scores as its frame does
    static = videos[:, :, :1].expand(-1, -1, 5, -1, -1)
    torch.testing.assert_close(scorer(static, prompts), image(videos[:, :, 0], prompts), atol=1e-5, rtol=1e-5)
    # max_frames: evenly spaced frames, first and last included
    sub = build_reward({"name": "frame_average", "inner": _image_spec(clip_dir, inner), "max_frames": 2})
    torch.testing.assert_close(sub(videos, prompts), per_frame[:, [0, 3]].mean(dim=1), atol=1e-5, rtol=1e-5)


def test_frame_indices() -> None:
    assert frame_indices(4).tolist() == [0, 1, 2, 3] and frame_indices(4, 8).tolist() == [0, 1, 2, 3]
    assert frame_indices(81, 5).tolist() == [0, 20, 40, 60, 80]


def test_frame_average_wraps_mixtures_and_the_toy_reward(clip_dir: Path) -> None:
    """Any image spec works inside: a weighted list of specs, or a scorer with no weights at all."""
    videos, prompts = _videos(2, 3), PROMPTS[:2]
    inner = [_image_spec(clip_dir, weight=2.0), {"name": "toy", "weight": 0.5}]
    scorer = build_reward({"name": "frame_average", "inner": inner})
    mix = build_reward(inner)
    expected = torch.stack([mix(videos[:, :, f], prompts) for f in range(3)], dim=1).mean(dim=1)
    torch.testing.assert_close(scorer(videos, prompts), expected, atol=1e-5, rtol=1e-5)


def test_temporal_consistency(clip_dir: Path) -> None:
    scorer = build_reward({"name": "temporal_consistency", "path": str(clip_dir), "batch_size": 2,
                           "frame_batch_size": 3})
    assert isinstance(scorer, TemporalConsistency) and scorer.video
    frame = _videos(3, 1, seed=1)
    static = frame.expand(-1, -1, 6, -1, -1)
    torch.testing.assert_close(scorer(static, PROMPTS[:3]), torch.ones(3), atol=1e-5, rtol=0)
    changing = _videos(3, 6, seed=2)
    # the same first frame, then growing drift towards other images: consistency falls with the drift
    drift = torch.stack([frame[:, :, 0] * (1 - a) + changing[:, :, 1] * a for a in (0.0, 0.2, 0.4, 0.6)], dim=2)
    s_changing, s_drift = scorer(changing, PROMPTS[:3]), scorer(drift, PROMPTS[:3])
    assert (s_changing < 0.999).all() and (s_drift < 0.9999).all() and (s_changing < s_drift).all()
    # the formula, from CLIPModel's own image features on the processor's pixels
    clip = scorer.clip
    with torch.no_grad():
        out = clip.model.get_image_features(pixel_values=clip.preprocess(changing[0].transpose(0, 1)))
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
    emb = emb / emb.norm(dim=-1, keepdim=True)
    adjacent = (emb[1:] * emb[:-1]).sum(-1)
    torch.testing.assert_close(s_changing[0], adjacent.mean(), atol=1e-5, rtol=1e-5)
    assert torch.equal(s_changing, scorer(changing, ["x"] * 3)), "the prompt is ignored"
    vbench = build_reward({"name": "temporal_consistency", "path": str(clip_dir), "mode": "vbench"})
    first = (emb[1:] * emb[:1]).sum(-1)
    torch.testing.assert_close(vbench(changing[:1], ["x"])[0],
                               ((adjacent.clamp_min(0) + first.clamp_min(0)) / 2).mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vbench(static, PROMPTS[:3]), torch.ones(3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="at least 2 frames.*F=1"):
        scorer(frame, PROMPTS[:3])
    with pytest.raises(ValueError, match="mode must be one of"):
        build_reward({"name": "temporal_consistency", "path": str(clip_dir), "mode": "dino"})


def test_mixtures_of_video_scorers(clip_dir: Path) -> None:
    videos, prompts = _videos(4, 3, seed=3), PROMPTS[:4]
    frame_avg = {"name": "frame_average", "inner": _image_spec(clip_dir)}
    temporal = {"name": "temporal_consistency", "path": str(clip_dir)}
    mix = build_reward([{**frame_avg, "weight": 2.0}, {**temporal, "weight": 0.5, "mean": 0.9, "std": 0.1}])
    assert isinstance(mix, WeightedMixture) and mix.video
    a, b = build_reward(frame_avg)(videos, prompts), build_reward(temporal)(videos, prompts)
    torch.testing.assert_close(mix(videos, prompts), 2.0 * a + 0.5 * (b - 0.9) / 0.1, atol=1e-5, rtol=1e-5)
    assert set(mix.component_scores(videos, prompts)) == {"frame_average(clip_score)", "temporal_consistency"}
    z = build_reward({"components": [frame_avg, temporal], "standardize": "batch"})(videos, prompts)
    za = (a - a.mean()) / (a.std(unbiased=False) + 1e-6)
    zb = (b - b.mean()) / (b.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(z, za + zb, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"cannot combine image scorers \['clip_score'\] with video scorers.*frame_average"):
        build_reward([_image_spec(clip_dir), temporal])


def test_shapes_and_specs_are_checked(clip_dir: Path, tmp_path: Path) -> None:
    image = build_reward(_image_spec(clip_dir))
    video = build_reward({"name": "frame_average", "inner": _image_spec(clip_dir)})
    with pytest.raises(ValueError, match=r"images must have shape \(N, 3, H, W\), got \(2, 3, 4, 40, 56\) "
                                         r"\(a video batch.*frame_average"):
        image(_videos(2), PROMPTS[:2])
    with pytest.raises(ValueError, match=r"videos must have shape \(N, 3, F, H, W\), got \(2, 3, 40, 56\) "
                                         r"\(an image batch"):
        video(_videos(2)[:, :, 0], PROMPTS[:2])
    with pytest.raises(ValueError, match=r"videos must have shape \(N, 3, F, H, W\), got \(2, 4, 3, 8, 8\)"):
        video(torch.zeros(2, 4, 3, 8, 8), PROMPTS[:2])
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        video(_videos(2), PROMPTS[:1])
    with pytest.raises(TypeError, match="videos must be floating point"):
        video(torch.zeros(1, 3, 2, 8, 8, dtype=torch.uint8), PROMPTS[:1])
    temporal = {"name": "temporal_consistency", "path": str(clip_dir)}
    with pytest.raises(ValueError, match="already scores videos"):
        build_reward({"name": "frame_average", "inner": temporal})
    with pytest.raises(ValueError, match="standardize.*outer mixture"):
        build_reward({"name": "frame_average", "inner": {"components": [_image_spec(clip_dir)], "standardize": "batch"}})
    with pytest.raises(ValueError, match="max_frames must be >= 0"):
        build_reward({"name": "frame_average", "inner": {"name": "toy"}, "max_frames": -1})
    with pytest.raises(ValueError, match="unknown reward model 'pickscor'"):
        check_reward_spec({"name": "frame_average", "inner": {"name": "pickscor"}})
    with pytest.raises(FileNotFoundError, match="no_such_model"):  # checked without loading anything
        check_reward_spec({"name": "frame_average", "inner": {"name": "pickscore", "path": str(tmp_path / "no_such_model")}})
    with pytest.raises(ValueError, match=r"unknown spec keys \['frames'\]"):
        build_reward({"name": "frame_average", "inner": {"name": "toy"}, "frames": 4})
