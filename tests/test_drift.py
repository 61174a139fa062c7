"""Drift statistics (background brightness, colour entropy, seed diversity) on rendered toy-world images, and
their place in the evaluation's results (EvalResult.drift, eval.json)."""

import colorsys
import json
import math

import numpy as np
import pytest
import torch

from pipeline.drift import STATISTICS, _hsv, drift_statistics
from pipeline.evaluation import score_samples
from pipeline.sampling import SampleOutput
from pipeline.toyworld import COLOURS, PromptSpec, render, render_batch, to_tensor

SPECS = [PromptSpec("red", "circle", 2, "left"), PromptSpec("blue", "square", 1, "top"),
         PromptSpec("green", "triangle", 3, "bottom")]
K = 4


def rendered(specs=SPECS, k=K, seed0=0) -> torch.Tensor:
    """``k`` renders (seeds ``seed0 …``) of each spec, prompt-major, as (N, 3, 32, 32) in [-1, 1]."""
    return to_tensor(render_batch([s for s in specs for _ in range(k)], list(range(seed0, seed0 + len(specs) * k)), 32))


def with_background(images: torch.Tensor, grey: float) -> torch.Tensor:
    """The same images with their black background (every channel 0) raised to ``grey`` in [0, 1]."""
    unit = (images + 1) / 2
    background = unit.amax(dim=1, keepdim=True) == 0
    return torch.where(background, torch.full_like(unit, grey), unit) * 2 - 1


def out_of(images: torch.Tensor) -> SampleOutput:
    return SampleOutput(images=images, latents=images, log_probs=torch.zeros(len(images), 1), timesteps=torch.zeros(1))


def test_per_prompt_arrays_and_input_checks():
    stats = drift_statistics(rendered(), K)
    assert tuple(stats) == STATISTICS
    for v in stats.values():
        assert isinstance(v, np.ndarray) and v.shape == (len(SPECS),) and v.dtype == np.float64
    with pytest.raises(ValueError, match="whole number"):
        drift_statistics(rendered()[:-1], K)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        drift_statistics(rendered()[:, :2], K)
    # arrays and lower precisions give the same values
    half = drift_statistics(rendered().half(), K)
    as_array = drift_statistics(rendered().numpy(), K)
    for s in STATISTICS:
        np.testing.assert_allclose(half[s], stats[s], atol=2e-3)
        np.testing.assert_allclose(as_array[s], stats[s], atol=1e-9)


def test_hsv_matches_colorsys():
    rgb = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    rgb[0, :, 0, 0] = torch.tensor([0.5, 0.5, 0.5])  # grey: hue 0 by convention
    hue, sat, val = _hsv(rgb)
    for y in range(8):
        for x in range(8):
            h, s, v = colorsys.rgb_to_hsv(*rgb[0, :, y, x].tolist())
            assert hue[0, y, x].item() == pytest.approx(h * 360, abs=1e-3)
            assert sat[0, y, x].item() == pytest.approx(s, abs=1e-5) and val[0, y, x].item() == pytest.approx(v)


def test_background_brightness_of_black_and_grey_backgrounds():
    images = rendered()
    black = drift_statistics(images, K)["background_brightness"]
    np.testing.assert_allclose(black, 0.0, atol=1e-6)  # ground truth is drawn on black
    for grey in (0.15, 0.4):
        lit = drift_statistics(with_background(images, grey), K)["background_brightness"]
        assert np.all(lit > 0.8 * grey) and np.all(lit <= grey + 1e-6)
    # per prompt, in prompt order: only the middle prompt's background is lit
    mixed = images.clone()
    mixed[K:2 * K] = with_background(images[K:2 * K], 0.4)
    b = drift_statistics(mixed, K)["background_brightness"]
    assert b[0] == pytest.approx(0, abs=1e-6) and b[2] == pytest.approx(0, abs=1e-6) and b[1] > 0.3


def test_colour_entropy_one_hue_vs_six_colours():
    one_hue = [PromptSpec("red", shape, n, pos) for shape, n, pos in
               [("circle", 1, "left"), ("square", 3, "top"), ("triangle", 2, "right")]]
    mono = drift_statistics(rendered(one_hue, 2), 2)["colour_entropy"]
    np.testing.assert_allclose(mono, 0.0, atol=1e-6)  # colour jitter stays inside the hue bin
    # six colours in one image: 16-px renders of each colour tiled 2 × 3
    tiles = [render(PromptSpec(c, "square", 1, "left"), seed, 16) for seed, c in enumerate(COLOURS)]
    six = np.concatenate([np.concatenate(tiles[:3], axis=1), np.concatenate(tiles[3:], axis=1)], axis=0)
    entropy = drift_statistics(to_tensor(six[None]), 1)["colour_entropy"]
    assert entropy[0] > 2.0 and entropy[0] <= math.log2(6) + 1e-6
    # grey carries no hue: a lit grey background leaves the entropy alone; colour noise raises it
    np.testing.assert_allclose(drift_statistics(with_background(rendered(), 0.4), K)["colour_entropy"], 0, atol=1e-6)
    noise = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert drift_statistics(noise, 4)["colour_entropy"][0] > 3.0  # near log2(12) = 3.58


def test_seed_diversity_identical_vs_different_seeds():
    images = rendered()
    diverse = drift_statistics(images, K)["seed_diversity"]
    assert np.all(diverse > 0.05)  # seeds move and resize the objects
    first = images.reshape(len(SPECS), K, 3, 32, 32)[:, :1]
    collapsed = first.expand(-1, K, -1, -1, -1).reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(drift_statistics(collapsed, K)["seed_diversity"], 0.0)
    np.testing.assert_array_equal(drift_statistics(images, 1)["seed_diversity"], np.zeros(len(SPECS) * K))
    # per prompt, in prompt order: only the collapsed prompt is 0
    mixed = images.clone()
    mixed[K:2 * K] = images[K]
    d = drift_statistics(mixed, K)["seed_diversity"]
    assert d[1] == 0 and d[0] == pytest.approx(diverse[0]) and d[2] == pytest.approx(diverse[2])


def test_eval_result_carries_drift_into_eval_json():
    images = rendered()
    res = score_samples(SPECS, out_of(images), per_prompt=K)
    assert set(res.drift) == set(STATISTICS)
    assert res.drift["background_brightness"].mean == pytest.approx(0, abs=1e-6)
    assert res.drift["seed_diversity"].ci_low <= res.drift["seed_diversity"].mean <= res.drift["seed_diversity"].ci_high
    stored = json.loads(json.dumps(res.to_dict()))
    assert set(stored["drift"]) == set(STATISTICS)
    for s in STATISTICS:
        assert stored["drift"][s] == pytest.approx(
            {"mean": getattr(res.drift[s], "mean"), "ci_low": res.drift[s].ci_low, "ci_high": res.drift[s].ci_high})
    assert "| model | drift: background brightness | 0.000 [0.000, 0.000] |" in res.table()
    assert "drift: seed diversity" in res.table() and "drift: colour entropy (bits)" in res.table()
    # any reward model gets them too
    from pipeline.rewards import build_reward

    lit = score_samples([s.text for s in SPECS], out_of(with_background(images, 0.4)), per_prompt=K,
                        reward=build_reward({"name": "toy"}))
    assert lit.overall is None and lit.drift["background_brightness"].mean > 0.3


def test_drift_is_an_addition_to_the_eval_json_schema():
    """Readers of eval.json (``rounds.load_eval``, the sweep) take plain dicts: ``drift`` is one new key, every
    key of files written before it keeps its name and form, so old files read as before (``.get("drift")``)."""
    new = json.loads(json.dumps(score_samples(SPECS, out_of(rendered()), per_prompt=K).to_dict()))
    assert set(new) == {"num_prompts", "samples_per_prompt", "reward", "overall", "attributes", "best_of_k_reward",
                        "best_of_k_overall", "rewards", "drift"}
    assert set(new["reward"]) == {"mean", "ci_low", "ci_high"} and np.shape(new["rewards"]) == (len(SPECS), K)
    old = {k: v for k, v in new.items() if k != "drift"}
    assert (old.get("drift") or {}) == {}
