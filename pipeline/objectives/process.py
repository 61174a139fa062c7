"""The forward diffusion process as the objectives see it: noising, regression targets, and Gaussian
transitions, for ε-prediction, v-prediction, x0-prediction and flow matching.

Every supported schedule is written as a Gaussian path ``x_t = α_t·x0 + σ_t·ε`` over a discrete grid of
training timesteps ``k = 0 … T-1``. The tables (α_k, σ_k) and the model's timestep input come from a
diffusers scheduler, so a model is trained on exactly the process its own scheduler samples with:

* DDPM family (``DDPMScheduler``, ``DDIMScheduler``, …): α_k = √ᾱ_k, σ_k = √(1-ᾱ_k), model input k;
  the parameterization is the scheduler's ``prediction_type`` (``epsilon``, ``v_prediction``, ``sample``).
* Flow matching (``FlowMatchEulerDiscreteScheduler``): α_k = 1-s_k, σ_k = s_k with the scheduler's
  (shifted) sigmas in ascending order, model input s_k·T; the model predicts the velocity ``ε - x0``.

One general posterior formula (Kingma et al. 2021, "Variational Diffusion Models", Eq. 2–4 in our
notation) serves both families, which is what lets SIPO's importance weight work for flow models too.
Pure torch: no Ray, no files.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor


class Parameterization(str, Enum):
    """What the network predicts."""

    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"
    SAMPLE = "sample"
    FLOW = "flow"


@dataclass(frozen=True)
class NoisedPair:
    """Winner and loser noised at the same timestep with the same noise (Diffusion-DPO convention)."""

    x_t_w: Tensor
    x_t_l: Tensor
    target_w: Tensor
    target_l: Tensor
    noise: Tensor
    t: Tensor  # grid index k, shape (B,)


@dataclass(frozen=True)
class GaussianTransition:
    """N(mean, var·I) over x_s given x_t; ``var`` broadcasts against ``mean`` (one value per sample)."""

    mean: Tensor
    var: Tensor


def _expand(coef: Tensor, like: Tensor) -> Tensor:
    return coef.reshape(coef.shape[0], *([1] * (like.dim() - 1)))


class DiffusionProcess:
    """Coefficient tables and the maths built on them. Build it with :meth:`from_scheduler`."""

    def __init__(self, alphas: Tensor, sigmas: Tensor, model_timesteps: Tensor, parameterization: Parameterization):
        if not (alphas.shape == sigmas.shape == model_timesteps.shape) or alphas.dim() != 1:
            raise ValueError("alphas, sigmas and model_timesteps must be 1-D tensors of equal length")
        if bool((sigmas[1:] <= sigmas[:-1]).any()):
            raise ValueError("noise level sigma must increase strictly with the timestep index")
        # Tables live in float64: α and σ at the ends of the grid differ from 0/1 by ~1e-4 and the
        # posterior variance is a difference of such numbers.
        self.alphas = alphas.double()
        self.sigmas = sigmas.double()
        self.model_timesteps = model_timesteps
        self.parameterization = Parameterization(parameterization)

    # ----------------------------------------------------------------------------------- construction
    @classmethod
    def from_scheduler(cls, scheduler) -> "DiffusionProcess":
        """Read the tables from a diffusers scheduler instance (DDPM family or flow matching)."""
        config = getattr(scheduler, "config", None)
        if config is None or "num_train_timesteps" not in config:
            raise TypeError(f"expected a diffusers scheduler instance, got {type(scheduler).__name__}")
        n = int(config.num_train_timesteps)
        if hasattr(scheduler, "alphas_cumprod"):
            prediction_type = config.get("prediction_type", "epsilon")
            if prediction_type not in ("epsilon", "v_prediction", "sample"):
                raise ValueError(
                    f"scheduler prediction_type={prediction_type!r}: expected 'epsilon', 'v_prediction' or 'sample'"
                )
            acp = scheduler.alphas_cumprod.double()[:n]
            return cls(acp.sqrt(), (1.0 - acp).sqrt(), torch.arange(n), Parameterization(prediction_type))
        if hasattr(scheduler, "sigmas") and type(scheduler).__name__.startswith("FlowMatch"):
            # A fresh flow scheduler holds its training sigmas in descending order (s_max … s_min).
            fresh = type(scheduler).from_config(config)
            s = fresh.sigmas.double()[:n].flip(0)
            return cls(1.0 - s, s, (s * n).float(), Parameterization.FLOW)
        raise TypeError(
            f"unsupported scheduler {type(scheduler).__name__}: expected a DDPM-family scheduler "
            "(with alphas_cumprod) or FlowMatchEulerDiscreteScheduler"
        )

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas.shape[0])

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(α_t, σ_t) broadcast against ``like``, in float32 on its device."""
        idx = t.long().cpu()
        a = self.alphas[idx].to(device=like.device, dtype=torch.float32)
        s = self.sigmas[idx].to(device=like.device, dtype=torch.float32)
        return _expand(a, like), _expand(s, like)

    def model_input_timesteps(self, t: Tensor) -> Tensor:
        """The timestep value the network is conditioned on for grid index ``t``."""
        return self.model_timesteps[t.long().cpu()].to(t.device)

    # ----------------------------------------------------------------------------------- sampling t
    def sample_timesteps(
        self, batch: int, *, generator: torch.Generator | None = None, device=None, min_index: int = 0
    ) -> Tensor:
        """Uniform grid indices in [min_index, T). SIPO needs ``min_index >= 1`` (a previous step must exist)."""
        if not 0 <= min_index < self.num_timesteps:
            raise ValueError(f"min_index={min_index} outside [0, {self.num_timesteps})")
        t = torch.randint(min_index, self.num_timesteps, (batch,), generator=generator)
        return t.to(device) if device is not None else t

    # ----------------------------------------------------------------------------------- forward process
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a, s = self.coefficients(t, x0)
        return a * x0.float() + s * noise.float()

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The regression target of the parameterization."""
        p = self.parameterization
        if p is Parameterization.EPSILON:
            return noise.float()
        if p is Parameterization.SAMPLE:
            return x0.float()
        if p is Parameterization.FLOW:
            return noise.float() - x0.float()
        a, s = self.coefficients(t, x0)
        return a * noise.float() - s * x0.float()

    def noise_pair(
        self, x0_w: Tensor, x0_l: Tensor, t: Tensor, *, generator: torch.Generator | None = None
    ) -> NoisedPair:
        """Noise winner and loser with shared ``t`` and shared ε, as Diffusion-DPO and its successors do."""
        noise = torch.randn(x0_w.shape, generator=generator, dtype=torch.float32).to(x0_w.device)
        return NoisedPair(
            x_t_w=self.add_noise(x0_w, noise, t),
            x_t_l=self.add_noise(x0_l, noise, t),
            target_w=self.target(x0_w, noise, t),
            target_l=self.target(x0_l, noise, t),
            noise=noise,
            t=t,
        )

    # ----------------------------------------------------------------------------------- conversions
    def predict_x0(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x̂0 implied by a network output, for any parameterization."""
        a, s = self.coefficients(t, x_t)
        pred, x_t = pred.float(), x_t.float()
        p = self.parameterization
        if p is Parameterization.EPSILON:
            return (x_t - s * pred) / a
        if p is Parameterization.SAMPLE:
            return pred
        if p is Parameterization.FLOW:
            return x_t - s * pred
        return a * x_t - s * pred

    def predict_epsilon(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """ε̂ implied by a network output, for any parameterization."""
        a, s = self.coefficients(t, x_t)
        pred, x_t = pred.float(), x_t.float()
        p = self.parameterization
        if p is Parameterization.EPSILON:
            return pred
        if p is Parameterization.SAMPLE:
            return (x_t - a * pred) / s
        if p is Parameterization.FLOW:
            return x_t + a * pred
        return s * x_t + a * pred

    # ----------------------------------------------------------------------------------- transitions
    def _posterior_coefficients(self, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Coefficients of q(x_s | x_t, x0) = N(c_t·x_t + c_0·x0, var): (c_t, c_0, var), float64 per sample."""
        t, s = t.long().cpu(), s.long().cpu()
        if bool((s < 0).any()) or bool((s >= t).any()):
            raise ValueError("transitions need 0 <= s < t for every sample (use t >= 1 for one-step transitions)")
        a_t, s_t, a_s, s_s = self.alphas[t], self.sigmas[t], self.alphas[s], self.sigmas[s]
        a_ts = a_t / a_s  # α_{t|s}
        var_ts = s_t**2 - a_ts**2 * s_s**2  # σ²_{t|s}
        c_t = a_ts * s_s**2 / s_t**2
        c_0 = a_s * var_ts / s_t**2
        var = var_ts * s_s**2 / s_t**2
        return c_t, c_0, var

    def posterior(self, x_t: Tensor, x0: Tensor, t: Tensor, s: Tensor | None = None) -> GaussianTransition:
        """q(x_s | x_t, x0); ``s`` defaults to ``t - 1`` (the DDPM posterior)."""
        s = t - 1 if s is None else s
        c_t, c_0, var = self._posterior_coefficients(t, s)
        dev = x_t.device
        mean = _expand(c_t.float().to(dev), x_t) * x_t.float() + _expand(c_0.float().to(dev), x_t) * x0.float()
        return GaussianTransition(mean=mean, var=_expand(var.float().to(dev), x_t))

    def reverse_step(self, pred: Tensor, x_t: Tensor, t: Tensor, s: Tensor | None = None) -> GaussianTransition:
        """The model's reverse transition p_θ(x_s | x_t): the posterior with x0 replaced by x̂0(pred)."""
        return self.posterior(x_t, self.predict_x0(pred, x_t, t), t, s)
