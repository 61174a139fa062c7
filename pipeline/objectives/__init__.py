"""Preference objectives for diffusion models: pure torch, fp32 loss math, no Ray and no I/O.

Start at :func:`preference_loss` with a config from :func:`preset`; the modules hold one idea each:
``process`` (noising, targets, Gaussian transitions), ``losses`` (residuals, z, DPO/DSPO/DMPO),
``ddspo`` (score-space targets), ``safeguard`` (SDPO λ), ``importance`` (SIPO weights, DPO-C&M).
"""

from .ddspo import DdspoTargets, LoserSource, ddspo_targets, derangement
from .importance import (
    clip_and_mask_weights,
    gaussian_log_prob,
    importance_log_weight,
    log_density_ratio,
    sipo_logit_weights,
)
from .losses import (
    beta_from_convention,
    dmpo_loss,
    dpo_loss,
    dspo_loss,
    dspo_sdxl_loss,
    preference_logit,
    residual,
)
from .objective import (
    FAMILIES,
    PRESETS,
    ObjectiveConfig,
    ObjectiveOutput,
    SafeguardConfig,
    preference_loss,
    preset,
    sdpo_mu,
    to_residual_space,
)
from .process import DiffusionProcess, GaussianTransition, NoisedPair, Parameterization
from .safeguard import (
    lambda_stats,
    output_space_lambda,
    parameter_lambda_method,
    parameter_space_lambda,
    parameter_space_lambda_jvp,
    scale_gradient,
)

__all__ = [
    "DdspoTargets", "LoserSource", "ddspo_targets", "derangement",
    "clip_and_mask_weights", "gaussian_log_prob", "importance_log_weight", "log_density_ratio",
    "sipo_logit_weights",
    "beta_from_convention", "dmpo_loss", "dpo_loss", "dspo_loss", "dspo_sdxl_loss", "preference_logit", "residual",
    "FAMILIES", "PRESETS", "ObjectiveConfig", "ObjectiveOutput", "SafeguardConfig", "preference_loss", "preset",
    "sdpo_mu", "to_residual_space",
    "DiffusionProcess", "GaussianTransition", "NoisedPair", "Parameterization",
    "lambda_stats", "output_space_lambda", "parameter_lambda_method", "parameter_space_lambda",
    "parameter_space_lambda_jvp", "scale_gradient",
]
