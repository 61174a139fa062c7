"""The verifiable reward: accuracy on rendered ground truth, false accepts, robustness, ranking."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from scipy import ndimage

from pipeline.toyworld import (ATTRIBUTES, PromptSpec, all_specs, detect, detect_batch,
                               differ_in, render, render_batch, score, to_tensor)

N_SAMPLES = 2400


def _sample(n: int, size: int, seed: int) -> tuple[list[PromptSpec], np.ndarray]:
    rng = np.random.default_rng(seed)
    specs = all_specs()
    chosen = [specs[int(i)] for i in rng.integers(len(specs), size=n)]
    return chosen, render_batch(chosen, [int(s) for s in rng.integers(1 << 30, size=n)], size)


@pytest.fixture(scope="module")
def ground_truth() -> tuple[list[PromptSpec], np.ndarray]:
    return _sample(N_SAMPLES, 32, seed=1234)


def _degrade(images: np.ndarray, noise: float, blur: float, seed: int = 0) -> torch.Tensor:
    """Gaussian blur (sigma in px) then Gaussian noise (sigma in [-1, 1] units)."""
    x = to_tensor(images).numpy()
    if blur:
        x = ndimage.gaussian_filter(x, (0, 0, blur, blur))
    x = x + noise * np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)
    return torch.from_numpy(x)


def _report(name: str, result) -> None:
    print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.summary().items()))


def test_accuracy_on_ground_truth(ground_truth) -> None:
    specs, images = ground_truth
    result = score(images, specs)
    _report("ground truth 32px", result)
    for attribute in ATTRIBUTES:
        assert getattr(result, attribute).mean() >= 0.995, attribute
    assert result.overall.mean() >= 0.99
    assert np.all((result.reward >= 0) & (result.reward <= 1))
    assert np.all(result.reward[result.overall] >= 0.8)


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_false_accept_rate_on_one_attribute_mismatch(ground_truth, attribute: str) -> None:
    specs, images = ground_truth
    rng = np.random.default_rng(7)
    wrong = [differ_in(s, attribute, rng) for s in specs]
    result = score(images, wrong)
    rate = result.overall.mean()
    print(f"false accept ({attribute} changed): {rate:.4f}")
    assert rate <= 0.01
    assert getattr(result, attribute).mean() <= 0.01
    # the other attributes are still read correctly (with a wrong colour nothing matches)
    if attribute != "colour":
        for other in ATTRIBUTES:
            if other != attribute:
                assert getattr(result, other).mean() >= 0.99, (attribute, other)


@pytest.mark.parametrize("noise, blur", [(0.1, 0.5), (0.1, 0.7), (0.15, 0.5)])
def test_robust_to_noise_and_blur(ground_truth, noise: float, blur: float) -> None:
    specs, images = ground_truth
    result = score(_degrade(images, noise, blur), specs)
    _report(f"noise {noise} blur {blur}", result)
    assert result.overall.mean() >= 0.95


def test_small_images() -> None:
    specs, images = _sample(1000, 16, seed=99)
    result = score(images, specs)
    _report("ground truth 16px", result)
    assert result.overall.mean() >= 0.98
    noisy = score(_degrade(images, 0.1, 0.5), specs)
    _report("16px noise 0.1 blur 0.5", noisy)
    assert noisy.overall.mean() >= 0.9


def test_darker_colours_still_read() -> None:
    specs, images = _sample(300, 32, seed=5)
    darker = np.round(images * 0.6).astype(np.uint8)
    assert score(darker, specs).overall.mean() >= 0.99


def test_reward_ranks_correct_above_one_wrong_attribute() -> None:
    rng = np.random.default_rng(11)
    specs = all_specs()
    correct, wrong, targets = [], [], []
    for i in range(300):
        spec = specs[int(rng.integers(len(specs)))]
        attribute = ATTRIBUTES[i % 4]
        seed = int(rng.integers(1 << 30))
        correct.append(render(spec, seed))
        wrong.append(render(differ_in(spec, attribute, rng), seed))
        targets.append(spec)
    good = score(np.stack(correct), targets)
    bad = score(np.stack(wrong), targets)
    assert good.overall.all()
    assert np.all(good.reward > bad.reward)
    # the continuous term separates images that are equally correct
    assert len(np.unique(good.reward)) > 0.9 * len(good.reward)


def test_input_formats_agree(ground_truth) -> None:
    specs, images = ground_truth
    specs, images = specs[:64], images[:64]
    reference = score(images, specs)
    tensor = to_tensor(images)
    for variant in (tensor, tensor.numpy(), tensor.to(torch.bfloat16), list(images)):
        result = score(variant, [s.text for s in specs])
        assert np.array_equal(result.overall, reference.overall)
        assert np.allclose(result.reward, reference.reward, atol=0.02)
    with pytest.raises(ValueError, match="prompts"):
        score(images, specs[:3])
    with pytest.raises(ValueError):
        score(images.astype(np.int32), specs)


def test_detect_reports_objects() -> None:
    spec = PromptSpec("magenta", "triangle", 3, "bottom")
    image = render(spec, 3)
    found = detect(image)
    assert len(found.objects) == 3
    assert {o.colour for o in found.objects} == {"magenta"}
    assert {o.shape for o in found.objects} == {"triangle"}
    assert all(o.y > 16 for o in found.objects)
    assert found.of_colour("red") == ()
    from_tensor_view = detect(to_tensor(image)[0])
    assert [o.shape for o in from_tensor_view.objects] == [o.shape for o in found.objects]
    blank = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    assert [d.objects for d in detect_batch(blank)] == [(), ()]
    empty = score(blank, [spec, spec])
    assert not empty.overall.any() and np.all(empty.reward < 0.1)


def test_other_colours_and_extra_objects_are_judged() -> None:
    """When objects of another colour dominate, the picture does not depict the prompt: colour fails
    and, by the anti-clutter gate, count / shape / position are not credited either."""
    red = render(PromptSpec("red", "circle", 1, "left"), 0)
    blues = render(PromptSpec("blue", "square", 3, "right"), 1)
    mixed = np.maximum(red, blues)
    found = detect(mixed)
    red_mass = sum(o.mass for o in found.of_colour("red"))
    assert red_mass < 0.5 * sum(o.mass for o in found.objects)   # blue dominates here
    result = score(mixed, ["a red circle on the left"])
    assert not result.colour[0]
    assert not (result.count[0] or result.shape[0] or result.position[0])
    # the continuous part still prefers it to an image without the red circle at all
    assert result.reward[0] > score(blues, ["a red circle on the left"]).reward[0]
    # an extra object of the prompt colour breaks count and (being on the right) position
    extra = np.maximum(red, render(PromptSpec("red", "square", 1, "right"), 2))
    result = score(extra, ["a red circle on the left"])
    assert result.colour[0] and not result.count[0] and not result.position[0]


def test_noise_and_clutter_collect_no_attribute_credit() -> None:
    """Uniform noise must not pass any attribute (one stray blob of the right hue used to earn ~0.75)."""
    rng = np.random.default_rng(0)
    prompts = [s.text for s in all_specs()[::4]]
    noise = rng.integers(0, 256, size=(len(prompts), 32, 32, 3), dtype=np.uint8)
    res = score(noise, prompts)
    for attribute in ("colour", "shape", "count", "position", "overall"):
        assert not getattr(res, attribute).any(), attribute
    assert float(res.reward.max()) <= 0.2
    # A clean render keeps its full score: the gates do not touch real depictions.
    clean = score(render_batch(list(all_specs()[::4]), list(range(len(prompts))), 32), prompts)
    assert clean.overall.mean() >= 0.99
