"""SIPO importance weights, DPO-C&M and the SIPO logit weighting."""

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from pipeline.objectives import (
    DiffusionProcess,
    GaussianTransition,
    clip_and_mask_weights,
    gaussian_log_prob,
    importance_log_weight,
    log_density_ratio,
    preference_loss,
    preset,
    sipo_logit_weights,
)

PROCESSES = {
    "sd-eps": lambda: DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "sd-v": lambda: DDPMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "flow": lambda: FlowMatchEulerDiscreteScheduler(shift=1.0),
}


def make(name):
    return DiffusionProcess.from_scheduler(PROCESSES[name]())


def test_gaussian_log_prob_matches_torch_normal():
    mean, x = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    var = torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1, 1)
    expected = torch.distributions.Normal(mean, var.sqrt()).log_prob(x)
    torch.testing.assert_close(gaussian_log_prob(x, GaussianTransition(mean, var)), expected.flatten(1).mean(1))
    torch.testing.assert_close(gaussian_log_prob(x, GaussianTransition(mean, var), "sum"), expected.flatten(1).sum(1))


def test_stable_log_ratio_matches_the_difference_of_log_densities():
    x, mp, mq = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    var = torch.full((4, 1), 0.3)
    p, q = GaussianTransition(mp, var), GaussianTransition(mq, var)
    torch.testing.assert_close(log_density_ratio(x, p, q), gaussian_log_prob(x, p) - gaussian_log_prob(x, q))
    with pytest.raises(ValueError, match="identical variances"):
        log_density_ratio(x, p, GaussianTransition(mq, var * 2))


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_perfect_predictor_has_importance_weight_one(name):
    proc = make(name)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(16, 4, 8, 8, generator=g), torch.randn(16, 4, 8, 8, generator=g)
    t = torch.tensor([1, 2, 3, 5, 10, 30, 60, 100, 200, 300, 400, 500, 700, 900, 990, 999])
    x_t = proc.add_noise(x0, noise, t)
    log_w = importance_log_weight(proc, proc.target(x0, noise, t), x_t, x0, t, generator=g)
    assert float(log_w.abs().max()) < 1e-5


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_fixed_error_predictor_has_small_weights_only_at_small_t(name):
    """SIPO Fig. 4: w(t) rises with t; with a fixed ε-error, w < 0.9 happens only early in the chain."""
    proc = make(name)
    g = torch.Generator().manual_seed(1)
    ts = torch.arange(1, 1000, 7)
    n = len(ts)
    x0, noise = torch.randn(n, 4, 16, 16, generator=g), torch.randn(n, 4, 16, 16, generator=g)
    x_t = proc.add_noise(x0, noise, ts)
    # An error of fixed size in the model's own output space (ε, v or velocity).
    pred = proc.target(x0, noise, ts) + 0.5 * torch.randn(n, 4, 16, 16, generator=g)
    w = importance_log_weight(proc, pred, x_t, x0, ts, generator=g).exp()
    small = ts[w < 0.9]
    assert len(small) > 0, "some early steps must be down-weighted"
    assert int(small.max()) < 150, f"w < 0.9 at late timesteps {small.tolist()}"
    assert float(w[ts > 300].min()) > 0.97


def test_clip_and_mask_weights():
    w_w = torch.tensor([0.5, 0.95, 1.0, 1.5, 0.92])
    w_l = torch.tensor([1.0, 1.0, 0.85, 1.0, 2.0])
    weight, keep = clip_and_mask_weights(w_w, w_l, epsilon=0.1, tau=0.9)
    assert keep.tolist() == [False, True, False, True, True]
    torch.testing.assert_close(weight, torch.tensor([0.0, 0.95, 0.0, 1.0, 0.92]))
    weight, keep = clip_and_mask_weights(w_w, w_l, epsilon=0.1, tau=0.9, pair_reduce="winner")
    torch.testing.assert_close(weight, torch.tensor([0.0, 0.95, 1.0, 1.1, 0.92]))


def test_sipo_logit_weights_use_the_max_inverse_weight_clipped():
    w_w = torch.tensor([0.5, 1.0, 2.0, 1.05])
    w_l = torch.tensor([1.0, 0.97, 4.0, 1.0])
    torch.testing.assert_close(sipo_logit_weights(w_w, w_l, epsilon=0.1), torch.tensor([1.1, 1 / 0.97, 0.9, 1.0]))


def pair(seed=0, b=5):
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(b, 2, 4, 4, generator=g)  # noqa: E731
    return dict(policy_w=r().requires_grad_(), policy_l=r().requires_grad_(), ref_w=r(), ref_l=r(), target_w=r(), target_l=r())


def test_weighted_objectives_reduce_to_dpo_at_unit_weights():
    p = pair()
    dpo = preference_loss(preset("diffusion-dpo", beta=1000.0), **p)
    ones = dict(log_w_w=torch.zeros(5), log_w_l=torch.zeros(5))
    for name in ("sipo", "dpo-cm"):
        out = preference_loss(preset(name), **p, **ones)
        torch.testing.assert_close(out.loss, dpo.loss)
        assert float(out.metrics["masked_frac"]) == 0.0


def test_sipo_multiplies_the_logit_and_cm_masks_pairs():
    p = pair(1)
    log_w_w = torch.log(torch.tensor([0.5, 1.0, 1.02, 0.95, 1.0]))
    log_w_l = torch.log(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.8]))
    base = preset("diffusion-dpo", beta=10.0)  # a moderate β keeps every pair's z in the sigmoid's slope
    sipo = preference_loss(preset("sipo", beta=10.0), **p, log_w_w=log_w_w, log_w_l=log_w_l)
    # Manual SIPO: the same pairs through plain DPO with the logit multiplied by w̃.
    w_tilde = sipo_logit_weights(log_w_w.exp(), log_w_l.exp(), epsilon=0.1)
    plain = preference_loss(base, **p)
    lz = -torch.nn.functional.logsigmoid(w_tilde * _logits(base, p))
    torch.testing.assert_close(sipo.loss, lz.mean())
    assert float(plain.loss) != pytest.approx(float(sipo.loss))

    cm = preference_loss(preset("dpo-cm"), **p, log_w_w=log_w_w, log_w_l=log_w_l)
    assert float(cm.metrics["masked_frac"]) == pytest.approx(0.4)  # pairs 0 and 4 have w < 0.9
    g_w, g_l = torch.autograd.grad(cm.loss, [p["policy_w"], p["policy_l"]])
    for i in (0, 4):
        assert float(g_w[i].abs().max()) == 0.0 and float(g_l[i].abs().max()) == 0.0
    for i in (1, 2, 3):
        assert float(g_w[i].abs().max()) > 0.0


def _logits(cfg, p):
    from pipeline.objectives import preference_logit, residual

    return preference_logit(
        residual(p["policy_w"], p["target_w"]), residual(p["ref_w"], p["target_w"]),
        residual(p["policy_l"], p["target_l"]), residual(p["ref_l"], p["target_l"]), cfg.beta,
    )
