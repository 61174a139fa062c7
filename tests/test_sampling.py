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


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_ddim_step_is_diffusers_step_and_finite_at_zero_terminal_snr(prediction_type):
    """Our DDIM step equals ``DDIMScheduler.step`` wherever that is finite, and stays finite on the grids where
    diffusers' rounds ``1 − ᾱ_prev − σ²`` below zero at ᾱ_T = 0 (the v-prediction world's 10-step rollouts)."""
    from diffusers import DDIMScheduler

    from pipeline.sampling import _ddim_step
    from pipeline.toyworld.reference import build_scheduler

    scheduler = DDIMScheduler.from_config(build_scheduler(prediction_type).config)
    g = torch.Generator().manual_seed(0)
    for steps in (4, 10, 20):
        scheduler.set_timesteps(steps)
        x = torch.randn(2, 3, 8, 8, generator=g)
        ours = x.clone()
        for t in scheduler.timesteps:
            pred, z = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
            prev_t = int(t) - 1000 // steps
            ours, std = _ddim_step(scheduler, pred, int(t), prev_t, x, 1.0, z)
            theirs = scheduler.step(pred, t, x, eta=1.0, variance_noise=z).prev_sample
            assert torch.isfinite(ours).all() and std >= 0
            if torch.isfinite(theirs).all():
                torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
            x = ours


def test_the_shipped_reference_rolls_out_finite_images_at_the_rollout_grid():
    """The embedded default rolls out the shipped v-prediction reference with 10 trailing steps: the grid whose
    first step sits at ᾱ = 0 (diffusers' DDIM step returned NaN there, and every rollout tied)."""
    from pipeline.backbones import load_backbone
    from pipeline.toyworld.reference import REFERENCE_DIR

    backbone = load_backbone(REFERENCE_DIR)
    for steps in (10, 20):
        out = sample(backbone, PROMPTS[:2], [0, 1], SamplerConfig(num_steps=steps, guidance_scale=3.0, eta=1.0))
        assert torch.isfinite(out.images).all() and torch.isfinite(out.log_probs).all()
        assert float(out.images.std()) > 0.05  # drew something, not a constant
