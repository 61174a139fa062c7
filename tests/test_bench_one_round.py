"""bench/one_round.py: its variants are valid configs, a snapshot at step k is what a k-step run ships, the report."""

import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import one_round  # noqa: E402


def test_every_variant_resolves_and_evaluates_at_increasing_steps():
    for name, spec in one_round.VARIANTS.items():
        cfg = one_round.rounds_config(spec["set"])  # raises, naming the dotted field, if an override is bad
        assert cfg.rounds == 1, name
        assert spec["eval_at"] == sorted(set(spec["eval_at"])) and spec["eval_at"][0] >= 1, name


def test_a_snapshot_at_step_k_is_the_policy_a_k_step_run_publishes(tiny_pairs_dataset, tiny_train_config):
    from pipeline.data.schema import read_pairs
    from pipeline.training import PairData, train_in_process

    data = PairData.from_table(read_pairs(tiny_pairs_dataset / "pairs"))
    cfg = tiny_train_config(max_steps=99, log_every=1, torch_threads=1)
    snaps, metrics = one_round.train_and_snapshot(cfg, data, [1, 3], log=lambda _: None)
    assert sorted(snaps) == sorted(metrics) == [1, 3]
    for k in (1, 3):
        shipped = train_in_process(replace(cfg, max_steps=k), data).policy_weights()
        assert shipped.keys() == snaps[k].keys()
        assert all((shipped[n] == snaps[k][n]).all() for n in shipped), k
    assert any((snaps[1][n] != snaps[3][n]).any() for n in snaps[1])  # the weights moved between the two


def test_render_lists_each_evaluated_step_with_both_intervals():
    ci = lambda m, lo, hi: {"mean": m, "ci_low": lo, "ci_high": hi}  # noqa: E731
    point = {"step": 300, "train": {"implicit_acc": 0.7, "residual_w": 0.05, "ref_residual_w": 0.04},
             "heldout": {"delta_vs_ref": ci(0.05, 0.02, 0.08), "overall": ci(0.01, 0, 0.02),
                         "attributes": {"shape": ci(0.2, 0.1, 0.3)}, "drift": {"colour_entropy": ci(0.8, 0.7, 0.9)}},
             "validation": {"delta_vs_ref": ci(-0.01, -0.04, 0.02), "overall": ci(0.09, 0.05, 0.12)}}
    res = {"variant": "beta-2000", "overrides": ["train.objective.beta=2000"], "machine": "some CPU, 2 cores",
           "reference": {"heldout": {"reward": ci(0.35, 0.3, 0.4)}, "validation": {"reward": ci(0.6, 0.55, 0.65)}},
           "points": [point]}
    text = one_round.render([json.loads(json.dumps(res))])
    assert ("| beta-2000 | train.objective.beta=2000 | 300 | +0.050 [+0.020, +0.080] | -0.010 [-0.040, +0.020] "
            "| 0.010 | 0.090 | 0.200 | 0.800 | 0.700 | +0.010 |") in text
    assert "some CPU, 2 cores" in text and "validation reward 0.600 [0.550, 0.650]" in text


def test_ground_truth_pairs_are_renders_the_verifiable_reward_accepts():
    """The ground-truth variants' winners are renders of the toy:fit prompts with their own captions: the
    detector gives every one all four attributes; the losers are the same renders, shuffled."""
    from pipeline.toyworld import from_tensor, score
    from pipeline.toyworld.grammar import fit_specs

    data, manifest = one_round.ground_truth_pairs()
    n = len(fit_specs()) * one_round.GROUND_TRUTH_SEEDS
    assert len(data) == manifest["num_pairs"] == n and len(set(data.pair_ids)) == n
    assert score(from_tensor(data.x0_w), data.prompts).overall.all()
    assert not score(from_tensor(data.x0_l), data.prompts).overall.all()  # shuffled: most losers miss their prompt
    assert sorted(data.x0_l.flatten(1).sum(1).tolist()) == sorted(data.x0_w.flatten(1).sum(1).tolist())
