"""Step-wise importance weights (SIPO Eq. 5) and the two weighting schemes built on them.

``w = p_θ(x_{t-1} | x_t) / q(x_{t-1} | x_t, x0)`` with ``x_{t-1} ~ q(· | x_t, x0)``. Both densities are
Gaussians with the posterior variance, so the ratio depends only on how far x̂0 is from x0.

Choices where the paper is loose (docs/objectives.md), each an argument here:

* The log-density is **averaged over dimensions** (``reduce="mean"``). Summed over ~16k latent dims the
  weight is 0 or ∞; averaged, ``w < 0.9`` happens only for small t, as in SIPO Fig. 4.
* DPO-C&M (Eq. 12–13) multiplies each pair's loss by ``clip(w, 1-ε, 1+ε)`` and masks pairs with
  ``w < τ``. The pair's w is the smaller of the two branches' by default (a pair is as reliable as its
  least reliable branch); ``"mean"`` and ``"winner"`` are offered.
* SIPO (Eq. 18–19 and A15) **multiplies** the logit by ``clip(max(1/w_w, 1/w_l), 1-ε, 1+ε)``;
  appendix A17 divides instead, but Eq. 18/19 and A15 agree with each other, so we multiply.
* Weights are detached by default (they rescale, they are not optimised).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .process import DiffusionProcess, GaussianTransition

Reduce = Literal["mean", "sum"]


def gaussian_log_prob(x: Tensor, dist: GaussianTransition, reduce: Reduce = "mean") -> Tensor:
    """Per-sample log N(x; mean, var·I), averaged (default) or summed over the non-batch dimensions."""
    x64, mean, var = x.double(), dist.mean.double(), dist.var.double().expand_as(dist.mean)
    logp = -0.5 * ((x64 - mean) ** 2 / var + torch.log(2 * torch.pi * var))
    logp = logp.flatten(1)
    return (logp.mean(1) if reduce == "mean" else logp.sum(1)).float()


def log_density_ratio(
    x: Tensor, numerator: GaussianTransition, denominator: GaussianTransition, reduce: Reduce = "mean"
) -> Tensor:
    """log p(x) - log q(x) per sample for two Gaussians with the same variance.

    Written as ``(μp - μq)·(2x - μp - μq) / (2v)`` in float64 so that the tiny variances at small t do
    not turn the difference of two large log-densities into rounding noise.
    """
    if not torch.equal(numerator.var, denominator.var):
        raise ValueError("log_density_ratio expects transitions with identical variances")
    mp, mq, v = numerator.mean.double(), denominator.mean.double(), numerator.var.double()
    per_dim = ((mp - mq) * (2 * x.double() - mp - mq) / (2 * v)).flatten(1)
    return (per_dim.mean(1) if reduce == "mean" else per_dim.sum(1)).float()


def importance_log_weight(
    process: DiffusionProcess,
    pred: Tensor,
    x_t: Tensor,
    x0: Tensor,
    t: Tensor,
    *,
    generator: torch.Generator | None = None,
    reduce: Reduce = "mean",
    detach: bool = True,
) -> Tensor:
    """log w(t) of SIPO Eq. 5 for each sample: draw x_{t-1} ~ q(·|x_t, x0), compare p_θ with q there."""
    pred = pred.detach() if detach else pred
    q = process.posterior(x_t, x0, t)
    p = process.reverse_step(pred, x_t, t)
    z = torch.randn(q.mean.shape, generator=generator, dtype=torch.float32).to(q.mean.device)
    x_prev = q.mean + q.var.sqrt() * z
    return log_density_ratio(x_prev, p, q, reduce)


def _pair_weight(w_w: Tensor, w_l: Tensor, pair_reduce: str) -> Tensor:
    if pair_reduce == "min":
        return torch.minimum(w_w, w_l)
    if pair_reduce == "mean":
        return 0.5 * (w_w + w_l)
    if pair_reduce == "winner":
        return w_w
    raise ValueError(f"pair_reduce={pair_reduce!r}: expected 'min', 'mean' or 'winner'")


def clip_and_mask_weights(
    w_w: Tensor, w_l: Tensor, *, epsilon: float, tau: float, pair_reduce: str = "min"
) -> tuple[Tensor, Tensor]:
    """DPO-C&M (SIPO Eq. 12–13): per-pair loss multiplier ``clip(w, 1-ε, 1+ε)·[w >= τ]`` and the mask."""
    w = _pair_weight(w_w.float(), w_l.float(), pair_reduce)
    keep = w >= tau
    return w.clamp(1.0 - epsilon, 1.0 + epsilon) * keep, keep


def sipo_logit_weights(w_w: Tensor, w_l: Tensor, *, epsilon: float) -> Tensor:
    """SIPO (Eq. 19 / A16): logit multiplier ``clip(max(1/w_w, 1/w_l), 1-ε, 1+ε)`` per pair."""
    inv = torch.maximum(1.0 / w_w.float(), 1.0 / w_l.float())
    return inv.clamp(1.0 - epsilon, 1.0 + epsilon)
