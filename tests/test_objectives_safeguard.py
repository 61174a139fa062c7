"""Diffusion-SDPO: λ against brute force, the plug-in's gradient surgery, and the winner-preserving guarantee."""

import copy

import pytest
import torch

from pipeline.objectives import (
    SafeguardConfig,
    output_space_lambda,
    parameter_lambda_method,
    parameter_space_lambda,
    parameter_space_lambda_jvp,
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


# ---------------------------------------------------------------------------------------------------------------
# Parameter-space λ by forward-mode AD (one extra backward + a JVP) against two backwards and brute force.


def tiny_unet():
    """A real diffusers UNet2DConditionModel, small: cross-attention (SDPA), group norm, up/down sampling."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(16, 32), layers_per_block=1,
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )


def unet_pairs(unet, sign, seed=0, b=2):
    """Noised winners/losers, their conditioning, and targets whose loser error is ``sign`` × the winner's (the
    parameter-space dot product follows the sign)."""
    g = torch.Generator().manual_seed(seed)
    x_w = torch.randn(b, 3, 8, 8, generator=g)
    x_l = x_w + 0.1 * torch.randn(x_w.shape, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    cond = torch.randn(b, 5, 16, generator=g)
    run = lambda x: unet(x, t, encoder_hidden_states=cond).sample  # noqa: E731
    with torch.no_grad():
        pw, pl = run(x_w), run(x_l)
    err = torch.randn(pw.shape, generator=g)
    return run, x_w, x_l, pw - err, pl - sign * 2.0 * err - 0.2 * torch.randn(pl.shape, generator=g)


def brute_force_dots(unet, run, x_w, x_l, tw, tl):
    """‖∇θL_w‖² and ⟨∇θL_w, ∇θL_l⟩ from explicit per-parameter gradients, in float64."""
    def grads(x, target):
        loss = 0.5 * (run(x) - target).pow(2).mean()
        return torch.autograd.grad(loss, list(unet.parameters()), allow_unused=True)

    ww = wl = 0.0
    for a, b in zip(grads(x_w, tw), grads(x_l, tl)):
        if a is not None:
            ww += float((a.double() * a.double()).sum())
            wl += 0.0 if b is None else float((a.double() * b.double()).sum())
    return ww, wl


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_jvp_lambda_equals_two_backward_and_brute_force_on_a_diffusers_unet(sign):
    unet = tiny_unet()
    run, x_w, x_l, tw, tl = unet_pairs(unet, sign)
    ww, wl = brute_force_dots(unet, run, x_w, x_l, tw, tl)
    assert (wl > 0) == (sign > 0), "the test data must give the dot product the intended sign"
    # A positive dot product: μ puts λ strictly inside (0, 1), where it is the ratio itself; a negative one: λ = 1.
    mu = min(max(1.0 - 0.5 * wl / ww, 0.0), 0.9) if sign > 0 else 0.5
    brute = 1.0 if wl <= 0 else min(max((1 - mu) * ww / wl, 0.0), 1.0)
    assert 0.0 < brute < 1.0 if sign > 0 else brute == 1.0

    pw, pl = run(x_w), run(x_l)
    lam_bwd = parameter_space_lambda(pw, tw, pl, tl, unet, mu=mu)
    pw = run(x_w)
    lam_jvp, pl_jvp = parameter_space_lambda_jvp(pw, tw, lambda: run(x_l), tl, unet, mu=mu, strict=True)
    assert lam_jvp.dtype == torch.float32 and lam_jvp.dim() == 0
    torch.testing.assert_close(float(lam_jvp), float(lam_bwd), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(float(lam_jvp), brute, rtol=1e-5, atol=1e-6)

    # The losers' prediction comes back attached: the same value and parameter gradient as a plain forward.
    torch.testing.assert_close(pl_jvp, pl, rtol=1e-5, atol=1e-5)
    unet.zero_grad()
    (pl_jvp * tl).sum().backward()
    via_jvp = [p.grad.clone() for p in unet.parameters()]
    unet.zero_grad()
    (pl * tl).sum().backward()
    scale = max(float(p.grad.abs().max()) for p in unet.parameters())
    assert max(float((a - p.grad).abs().max()) for a, p in zip(via_jvp, unet.parameters())) <= 1e-5 * scale


def test_jvp_lambda_counts_only_trainable_parameters_and_applies_the_residual_space():
    unet = tiny_unet()
    unet.down_blocks.requires_grad_(False)
    run, x_w, x_l, tw, tl = unet_pairs(unet, 1.0, seed=4)
    scale = lambda y: 3.0 * y - 1.0  # noqa: E731  (an affine residual space, as x̂0 is)
    pw, pl = run(x_w), run(x_l)
    lam_bwd = parameter_space_lambda(scale(pw), scale(tw), scale(pl), scale(tl), unet, mu=0.3)
    pw = run(x_w)
    lam_jvp, _ = parameter_space_lambda_jvp(scale(pw), scale(tw), lambda: run(x_l), scale(tl), unet, mu=0.3,
                                            space=scale, strict=True)
    torch.testing.assert_close(lam_jvp, lam_bwd, rtol=1e-5, atol=1e-6)


class _NoForwardAD(torch.autograd.Function):
    """tanh with a backward formula and no forward-mode one."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


def test_jvp_lambda_falls_back_to_a_second_backward_for_ops_without_forward_ad():
    torch.manual_seed(1)
    lin1, lin2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
    net = torch.nn.ModuleList([lin1, lin2])
    run = lambda x: lin2(_NoForwardAD.apply(lin1(x)))  # noqa: E731
    x_w, x_l = torch.randn(4, 8), torch.randn(4, 8)
    with torch.no_grad():
        tw, tl = run(x_w) - 0.3, run(x_l) - 0.5
    lam_bwd = parameter_space_lambda(run(x_w), tw, run(x_l), tl, net, mu=0.2)
    with pytest.raises(NotImplementedError):
        parameter_space_lambda_jvp(run(x_w), tw, lambda: run(x_l), tl, net, mu=0.2, strict=True)
    with pytest.warns(RuntimeWarning, match="second backward"):
        lam, pred_l = parameter_space_lambda_jvp(run(x_w), tw, lambda: run(x_l), tl, net, mu=0.2)
    torch.testing.assert_close(lam, lam_bwd, rtol=1e-5, atol=1e-6)
    assert pred_l.requires_grad


def test_parameter_lambda_method_resolution():
    net = torch.nn.Linear(2, 2)
    assert parameter_lambda_method(net) == "jvp" and parameter_lambda_method(net, "backward") == "backward"
    assert parameter_lambda_method(net, "jvp") == "jvp" and parameter_lambda_method(net, "split") == "split"
    assert parameter_lambda_method(net, checkpointed=True) == "split"  # forward AD cannot run through a recompute
    with pytest.raises(ValueError, match="activation checkpointing"):
        parameter_lambda_method(net, "jvp", checkpointed=True)
    with pytest.raises(ValueError, match="safeguard.method='fast'"):
        parameter_lambda_method(net, "fast")
    with pytest.raises(TypeError, match="needs the module"):
        parameter_space_lambda_jvp(torch.zeros(1, 2), torch.zeros(1, 2), lambda: torch.zeros(1, 2), torch.zeros(1, 2),
                                   list(net.parameters()), mu=0.1)


def _step_batch():
    from pipeline.toyworld import PromptSpec, render_batch, to_tensor
    from pipeline.training import PairBatch

    specs = [PromptSpec("red", "circle", 2, "left"), PromptSpec("blue", "square", 1, "top")]
    win = to_tensor(render_batch(specs, [0, 1], 32))
    lose = to_tensor(render_batch([s.replace(colour="green") for s in specs], [2, 3], 32))
    return PairBatch(win, lose, [s.text for s in specs], ["red circles on", "a square top"])


@pytest.mark.parametrize("name,prediction,residual_space", [
    ("diffusion-dpo", "epsilon", "model"), ("diffusion-dpo", "epsilon", "x0"), ("diffusion-dpo", "v_prediction", "model"),
    ("diffusion-dpo", "v_prediction", "x0"), ("ddspo", "epsilon", "model"), ("sipo", "v_prediction", "model"),
])
def test_preference_step_lambda_methods_give_the_same_lambda_loss_and_gradient(name, prediction, residual_space,
                                                                              tiny_toy_model_dir):
    """Through the product's step on the toy backbone: the default (the JVP; winners and losers as two forwards),
    the split method (one extra backward through each half) and the two-backward method agree on λ, the loss
    and every parameter gradient — for ε and v, residuals in model or x0 space, data targets and DDSPO's
    reference targets, with and without SIPO's weights."""
    from pipeline.backbones import UNetBackbone
    from pipeline.toyworld.reference import build_scheduler
    from pipeline.training import preference_step

    base = UNetBackbone.from_pretrained(tiny_toy_model_dir)
    bb = UNetBackbone(base.tokenizer, base.text_encoder, base.denoiser, build_scheduler(prediction).config)
    with bb.reference_module():  # take the reference copy now, then let the policy drift from it
        pass
    with torch.no_grad():
        for p in bb.denoiser.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cfg = preset(name, residual_space=residual_space).with_safeguard(mu=0.5, space="parameter")
    results = {}
    for method in ("auto", "split", "jvp", "backward"):
        bb.denoiser.zero_grad(set_to_none=True)
        out = preference_step(bb, cfg, _step_batch(), generator=torch.Generator().manual_seed(3), safeguard_method=method)
        out.loss.backward()
        results[method] = (out, [p.grad.clone() for p in bb.trainable_parameters()])
    b, gb = results["backward"]
    # "auto" is "jvp" on an unsharded model: the same computation, bit for bit
    assert torch.equal(results["auto"][0].loss, results["jvp"][0].loss)
    assert all(torch.equal(x, y) for x, y in zip(results["auto"][1], results["jvp"][1]))
    # Two forwards of 2 instead of one of 4 round differently in fp32, and β = 5000 magnifies the residuals'
    # difference in the logit (x̂0 residuals divide by √ᾱ_t, more so): the loss and gradients agree to 1e-3
    # (1e-2 for x̂0 residuals; the rounding depends on the machine's thread count), λ (a ratio of sums) to 1e-5.
    tol = 1e-2 if residual_space == "x0" else 1e-3
    scale = max(float(g.abs().max()) for g in gb)
    for method in ("split", "jvp"):
        a, ga = results[method]
        torch.testing.assert_close(a.loser_scale, b.loser_scale, rtol=1e-5, atol=1e-6, msg=method)
        torch.testing.assert_close(a.loss, b.loss, rtol=tol, atol=0, msg=method)
        assert max(float((x - y).abs().max()) for x, y in zip(ga, gb)) <= tol * scale, method
    assert 0.0 < float(b.loser_scale) <= 1.0
