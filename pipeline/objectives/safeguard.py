"""The Diffusion-SDPO safeguard: scale the loser's gradient so the winner's loss does not rise.

A first-order step on ``L_w - λ·L_l`` leaves ``L_w`` non-increasing iff
``λ ≤ ‖∇θL_w‖² / ⟨∇θL_w, ∇θL_l⟩`` (SDPO Eq. 14). Two ways to get λ:

* **output space** (Eq. 17, Alg. 1): replace parameter gradients by the gradients with respect to the
  network output, ``g = ∂L/∂pred``, and absorb the Jacobian factor ρ into a slack μ:
  ``λ = clip((1-μ)·‖g_w‖² / ⟨g_w, g_l⟩, 0, 1)``, and ``λ = 1`` when ``⟨g_w, g_l⟩ ≤ 0``.
  Scope ``"batch"`` sums the norms over the micro-batch and gives one λ (the authors' code; not
  all-reduced across workers); ``"sample"`` gives one λ per pair.
* **parameter space** (Eq. 14 exactly, the † rows of Table 4): two extra vector-Jacobian products give
  ∇θL_w and ∇θL_l of the micro-batch mean residuals. For validation and ablation; costs extra backward
  passes. With one pair per step the first-order guarantee is exact; with more pairs it holds for the
  linearised objective ``L_w - λ·L_l`` (the paper's footnote 2: DPO's σ factor differs per pair).

λ is applied with :func:`scale_gradient` on the loser's prediction: the forward value is unchanged and only
the gradient flowing into the loser branch is multiplied by λ. For Diffusion-DPO this is exactly Alg. 1's
``L_l.detach() + λ·(L_l - L_l.detach())``, and it plugs into any objective whose loser enters through
the loser prediction (DSPO, DMPO, DDSPO, DPO-C&M, SIPO).
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch
from torch import Tensor

Scope = Literal["batch", "sample"]


def scale_gradient(x: Tensor, scale: Tensor | float) -> Tensor:
    """Identity in the forward pass; multiplies the incoming gradient by ``scale`` (per sample if 1-D)."""
    if isinstance(scale, Tensor):
        scale = scale.detach().to(x.dtype)
        if scale.dim() == 1:
            scale = scale.reshape(-1, *([1] * (x.dim() - 1)))
    detached = x.detach()
    return detached + scale * (x - detached)


def _safe_ratio(num: Tensor, den: Tensor, mu: float) -> Tensor:
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"SDPO slack mu={mu} must lie in [0, 1]")
    lam = ((1.0 - mu) * num / den.where(den > 0, torch.ones_like(den))).clamp(0.0, 1.0)
    return torch.where(den > 0, lam, torch.ones_like(lam))


@torch.no_grad()
def output_space_lambda(
    pred_w: Tensor, target_w: Tensor, pred_l: Tensor, target_l: Tensor, *, mu: float, scope: Scope = "batch"
) -> Tensor:
    """SDPO Eq. 17 with output-space gradients ``g = pred - target`` (∝ ∂L/∂pred; the scale cancels).

    Returns a 0-d tensor for ``scope="batch"`` and a (B,) tensor for ``scope="sample"``.
    """
    g_w = (pred_w.float() - target_w.float()).flatten(1)
    g_l = (pred_l.float() - target_l.float()).flatten(1)
    if scope == "batch":
        return _safe_ratio(g_w.pow(2).sum(), (g_w * g_l).sum(), mu)
    if scope == "sample":
        return _safe_ratio(g_w.pow(2).sum(1), (g_w * g_l).sum(1), mu)
    raise ValueError(f"SDPO scope={scope!r}: expected 'batch' or 'sample'")


def parameter_space_lambda(
    pred_w: Tensor,
    target_w: Tensor,
    pred_l: Tensor,
    target_l: Tensor,
    params: Iterable[Tensor],
    *,
    mu: float,
) -> Tensor:
    """SDPO Eq. 14 with exact parameter gradients of the micro-batch mean residuals (one λ per batch).

    ``pred_w``/``pred_l`` must still be attached to the graph; it is retained for the caller's backward.
    """
    params = [p for p in params if p.requires_grad]
    g_w = (pred_w.detach().float() - target_w.float()) / pred_w[0].numel() / pred_w.shape[0]
    g_l = (pred_l.detach().float() - target_l.float()) / pred_l[0].numel() / pred_l.shape[0]
    grad_w = torch.autograd.grad(pred_w, params, grad_outputs=g_w.to(pred_w.dtype), retain_graph=True, allow_unused=True)
    grad_l = torch.autograd.grad(pred_l, params, grad_outputs=g_l.to(pred_l.dtype), retain_graph=True, allow_unused=True)
    # Per-parameter dot products in fp32 (no float64 copy of ~1e9 gradient entries), summed in float64,
    # kept on the device (one host sync when λ is used, not one per parameter).
    ww, wl = [], []
    for a, b in zip(grad_w, grad_l):
        if a is None:
            continue
        a = a.reshape(-1).float()
        ww.append(torch.dot(a, a))
        if b is not None:
            wl.append(torch.dot(a, b.reshape(-1).float()))
    zero = pred_w.new_zeros((), dtype=torch.float64)
    total = lambda xs: torch.stack(xs).double().sum() if xs else zero  # noqa: E731
    return _safe_ratio(total(ww), total(wl), mu).float()


def lambda_stats(lam: Tensor) -> dict[str, Tensor]:
    """Mean/min/max of λ and the fraction of pairs (or batches) where the safeguard was active (λ < 1)."""
    lam = lam.detach().float().reshape(-1)
    return {
        "lambda_mean": lam.mean(),
        "lambda_min": lam.min(),
        "lambda_max": lam.max(),
        "lambda_active_frac": (lam < 1.0).float().mean(),
    }
