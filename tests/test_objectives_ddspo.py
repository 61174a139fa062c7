"""DDSPO targets and the efficient (no negative image) variants."""

import pytest
import torch

from pipeline.objectives import LoserSource, ddspo_targets, derangement, preference_loss, preset, residual


def test_ddspo_targets_follow_eq_7():
    g = torch.Generator().manual_seed(0)
    ref_w_c, ref_l_c, ref_l_cm = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(3))
    tg = ddspo_targets(ref_w_c, ref_l_c, ref_l_cm)
    assert torch.equal(tg.target_w, ref_w_c) and torch.equal(tg.ref_w, ref_w_c)
    assert torch.equal(tg.target_l, ref_l_cm) and torch.equal(tg.ref_l, ref_l_c)
    assert float(residual(tg.ref_w, tg.target_w).abs().max()) == 0.0  # winner term is pure distillation

    # The policy equal to the reference is the DPO fixed point: z = 0 and loss = log 2.
    pol_w, pol_l = ref_w_c.clone().requires_grad_(), ref_l_c.clone().requires_grad_()
    out = preference_loss(preset("ddspo"), policy_w=pol_w, policy_l=pol_l, **vars(tg))
    torch.testing.assert_close(out.loss, torch.log(torch.tensor(2.0)))

    # A gradient step moves the policy's loser prediction away from the degraded score ε_ref(x_l, c⁻)
    # and keeps the winner on the reference's score under c.
    g_w, g_l = torch.autograd.grad(out.loss, [pol_w, pol_l])
    moved_l = pol_l.detach() - 1e-3 * g_l
    assert bool((residual(moved_l, ref_l_cm) > residual(pol_l.detach(), ref_l_cm)).all())
    assert float(g_w.abs().max()) == 0.0  # at the fixed point the winner residual is already minimal


@pytest.mark.parametrize("n", [2, 3, 5, 16, 64])
def test_derangement_has_no_fixed_point(n):
    for seed in range(50):
        perm = derangement(n, generator=torch.Generator().manual_seed(seed))
        assert sorted(perm.tolist()) == list(range(n))
        assert bool((perm != torch.arange(n)).all())


def test_derangement_is_random_and_validates():
    counts = torch.zeros(5, 5)
    for s in range(2000):
        perm = derangement(5, generator=torch.Generator().manual_seed(s))
        counts[torch.arange(5), perm] += 1
    # Each pair borrows its loser from a uniformly random *other* pair: 2000/4 = 500 per off-diagonal cell.
    off = counts[~torch.eye(5, dtype=torch.bool)]
    assert float(counts.diag().sum()) == 0 and float((off - 500).abs().max()) < 100
    with pytest.raises(ValueError, match="at least 2 pairs"):
        derangement(1)
    assert {s.value for s in LoserSource} == {"paired", "rand-positive", "not-paired"}
