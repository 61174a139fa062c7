"""pipeline/stats.py against hand computations: paired Δ, win rate with ties, t intervals, verdicts, the bootstrap."""

import math

import numpy as np
import pytest

from pipeline import stats


def test_paired_delta_is_the_mean_of_per_prompt_differences():
    policy = np.array([[0.5, 1.0], [0.25, 0.25], [1.0, 0.0]])
    reference = np.array([[0.25, 0.5], [0.25, 0.0], [0.5, 0.5]])
    # per prompt: (0.25 + 0.5)/2 = 0.375, (0 + 0.25)/2 = 0.125, (0.5 − 0.5)/2 = 0 → mean 0.5/3
    d = stats.paired_delta(policy, reference)
    assert d["mean"] == pytest.approx(0.5 / 3)
    assert d["ci_low"] <= d["mean"] <= d["ci_high"]
    assert 0.0 <= d["ci_low"] and d["ci_high"] <= 0.375  # inside the range of the per-prompt differences
    assert set(d) == {"mean", "ci_low", "ci_high"}
    assert stats.paired_delta(reference, reference) == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    with pytest.raises(ValueError, match="not the same samples"):
        stats.paired_delta(policy, reference[:2])


def test_pairing_removes_the_shared_prompt_variance():
    rng = np.random.default_rng(0)
    reference = rng.uniform(0, 1, size=(48, 4))  # prompts differ a lot in difficulty
    policy = reference + 0.03 + rng.normal(0, 0.01, size=reference.shape)
    d = stats.paired_delta(policy, reference)
    assert d["mean"] == pytest.approx((policy - reference).mean())
    assert d["mean"] == pytest.approx(0.03, abs=0.005)
    assert 0.0 < d["ci_low"] < 0.03 < d["ci_high"]
    unpaired = stats.mean_ci(policy)
    assert d["ci_high"] - d["ci_low"] < 0.2 * (unpaired["ci_high"] - unpaired["ci_low"])
    # the unpaired intervals of the two models overlap: only the paired one shows the gain
    ref_ci = stats.mean_ci(reference)
    assert unpaired["ci_low"] < ref_ci["ci_high"]


def test_paired_over_seeds_averages_seeds_per_prompt():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, size=(40, 2))
    d = stats.paired_over_seeds([base + 0.05, base + 0.07], base)
    assert d["mean"] == pytest.approx(0.06)
    assert d["per_seed"] == pytest.approx([0.05, 0.07])
    assert d["ci_low"] == pytest.approx(0.06) and d["ci_high"] == pytest.approx(0.06)  # no noise left after pairing
    two = stats.paired_over_seeds([base + 0.1, base], [base, base + 0.1])  # one baseline per seed
    assert two["mean"] == pytest.approx(0.0) and two["per_seed"] == pytest.approx([0.1, -0.1])


def test_win_rate_counts_ties_half():
    policy = np.array([[1.0, 0.5], [0.2, 0.7]])
    reference = np.array([[0.5, 0.5], [0.3, 0.7]])
    # win, tie, loss, tie → (1 + 0.5 + 0 + 0.5) / 4
    assert stats.win_rate(policy, reference) == pytest.approx(0.5)
    assert stats.win_rate(reference + 1, reference) == 1.0 and stats.win_rate(reference, reference) == 0.5
    w = stats.win_rate_ci(policy, reference)
    assert w["mean"] == pytest.approx(0.5) and w["ci_low"] <= 0.5 <= w["ci_high"]  # per prompt 0.75 and 0.25


def test_t_interval_matches_the_hand_formula():
    values = [1.0, 2.0, 4.0]
    mean, s = 7 / 3, math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    half = 4.302652729911275 * s / math.sqrt(3)  # t_{0.975, 2 dof}
    t = stats.t_interval(values)
    assert t["mean"] == pytest.approx(mean)
    assert t["ci_low"] == pytest.approx(mean - half) and t["ci_high"] == pytest.approx(mean + half)
    assert t["per_seed"] == values
    one = stats.t_interval([0.3])
    assert one["mean"] == 0.3 and math.isnan(one["ci_low"]) and math.isnan(one["ci_high"])
    mean_, lo, hi = stats.t_band([[1.0, 0.0], [2.0, 0.0], [4.0, 0.0]])
    assert mean_[0] == pytest.approx(mean) and lo[0] == pytest.approx(mean - half) and hi[1] == 0.0


def test_verdict_follows_the_interval_and_the_claimed_direction():
    assert stats.verdict({"ci_low": 0.01, "ci_high": 0.2}, +1) == "reproduces"
    assert stats.verdict({"ci_low": 0.01, "ci_high": 0.2}, -1) == "contradicted"
    assert stats.verdict({"ci_low": -0.2, "ci_high": -0.01}, -1) == "reproduces"
    assert stats.verdict({"ci_low": -0.2, "ci_high": -0.01}, +1) == "contradicted"
    assert stats.verdict({"ci_low": -0.01, "ci_high": 0.2}, +1) == "inconclusive"
    assert stats.verdict({"ci_low": 0.0, "ci_high": 0.2}, +1) == "inconclusive"  # touching 0 does not exclude it
    assert stats.verdict({"ci_low": float("nan"), "ci_high": float("nan")}, +1) == "inconclusive"
    with pytest.raises(ValueError, match="direction"):
        stats.verdict({"ci_low": 0.1, "ci_high": 0.2}, 0)


def test_bootstrap_ci_contains_the_mean_and_is_deterministic():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.5, 0.1, size=(10, 4)), rng.normal(0.5, 0.1, size=(400, 4))
    lo, hi = stats.bootstrap_ci(small)
    assert lo < small.mean() < hi
    assert stats.bootstrap_ci(small) == (lo, hi)  # fixed seed: the same interval every time
    assert stats.bootstrap_ci(small, seed=1) != (lo, hi)
    lo2, hi2 = stats.bootstrap_ci(large)
    assert hi2 - lo2 < (hi - lo) / 3  # ~√40 narrower
    # rows are prompts: a (prompts, samples) array is the same as its row means
    assert stats.bootstrap_ci(small) == stats.bootstrap_ci(small.mean(1))
    # about 1.96 standard errors of the mean on each side
    se = small.mean(1).std(ddof=1) / math.sqrt(10)
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.3)
    bca = stats.bootstrap_ci(small, method="BCa")
    assert bca[0] < small.mean() < bca[1]
    assert stats.bootstrap_ci(np.full((5, 2), 0.25)) == (0.25, 0.25)
    assert stats.mean_ci(np.array([[0.7, 0.3]])) == {"mean": 0.5, "ci_low": 0.5, "ci_high": 0.5}
    assert "bootstrap over prompts" in stats.describe()
