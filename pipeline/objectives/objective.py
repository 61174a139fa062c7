"""One entry point for every preference objective: config, named presets, loss and metrics.

An objective is the combination of four independent choices:

* ``loss``: the per-pair loss on the logit z — ``dpo`` (Diffusion-DPO), ``dspo``, ``dmpo``;
* ``targets``: the regression targets — ``data`` (ε / v / velocity of the forward process) or
  ``ddspo`` (reference scores under c and c⁻, see :mod:`.ddspo`); the trainer reads this to decide
  which reference predictions to compute;
* ``weighting``: ``none``, ``cm`` (DPO-C&M) or ``sipo`` (importance-weighted logit), see :mod:`.importance`;
* ``safeguard``: optional Diffusion-SDPO loser scaling, see :mod:`.safeguard`.

The named presets (``PRESETS``) are the papers' methods with the papers' hyperparameters in this
library's β convention (see :mod:`.losses`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from . import importance, losses, safeguard


@dataclass(frozen=True)
class SafeguardConfig:
    """Diffusion-SDPO. ``mu`` is the slack of Eq. 17 (SD 1.5: 0.9 for DPO/DMPO, 0.2 for DSPO; SDXL 0.6)."""

    mu: float = 0.9
    scope: Literal["batch", "sample"] = "batch"
    space: Literal["output", "parameter"] = "output"

    def __post_init__(self):
        if not 0.0 <= self.mu <= 1.0:
            raise ValueError(f"safeguard.mu={self.mu}: expected a value in [0, 1]")
        if self.scope not in ("batch", "sample"):
            raise ValueError(f"safeguard.scope={self.scope!r}: expected 'batch' or 'sample'")
        if self.space not in ("output", "parameter"):
            raise ValueError(f"safeguard.space={self.space!r}: expected 'output' or 'parameter'")
        if self.space == "parameter" and self.scope != "batch":
            raise ValueError("safeguard.space='parameter' computes one λ per micro-batch: use scope='batch'")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Every knob of the preference objective; see the module docstring and docs/objectives.md."""

    loss: Literal["dpo", "dspo", "dmpo"] = "dpo"
    beta: float = 5000.0
    targets: Literal["data", "ddspo"] = "data"
    weighting: Literal["none", "cm", "sipo"] = "none"
    epsilon: float = 0.1  # clip range of importance weights (SIPO Table A2: 0.1 best, 0.2 close)
    tau: float = 0.9  # DPO-C&M mask threshold on w
    pair_reduce: Literal["min", "mean", "winner"] = "min"  # DPO-C&M: the pair's w from its two branches
    detach_weights: bool = True
    beta_timestep_factor: Literal["none", "T"] = "none"  # multiply β by T (SIPO Eq. 10 with ω = 1)
    dmpo_alpha: float = 0.01
    safeguard: SafeguardConfig | None = None

    def __post_init__(self):
        choices = {
            "loss": ("dpo", "dspo", "dmpo"),
            "targets": ("data", "ddspo"),
            "weighting": ("none", "cm", "sipo"),
            "pair_reduce": ("min", "mean", "winner"),
            "beta_timestep_factor": ("none", "T"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"objective.{name}={getattr(self, name)!r}: expected one of {allowed}")
        if not self.beta > 0:
            raise ValueError(f"objective.beta={self.beta}: expected a positive number")
        if not 0.0 < self.epsilon < 1.0:
            raise ValueError(f"objective.epsilon={self.epsilon}: expected a value in (0, 1)")
        if self.weighting == "cm" and not 0.0 <= self.tau <= 1.0 + self.epsilon:
            raise ValueError(f"objective.tau={self.tau}: expected a threshold in [0, 1+epsilon]")
        if not 0.0 < self.dmpo_alpha < 1.0:
            raise ValueError(f"objective.dmpo_alpha={self.dmpo_alpha}: expected a value in (0, 1)")

    @property
    def needs_importance_weights(self) -> bool:
        return self.weighting != "none"

    def with_safeguard(self, mu: float = 0.9, **kwargs) -> "ObjectiveConfig":
        return replace(self, safeguard=SafeguardConfig(mu=mu, **kwargs))


PRESETS: dict[str, ObjectiveConfig] = {
    "diffusion-dpo": ObjectiveConfig(loss="dpo", beta=5000.0),
    "dspo": ObjectiveConfig(loss="dspo", beta=0.001),
    "dmpo": ObjectiveConfig(loss="dmpo", beta=5000.0, dmpo_alpha=0.01),
    "ddspo": ObjectiveConfig(loss="dpo", beta=5000.0, targets="ddspo"),
    "dpo-cm": ObjectiveConfig(loss="dpo", beta=1000.0, weighting="cm"),
    "sipo": ObjectiveConfig(loss="dpo", beta=1000.0, weighting="sipo"),
}


def preset(name: str, **overrides) -> ObjectiveConfig:
    """A named method, optionally with fields overridden (``safeguard=SafeguardConfig(mu=0.9)``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown objective {name!r}: expected one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


@dataclass
class ObjectiveOutput:
    """The scalar loss to backpropagate and detached per-step metrics (0-d tensors; no host sync)."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    loser_scale: Tensor | None = None


def preference_loss(
    cfg: ObjectiveConfig,
    *,
    policy_w: Tensor,
    policy_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    target_w: Tensor,
    target_l: Tensor,
    log_w_w: Tensor | None = None,
    log_w_l: Tensor | None = None,
    num_train_timesteps: int | None = None,
    loser_scale: Tensor | None = None,
) -> ObjectiveOutput:
    """The preference loss of one micro-batch of pairs, averaged over pairs.

    ``policy_*`` carry gradients; ``ref_*`` and ``target_*`` do not. ``log_w_*`` are the SIPO log
    importance weights per branch (needed for ``weighting != "none"``). With a parameter-space safeguard
    the caller computes λ with :func:`.safeguard.parameter_space_lambda` and passes it as ``loser_scale``.
    """
    sg = cfg.safeguard
    if sg is not None and sg.space == "parameter" and loser_scale is None:
        raise ValueError("safeguard.space='parameter' needs loser_scale from safeguard.parameter_space_lambda")
    if loser_scale is None:
        if sg is not None:
            loser_scale = safeguard.output_space_lambda(
                policy_w, target_w, policy_l, target_l, mu=sg.mu, scope=sg.scope
            )
        else:
            loser_scale = torch.ones((), device=policy_w.device)
    scaled_policy_l = safeguard.scale_gradient(policy_l, loser_scale)

    lp_w, lp_l = losses.residual(policy_w, target_w), losses.residual(scaled_policy_l, target_l)
    lr_w, lr_l = losses.residual(ref_w.detach(), target_w), losses.residual(ref_l.detach(), target_l)

    beta: Tensor | float = cfg.beta
    if cfg.beta_timestep_factor == "T":
        if num_train_timesteps is None:
            raise ValueError("beta_timestep_factor='T' needs num_train_timesteps")
        beta = cfg.beta * num_train_timesteps
    z = losses.preference_logit(lp_w, lr_w, lp_l, lr_l, beta)

    metrics: dict[str, Tensor] = {}
    pair_weight = None
    if cfg.weighting != "none":
        if log_w_w is None or log_w_l is None:
            raise ValueError(f"weighting={cfg.weighting!r} needs log importance weights log_w_w and log_w_l")
        w_w, w_l = log_w_w.float().exp(), log_w_l.float().exp()
        if cfg.detach_weights:
            w_w, w_l = w_w.detach(), w_l.detach()
        metrics.update(_weight_stats(w_w, w_l))
        if cfg.weighting == "sipo":
            logit_weight = importance.sipo_logit_weights(w_w, w_l, epsilon=cfg.epsilon)
            z = logit_weight * z
            metrics["iw_logit_weight_mean"] = logit_weight.detach().mean()
            metrics["masked_frac"] = torch.zeros((), device=z.device)
        else:
            pair_weight, keep = importance.clip_and_mask_weights(
                w_w, w_l, epsilon=cfg.epsilon, tau=cfg.tau, pair_reduce=cfg.pair_reduce
            )
            metrics["masked_frac"] = (~keep).float().mean()

    if cfg.loss == "dpo":
        per_pair = losses.dpo_loss(z)
    elif cfg.loss == "dmpo":
        per_pair = losses.dmpo_loss(z, cfg.dmpo_alpha)
    else:
        per_pair = losses.dspo_loss(z, policy_w, target_w, ref_w.detach(), cfg.beta)

    if pair_weight is not None:
        # Masked pairs count in the denominator: masking removes their signal, it does not
        # up-weight the rest of the batch (a constant effective learning rate).
        per_pair = per_pair * pair_weight
    loss = per_pair.mean()

    with torch.no_grad():
        metrics.update(
            {
                "loss": loss.detach(),
                "residual_w": lp_w.mean(),
                "residual_l": lp_l.mean(),
                "ref_residual_w": lr_w.mean(),
                "ref_residual_l": lr_l.mean(),
                "margin": ((lr_w - lp_w) - (lr_l - lp_l)).mean(),
                "logit_mean": z.detach().mean(),
                "implicit_acc": (z.detach() > 0).float().mean(),
            }
        )
        metrics.update(safeguard.lambda_stats(loser_scale))
    return ObjectiveOutput(loss=loss, metrics=metrics, loser_scale=loser_scale.detach())


def _weight_stats(w_w: Tensor, w_l: Tensor) -> dict[str, Tensor]:
    both = torch.cat([w_w.detach().reshape(-1), w_l.detach().reshape(-1)])
    return {
        "iw_mean": both.mean(),
        "iw_min": both.min(),
        "iw_max": both.max(),
        "iw_below_0.9_frac": (both < 0.9).float().mean(),
    }
