"""Residuals, the preference logit z, and the per-pair losses of Diffusion-DPO, DMPO and DSPO (both forms).

Notation (docs/objectives.md): the per-sample residual is ``L = ½·mean_dims(‖pred − target‖²)`` in fp32, and

    z = −β·[(Lθ_w − Lref_w) − (Lθ_l − Lref_l)]                                   (SDPO paper Eq. 9)

**β convention.** Ours equals the Salesforce Diffusion-DPO code (``−½β`` times a *mean-squared* error,
β = 5000 for SD 1.5). diffusers' training example multiplies the mean-squared-error difference by ``−β``
(β = 2500 there), which is our β = 2·2500. SIPO writes ``β·T·ω(λ_t)`` (β = 1 with T = 1000). Use
:func:`beta_from_convention` to take a paper's number as written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BETA_CONVENTIONS = ("salesforce", "diffusers", "sipo")


def beta_from_convention(beta: float, convention: str, num_train_timesteps: int = 1000) -> float:
    """Convert a β quoted in another codebase's convention to this library's β."""
    if convention == "salesforce":
        return float(beta)
    if convention == "diffusers":
        return 2.0 * float(beta)
    if convention == "sipo":  # β·T·ω(λ_t) with the constant weighting ω = 1
        return float(beta) * num_train_timesteps
    raise ValueError(f"unknown beta convention {convention!r}: expected one of {BETA_CONVENTIONS}")


def residual(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample ``½·mean(‖pred − target‖²)`` in fp32 (bf16 rounding at β≈5000 is as large as the margin)."""
    return 0.5 * (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def preference_logit(
    policy_w: Tensor, ref_w: Tensor, policy_l: Tensor, ref_l: Tensor, beta: Tensor | float
) -> Tensor:
    """z from the four per-sample residuals; ``beta`` may be a per-pair tensor (e.g. β·T·ω(λ_t))."""
    return -beta * ((policy_w - ref_w) - (policy_l - ref_l))


def dpo_loss(z: Tensor) -> Tensor:
    """Diffusion-DPO per-pair loss ``−log σ(z)`` (Wallace et al. 2024; SDPO paper Eq. 9)."""
    return F.softplus(-z)


def dmpo_loss(z: Tensor, alpha: float) -> Tensor:
    """DMPO per-pair loss ``KL(Bern(σ(z)) ‖ Bern(1−α))`` (Li et al. 2025), stable for any z.

    With ``log σ(z) = −softplus(−z)`` and ``log(1−σ(z)) = −softplus(z)`` no log of 0 can occur.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"DMPO alpha={alpha} must lie in (0, 1)")
    p = torch.sigmoid(z)
    log_p, log_1mp = -F.softplus(-z), -F.softplus(z)
    q = torch.tensor(1.0 - alpha, dtype=z.dtype, device=z.device)
    return p * (log_p - torch.log(q)) + (1 - p) * (log_1mp - torch.log1p(-q))


def dspo_loss(z: Tensor, policy_pred_w: Tensor, target_w: Tensor, ref_pred_w: Tensor, beta: float) -> Tensor:
    """DSPO per-pair loss (Zhu et al., ICLR 2025; SD 1.5 recipe of the SDPO authors' code).

    Score matching on the winner towards a preference-shifted target:
    ``mean_dims(‖(pθ_w − target_w) − β·(1−σ(z))·(pθ_w − pref_w)‖²)``. The loser enters only through z,
    so the SDPO safeguard acts there. The recipe uses the same small β (≈0.001) in z and in the shift.
    """
    shift = beta * (1.0 - torch.sigmoid(z)).reshape(-1, *([1] * (policy_pred_w.dim() - 1)))
    diff = (policy_pred_w.float() - target_w.float()) - shift * (policy_pred_w.float() - ref_pred_w.float())
    return diff.pow(2).flatten(1).mean(1)


def dspo_sdxl_loss(z: Tensor, policy_pred_w: Tensor, ref_pred_w: Tensor, threshold: float = 0.1) -> Tensor:
    """DSPO per-pair loss of the SDPO authors' SDXL recipe (``train.py`` with ``--sdxl``, β = 5000 in z).

    With the winner's drift from the reference ``d = mean_dims(‖pθ_w − pref_w‖²)`` per pair:

    * ``(1 − σ(z))² · d`` when the micro-batch mean of d is ≥ ``threshold`` (0.1 in the recipe): the
      recipe's ``mean‖(1 − σ(z))·(pθ_w − pref_w)‖²``, a pull towards the reference scaled by how unsure
      the preference still is;
    * ``(1 − σ(z))²`` otherwise — in particular at the start, where the policy is the reference. Its
      gradient ``−2σ(z)(1 − σ(z))²·∇z`` is DPO's ``−(1 − σ(z))·∇z`` weighted by ``2σ(z)(1 − σ(z))``
      (½ at z = 0, vanishing as a pair becomes certain either way): a DPO-like loss.

    Neither the score-matching term of the SD 1.5 form (:func:`dspo_loss`) nor a β-scaled shift appears:
    β acts only through z. σ(z) and d are not detached (as in the recipe). The branch is chosen per
    micro-batch without a host sync (``torch.where``).
    """
    drift = (policy_pred_w.float() - ref_pred_w.float()).pow(2).flatten(1).mean(1)
    gap = (1.0 - torch.sigmoid(z)).pow(2)
    return torch.where(drift.mean() >= threshold, gap * drift, gap)
