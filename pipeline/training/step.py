"""One preference-optimization step on a batch of pairs, for any backbone and any objective.

This is where models meet the pure maths of :mod:`pipeline.objectives`:

* winners and losers share t and noise; the policy runs **one** batched forward over both;
* the reference runs one batched forward without gradient — over (winner | c, loser | c) for data targets,
  and over (winner | c, loser | c, loser | c⁻) for DDSPO's score-space targets;
* SIPO / DPO-C&M importance weights come from the policy's predictions on the same noised pairs;
* the SDPO safeguard is computed from output-space gradients inside the objective, or here from exact
  parameter gradients when ``safeguard.space == "parameter"`` (winners and losers then run as two forwards: one
  extra backward and a JVP in the losers' forward, or one extra backward through each half; two extra backwards
  of the batched forward under FSDP2).

The caller owns backward, clipping and the optimizer (Ray Train loop, benchmarks, tests).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..backbones.base import Backbone, cat_conditioning
from ..objectives import (ObjectiveConfig, ObjectiveOutput, ddspo_targets, importance_log_weight, preference_loss,
                          to_residual_space)
from ..objectives.safeguard import (Method, forward_ad_kernels, parameter_lambda_method, parameter_space_lambda,
                                    parameter_space_lambda_jvp)
from .parallel import activation_checkpointed


@dataclass
class PairBatch:
    """Winner/loser latents (N, C, H, W), their prompts, c⁻ for DDSPO objectives, and the pairs' ids (so that an
    error can name the pairs it came from)."""

    x0_w: Tensor
    x0_l: Tensor
    prompts: Sequence[str]
    perturbed_prompts: Sequence[str] | None = None
    pair_ids: Sequence[str] | None = None

    def __post_init__(self):
        if self.x0_w.shape != self.x0_l.shape or self.x0_w.shape[0] != len(self.prompts):
            raise ValueError(f"pair batch: winners {tuple(self.x0_w.shape)}, losers {tuple(self.x0_l.shape)} and "
                             f"{len(self.prompts)} prompts do not line up")


def preference_step(backbone: Backbone, cfg: ObjectiveConfig, batch: PairBatch, *,
                    generator: torch.Generator | None = None, reference: torch.nn.Module | None = None,
                    safeguard_method: Method = "auto") -> ObjectiveOutput:
    """Forward passes and the objective for one micro-batch; returns the loss (with graph) and metrics.

    ``reference`` is the frozen reference denoiser the trainer owns (``None``: the backbone's own — the
    denoiser with LoRA adapters off, or its lazily taken copy). ``safeguard_method`` picks how the
    parameter-space λ is computed (:func:`~pipeline.objectives.safeguard.parameter_lambda_method`): ``"auto"``
    is the forward-mode ``"jvp"``, ``"split"`` (one extra backward through each half) on a denoiser with
    activation checkpointing, and the two-backward ``"backward"`` for FSDP2-sharded denoisers; all give the
    same λ to fp32 rounding.
    """
    ref_kw = dict(reference=True if reference is None else reference)
    process = backbone.process
    device = backbone.device
    n = len(batch.prompts)
    x0_w, x0_l = batch.x0_w.to(device).float(), batch.x0_l.to(device).float()
    t = process.sample_timesteps(n, generator=generator, min_index=cfg.min_timestep(process.num_timesteps)).to(device)
    pair = process.noise_pair(x0_w, x0_l, t, generator=generator)
    cond = backbone.encode_prompts(batch.prompts)
    x_t = torch.cat([pair.x_t_w, pair.x_t_l])

    method = None
    if cfg.safeguard is not None and cfg.safeguard.space == "parameter":
        method = parameter_lambda_method(backbone.denoiser, safeguard_method,
                                         checkpointed=activation_checkpointed(backbone.denoiser))

    # The reference and the targets first: the parameter-space λ needs the targets before the losers' forward.
    ddspo = cfg.targets == "ddspo"
    cond_minus = None
    if ddspo:
        if batch.perturbed_prompts is None or any(not p for p in batch.perturbed_prompts):
            raise ValueError("objective.targets='ddspo' needs a perturbed prompt (c⁻) for every pair")
        cond_minus = backbone.encode_prompts(batch.perturbed_prompts)
    if method in ("split", "jvp"):
        # The reference split as the policy runs below and on the same kernels (for "jvp" the losers' on the
        # attention kernel the JVP needs), so that a policy equal to its reference gives a DPO logit of exactly
        # zero, as it does when both run batched.
        ref_w = backbone.predict(pair.x_t_w, t, cond, **ref_kw)
        with forward_ad_kernels() if method == "jvp" else nullcontext():
            ref_l = backbone.predict(pair.x_t_l, t, cond, **ref_kw)
            ref_l_minus = backbone.predict(pair.x_t_l, t, cond_minus, **ref_kw) if ddspo else None
    elif ddspo:
        ref = backbone.predict(torch.cat([x_t, pair.x_t_l]), t.repeat(3),
                               cat_conditioning([cond, cond, cond_minus]), **ref_kw)
        ref_w, ref_l, ref_l_minus = ref.chunk(3)
    else:
        ref_w, ref_l = backbone.predict(x_t, t.repeat(2), cat_conditioning([cond, cond]), **ref_kw).chunk(2)
    if ddspo:
        tg = ddspo_targets(ref_w, ref_l, ref_l_minus)
        ref_w, ref_l, target_w, target_l = tg.ref_w, tg.ref_l, tg.target_w, tg.target_l
    else:
        target_w, target_l = pair.target_w, pair.target_l

    def space(y: Tensor, x_t: Tensor) -> Tensor:  # the residuals the loss uses (x̂0 for residual_space="x0")
        return to_residual_space(cfg, process, y, x_t, t)

    loser_scale = None
    if method == "split":
        # Winners and losers in two forwards: ∇θL_w backpropagates through the winners' graph only and ∇θL_l
        # through the losers' only (together one backward of the batch); the graphs stay for the loss's backward.
        policy_w = backbone.predict(pair.x_t_w, t, cond)
        policy_l = backbone.predict(pair.x_t_l, t, cond)
        loser_scale = parameter_space_lambda(space(policy_w, pair.x_t_w), space(target_w, pair.x_t_w),
                                             space(policy_l, pair.x_t_l), space(target_l, pair.x_t_l),
                                             backbone.denoiser, mu=cfg.safeguard.mu)
    elif method == "jvp":
        # Winners and losers in two forwards: g_w = ∇θL_w backpropagates through the winners' graph only, and
        # the losers' forward (the one the loss uses) carries the JVP along g_w.
        policy_w = backbone.predict(pair.x_t_w, t, cond)
        loser_scale, policy_l = parameter_space_lambda_jvp(
            space(policy_w, pair.x_t_w), space(target_w, pair.x_t_w), lambda: backbone.predict(pair.x_t_l, t, cond),
            space(target_l, pair.x_t_l), backbone.denoiser, mu=cfg.safeguard.mu,
            space=lambda y: space(y, pair.x_t_l))
    else:
        pred = backbone.predict(x_t, t.repeat(2), cat_conditioning([cond, cond]))
        policy_w, policy_l = pred.chunk(2)
        if method == "backward":
            # The module, not a parameter list: under FSDP2 its root holds unsharded copies until backward.
            loser_scale = parameter_space_lambda(space(policy_w, pair.x_t_w), space(target_w, pair.x_t_w),
                                                 space(policy_l, pair.x_t_l), space(target_l, pair.x_t_l),
                                                 backbone.denoiser, mu=cfg.safeguard.mu)

    log_w_w = log_w_l = None
    if cfg.needs_importance_weights:
        kw = dict(generator=generator, detach=cfg.detach_weights)
        log_w_w = importance_log_weight(process, policy_w, pair.x_t_w, x0_w, t, **kw)
        log_w_l = importance_log_weight(process, policy_l, pair.x_t_l, x0_l, t, **kw)

    return preference_loss(cfg, policy_w=policy_w, policy_l=policy_l, ref_w=ref_w, ref_l=ref_l, target_w=target_w,
                           target_l=target_l, log_w_w=log_w_w, log_w_l=log_w_l,
                           num_train_timesteps=process.num_timesteps, loser_scale=loser_scale,
                           timesteps=t, process=process, x_t_w=pair.x_t_w, x_t_l=pair.x_t_l)
