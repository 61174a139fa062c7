"""Per-pair losses: exact values against brute force, β conventions, and finiteness at extreme margins."""

import math
from dataclasses import replace

import pytest
import torch

from pipeline.objectives import (
    PRESETS,
    ObjectiveConfig,
    SafeguardConfig,
    beta_from_convention,
    dmpo_loss,
    dpo_loss,
    dspo_loss,
    preference_logit,
    preference_loss,
    preset,
    residual,
)


def rand_pair(b=4, shape=(3, 8, 8), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(b, *shape, generator=g).to(dtype)  # noqa: E731
    return dict(policy_w=r().requires_grad_(), policy_l=r().requires_grad_(), ref_w=r(), ref_l=r(), target_w=r(), target_l=r())


def test_residual_is_half_mean_square_in_fp32():
    a = torch.randn(3, 2, 5, 5, dtype=torch.bfloat16)
    b = torch.randn(3, 2, 5, 5, dtype=torch.bfloat16)
    r = residual(a, b)
    assert r.dtype == torch.float32
    expected = torch.stack([0.5 * ((a[i].double() - b[i].double()) ** 2).mean() for i in range(3)]).float()
    torch.testing.assert_close(r, expected)


def test_dpo_logit_and_loss_against_brute_force():
    p = rand_pair()
    out = preference_loss(PRESETS["diffusion-dpo"], **p)
    beta = PRESETS["diffusion-dpo"].beta
    losses = []
    for i in range(4):
        lw = 0.5 * ((p["policy_w"][i] - p["target_w"][i]) ** 2).mean() - 0.5 * ((p["ref_w"][i] - p["target_w"][i]) ** 2).mean()
        ll = 0.5 * ((p["policy_l"][i] - p["target_l"][i]) ** 2).mean() - 0.5 * ((p["ref_l"][i] - p["target_l"][i]) ** 2).mean()
        z = -beta * (lw - ll)
        losses.append(-torch.log(torch.sigmoid(z.double())) if abs(z) < 30 else torch.nn.functional.softplus(-z))
    torch.testing.assert_close(out.loss, torch.stack(losses).mean().float(), rtol=1e-4, atol=1e-4)


def test_salesforce_and_diffusers_conventions_give_the_same_logit():
    p = rand_pair()
    mse = lambda a, b: ((a - b) ** 2).flatten(1).mean(1)  # noqa: E731
    dw = mse(p["policy_w"], p["target_w"]) - mse(p["ref_w"], p["target_w"])
    dl = mse(p["policy_l"], p["target_l"]) - mse(p["ref_l"], p["target_l"])
    z_salesforce = -0.5 * 5000 * (dw - dl)
    z_diffusers = -2500 * (dw - dl)
    lw, lrw = residual(p["policy_w"], p["target_w"]), residual(p["ref_w"], p["target_w"])
    ll, lrl = residual(p["policy_l"], p["target_l"]), residual(p["ref_l"], p["target_l"])
    torch.testing.assert_close(preference_logit(lw, lrw, ll, lrl, beta_from_convention(5000, "salesforce")), z_salesforce)
    torch.testing.assert_close(preference_logit(lw, lrw, ll, lrl, beta_from_convention(2500, "diffusers")), z_diffusers)
    assert beta_from_convention(1, "sipo") == 1000
    with pytest.raises(ValueError, match="unknown beta convention"):
        beta_from_convention(1, "mine")


def test_dmpo_is_the_bernoulli_kl():
    z = torch.linspace(-8, 8, 33, dtype=torch.float64)
    alpha = 0.01
    p, q = torch.sigmoid(z), 1 - alpha
    kl = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    torch.testing.assert_close(dmpo_loss(z, alpha), kl)
    z_star = torch.tensor(math.log(q / (1 - q)), dtype=torch.float64)  # σ(z*) = 1 - α
    assert dmpo_loss(z_star, alpha).abs() < 1e-12
    assert bool((dmpo_loss(z, alpha) >= -1e-12).all())


def test_dspo_matches_its_formula_and_loser_acts_only_through_z():
    p = rand_pair()
    cfg = preset("dspo")
    out = preference_loss(cfg, **p)
    lw, lrw = residual(p["policy_w"], p["target_w"]), residual(p["ref_w"], p["target_w"])
    ll, lrl = residual(p["policy_l"], p["target_l"]), residual(p["ref_l"], p["target_l"])
    z = -cfg.beta * ((lw - lrw) - (ll - lrl))
    shift = (cfg.beta * (1 - torch.sigmoid(z)))[:, None, None, None]
    manual = (((p["policy_w"] - p["target_w"]) - shift * (p["policy_w"] - p["ref_w"])) ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(out.loss, manual)
    torch.testing.assert_close(dspo_loss(z, p["policy_w"], p["target_w"], p["ref_w"], cfg.beta).mean(), manual)
    (g_l,) = torch.autograd.grad(out.loss, p["policy_l"])
    # ∂loss/∂policy_l = ∂loss/∂z · ∂z/∂L_l · ∂L_l/∂policy_l, which is ∝ (policy_l - target_l) per pair.
    for i in range(4):
        d = (p["policy_l"][i] - p["target_l"][i]).flatten()
        cos = torch.nn.functional.cosine_similarity(g_l[i].flatten(), d, dim=0).abs()
        assert cos > 0.999


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("sdpo", [None, "batch", "sample"])
def test_every_objective_is_finite_at_beta_5000_and_extreme_margins(name, sdpo):
    for scale in (1e-3, 1.0, 30.0, 1e3):
        p = rand_pair(seed=int(scale * 10) % 97, dtype=torch.bfloat16)
        p["policy_l"] = (p["target_l"].float() + scale * torch.randn_like(p["target_l"].float())).bfloat16().requires_grad_()
        cfg = preset(name, beta=5000.0)
        if sdpo:
            cfg = cfg.with_safeguard(mu=0.5, scope=sdpo)
        n = p["policy_w"].shape[0]
        log_w = torch.linspace(-20.0, 20.0, n)
        out = preference_loss(cfg, **p, log_w_w=log_w, log_w_l=log_w.flip(0))
        out.loss.backward()
        assert torch.isfinite(out.loss), (name, scale)
        assert torch.isfinite(p["policy_w"].grad.float()).all() and torch.isfinite(p["policy_l"].grad.float()).all()
        assert all(torch.isfinite(v) for v in out.metrics.values()), out.metrics


def test_metrics_every_objective_reports():
    p = rand_pair()
    cfg = preset("sipo", safeguard=SafeguardConfig(mu=0.9))
    out = preference_loss(cfg, **p, log_w_w=torch.zeros(4), log_w_l=torch.zeros(4))
    expected = {
        "loss", "residual_w", "residual_l", "ref_residual_w", "ref_residual_l", "margin", "implicit_acc",
        "lambda_mean", "lambda_min", "lambda_max", "lambda_active_frac",
        "iw_mean", "iw_min", "iw_max", "iw_below_0.9_frac", "masked_frac",
    }
    assert expected <= set(out.metrics)
    assert all(v.dim() == 0 and not v.requires_grad for v in out.metrics.values())
    lw, lrw = residual(p["policy_w"], p["target_w"]), residual(p["ref_w"], p["target_w"])
    ll, lrl = residual(p["policy_l"], p["target_l"]), residual(p["ref_l"], p["target_l"])
    torch.testing.assert_close(out.metrics["margin"], ((lrw - lw) - (lrl - ll)).mean())


def test_beta_timestep_factor_multiplies_beta_by_T():
    p = rand_pair()
    a = preference_loss(ObjectiveConfig(beta=2.0, beta_timestep_factor="T"), **p, num_train_timesteps=1000)
    b = preference_loss(ObjectiveConfig(beta=2000.0), **p)
    torch.testing.assert_close(a.loss, b.loss)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        preference_loss(ObjectiveConfig(beta=2.0, beta_timestep_factor="T"), **p)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(loss="ipo"), "objective.loss"),
        (dict(beta=0.0), "objective.beta"),
        (dict(weighting="tis"), "objective.weighting"),
        (dict(epsilon=1.5), "objective.epsilon"),
        (dict(dmpo_alpha=1.0), "objective.dmpo_alpha"),
        (dict(pair_reduce="max"), "objective.pair_reduce"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ObjectiveConfig(**kwargs)


def test_bad_safeguard_and_preset_errors():
    with pytest.raises(ValueError, match="safeguard.mu"):
        SafeguardConfig(mu=1.5)
    with pytest.raises(ValueError, match="scope='batch'"):
        SafeguardConfig(space="parameter", scope="sample")
    with pytest.raises(ValueError, match="unknown objective 'dpo2'"):
        preset("dpo2")
    with pytest.raises(ValueError, match="loser_scale"):
        preference_loss(preset("diffusion-dpo").with_safeguard(space="parameter"), **rand_pair())
    with pytest.raises(ValueError, match="log importance weights"):
        preference_loss(preset("sipo"), **rand_pair())


def test_dpo_gradient_pushes_winner_down_and_loser_up():
    p = rand_pair()
    out = preference_loss(preset("diffusion-dpo", beta=10.0), **p)
    g_w, g_l = torch.autograd.grad(out.loss, [p["policy_w"], p["policy_l"]])
    step = 1e-2
    new_w = residual(p["policy_w"] - step * g_w, p["target_w"])
    new_l = residual(p["policy_l"] - step * g_l, p["target_l"])
    assert bool((new_w < residual(p["policy_w"], p["target_w"])).all())
    assert bool((new_l > residual(p["policy_l"], p["target_l"])).all())
    torch.testing.assert_close(dpo_loss(torch.tensor([0.0])), torch.tensor([math.log(2.0)]))


def test_anchor_adds_the_squared_distance_to_the_reference_and_pulls_towards_it():
    """anchor = a adds a · mean over pairs of ½(‖πw − rw‖² + ‖πl − rl‖²)/D; its gradient points at the reference."""
    pair = rand_pair()
    plain = preference_loss(ObjectiveConfig(beta=10.0), **pair)
    anchored = preference_loss(ObjectiveConfig(beta=10.0, anchor=0.5), **pair)
    d = lambda p, r: (p - r).pow(2).flatten(1).mean(1)  # noqa: E731
    drift = 0.5 * (d(pair["policy_w"], pair["ref_w"]) + d(pair["policy_l"], pair["ref_l"])).mean()
    torch.testing.assert_close(anchored.loss - plain.loss, 0.5 * drift)
    torch.testing.assert_close(anchored.metrics["anchor_drift"], drift.detach())
    g_plain, = torch.autograd.grad(plain.loss, pair["policy_w"])
    g_anchor, = torch.autograd.grad(anchored.loss, pair["policy_w"])
    n = pair["policy_w"][0].numel() * pair["policy_w"].shape[0]
    torch.testing.assert_close(g_anchor - g_plain, 0.5 * (pair["policy_w"] - pair["ref_w"]).detach() / n)
    with pytest.raises(ValueError, match="objective.anchor=-1"):
        ObjectiveConfig(anchor=-1.0)


def test_sft_adds_the_winners_residual_and_moves_only_the_winner():
    """sft = a adds a · mean over pairs of L(x_w) = ½‖πw − target_w‖²/D: a gradient on the winner only, towards
    its target, whatever the safeguard does to the loser."""
    pair = rand_pair()
    for base in (ObjectiveConfig(beta=10.0), ObjectiveConfig(beta=10.0).with_safeguard(mu=0.5)):
        plain = preference_loss(base, **pair)
        tuned = preference_loss(replace(base, sft=2.0), **pair)
        torch.testing.assert_close(tuned.loss - plain.loss, 2.0 * residual(pair["policy_w"], pair["target_w"]).mean())
        (gw0, gl0), (gw1, gl1) = (torch.autograd.grad(o.loss, [pair["policy_w"], pair["policy_l"]]) for o in (plain, tuned))
        n = pair["policy_w"][0].numel() * pair["policy_w"].shape[0]
        torch.testing.assert_close(gw1 - gw0, 2.0 * (pair["policy_w"] - pair["target_w"]).detach() / n)
        torch.testing.assert_close(gl1, gl0)
    with pytest.raises(ValueError, match="objective.sft=-1"):
        ObjectiveConfig(sft=-1.0)
