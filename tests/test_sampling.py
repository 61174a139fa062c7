"""CFG sampling: fixed seeds give fixed images whatever the batch, and transitions carry log-probabilities."""

import pytest
import torch

from pipeline.sampling import SamplerConfig, sample

PROMPTS = ["two red circles on the left", "a blue square at the top", "three green triangles at the bottom"]
FAST = SamplerConfig(num_steps=4, guidance_scale=3.0, eta=1.0, batch_size=8)


def test_same_seeds_same_images_and_batch_invariance(tiny_toy_backbone):
    a = sample(tiny_toy_backbone, PROMPTS, [1, 2, 3], FAST)
    b = sample(tiny_toy_backbone, PROMPTS, [1, 2, 3], FAST)
    assert torch.equal(a.images, b.images) and torch.equal(a.log_probs, b.log_probs)
    one_by_one = sample(tiny_toy_backbone, PROMPTS, [1, 2, 3], SamplerConfig(num_steps=4, batch_size=1))
    torch.testing.assert_close(one_by_one.images, a.images, atol=1e-4, rtol=0)
    reordered = sample(tiny_toy_backbone, PROMPTS[::-1], [3, 2, 1], FAST)
    torch.testing.assert_close(reordered.images.flip(0), a.images, atol=1e-4, rtol=0)
    other = sample(tiny_toy_backbone, PROMPTS, [4, 5, 6], FAST)
    assert not torch.allclose(other.images, a.images)


def test_outputs_and_log_probs(tiny_toy_backbone):
    out = sample(tiny_toy_backbone, PROMPTS, [1, 2, 3], FAST)
    assert out.images.shape == (3, 3, 32, 32) and float(out.images.abs().max()) <= 1.0
    assert out.log_probs.shape == (3, 4) and torch.isfinite(out.log_probs).all()
    assert out.timesteps.tolist() == sorted(out.timesteps.tolist(), reverse=True)
    assert bool((out.log_probs[:, -1] == 0).all())  # the last step to t=0 is deterministic
    assert bool((out.log_probs[:, :-1] != 0).all())
    ddim = sample(tiny_toy_backbone, PROMPTS, [1, 2, 3], SamplerConfig(num_steps=4, eta=0.0))
    assert bool((ddim.log_probs == 0).all())


def test_reference_sampling_matches_policy_at_init(tiny_toy_backbone):
    a = sample(tiny_toy_backbone, PROMPTS[:1], [7], FAST)
    b = sample(tiny_toy_backbone, PROMPTS[:1], [7], FAST, reference=True)
    torch.testing.assert_close(a.images, b.images)


def test_unguided_path(tiny_toy_backbone):
    out = sample(tiny_toy_backbone, PROMPTS[:2], [1, 2], SamplerConfig(num_steps=3, guidance_scale=1.0))
    assert out.images.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("kwargs, field", [(dict(num_steps=0), "num_steps"), (dict(eta=2.0), "eta"),
                                           (dict(guidance_scale=-1.0), "guidance_scale"), (dict(batch_size=0), "batch_size")])
def test_bad_sampler_config(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}="):
        SamplerConfig(**kwargs)


def test_seed_count_must_match(tiny_toy_backbone):
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        sample(tiny_toy_backbone, PROMPTS[:2], [1])
