"""DDSPO targets: score-space preferences from a reference model and a perturbed prompt (DDSPO Eq. 7).

The winner's target is the reference's prediction under the original prompt, ``ε*_w = ε_ref(x_t^w, t, c)``;
the loser's target is the reference's prediction under the degraded prompt, ``ε*_l = ε_ref(x_t^l, t, c⁻)``.
The policy is conditioned on ``c`` in both branches, and the reference terms of the DPO logit are the
reference's predictions under ``c``. Everything is in the model's own parameterization, so the same code
serves ε-, v- and flow models.

Efficient variants without negative images (DDSPO Sec. 3.3 and 4.4): the loser image is a winner image of
*another* prompt in the batch (a derangement), and ``c⁻`` is that image's own prompt (``rand-positive``)
or a perturbation of the current prompt (``not-paired``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor


class LoserSource(str, Enum):
    """Where a DDSPO loser image and its degraded prompt come from."""

    PAIRED = "paired"  # x_l rendered by the reference from c⁻ (the standard DDSPO dataset)
    RAND_POSITIVE = "rand-positive"  # x_l = another prompt's winner, c⁻ = that prompt
    NOT_PAIRED = "not-paired"  # x_l = another prompt's winner, c⁻ = perturbed current prompt


@dataclass(frozen=True)
class DdspoTargets:
    """What :func:`pipeline.objectives.objective.preference_loss` needs besides the policy predictions."""

    target_w: Tensor
    target_l: Tensor
    ref_w: Tensor
    ref_l: Tensor


def ddspo_targets(ref_w_given_c: Tensor, ref_l_given_c: Tensor, ref_l_given_c_minus: Tensor) -> DdspoTargets:
    """Assemble DDSPO Eq. 7 from three reference predictions (computed without gradient).

    The winner's reference residual is identically zero (target = reference prediction), so the winner
    branch is plain distillation towards the reference under ``c``.
    """
    return DdspoTargets(
        target_w=ref_w_given_c.detach(),
        target_l=ref_l_given_c_minus.detach(),
        ref_w=ref_w_given_c.detach(),
        ref_l=ref_l_given_c.detach(),
    )


def derangement(n: int, *, generator: torch.Generator | None = None) -> Tensor:
    """A random permutation without fixed points: no pair uses its own image as the surrogate loser, and each
    pair borrows from a uniformly random other pair (a cyclic shift of a random order)."""
    if n < 2:
        raise ValueError(f"efficient DDSPO needs at least 2 pairs in a batch to borrow a loser, got {n}")
    shift = int(torch.randint(1, n, (1,), generator=generator))
    order = torch.randperm(n, generator=generator)
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-shift)  # a cyclic shift of a random order: never i -> i
    return perm
