"""The toy video world: grammar and splits, renderer, verifiable video reward, and its registered RewardModel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.rewards import build_reward, known_rewards
from pipeline.toyworld import heldout_pairs
from pipeline.toyworld.video import (DIMENSIONS, MOTION_VECTORS, MOTIONS, REVERSED, VideoSpec, all_specs,
                                     corrupt_spec, detect, differ_in, fit_specs, from_tensor,
                                     heldout_motion_pairs, heldout_specs, is_heldout, judge, layout,
                                     parse_prompt, render, render_batch, score, to_tensor, train_specs,
                                     validation_specs, detect_batch)
from pipeline.toyworld.video.detector import HARD_WEIGHT


# ----------------------------------------------------------------------------- grammar


def test_prompt_text_round_trips_for_every_spec() -> None:
    specs = all_specs()
    assert len(specs) == 6 * 3 * 3 * 5 == len(set(specs))
    for spec in specs:
        assert parse_prompt(spec.text) == spec
    assert VideoSpec("red", "circle", 1, "left").text == "a red circle moving left"
    assert VideoSpec("blue", "square", 2, "up").text == "two blue squares moving up"
    assert parse_prompt("  Three green triangles standing still. ") == VideoSpec("green", "triangle", 3, "still")
    assert parse_prompt("one red circle moving down").count == 1


@pytest.mark.parametrize("bad", ["a red circle on the left", "two red circle moving left", "a red circles moving up",
                                 "a purple circle moving left", "a red circle moving sideways", "", 3])
def test_parse_rejects_text_outside_the_grammar(bad) -> None:
    with pytest.raises(ValueError, match="cannot parse video prompt"):
        parse_prompt(bad)


def test_spec_validates() -> None:
    with pytest.raises(ValueError, match="motion 'sideways'"):
        VideoSpec("red", "circle", 1, "sideways")
    with pytest.raises(ValueError, match="count"):
        VideoSpec("red", "circle", 4, "left")


def test_splits_are_disjoint_complete_deterministic_and_pinned() -> None:
    train, val, fit, held = train_specs(), validation_specs(), fit_specs(), heldout_specs()
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(all_specs())
    assert set(val).isdisjoint(fit) and set(val) | set(fit) == set(train)
    assert (len(train), len(val), len(fit), len(held)) == (192, 28, 164, 78)
    assert heldout_motion_pairs() == (("blue", "up"), ("cyan", "down"), ("yellow", "right"))
    # same rule, same answer (no process-dependent hashing); another seed gives another split
    assert heldout_motion_pairs.__wrapped__() == heldout_motion_pairs()
    assert heldout_motion_pairs.__wrapped__(seed=1) != heldout_motion_pairs()
    for spec in held:
        assert (spec.colour, spec.shape) in heldout_pairs() or (spec.colour, spec.motion) in heldout_motion_pairs()
    # held-out combinations never occur in training, while every single value does
    assert not any((s.colour, s.shape) in heldout_pairs() for s in train)
    assert not any((s.colour, s.motion) in heldout_motion_pairs() for s in train)
    for attribute in ("colour", "shape", "count", "motion"):
        assert {getattr(s, attribute) for s in train} == {getattr(s, attribute) for s in all_specs()}
    assert is_heldout(VideoSpec("blue", "circle", 1, "up")) and not is_heldout(VideoSpec("blue", "circle", 1, "down"))


def test_differ_in_and_corrupt_spec() -> None:
    rng = np.random.default_rng(0)
    spec = VideoSpec("red", "circle", 2, "left")
    for attribute in ("colour", "shape", "count", "motion"):
        other = differ_in(spec, attribute, rng)
        changed = [a for a in ("colour", "shape", "count", "motion") if getattr(other, a) != getattr(spec, a)]
        assert changed == [attribute]
    assert corrupt_spec(spec, 0.0, rng) == spec
    flipped = corrupt_spec(spec, 1.0, rng)
    assert all(getattr(flipped, a) != getattr(spec, a) for a in ("colour", "shape", "count", "motion"))


# ----------------------------------------------------------------------------- renderer


def _mass_centroid(frame: np.ndarray) -> np.ndarray:
    """(x, y) of the pixel mass, straight from the pixels (independent of the detector)."""
    m = frame.astype(np.float64).sum(axis=-1)
    ys, xs = np.indices(m.shape) + 0.5
    return np.array([(m * xs).sum(), (m * ys).sum()]) / m.sum()


def test_render_is_deterministic_and_seeded() -> None:
    spec = VideoSpec("green", "triangle", 3, "down")
    a, b = render(spec, 5), render(spec.text, 5)
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render(spec, 6))
    assert np.array_equal(render_batch([spec, spec], [5, 6])[1], render(spec, 6))
    custom = render(spec, 5, size=48, frames=5, speed=3)
    assert custom.shape == (5, 48, 48, 3)


@pytest.mark.parametrize("motion", MOTIONS)
def test_motion_is_visible_in_the_pixels(motion: str) -> None:
    spec = VideoSpec("magenta", "square", 2, motion)
    clip = render(spec, 11)
    centroids = np.stack([_mass_centroid(f) for f in clip])
    steps = np.diff(centroids, axis=0)
    ux, uy = MOTION_VECTORS[motion]
    np.testing.assert_allclose(steps, np.tile([2.0 * ux, 2.0 * uy], (7, 1)), atol=1e-6)  # 2 px/frame at 32 px
    # objects stay whole in every frame: same amount of colour each frame
    mass = clip.astype(np.float64).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(mass, mass[0], rtol=1e-3)
    if motion == "still":
        assert all(np.array_equal(f, clip[0]) for f in clip)
    else:
        assert not np.array_equal(clip[0], clip[-1])


def test_layout_keeps_every_track_inside_the_frame() -> None:
    for spec in all_specs()[::7]:
        for track in layout(spec, 3):
            for f in (0, 7):
                p = track.at(f)
                assert 0.5 - 1e-9 <= p.x0 and p.x0 + p.s <= 31.5 + 1e-9
                assert 0.5 - 1e-9 <= p.y0 and p.y0 + p.s <= 31.5 + 1e-9
    with pytest.raises(ValueError, match="no room to move"):
        layout(VideoSpec("red", "circle", 1, "left"), 0, size=16, frames=8, speed=2)
    with pytest.raises(ValueError, match="frames"):
        render(VideoSpec("red", "circle", 1, "left"), 0, frames=1)


def test_tensor_layout_round_trips() -> None:
    clips = render_batch([VideoSpec("red", "circle", 1, "left"), VideoSpec("cyan", "square", 3, "up")], [0, 1])
    t = to_tensor(clips)
    assert t.shape == (2, 3, 8, 32, 32) and t.dtype == torch.float32
    assert t.min() >= -1.0 and t.max() <= 1.0
    # channel 0 of frame 3 of clip 1 is the red channel of that frame
    np.testing.assert_allclose(t[1, 0, 3].numpy(), clips[1, 3, :, :, 0] / 127.5 - 1.0, atol=1e-6)
    assert np.array_equal(from_tensor(t), clips)
    assert to_tensor(clips[0]).shape == (1, 3, 8, 32, 32)
    with pytest.raises(ValueError):
        to_tensor(clips.astype(np.float32))


# ----------------------------------------------------------------------------- detector


@pytest.fixture(scope="module")
def ground_truth() -> tuple[list[VideoSpec], np.ndarray]:
    rng = np.random.default_rng(2024)
    specs = list(all_specs())
    return specs, render_batch(specs, [int(s) for s in rng.integers(1 << 30, size=len(specs))])


def test_accuracy_on_ground_truth(ground_truth) -> None:
    specs, clips = ground_truth
    result = score(clips, specs)
    for dim in (*DIMENSIONS, "overall"):
        assert getattr(result, dim).mean() >= 0.99, dim
    assert np.all(result.reward[result.overall] >= HARD_WEIGHT)
    assert np.all((result.reward >= 0) & (result.reward <= 1))
    assert np.array_equal(result.num_objects, [s.count for s in specs])
    ux = np.array([MOTION_VECTORS[s.motion][0] for s in specs])
    np.testing.assert_allclose(result.velocity[:, 0], 2.0 * ux, atol=0.2)


def test_float_tensor_and_uint8_inputs_agree(ground_truth) -> None:
    specs, clips = ground_truth
    a = score(clips[:20], specs[:20])
    b = score(to_tensor(clips[:20]), [s.text for s in specs[:20]])
    np.testing.assert_allclose(a.reward, b.reward, atol=1e-6)
    assert len(detect(clips[0]).frames) == 8


def test_wrong_direction_scores_lower_on_motion(ground_truth) -> None:
    specs, clips = ground_truth
    idx = [i for i, s in enumerate(specs) if s.motion != "still"][:60]
    right = score(clips[idx], [specs[i] for i in idx])
    reversed_ = score(clips[idx], [specs[i].replace(motion=REVERSED[specs[i].motion]) for i in idx])
    still = score(clips[idx], [specs[i].replace(motion="still") for i in idx])
    assert right.motion.all() and not reversed_.motion.any() and not still.motion.any()
    assert np.all(reversed_.reward < right.reward) and np.all(still.reward < right.reward)
    # the other dimensions are still read correctly
    for dim in ("colour", "shape", "count", "consistency"):
        assert getattr(reversed_, dim).all(), dim
    # and a still clip does not pass for a moving prompt
    still_idx = [i for i, s in enumerate(specs) if s.motion == "still"][:20]
    moving = score(clips[still_idx], [specs[i].replace(motion="left") for i in still_idx])
    assert not moving.motion.any()


@pytest.mark.parametrize("attribute", ["colour", "shape", "count"])
def test_rendered_one_attribute_mismatch_is_rejected(ground_truth, attribute: str) -> None:
    specs, _ = ground_truth
    rng = np.random.default_rng(3)
    chosen = specs[::9]
    shown = render_batch([differ_in(s, attribute, rng) for s in chosen], list(range(len(chosen))))
    result = score(shown, chosen)
    assert not result.overall.any()
    assert getattr(result, attribute).mean() <= 0.01
    assert np.all(result.reward <= HARD_WEIGHT + 1e-9)   # one dimension wrong: at most 5/6


def test_temporal_faults_fail_consistency(ground_truth) -> None:
    specs, clips = ground_truth
    idx = [i for i, s in enumerate(specs) if s.motion != "still"][:40]
    base = clips[idx]
    prompts = [specs[i] for i in idx]
    shuffled = base[:, [0, 4, 1, 6, 2, 7, 3, 5]]
    blanked = base.copy()
    blanked[:, 4] = 0
    for faulty in (shuffled, blanked):
        result = score(faulty, prompts)
        assert not result.consistency.any()
        assert not result.overall.any()
        assert np.all(result.reward < score(base, prompts).reward)


def test_clutter_and_empty_clips_score_low() -> None:
    rng = np.random.default_rng(0)
    prompts = [VideoSpec("red", "circle", 1, "left")] * 4
    noise = rng.integers(0, 256, size=(4, 8, 32, 32, 3), dtype=np.uint8)
    black = np.zeros((4, 8, 32, 32, 3), dtype=np.uint8)
    for clips in (noise, black):
        result = score(clips, prompts)
        assert not any(getattr(result, d).any() for d in DIMENSIONS)
        assert result.reward.max() < 0.2


def test_judge_reuses_detections_and_checks_lengths(ground_truth) -> None:
    specs, clips = ground_truth
    dets = detect_batch(clips[:5])
    np.testing.assert_allclose(judge(dets, specs[:5]).reward, score(clips[:5], specs[:5]).reward)
    with pytest.raises(ValueError, match="5 videos but 4 prompts"):
        judge(dets, specs[:4])
    with pytest.raises(ValueError, match=r"\(N, 3, F, H, W\)"):
        score(np.zeros((2, 8, 32, 32), dtype=np.float32), specs[:2])


# ----------------------------------------------------------------------------- reward model


def test_registered_reward_scores_video_batches(ground_truth) -> None:
    specs, clips = ground_truth
    assert "toy_video" in known_rewards()
    reward = build_reward({"name": "toy_video", "batch_size": 7})
    assert reward.video and reward.name == "toy_video"
    videos = to_tensor(clips[:16])
    assert videos.shape == (16, 3, 8, 32, 32)
    prompts = [s.text for s in specs[:16]]
    scores = reward(videos, prompts)
    assert scores.shape == (16,) and scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), score(clips[:16], prompts).reward, atol=1e-6)
    wrong = reward(videos, [s.replace(motion="still" if s.motion != "still" else "up").text for s in specs[:16]])
    assert torch.all(wrong < scores)
    dims = reward.dimensions(videos, prompts)
    assert set(dims) == {*DIMENSIONS, "overall", "reward"} and torch.all(dims["overall"] == 1.0)
    with pytest.raises(ValueError, match=r"\(N, 3, F, H, W\)"):
        reward(videos[:, :, 0], prompts)        # an image batch is refused, not scored
    mixture = build_reward([{"name": "toy_video", "weight": 2.0}])
    np.testing.assert_allclose(mixture(videos, prompts).numpy(), 2.0 * scores.numpy(), atol=1e-6)
