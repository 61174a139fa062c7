"""bench/rounds.py: the computed "compounds" verdict, the round-0 reuse between variants and the report."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import rounds as bench_rounds  # noqa: E402


def ci(mean, low, high):
    return {"mean": mean, "ci_low": low, "ci_high": high}


def rows(*steps):
    """A reference row and one row per round: (Δ vs previous, Δ vs reference with its interval)."""
    out = [{"round": "reference", "reward": ci(0.35, 0.3, 0.4), "delta_vs_ref": ci(0, 0, 0), "delta_vs_prev": None,
            "overall": ci(0, 0, 0)}]
    for k, (prev, ref) in enumerate(steps):
        out.append({"round": f"round {k}", "reward": ci(0.35 + ref[0], 0.3, 0.5), "delta_vs_ref": ci(*ref),
                    "delta_vs_prev": ci(prev, prev - 0.03, prev + 0.03), "overall": ci(0.01 * k, 0, 0.02)})
    return out


def test_compounds_needs_every_round_up_and_the_final_interval_above_round_0():
    good = rows((0.05, (0.05, 0.02, 0.08)), (0.03, (0.08, 0.06, 0.11)), (0.02, (0.10, 0.07, 0.13)))
    assert bench_rounds.compounds(good)["compounds"]
    dip = rows((0.05, (0.05, 0.02, 0.08)), (-0.01, (0.04, 0.01, 0.07)), (0.08, (0.12, 0.09, 0.15)))
    v = bench_rounds.compounds(dip)
    assert not v["compounds"] and not v["every_round_rises"] and v["final_above_round0"]
    flat = rows((0.05, (0.05, 0.02, 0.08)), (0.001, (0.051, 0.01, 0.09)))
    v = bench_rounds.compounds(flat)
    assert not v["compounds"] and v["every_round_rises"] and not v["final_above_round0"]
    assert not bench_rounds.compounds(rows((0.05, (0.05, 0.02, 0.08))))["compounds"]  # one round cannot compound


def test_round0_is_copied_from_the_base_variant_only(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_rounds, "WORK", tmp_path)
    base = tmp_path / "beta-2000"
    for part in ("reference_eval", "round_0"):
        (base / part).mkdir(parents=True)
        (base / part / "eval.json").write_text(part)
    assert not bench_rounds._reuse_round0("beta-2000-refresh")  # the base's round 0 is not finished
    (base / "round_0" / "_COMPLETE").write_text("")
    assert not bench_rounds._reuse_round0("anchor")  # acts in round 0: never copied
    assert bench_rounds._reuse_round0("beta-2000-refresh")
    assert (tmp_path / "beta-2000-refresh" / "round_0" / "eval.json").read_text() == "round_0"
    assert not bench_rounds._reuse_round0("beta-2000-refresh")  # already there: left alone
    assert not (tmp_path / "refresh").exists()  # its base (baseline) has not run


def test_every_variant_resolves_to_a_valid_config_and_reused_bases_exist():
    from pipeline.config import apply_overrides, build
    from pipeline.recipes import recipe
    from pipeline.rounds import RoundsConfig

    for name, overrides in bench_rounds.VARIANTS.items():
        cfg = build(RoundsConfig, apply_overrides(recipe("toy-one-round"), ["rounds=3", *overrides]))  # raises if bad
        assert cfg.rounds == 3, name
    assert set(bench_rounds.ROUND0_FROM.values()) <= set(bench_rounds.VARIANTS)
    assert set(bench_rounds.ROUND0_FROM) <= set(bench_rounds.VARIANTS)


def test_render_reports_each_variant_and_the_verdict():
    good = rows((0.05, (0.05, 0.02, 0.08)), (0.03, (0.08, 0.06, 0.11)))
    res = {"variant": "beta-2000-refresh", "overrides": ["rounds=2", "reference=refresh"], "seconds": 600,
           "round0_from_baseline": True, "rows": good, "pairs": [{"num_pairs": 660}, {"num_pairs": 650}]}
    text = bench_rounds.render([json.loads(json.dumps(res))])
    assert "## beta-2000-refresh" in text and "round 0 copied from beta-2000" in text
    assert "| beta-2000-refresh | reference=refresh | +0.080 [+0.060, +0.110] |" in text
    assert "compounds: yes" in text and "10.0 min" in text


def test_a_run_stopped_early_is_reported_as_such(tmp_path, monkeypatch):
    """A variant's run killed before its last round has no bench record: the report says how many of the rounds
    it asked for it ran, from its run_config.json, and shows no wall time rather than a zero."""
    monkeypatch.setattr(bench_rounds, "WORK", tmp_path)
    run = tmp_path / "anchor"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"config": {"rounds": 3}}))
    (run / "summary.json").write_text(json.dumps(rows((0.05, (0.05, 0.02, 0.08)))))
    res = bench_rounds.collect("anchor")
    assert res["note"] == "stopped after 1 of 3 rounds" and res["overrides"][0] == "rounds=3" and "seconds" not in res
    text = bench_rounds.render([json.loads(json.dumps(res))])
    assert "wall time not recorded; stopped after 1 of 3 rounds" in text
    assert "| anchor | train.objective.anchor=20000 | +0.050 [+0.020, +0.080] | 0.000 | no | – |" in text
