"""Diffusion-SDPO: λ against brute force, the plug-in's gradient surgery, and the winner-preserving guarantee."""

import copy

import pytest
import torch

from pipeline.objectives import (
    SafeguardConfig,
    output_space_lambda,
    parameter_space_lambda,
    preference_loss,
    preset,
    residual,
    scale_gradient,
)


def brute_force_lambda(pred_w, target_w, pred_l, target_l, mu, per_sample):
    """λ from autograd output gradients of the residuals, Eq. 17 written out element by element."""
    pw = pred_w.detach().double().requires_grad_()
    pl = pred_l.detach().double().requires_grad_()
    (g_w,) = torch.autograd.grad(residual(pw, target_w.double()).sum(), pw)
    (g_l,) = torch.autograd.grad(residual(pl, target_l.double()).sum(), pl)
    groups = [(g_w[i], g_l[i]) for i in range(len(g_w))] if per_sample else [(g_w, g_l)]
    out = []
    for a, b in groups:
        dot = float((a * b).sum())
        out.append(1.0 if dot <= 0 else min(max((1 - mu) * float((a * a).sum()) / dot, 0.0), 1.0))
    return torch.tensor(out)


def correlated_pair(b, seed, shape=(3, 6, 6)):
    g = torch.Generator().manual_seed(seed)
    tw, tl = torch.randn(b, *shape, generator=g), torch.randn(b, *shape, generator=g)
    err = torch.randn(b, *shape, generator=g)
    # Losers whose error correlates with the winner's (the case where the safeguard binds) and some that don't.
    sign = torch.where(torch.arange(b) % 3 == 0, -1.0, 1.0).reshape(-1, 1, 1, 1)
    pw = tw + err
    pl = tl + sign * 2.0 * err + 0.5 * torch.randn(b, *shape, generator=g)
    return pw, tw, pl, tl


@pytest.mark.parametrize("mu", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("seed", range(5))
def test_output_space_lambda_matches_brute_force(mu, seed):
    pw, tw, pl, tl = correlated_pair(6, seed)
    lam_b = output_space_lambda(pw, tw, pl, tl, mu=mu, scope="batch")
    lam_s = output_space_lambda(pw, tw, pl, tl, mu=mu, scope="sample")
    torch.testing.assert_close(lam_b.reshape(1).double(), brute_force_lambda(pw, tw, pl, tl, mu, False).double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lam_s.double(), brute_force_lambda(pw, tw, pl, tl, mu, True).double(), rtol=1e-5, atol=1e-6)
    assert lam_b.dim() == 0 and lam_s.shape == (6,)


def test_lambda_is_one_when_gradients_disagree_and_bounded():
    tw, tl = torch.zeros(2, 4), torch.zeros(2, 4)
    pw = torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 0, 0]])
    pl = torch.tensor([[-1.0, 0, 0, 0], [0.0, 0, 5, 0]])  # anti-aligned, orthogonal
    assert torch.equal(output_space_lambda(pw, tw, pl, tl, mu=0.5, scope="sample"), torch.ones(2))
    pl_big = 10 * pw  # aligned and larger: λ = (1-μ)·|g_w|²/<g_w,g_l> = 0.5/10
    torch.testing.assert_close(output_space_lambda(pw, tw, pl_big, tl, mu=0.5, scope="sample"), torch.full((2,), 0.05))
    pl_small = 0.1 * pw  # aligned and smaller: the bound exceeds 1, clipped
    assert torch.equal(output_space_lambda(pw, tw, pl_small, tl, mu=0.0, scope="sample"), torch.ones(2))


@pytest.mark.parametrize("name", ["diffusion-dpo", "dmpo", "dspo", "sipo"])
@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_sdpo_keeps_the_forward_value_and_scales_only_the_loser_gradient(name, scope):
    pw, tw, pl, tl = correlated_pair(6, seed=11)
    refs = dict(ref_w=tw + 0.9 * (pw - tw), ref_l=tl + 0.9 * (pl - tl), target_w=tw, target_l=tl)
    extra = dict(log_w_w=torch.full((6,), -0.01), log_w_l=torch.zeros(6))
    base_cfg = preset(name, beta=50.0)

    def run(cfg):
        a, b = pw.clone().requires_grad_(), pl.clone().requires_grad_()
        out = preference_loss(cfg, policy_w=a, policy_l=b, **refs, **extra)
        out.loss.backward()
        return out, a.grad, b.grad

    plain, gw0, gl0 = run(base_cfg)
    safe, gw1, gl1 = run(base_cfg.with_safeguard(mu=0.5, scope=scope))
    lam = output_space_lambda(pw, tw, pl, tl, mu=0.5, scope=scope)
    assert float(lam.min()) < 1.0, "the test data must make the safeguard bind"
    torch.testing.assert_close(safe.loss, plain.loss)
    torch.testing.assert_close(gw1, gw0)
    torch.testing.assert_close(gl1, gl0 * lam.reshape(-1, 1, 1, 1) if lam.dim() else gl0 * lam)
    torch.testing.assert_close(safe.metrics["lambda_mean"], lam.float().mean())


def test_scale_gradient_is_identity_forward():
    x = torch.randn(3, 2, requires_grad=True)
    y = scale_gradient(x, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]]))


@pytest.mark.parametrize("mu", [0.0, 0.2, 0.6, 0.9])
@pytest.mark.parametrize("seed", range(4))
def test_identity_jacobian_output_and_parameter_lambda_agree(mu, seed):
    """pred_i = θ_i + x_i shares θ_i between winner i and loser i: J Jᵀ = I, so ρ = 1 in Eq. 16."""
    pw, tw, pl, tl = correlated_pair(5, seed)
    theta = torch.zeros_like(pw, requires_grad=True)
    lam_param = parameter_space_lambda(theta + pw, tw, theta + pl, tl, [theta], mu=mu)
    lam_out = output_space_lambda(pw, tw, pl, tl, mu=mu, scope="batch")
    torch.testing.assert_close(lam_param, lam_out, rtol=1e-5, atol=1e-6)


def test_parameter_lambda_differs_from_output_lambda_for_a_real_jacobian():
    """Guards against a 'parameter-space' λ that silently falls back to output space."""
    diffs = []
    for seed in range(10):
        pw, tw, pl, tl = correlated_pair(4, seed)
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(108, 108), torch.nn.Tanh())
        out = net(torch.cat([pw, pl])).reshape(8, 3, 6, 6)
        # Targets placed so that the output-space errors are aligned (0 < λ < 1 in output space).
        err = torch.randn(4, 3, 6, 6)
        tw, tl = out[:4].detach() - err, out[4:].detach() - 2 * err - 0.5 * torch.randn(4, 3, 6, 6)
        lam_param = parameter_space_lambda(out[:4], tw, out[4:], tl, net.parameters(), mu=0.0)
        lam_out = output_space_lambda(out[:4], tw, out[4:], tl, mu=0.0, scope="batch")
        assert 0.0 < float(lam_out) < 1.0
        diffs.append(float((lam_param - lam_out).abs()))
    assert max(diffs) > 1e-2


def test_parameter_lambda_takes_the_module_or_its_parameters():
    """The module form (what the training step passes, needed under FSDP2) equals the parameter list; frozen
    parameters do not count."""
    pw, tw, pl, tl = correlated_pair(4, seed=3)
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(108, 64), torch.nn.Tanh(), torch.nn.Linear(64, 108))
    net[1].requires_grad_(False)
    out = net(torch.cat([pw, pl])).reshape(8, 3, 6, 6)
    tw, tl = out[:4].detach() - (pw - tw), out[4:].detach() - (pl - tl)
    by_module = parameter_space_lambda(out[:4], tw, out[4:], tl, net, mu=0.1)
    by_list = parameter_space_lambda(out[:4], tw, out[4:], tl, list(net[3].parameters()), mu=0.1)
    torch.testing.assert_close(by_module, by_list, rtol=0, atol=0)
    assert 0.0 < float(by_module) < 1.0


class TinyDenoiser(torch.nn.Module):
    def __init__(self, dim=8, hidden=32):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, dim))

    def forward(self, x):
        return self.net(x)


def one_sgd_step(seed, safeguard, lr=1e-4, beta=1.0):
    """One DPO(+SDPO) step on one pair; returns the winner residual before and after."""
    torch.manual_seed(seed)
    policy = TinyDenoiser().double()
    ref = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():  # the policy has drifted from the reference a little, as during training
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x_w = torch.randn(1, 8, dtype=torch.float64)
    x_l = x_w + 0.3 * torch.randn(1, 8, dtype=torch.float64)
    noise = torch.randn(1, 8, dtype=torch.float64)
    pred = policy(torch.cat([x_w, x_l]))
    with torch.no_grad():
        ref_pred = ref(torch.cat([x_w, x_l]))
    cfg = preset("diffusion-dpo", beta=beta)
    lam = None
    if safeguard:
        cfg = cfg.with_safeguard(mu=0.1, space="parameter")
        lam = parameter_space_lambda(pred[:1], noise, pred[1:], noise, policy.parameters(), mu=0.1)
    out = preference_loss(
        cfg, policy_w=pred[:1], policy_l=pred[1:], ref_w=ref_pred[:1], ref_l=ref_pred[1:],
        target_w=noise, target_l=noise, loser_scale=lam,
    )
    before = float(residual(pred[:1].detach(), noise))
    out.loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            p.sub_(lr * p.grad)
        after = float(residual(policy(x_w), noise))
    return before, after


def test_exact_lambda_never_increases_the_winner_loss_while_dpo_sometimes_does():
    seeds = range(150)
    dpo_increase = sum(a > b + 1e-15 for b, a in (one_sgd_step(s, safeguard=False) for s in seeds))
    sdpo_increase = [s for s in seeds if (lambda b, a: a > b + 1e-15)(*one_sgd_step(s, safeguard=True))]
    assert dpo_increase >= 10, "plain DPO should raise the winner loss for a good share of these pairs"
    assert sdpo_increase == [], f"SDPO with the exact λ raised the winner loss for seeds {sdpo_increase}"


def test_safeguard_config_roundtrip():
    cfg = preset("diffusion-dpo").with_safeguard(mu=0.6, scope="sample")
    assert cfg.safeguard == SafeguardConfig(mu=0.6, scope="sample", space="output")
