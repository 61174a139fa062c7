"""Per-backbone presets and the authors' backbone-specific branches, against hand computations.

* ``preset(name, family)``: the β / μ / loss-form table of the SDPO and DDSPO training scripts;
* DSPO's SDXL form ``(1−σ(z))²·drift`` or ``(1−σ(z))²`` (SDPO authors' ``train.py --sdxl``);
* DDSPO-SDXL's per-pair ``t/(T−1)`` loss weight;
* DDSPO-SD3's residuals on the predicted x0 (checked against ``DDPMScheduler.step``'s own x̂0 and, for flow,
  against ``x̂0 = x_t − σ·v``).
"""

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from pipeline.objectives import (
    FAMILIES,
    DiffusionProcess,
    ObjectiveConfig,
    SafeguardConfig,
    dspo_sdxl_loss,
    preference_loss,
    preset,
    sdpo_mu,
)


# ----------------------------------------------------------------------------------- the presets table
@pytest.mark.parametrize("name, family, beta, extra", [
    ("diffusion-dpo", "sd15", 5000.0, {}),
    ("diffusion-dpo", "sdxl", 5000.0, {}),
    ("dspo", "sd15", 0.001, {"dspo_form": "sd15"}),
    ("dspo", "sdxl", 5000.0, {"dspo_form": "sdxl"}),
    ("dmpo", "sd15", 2000.0, {"dmpo_alpha": 0.01}),
    ("dmpo", "sdxl", 6000.0, {"dmpo_alpha": 0.01}),
    ("ddspo", "sd15", 16000.0, {"targets": "ddspo", "timestep_weighting": "none", "residual_space": "model"}),
    ("ddspo", "sdxl", 16000.0, {"targets": "ddspo", "timestep_weighting": "linear", "residual_space": "model"}),
    ("ddspo", "sd3", 2000.0, {"targets": "ddspo", "timestep_weighting": "none", "residual_space": "x0"}),
    ("ddspo", "sana", 2000.0, {"targets": "ddspo", "timestep_weighting": "none", "residual_space": "model"}),
    ("dpo-cm", "sd15", 1000.0, {"weighting": "cm"}),
    ("sipo", "sd15", 1000.0, {"weighting": "sipo"}),
])
def test_preset_family_table(name, family, beta, extra):
    cfg = preset(name, family)
    assert cfg.beta == beta
    for k, v in extra.items():
        assert getattr(cfg, k) == v, k
    assert cfg.safeguard is None


def test_default_family_is_sd15():
    assert preset("dmpo") == preset("dmpo", family="sd15")
    assert preset("ddspo").beta == 16000.0


@pytest.mark.parametrize("name, family, mu", [
    ("diffusion-dpo", "sd15", 0.9), ("dmpo", "sd15", 0.9), ("dspo", "sd15", 0.2),
    ("diffusion-dpo", "sdxl", 0.6), ("dmpo", "sdxl", 0.6), ("dspo", "sdxl", 0.6),
])
def test_safeguard_true_takes_the_authors_mu(name, family, mu):
    assert preset(name, family, safeguard=True).safeguard == SafeguardConfig(mu=mu)
    assert sdpo_mu(name, family) == mu


def test_unpublished_combinations_are_refused_not_guessed():
    with pytest.raises(ValueError, match="no published 'sipo' recipe"):
        preset("sipo", "sdxl")
    with pytest.raises(ValueError, match="no published 'diffusion-dpo' recipe"):
        preset("diffusion-dpo", "sd3")
    with pytest.raises(ValueError, match="unknown backbone family"):
        preset("ddspo", "flux")
    with pytest.raises(ValueError, match="no published SDPO μ"):
        preset("ddspo", "sdxl", safeguard=True)
    assert set(FAMILIES) == {"sd15", "sdxl", "sd3", "sana"}


def test_overrides_beat_the_family():
    cfg = preset("ddspo", "sd3", beta=1.0, safeguard=SafeguardConfig(mu=0.3))
    assert cfg.beta == 1.0 and cfg.residual_space == "x0" and cfg.safeguard.mu == 0.3
    assert preset("dspo", "sdxl", safeguard=False).safeguard is None


def test_branch_options_are_validated():
    with pytest.raises(ValueError, match="applies to loss='dspo' only"):
        ObjectiveConfig(loss="dpo", dspo_form="sdxl")
    for field, bad in [("timestep_weighting", "cosine"), ("residual_space", "eps"), ("dspo_form", "sd3")]:
        with pytest.raises(ValueError, match=field):
            ObjectiveConfig(loss="dspo", **{field: bad})


# ----------------------------------------------------------------------------------- hand computations
def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _res(a: list[float], b: list[float]) -> float:
    """½·mean‖a − b‖², by hand."""
    return 0.5 * sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)


def _z(beta, pw, rw, tw, pl, rl, tl) -> float:
    return -beta * ((_res(pw, tw) - _res(rw, tw)) - (_res(pl, tl) - _res(rl, tl)))


# Two pairs of 2-dim "predictions"; references close to the targets, policies drifted from them.
TW = [[0.0, 0.0], [1.0, -1.0]]
TL = [[0.5, 0.5], [0.0, 1.0]]
RW = [[0.1, -0.1], [1.1, -0.9]]
RL = [[0.4, 0.6], [0.1, 1.2]]


def _tensors(pw, pl):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return dict(policy_w=t(pw).requires_grad_(), policy_l=t(pl).requires_grad_(), ref_w=t(RW), ref_l=t(RL),
                target_w=t(TW), target_l=t(TL))


@pytest.mark.parametrize("pw, expect_drift_branch", [
    ([[0.9, -0.7], [1.6, -0.2]], True),     # mean drift ((0.8²+0.6²)/2 + (0.5²+0.7²)/2)/2 = 0.435 ≥ 0.1
    ([[0.12, -0.08], [1.08, -0.93]], False),  # mean drift ≈ 0.0006 < 0.1
])
def test_dspo_sdxl_form_matches_the_recipe_by_hand(pw, expect_drift_branch):
    pl = [[0.3, 0.9], [0.2, 1.5]]
    beta = 50.0
    out = preference_loss(preset("dspo", "sdxl", beta=beta), **_tensors(pw, pl))
    per_pair = []
    drifts = [_res(p, r) * 2 for p, r in zip(pw, RW)]  # mean_dims(‖pθ_w − pref_w‖²)
    for i in range(2):
        z = _z(beta, pw[i], RW[i], TW[i], pl[i], RL[i], TL[i])
        gap = (1.0 - _sig(z)) ** 2
        per_pair.append(gap * drifts[i] if sum(drifts) / 2 >= 0.1 else gap)
    assert (sum(drifts) / 2 >= 0.1) == expect_drift_branch
    assert float(out.metrics["loss"]) == pytest.approx(sum(per_pair) / 2, rel=1e-6)
    assert float(out.metrics["dspo_drift"]) == pytest.approx(sum(drifts) / 2, rel=1e-6)


def test_dspo_sdxl_small_drift_gradient_is_dpo_weighted():
    """d/dz (1−σ(z))² = −2σ(1−σ)² = 2σ(z)(1−σ(z)) · d/dz(−log σ(z)): one pair, the policy at the reference (the
    start of training)."""
    beta = 20.0
    pw, pl = [[0.1, -0.1]], [[0.7, 0.2]]
    a, b = _tensors(pw, pl), _tensors(pw, pl)
    for t in (a, b):
        t["ref_w"], t["ref_l"], t["target_w"], t["target_l"] = t["ref_w"][:1], t["ref_l"][:1], t["target_w"][:1], t["target_l"][:1]
    sdxl = preference_loss(preset("dspo", "sdxl", beta=beta), **a)
    dpo = preference_loss(preset("diffusion-dpo", beta=beta), **b)
    sdxl.loss.backward()
    dpo.loss.backward()
    z = _z(beta, pw[0], RW[0], TW[0], pl[0], RL[0], TL[0])
    assert float(sdxl.metrics["loss"]) == pytest.approx((1 - _sig(z)) ** 2, rel=1e-6)
    for k in ("policy_w", "policy_l"):
        torch.testing.assert_close(a[k].grad, 2 * _sig(z) * (1 - _sig(z)) * b[k].grad, rtol=1e-5, atol=1e-9)


def test_dspo_sdxl_loss_function_directly():
    z = torch.tensor([0.0, 2.0])
    pw = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    ref = torch.zeros(2, 2)
    # drift per pair (1, 0), mean 0.5 ≥ 0.1: (1−σ)²·drift = (0.25·1, (1−σ(2))²·0)
    torch.testing.assert_close(dspo_sdxl_loss(z, pw, ref), torch.tensor([0.25, 0.0]))
    # threshold above the mean drift: (1−σ(z))² for every pair
    torch.testing.assert_close(dspo_sdxl_loss(z, pw, ref, threshold=0.6), torch.tensor([0.25, (1 - _sig(2.0)) ** 2]))


def test_linear_timestep_weight_by_hand():
    pw, pl = [[0.9, -0.7], [1.6, -0.2]], [[0.3, 0.9], [0.2, 1.5]]
    beta, T = 3.0, 1000
    t = torch.tensor([0, 333])
    tens = _tensors(pw, pl)
    out = preference_loss(preset("ddspo", "sdxl", beta=beta), **tens, timesteps=t, num_train_timesteps=T)
    expect = 0.0
    for i in range(2):
        z = _z(beta, pw[i], RW[i], TW[i], pl[i], RL[i], TL[i])
        expect += math.log1p(math.exp(-z)) * int(t[i]) / (T - 1)
    assert float(out.metrics["loss"]) == pytest.approx(expect / 2, rel=1e-6)
    assert float(out.metrics["timestep_weight_mean"]) == pytest.approx(333 / 999 / 2)
    out.loss.backward()
    assert torch.all(tens["policy_w"].grad[0] == 0) and torch.any(tens["policy_w"].grad[1] != 0)  # t = 0: no signal
    with pytest.raises(ValueError, match="needs timesteps"):
        preference_loss(preset("ddspo", "sdxl"), **_tensors(pw, pl))


# ----------------------------------------------------------------------------------- x0-space residuals
def _ddpm():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon", clip_sample=False)


def _random_pairs(b, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(b, 3, 4, 4, generator=g, dtype=torch.float64)  # noqa: E731
    x_t_w, x_t_l, tw, tl = r(), r(), r(), r()
    return dict(x_t_w=x_t_w, x_t_l=x_t_l, target_w=tw, target_l=tl, policy_w=tw + 0.3 * r(), policy_l=tl + 0.3 * r(),
                ref_w=tw + 0.2 * r(), ref_l=tl + 0.2 * r())


def test_x0_residuals_against_the_schedulers_own_x0_prediction():
    """ε-model: every residual is measured on DDPMScheduler.step(...).pred_original_sample."""
    sched = _ddpm()
    process = DiffusionProcess.from_scheduler(sched)
    t = torch.tensor([5, 400, 990])
    d = _random_pairs(3, seed=0)
    beta = 0.7
    out = preference_loss(preset("ddspo", "sd3", beta=beta), **{k: v for k, v in d.items() if not k.startswith("x_t")},
                          timesteps=t, process=process, x_t_w=d["x_t_w"], x_t_l=d["x_t_l"])

    def x0(pred, x_t):
        return torch.stack([sched.step(pred[i:i + 1], int(t[i]), x_t[i:i + 1]).pred_original_sample[0]
                            for i in range(len(t))]).double()

    def res(a, b):
        return 0.5 * (a - b).pow(2).flatten(1).mean(1)

    tw, tl = x0(d["target_w"], d["x_t_w"]), x0(d["target_l"], d["x_t_l"])
    z = -beta * ((res(x0(d["policy_w"], d["x_t_w"]), tw) - res(x0(d["ref_w"], d["x_t_w"]), tw))
                 - (res(x0(d["policy_l"], d["x_t_l"]), tl) - res(x0(d["ref_l"], d["x_t_l"]), tl)))
    assert float(out.metrics["loss"]) == pytest.approx(float(torch.nn.functional.softplus(-z).mean()), rel=1e-5)
    assert float(out.metrics["logit_mean"]) == pytest.approx(float(z.mean()), rel=1e-5)
    # The same residuals in model space differ by (σ/α)² per pair: the test data must tell them apart.
    model = preference_loss(preset("ddspo", beta=beta), **{k: v for k, v in d.items() if not k.startswith("x_t")})
    assert abs(float(model.metrics["loss"]) - float(out.metrics["loss"])) > 1e-3


def test_x0_residuals_of_a_flow_model_scale_by_sigma_squared():
    """Flow: x̂0 = x_t − σ·v, so each x0-space residual is σ_t² times the velocity residual and z scales by σ_t²."""
    process = DiffusionProcess.from_scheduler(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))
    t = torch.tensor([10, 500, 999])
    d = _random_pairs(3, seed=1)
    beta = 2.0
    plain = {k: v for k, v in d.items() if not k.startswith("x_t")}
    out = preference_loss(preset("ddspo", "sd3", beta=beta), **plain, timesteps=t, process=process,
                          x_t_w=d["x_t_w"], x_t_l=d["x_t_l"])

    def res(a, b):
        return 0.5 * (a - b).pow(2).flatten(1).mean(1)

    z_model = -beta * ((res(d["policy_w"], d["target_w"]) - res(d["ref_w"], d["target_w"]))
                       - (res(d["policy_l"], d["target_l"]) - res(d["ref_l"], d["target_l"])))
    sigma2 = process.sigmas[t] ** 2
    z = sigma2 * z_model
    assert float(out.metrics["loss"]) == pytest.approx(float(torch.nn.functional.softplus(-z).mean()), rel=1e-5)
    # The true velocity's x0 is the clean image: x_t = (1−σ)x0 + σε, v = ε − x0 ⇒ x_t − σv = x0.
    x0, eps = torch.randn(3, 3, 4, 4, dtype=torch.float64), torch.randn(3, 3, 4, 4, dtype=torch.float64)
    s = process.sigmas[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(process.predict_x0(eps - x0, (1 - s) * x0 + s * eps, t).double(), x0, rtol=1e-5, atol=1e-5)


def test_x0_space_safeguard_uses_the_x0_gradients():
    """Output-space λ in x0 space: g = x̂0 − x̂0* = −(σ/α)(pred − target) per pair, so the batch λ is
    (1−μ)·Σ c_i²‖e_w,i‖² / Σ c_i²⟨e_w,i, e_l,i⟩ with c_i = σ_i/α_i (ε-model) and e = pred − target."""
    process = DiffusionProcess.from_scheduler(_ddpm())
    t = torch.tensor([50, 600, 950])
    d = _random_pairs(3, seed=2)
    e = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    d["policy_w"], d["policy_l"] = d["target_w"] + e, d["target_l"] + 2 * e  # aligned errors: the safeguard binds
    mu = 0.2
    cfg = preset("ddspo", "sd3", beta=1.0, safeguard=SafeguardConfig(mu=mu))
    out = preference_loss(cfg, **{k: v for k, v in d.items() if not k.startswith("x_t")}, timesteps=t, process=process,
                          x_t_w=d["x_t_w"], x_t_l=d["x_t_l"])
    acp = _ddpm().alphas_cumprod.double()[t]
    c2 = (1 - acp) / acp
    ew, el = (d["policy_w"] - d["target_w"]).flatten(1), (d["policy_l"] - d["target_l"]).flatten(1)
    lam = (1 - mu) * float((c2 * (ew * ew).sum(1)).sum() / (c2 * (ew * el).sum(1)).sum())
    assert float(out.loser_scale) == pytest.approx(min(lam, 1.0), rel=1e-5)
    assert float(out.loser_scale) == pytest.approx(0.4, rel=1e-5)  # e_l = 2·e_w: λ = 0.8/2 whatever the weights


def test_x0_space_needs_the_process():
    d = _random_pairs(2, seed=4)
    with pytest.raises(ValueError, match="residual_space='x0' needs"):
        preference_loss(preset("ddspo", "sd3"), **{k: v for k, v in d.items() if not k.startswith("x_t")})


# ----------------------------------------------------------------------------------- through the training step
@pytest.mark.parametrize("name, family, space", [
    ("dspo", "sdxl", "output"), ("ddspo", "sdxl", "output"), ("ddspo", "sd3", "output"), ("ddspo", "sd3", "parameter"),
])
def test_family_presets_train_through_the_step(name, family, space, tiny_toy_backbone):
    """The step passes timesteps, x_t and the process: every branch trains (the toy model is ε-prediction; x0 space
    works for any parameterization)."""
    from pipeline.toyworld import PromptSpec, render_batch, to_tensor
    from pipeline.training import PairBatch, preference_step

    specs = [PromptSpec("red", "circle", 2, "left"), PromptSpec("blue", "square", 1, "top")]
    batch = PairBatch(to_tensor(render_batch(specs, [0, 1], 32)),
                      to_tensor(render_batch([s.replace(colour="green") for s in specs], [2, 3], 32)),
                      [s.text for s in specs], ["red circles on", "a square top"])
    cfg = preset(name, family, safeguard=SafeguardConfig(mu=0.5, space=space))
    out = preference_step(tiny_toy_backbone, cfg, batch, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    grad = sum(float(p.grad.abs().sum()) for p in tiny_toy_backbone.trainable_parameters() if p.grad is not None)
    assert torch.isfinite(out.loss) and grad > 0
    assert 0.0 <= float(out.loser_scale) <= 1.0
