"""The forward process and its transitions agree with diffusers' own schedulers and with the textbook."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, ScoreSdeVeScheduler

from pipeline.objectives import DiffusionProcess, Parameterization

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def schedulers():
    return {
        "ddpm-eps": DDPMScheduler(clip_sample=False),
        "sd-v": DDPMScheduler(prediction_type="v_prediction", clip_sample=False, **SD_BETAS),
        "ddim-sample": DDIMScheduler(prediction_type="sample", clip_sample=False, **SD_BETAS),
        "flow-shift3": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


@pytest.fixture(params=list(schedulers()))
def sched(request):
    return schedulers()[request.param]


def test_noising_and_targets_match_diffusers(sched):
    proc = DiffusionProcess.from_scheduler(sched)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = proc.sample_timesteps(6, generator=g)
    x_t, target = proc.add_noise(x0, noise, t), proc.target(x0, noise, t)
    if proc.parameterization is Parameterization.FLOW:
        ref = sched.scale_noise(x0, proc.model_input_timesteps(t), noise)
        torch.testing.assert_close(x_t, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(target, noise - x0)
    else:
        torch.testing.assert_close(x_t, sched.add_noise(x0, noise, t), atol=1e-5, rtol=1e-5)
        expected = {"epsilon": noise, "sample": x0, "v_prediction": sched.get_velocity(x0, noise, t)}
        torch.testing.assert_close(target, expected[sched.config.prediction_type], atol=1e-5, rtol=1e-5)


def test_conversions_invert_the_target(sched):
    proc = DiffusionProcess.from_scheduler(sched)
    x0, noise = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    t = torch.tensor([1, 10, 200, 500, 999])
    x_t, target = proc.add_noise(x0, noise, t), proc.target(x0, noise, t)
    torch.testing.assert_close(proc.predict_x0(target, x_t, t), x0, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(proc.predict_epsilon(target, x_t, t), noise, atol=2e-4, rtol=1e-3)


def test_noise_pair_shares_noise_and_timestep():
    proc = DiffusionProcess.from_scheduler(DDPMScheduler())
    x_w, x_l = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([5, 50, 500])
    pair = proc.noise_pair(x_w, x_l, t, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(pair.x_t_w - pair.x_t_l, proc.add_noise(x_w - x_l, torch.zeros_like(x_w), t))
    torch.testing.assert_close(pair.target_w, pair.noise)
    torch.testing.assert_close(pair.target_l, pair.noise)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_reverse_step_matches_diffusers_ddpm_sampler(prediction_type):
    """p_θ(x_{t-1}|x_t) is exactly the step DDPMScheduler takes (fixed_small variance)."""
    sched = DDPMScheduler(prediction_type=prediction_type, clip_sample=False, **SD_BETAS)
    proc = DiffusionProcess.from_scheduler(sched)
    x_t, pred = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    for k in (1, 7, 300, 999):
        t = torch.tensor([k])
        mine = proc.reverse_step(pred, x_t, t)
        out = sched.step(pred, k, x_t, generator=torch.Generator().manual_seed(k)).prev_sample
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(k))
        torch.testing.assert_close(out, mine.mean + mine.var.sqrt() * z, atol=1e-5, rtol=1e-4)


def test_posterior_matches_textbook_ddpm():
    sched = DDPMScheduler(**SD_BETAS)
    proc = DiffusionProcess.from_scheduler(sched)
    acp = sched.alphas_cumprod.double()
    # β_t as the sampler itself derives it from the fp32 table (DDPMScheduler.step: 1 - ᾱ_t/ᾱ_{t-1}).
    betas = torch.cat([1 - acp[:1], 1 - acp[1:] / acp[:-1]])
    x_t, x0 = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    t = torch.tensor([1, 2, 100, 999])
    post = proc.posterior(x_t, x0, t)
    for i, k in enumerate(t.tolist()):
        c0 = acp[k - 1].sqrt() * betas[k] / (1 - acp[k])
        ct = (1 - betas[k]).sqrt() * (1 - acp[k - 1]) / (1 - acp[k])
        var = (1 - acp[k - 1]) / (1 - acp[k]) * betas[k]
        torch.testing.assert_close(post.mean[i], (ct * x_t[i] + c0 * x0[i]).float(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(post.var[i].flatten()[0], var.float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["sd-v", "flow-shift3"])
def test_posterior_preserves_the_marginal(name):
    """x_t ~ q(x_t|x0), then x_s ~ q(x_s|x_t,x0) must be distributed as q(x_s|x0) = N(α_s x0, σ_s²)."""
    proc = DiffusionProcess.from_scheduler(schedulers()[name])
    g = torch.Generator().manual_seed(3)
    n = 200_000
    x0 = torch.full((n, 1), 0.7)
    for k, s in ((5, 4), (400, 399), (900, 600)):
        t = torch.full((n,), k)
        x_t = proc.add_noise(x0, torch.randn(n, 1, generator=g), t)
        post = proc.posterior(x_t, x0, t, torch.full((n,), s))
        x_s = post.mean + post.var.sqrt() * torch.randn(n, 1, generator=g)
        a_s, sig_s = proc.alphas[s].item(), proc.sigmas[s].item()
        assert abs(x_s.mean().item() - a_s * 0.7) < 4 * sig_s / n**0.5 + 1e-6
        assert abs(x_s.std().item() / sig_s - 1) < 0.01


def test_flow_tables_follow_the_scheduler_shift():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    proc = DiffusionProcess.from_scheduler(sched)
    assert proc.parameterization is Parameterization.FLOW
    torch.testing.assert_close(proc.sigmas.float(), sched.sigmas[:1000].flip(0))
    torch.testing.assert_close(proc.model_timesteps, sched.timesteps.flip(0))


def test_clear_errors():
    with pytest.raises(TypeError, match="unsupported scheduler ScoreSdeVeScheduler"):
        DiffusionProcess.from_scheduler(ScoreSdeVeScheduler())
    with pytest.raises(TypeError, match="expected a diffusers scheduler"):
        DiffusionProcess.from_scheduler(object())
    bad = DDPMScheduler()
    bad.register_to_config(prediction_type="sigma")
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionProcess.from_scheduler(bad)
    proc = DiffusionProcess.from_scheduler(DDPMScheduler())
    with pytest.raises(ValueError, match="0 <= s < t"):
        proc.posterior(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="min_index"):
        proc.sample_timesteps(2, min_index=1000)
