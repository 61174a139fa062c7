"""One entry point for every preference objective: config, named presets, loss and metrics.

An objective is the combination of four independent choices:

* ``loss``: the per-pair loss on the logit z — ``dpo`` (Diffusion-DPO), ``dspo``, ``dmpo``;
* ``targets``: the regression targets — ``data`` (ε / v / velocity of the forward process) or
  ``ddspo`` (reference scores under c and c⁻, see :mod:`.ddspo`); the trainer reads this to decide
  which reference predictions to compute;
* ``weighting``: ``none``, ``cm`` (DPO-C&M) or ``sipo`` (importance-weighted logit), see :mod:`.importance`;
* ``safeguard``: optional Diffusion-SDPO loser scaling, see :mod:`.safeguard`.

Three backbone-specific branches of the authors' recipes are options too: DSPO's SDXL loss form
(``dspo_form``), DDSPO-SDXL's ``t/(T−1)`` loss weight (``timestep_weighting``) and DDSPO-SD3's residuals
on the predicted x0 (``residual_space``).

The named presets (``PRESETS``) are the papers' methods with the papers' hyperparameters in this
library's β convention (see :mod:`.losses`); :func:`preset` takes a backbone ``family`` (``FAMILIES``)
for the authors' per-backbone numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from . import importance, losses, safeguard
from .process import DiffusionProcess


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
    # DSPO's loss form: "sd15" regresses εθ_w − ε towards β(1−σ(z))(εθ_w − εref_w) (β ≈ 0.001); "sdxl" is the
    # SDPO authors' SDXL branch, (1−σ(z))²·drift or (1−σ(z))² (β = 5000 in z), see losses.dspo_sdxl_loss.
    dspo_form: Literal["sd15", "sdxl"] = "sd15"
    dspo_sdxl_threshold: float = 0.1  # the SDXL branch's switch on the winner's mean drift from the reference
    # Per-pair loss weight: "linear" multiplies each pair's loss by t/(T−1) (DDSPO's SDXL recipe).
    timestep_weighting: Literal["none", "linear"] = "none"
    # Where residuals are measured: "model" (the network's own output) or "x0" (every prediction and target
    # converted to the x0 it implies, DDSPO's SD3 recipe; needs the process, x_t and t).
    residual_space: Literal["model", "x0"] = "model"
    # An anchor to the reference: ``anchor`` × the mean squared distance between the policy's and the reference's
    # outputs on both branches (for Gaussian reverse transitions, a per-timestep KL up to a weight). 0 = off;
    # it bounds how far on-policy rounds can drift where the sigmoid no longer does (docs/rounds.md).
    anchor: float = 0.0
    # Fine-tuning on the winners: ``sft`` × the winner's own residual L(x_w) (a bound on its negative log-likelihood)
    # added to the loss — the NLL term of iterative RPO (Pang et al. 2024), which keeps the winners' likelihood
    # from falling while the margin grows (both residuals climb under DPO alone, docs/rounds.md). 0 = off.
    sft: float = 0.0
    # Train only on noise levels t ≥ t_min·T (a fraction of the schedule): the layout that a compositional reward
    # judges (count, position, shape) is decided at high noise, low-noise steps refine detail. It does not keep
    # the low-noise steps as they were (they share the weights): docs/rounds.md measures it. 0 = every step.
    t_min: float = 0.0
    safeguard: SafeguardConfig | None = None

    def __post_init__(self):
        choices = {
            "loss": ("dpo", "dspo", "dmpo"),
            "targets": ("data", "ddspo"),
            "weighting": ("none", "cm", "sipo"),
            "pair_reduce": ("min", "mean", "winner"),
            "beta_timestep_factor": ("none", "T"),
            "dspo_form": ("sd15", "sdxl"),
            "timestep_weighting": ("none", "linear"),
            "residual_space": ("model", "x0"),
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
        if self.dspo_form != "sd15" and self.loss != "dspo":
            raise ValueError(f"objective.dspo_form={self.dspo_form!r} applies to loss='dspo' only (loss={self.loss!r})")
        if not self.anchor >= 0.0:
            raise ValueError(f"objective.anchor={self.anchor}: expected a weight >= 0 (0 = off)")
        if not 0.0 <= self.t_min < 1.0:
            raise ValueError(f"objective.t_min={self.t_min}: expected a fraction of the schedule in [0, 1)")
        if not self.sft >= 0.0:
            raise ValueError(f"objective.sft={self.sft}: expected a weight >= 0 (0 = off)")
        if not self.dspo_sdxl_threshold >= 0.0:
            raise ValueError(f"objective.dspo_sdxl_threshold={self.dspo_sdxl_threshold}: expected a value >= 0")

    @property
    def needs_importance_weights(self) -> bool:
        return self.weighting != "none"

    def min_timestep(self, num_timesteps: int) -> int:
        """The smallest grid index a pair is trained at: ``t_min``·T, and ≥ 1 where importance weights need a
        previous step."""
        return max(int(self.t_min * num_timesteps), 1 if self.needs_importance_weights else 0)

    def with_safeguard(self, mu: float = 0.9, **kwargs) -> "ObjectiveConfig":
        return replace(self, safeguard=SafeguardConfig(mu=mu, **kwargs))


#: The methods with their SD 1.x hyperparameters (the ``"sd15"`` family; also the toy world's default).
PRESETS: dict[str, ObjectiveConfig] = {
    "diffusion-dpo": ObjectiveConfig(loss="dpo", beta=5000.0),
    "dspo": ObjectiveConfig(loss="dspo", beta=0.001),
    "dmpo": ObjectiveConfig(loss="dmpo", beta=2000.0, dmpo_alpha=0.01),
    "ddspo": ObjectiveConfig(loss="dpo", beta=16000.0, targets="ddspo"),
    "dpo-cm": ObjectiveConfig(loss="dpo", beta=1000.0, weighting="cm"),
    "sipo": ObjectiveConfig(loss="dpo", beta=1000.0, weighting="sipo"),
}

#: Backbone families: ``sd15`` (SD 1.x/2.x UNets, ε; the default), ``sdxl``, ``sd3`` (flow MMDiT), ``sana``
#: (flow DiT).
FAMILIES = ("sd15", "sdxl", "sd3", "sana")

#: What each family changes in a preset, from the authors' training scripts (SDPO: ``scripts/train/*.sh`` and
#: ``train.py``; DDSPO: ``scripts/train_ddspo*.sh``, ``ddspo/dpo.py``, ``ddspo/adapters/sd3.py``). Both
#: codebases write ``−½β·Δmse``, which is this library's β. A family a method's authors did not run is
#: refused rather than guessed.
FAMILY_OVERRIDES: dict[str, dict[str, dict]] = {
    "diffusion-dpo": {"sd15": {}, "sdxl": {}},  # β 5000 on both
    "dspo": {"sd15": {}, "sdxl": {"beta": 5000.0, "dspo_form": "sdxl"}},
    "dmpo": {"sd15": {}, "sdxl": {"beta": 6000.0}},
    "ddspo": {
        "sd15": {},
        "sdxl": {"timestep_weighting": "linear"},  # β 16000 as SD 1.x, loss × t/(T−1)
        "sd3": {"beta": 2000.0, "residual_space": "x0"},  # the script's --precondition_outputs
        "sana": {"beta": 2000.0},
    },
    "dpo-cm": {"sd15": {}},
    "sipo": {"sd15": {}},
}

#: The SDPO slack μ per (method, family) (SDPO paper Sec. 5.1 and its scripts).
SDPO_MU: dict[tuple[str, str], float] = {
    ("diffusion-dpo", "sd15"): 0.9, ("dmpo", "sd15"): 0.9, ("dspo", "sd15"): 0.2,
    ("diffusion-dpo", "sdxl"): 0.6, ("dmpo", "sdxl"): 0.6, ("dspo", "sdxl"): 0.6,
}


def sdpo_mu(name: str, family: str = "sd15") -> float:
    """The SDPO authors' μ for a method on a backbone family."""
    if (name, family) not in SDPO_MU:
        known = sorted(f"{n}/{f}" for n, f in SDPO_MU)
        raise ValueError(f"no published SDPO μ for {name!r} on {family!r} (known: {known}); "
                         "pass safeguard=SafeguardConfig(mu=...)")
    return SDPO_MU[(name, family)]


def preset(name: str, family: str = "sd15", **overrides) -> ObjectiveConfig:
    """A named method with its authors' hyperparameters for a backbone ``family``, optionally with fields
    overridden (``beta=2000.0``, ``safeguard=SafeguardConfig(mu=0.9)``). ``safeguard=True`` attaches the SDPO
    safeguard with the authors' μ for this method and family (:func:`sdpo_mu`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown objective {name!r}: expected one of {sorted(PRESETS)}")
    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}: expected one of {FAMILIES}")
    if family not in FAMILY_OVERRIDES[name]:
        raise ValueError(f"no published {name!r} recipe for the {family!r} family: expected one of "
                         f"{sorted(FAMILY_OVERRIDES[name])} (or pass family='sd15' and override the fields)")
    if overrides.get("safeguard") is True:
        overrides["safeguard"] = SafeguardConfig(mu=sdpo_mu(name, family))
    elif overrides.get("safeguard") is False:
        overrides["safeguard"] = None
    return replace(PRESETS[name], **{**FAMILY_OVERRIDES[name][family], **overrides})


def to_residual_space(cfg: ObjectiveConfig, process: DiffusionProcess | None, pred: Tensor, x_t: Tensor | None,
                      t: Tensor | None) -> Tensor:
    """A prediction (or target) in the space the residuals are measured in: unchanged for
    ``residual_space="model"``, the x0 it implies for ``"x0"`` (:meth:`DiffusionProcess.predict_x0`, affine in
    ``pred``, so gradients flow through)."""
    if cfg.residual_space == "model":
        return pred
    if process is None or x_t is None or t is None:
        raise ValueError("objective.residual_space='x0' needs the process, x_t and timesteps to convert predictions")
    return process.predict_x0(pred, x_t, t)


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
    timesteps: Tensor | None = None,
    process: DiffusionProcess | None = None,
    x_t_w: Tensor | None = None,
    x_t_l: Tensor | None = None,
) -> ObjectiveOutput:
    """The preference loss of one micro-batch of pairs, averaged over pairs.

    ``policy_*`` carry gradients; ``ref_*`` and ``target_*`` do not. ``log_w_*`` are the SIPO log
    importance weights per branch (needed for ``weighting != "none"``). With a parameter-space safeguard
    the caller computes λ with :func:`.safeguard.parameter_space_lambda` (on :func:`to_residual_space`
    tensors) and passes it as ``loser_scale``. ``timesteps`` are the pairs' grid indices (B,), needed for
    ``timestep_weighting="linear"``; ``process``, ``x_t_w``, ``x_t_l`` and ``timesteps`` are needed for
    ``residual_space="x0"``, where x̂0 takes the place of the network output everywhere (residuals, z, DSPO's
    terms and the output-space λ). ``num_train_timesteps`` defaults to ``process.num_timesteps``.
    """
    if num_train_timesteps is None and process is not None:
        num_train_timesteps = process.num_timesteps
    if cfg.residual_space == "x0":
        def x0(y: Tensor, x_t: Tensor | None) -> Tensor:
            return to_residual_space(cfg, process, y, x_t, timesteps)

        policy_w, ref_w, target_w = x0(policy_w, x_t_w), x0(ref_w, x_t_w), x0(target_w, x_t_w)
        policy_l, ref_l, target_l = x0(policy_l, x_t_l), x0(ref_l, x_t_l), x0(target_l, x_t_l)
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
    elif cfg.dspo_form == "sdxl":
        per_pair = losses.dspo_sdxl_loss(z, policy_w, ref_w.detach(), cfg.dspo_sdxl_threshold)
        metrics["dspo_drift"] = (policy_w.detach().float() - ref_w.detach().float()).pow(2).flatten(1).mean(1).mean()
    else:
        per_pair = losses.dspo_loss(z, policy_w, target_w, ref_w.detach(), cfg.beta)

    if pair_weight is not None:
        # Masked pairs count in the denominator: masking removes their signal, it does not
        # up-weight the rest of the batch (a constant effective learning rate).
        per_pair = per_pair * pair_weight
    if cfg.timestep_weighting == "linear":
        if timesteps is None or num_train_timesteps is None:
            raise ValueError("timestep_weighting='linear' needs timesteps and num_train_timesteps (or the process)")
        t_weight = timesteps.to(per_pair.device).float() / (num_train_timesteps - 1)
        per_pair = per_pair * t_weight  # DDSPO's SDXL recipe: mean over pairs of t/(T−1)·loss
        metrics["timestep_weight_mean"] = t_weight.mean()
    loss = per_pair.mean()
    if cfg.anchor > 0:
        drift = 0.5 * ((policy_w.float() - ref_w.detach().float()).pow(2).flatten(1).mean(1)
                       + (policy_l.float() - ref_l.detach().float()).pow(2).flatten(1).mean(1))
        loss = loss + cfg.anchor * drift.mean()
        metrics["anchor_drift"] = drift.detach().mean()
    if cfg.sft > 0:
        loss = loss + cfg.sft * lp_w.mean()

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
