"""Classifier-free-guided sampling with the log-probability of every stochastic transition.

DDPM-family backbones sample with diffusers' ``DDIMScheduler`` (η = 1 is ancestral DDPM sampling on the
coarse grid, η = 0 is deterministic DDIM). Flow models take the sigmas of ``FlowMatchEulerDiscreteScheduler``
and step with generalized DDIM on the flow path: η = 0 is exactly flow Euler, η > 0 is stochastic with
Gaussian transitions (the SDE-style sampling of Flow-GRPO, here with the exact posterior variance). Each image draws its initial noise and its step noise from its
own ``torch.Generator(seed)``, so a (prompt, seed) gives the same image whatever batch it lands in — that
is what makes evaluation seeds fixed and rollouts reproducible.

The transition ``x_t → x_prev`` is ``N(mean, std²)`` with ``std = η·√(posterior variance)`` (DDIM Eq. 16);
the log-probability (averaged over dimensions, as the importance weights are) is recorded per step so
that off-policy corrections can compare the policy that sampled with the one being trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .objectives import Parameterization

if TYPE_CHECKING:  # imported where used: the jobs read SamplerConfig (their config trees) without diffusers
    from diffusers import DDIMScheduler

    from .backbones.base import Backbone


@dataclass
class SampleOutput:
    images: Tensor  # (N, 3, H, W) in [-1, 1], on CPU; videos (N, 3, F, H, W) for a video backbone
    latents: Tensor  # (N, C, h, w) final latents, on CPU; (N, C, f, h, w) for a video backbone
    log_probs: Tensor  # (N, steps) mean-over-dims log-density of each transition; 0 where deterministic
    timesteps: Tensor  # (steps,) the network timestep values visited


@dataclass(frozen=True)
class SamplerConfig:
    num_steps: int = 20
    guidance_scale: float = 3.0
    eta: float = 1.0
    batch_size: int = 64

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps={self.num_steps}: expected >= 1")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale={self.guidance_scale}: expected >= 0")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta={self.eta}: expected a value in [0, 1]")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: expected >= 1")


def _noise(shape, generators: Sequence[torch.Generator]) -> Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


@torch.no_grad()
def _sample_batch(backbone: Backbone, prompts: Sequence[str], seeds: Sequence[int], cfg: SamplerConfig,
                  reference: bool) -> SampleOutput:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .backbones.base import cat_conditioning

    device = backbone.device
    flow = backbone.process.parameterization is Parameterization.FLOW
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(backbone.scheduler_config) if flow else _ddim_scheduler(backbone)
    scheduler.set_timesteps(cfg.num_steps)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    n = len(prompts)
    shape = backbone.latent_shape()
    x = _noise(shape, generators).to(device)
    cond = backbone.encode_prompts(prompts)
    guided = cfg.guidance_scale != 1.0
    if guided:
        cond = cat_conditioning([cond, backbone.empty_conditioning(n)])
    log_probs = []
    for i, t in enumerate(scheduler.timesteps):
        t_model = torch.full((n,), float(t))
        if guided:
            out = backbone.predict_at(torch.cat([x, x]), t_model.repeat(2), cond, reference=reference)
            pred_c, pred_u = out.float().chunk(2)
            pred = pred_u + cfg.guidance_scale * (pred_c - pred_u)
        else:
            pred = backbone.predict_at(x, t_model, cond, reference=reference).float()
        z = _noise(shape, generators).to(device)
        if flow:
            x, std = _flow_step(x, pred, float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1]), cfg.eta, z)
        else:
            prev_t = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
            x, std = _ddim_step(scheduler, pred, int(t), prev_t, x, cfg.eta, z)
        if std > 0:
            lp = (-0.5 * z.pow(2) - math.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
        else:
            lp = torch.zeros(n, device=device)
        log_probs.append(lp)
    images = backbone.decode_latents(x)
    return SampleOutput(images=images.cpu(), latents=x.cpu(), log_probs=torch.stack(log_probs, 1).cpu(),
                        timesteps=scheduler.timesteps.clone().cpu())


def _ddim_scheduler(backbone: Backbone) -> DDIMScheduler:
    """``DDIMScheduler`` of the backbone's scheduler config, stepping on the ᾱ table the model was trained on.

    For SD-family configs the two tables agree and nothing changes; CogVideoX's schedulers shift ᾱ by
    ``snr_shift_scale``, which ``DDIMScheduler`` does not know, so its table is replaced by the process's."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(backbone.scheduler_config)
    trained = backbone.process.alphas.pow(2)
    if not torch.allclose(scheduler.alphas_cumprod.double(), trained, rtol=1e-5, atol=1e-7):
        scheduler.alphas_cumprod = trained.float()
        scheduler.final_alpha_cumprod = (torch.tensor(1.0) if scheduler.config.set_alpha_to_one
                                         else scheduler.alphas_cumprod[0])
    return scheduler


def _flow_step(x: Tensor, velocity: Tensor, sigma_t: float, sigma_s: float, eta: float, z: Tensor) -> tuple[Tensor, float]:
    """One generalized-DDIM step on the rectified-flow path x = (1-σ)·x0 + σ·ε.

    η = 0 is exactly the flow Euler step ``x + (σ_s - σ_t)·v``; η > 0 adds noise with the posterior
    variance scaled by η² (the stochastic, SDE-style sampler whose transitions have a tractable density).
    """
    a_t, a_s = 1.0 - sigma_t, 1.0 - sigma_s
    x0 = x - sigma_t * velocity
    eps = x + a_t * velocity
    var = 0.0
    if sigma_s > 0 and a_s > 0:
        var = max(sigma_t**2 - (a_t / a_s) ** 2 * sigma_s**2, 0.0) * sigma_s**2 / sigma_t**2
    std = eta * math.sqrt(var)
    mean = a_s * x0 + math.sqrt(max(sigma_s**2 - std**2, 0.0)) * eps
    return mean + std * z, std


def _ddim_step(scheduler: DDIMScheduler, pred: Tensor, t: int, prev_t: int, x: Tensor, eta: float,
               z: Tensor) -> tuple[Tensor, float]:
    """DDIM's step (``DDIMScheduler.step``: same arithmetic, same ``clip_sample``), with its one fragile term made
    safe: at a zero-terminal-SNR first step (ᾱ_t = 0) and η = 1, ``1 − ᾱ_prev − σ_t²`` is zero in exact arithmetic
    and can round below it, which makes diffusers' step return NaN for some grids (10 trailing steps)."""
    c = scheduler.config
    if c.thresholding:
        raise ValueError("sampler: the scheduler's 'thresholding' is not supported; set it false in scheduler_config.json")
    a_t = scheduler.alphas_cumprod[t]
    a_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    b_t = 1 - a_t
    if c.prediction_type == "epsilon":
        x0, eps = (x - b_t**0.5 * pred) / a_t**0.5, pred
    elif c.prediction_type == "v_prediction":
        x0, eps = a_t**0.5 * x - b_t**0.5 * pred, a_t**0.5 * pred + b_t**0.5 * x
    elif c.prediction_type == "sample":
        x0, eps = pred, (x - a_t**0.5 * pred) / b_t**0.5
    else:
        raise ValueError(f"sampler: prediction_type {c.prediction_type!r} is not supported")
    if c.clip_sample:
        x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)
    variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)  # DDIM's σ_t² at η = 1: the DDPM posterior variance
    std = eta * variance**0.5
    direction = (1 - a_prev - std**2).clamp(min=0) ** 0.5 * eps
    out = a_prev**0.5 * x0 + direction
    if eta > 0:
        out = out + std * z
    return out.to(x.dtype), float(std)


def sample(backbone: Backbone, prompts: Sequence[str], seeds: Sequence[int], cfg: SamplerConfig = SamplerConfig(),
           *, reference: bool = False, progress: bool = False) -> SampleOutput:
    """Sample one image (a video for a video backbone) per (prompt, seed); ``reference=True`` samples from the frozen
    reference."""
    if len(prompts) != len(seeds):
        raise ValueError(f"sample: {len(prompts)} prompts but {len(seeds)} seeds; expected one seed per prompt")
    outs = []
    starts = range(0, len(prompts), cfg.batch_size)
    for start in tqdm(starts, desc="sampling", disable=not progress, unit="batch"):
        sl = slice(start, start + cfg.batch_size)
        outs.append(_sample_batch(backbone, prompts[sl], seeds[sl], cfg, reference))
    return SampleOutput(
        images=torch.cat([o.images for o in outs]),
        latents=torch.cat([o.latents for o in outs]),
        log_probs=torch.cat([o.log_probs for o in outs]),
        timesteps=outs[0].timesteps,
    )
