"""The human study's aggregation (pipeline/human/aggregate.py) against hand computations: the within- and
across-group rules, a small study's exact win rate, quality control, Fleiss' kappa, the bootstrap over
prompts, the reward agreement, and the written report. No Ray."""

import json

import numpy as np
import pytest

from pipeline import stats
from pipeline.human.aggregate import QualityControl, aggregate, cross_group_label, fleiss, group_label, qc_reasons
from pipeline.human.report import write_report
from pipeline.human.store import AnnotatorRecord, ItemRecord, SampleRecord, StudyStore, choice_to_side


def _study(plan: dict, prompts: dict, *, a_on_left=lambda item: True, rewards: dict | None = None):
    """Records as StudyStore returns them. ``plan``: {annotator: (group, {item: choice})}; every annotator is
    assigned every item of ``prompts`` ({item: prompt index}) and an item missing from their dict is unanswered."""
    items = [{"item_key": k, "prompt_index": p, "reward_a": (rewards or {}).get(k, (None, None))[0],
              "reward_b": (rewards or {}).get(k, (None, None))[1]} for k, p in prompts.items()]
    assignments, votes = [], []
    for name, (group, choices) in plan.items():
        for k, p in prompts.items():
            assignments.append({"annotator": name, "group": group, "item": k, "prompt_index": p})
            if k in choices:
                votes.append({"annotator": name, "group": group, "item": k, "prompt_index": p, "choice": choices[k],
                              "side": choice_to_side(choices[k], a_on_left(k))})
    return votes, assignments, items


# ---------------------------------------------------------------------------------------------- the rules
def test_group_label_is_a_strict_plurality_of_decisive_votes():
    assert group_label({"A": 3, "B": 1}) == "A"
    assert group_label({"A": 2, "B": 2}) == "tie"
    assert group_label({"A": 2, "B": 1, "tie": 1}) == "A"  # plurality, not majority
    assert group_label({"B": 2, "A": 1, "skip": 5}) == "B"  # skips are no opinion
    assert group_label({"tie": 2, "A": 1}) == "tie"  # a tie vote can lead too
    assert group_label({"A": 1, "tie": 1}) == "tie"  # shared top
    assert group_label({"skip": 4}) is None
    assert group_label({}) is None
    assert group_label(["A", "skip", "B", "A"]) == "A"  # the choices themselves


def test_cross_group_label_needs_a_strict_majority_of_labelling_groups():
    assert cross_group_label(["A", "A", "B"]) == "A"
    assert cross_group_label(["B", "tie", "B"]) == "B"
    assert cross_group_label(["A", "B", "tie"]) == "tie"
    assert cross_group_label(["A", "tie", "tie"]) == "tie"
    assert cross_group_label(["A", None, None]) == "A"  # only one group labelled: its label
    assert cross_group_label(["A", "B", None]) == "tie"  # 1 of 2 is not more than half
    assert cross_group_label(["A", "A", "B", "B"]) == "tie"
    assert cross_group_label([None, None, None]) is None


# ---------------------------------------------------------------------------------------------- a study by hand
HAND_PROMPTS = {"p0a": 0, "p0b": 0, "p1a": 1, "p1b": 1}
HAND_PLAN = {
    # group 0: p0a A, p0b tie (1–1), p1a none (both skip), p1b none
    "g0x": (0, {"p0a": "A", "p0b": "A", "p1a": "skip", "p1b": "skip"}),
    "g0y": (0, {"p0a": "A", "p0b": "B", "p1a": "skip"}),
    # group 1: p0a A (the skip does not count), p0b B, p1a B (one vote, one unanswered), p1b none
    "g1x": (1, {"p0a": "A", "p0b": "B", "p1a": "B", "p1b": "skip"}),
    "g1y": (1, {"p0a": "skip", "p0b": "B"}),
    # group 2: p0a B, p0b tie (B vs tie), p1a tie (A vs B), p1b none
    "g2x": (2, {"p0a": "B", "p0b": "B", "p1a": "A"}),
    "g2y": (2, {"p0a": "B", "p0b": "tie", "p1a": "B", "p1b": "skip"}),
}


def test_hand_computed_study():
    r = aggregate(*_study(HAND_PLAN, HAND_PROMPTS), qc=QualityControl.off())
    assert r["group_labels"] == {"0": {"p0a": "A", "p0b": "tie", "p1a": None, "p1b": None},
                                 "1": {"p0a": "A", "p0b": "B", "p1a": "B", "p1b": None},
                                 "2": {"p0a": "B", "p0b": "tie", "p1a": "tie", "p1b": None}}
    # p0a: A, A, B → A; p0b: tie, B, tie → tie; p1a: B, tie (group 0 has none) → tie; p1b: dropped
    assert r["final_labels"] == {"p0a": "A", "p0b": "tie", "p1a": "tie"}
    assert (r["num_items"], r["num_labelled"], r["num_dropped"], r["num_prompts"]) == (4, 3, 1, 2)
    assert r["counts"] == {"win": 1, "tie": 2, "loss": 0}
    assert r["fractions"] == pytest.approx({"win": 1 / 3, "tie": 2 / 3, "loss": 0.0})
    # prompt 0 has two labelled items, prompt 1 one: per prompt (1 + ½)/2 = 0.75 and 0.5, so 0.625 (not 2/3)
    assert r["win_rate"]["mean"] == pytest.approx(0.625)
    # two prompts: the percentile bootstrap's resampled means are 0.5, 0.625 and 0.75
    assert (r["win_rate"]["ci_low"], r["win_rate"]["ci_high"]) == pytest.approx((0.5, 0.75))
    # each group's own labels: group 0 only prompt 0 → (1 + ½)/2; group 1 (½·(1 + 0) + 0)/2; group 2 (¼ + ½)/2
    assert [r["groups"][g]["win_rate"]["mean"] for g in "012"] == pytest.approx([0.75, 0.25, 0.375])
    assert r["groups"]["1"]["counts"] == {"win": 1, "tie": 0, "loss": 2}
    assert r["qc"]["flagged"] == [] and r["qc"]["excluded"] == []
    json.dumps(r, allow_nan=False)  # serialisable as strict JSON


def test_annotator_table_counts_skips_unanswered_sides_and_agreement():
    r = aggregate(*_study(HAND_PLAN, HAND_PROMPTS, a_on_left=lambda k: k.endswith("a")), qc=QualityControl.off())
    row = {a["annotator"]: a for a in r["annotators"]}
    g1y = row["g1y"]
    assert (g1y["assigned"], g1y["votes"], g1y["decisive"], g1y["skipped"], g1y["unanswered"]) == (4, 2, 1, 1, 2)
    assert g1y["skipped_fraction"] == pytest.approx(3 / 4)
    # g2x: B on p0a (A left → right), B on p0b (A right → left), A on p1a (A left → left)
    assert (row["g2x"]["left"], row["g2x"]["right"]) == (2, 1)
    assert row["g2x"]["left_fraction"] == pytest.approx(2 / 3)
    # g2y votes B, tie, B against its group's B, tie, tie: 2 of 3; against the final A, tie, tie: 1 of 3
    assert row["g2y"]["agreement_group"] == {"n": 3, "fraction": pytest.approx(2 / 3)}
    assert row["g2y"]["agreement_final"] == {"n": 3, "fraction": pytest.approx(1 / 3)}


# ---------------------------------------------------------------------------------------------- quality control
QC_PROMPTS = {f"i{k}": k for k in range(12)}
QC_PLAN = {
    "good1": (0, {k: "A" for k in QC_PROMPTS}),
    "good2": (0, {k: "B" for k in QC_PROMPTS}),
    # A is on the left on even items: always clicking left gives A, B, A, B, …
    "lefty": (0, {k: "A" if int(k[1:]) % 2 == 0 else "B" for k in QC_PROMPTS}),
    # B on i0 and i1, skips i2–i5, leaves i6–i11 unanswered
    "skipper": (0, {"i0": "B", "i1": "B", **{f"i{k}": "skip" for k in range(2, 6)}}),
}


def _qc_study(**kw):
    return _study(QC_PLAN, QC_PROMPTS, a_on_left=lambda k: int(k[1:]) % 2 == 0, **kw)


def test_quality_control_excludes_the_always_left_and_the_skipping_annotator():
    r = aggregate(*_qc_study())
    reasons = {f["annotator"]: f["reasons"] for f in r["qc"]["flagged"]}
    assert set(reasons) == {"lefty", "skipper"} and r["qc"]["excluded"] == ["lefty", "skipper"]
    assert reasons["lefty"] == ["same side almost always: 12 of 12 left/right votes on the left (1.00 ≥ 0.9)"]
    assert reasons["skipper"] == ["skips many items: 4 skipped + 6 unanswered of 12 assigned (0.83 > 0.2)"]
    assert r["groups"]["0"]["annotators"] == ["good1", "good2"]
    assert r["groups"]["0"]["excluded"] == ["lefty", "skipper"]
    # good1 (A) against good2 (B) on every item: 1–1, all ties
    assert set(r["final_labels"].values()) == {"tie"} and len(r["final_labels"]) == 12
    assert r["win_rate"] == {"mean": 0.5, "ci_low": 0.5, "ci_high": 0.5}
    assert r["qc"]["thresholds"] == {"max_same_side": 0.9, "min_decisive": 10, "max_skipped": 0.2}


def test_without_quality_control_the_flagged_votes_change_the_labels():
    r = aggregate(*_qc_study(), qc=QualityControl.off())
    assert r["qc"]["flagged"] == []
    # i0: A, B, A, B → 2–2 tie; i1: A, B, B, B → B; later items follow lefty: A on even, B on odd (2–1)
    expected = {"i0": "tie", "i1": "B", **{f"i{k}": "A" if k % 2 == 0 else "B" for k in range(2, 12)}}
    assert r["final_labels"] == expected
    assert r["counts"] == {"win": 5, "tie": 1, "loss": 6}
    assert r["win_rate"]["mean"] == pytest.approx(5.5 / 12)


def test_quality_control_thresholds_are_inclusive_as_specified():
    votes, assignments, items = _qc_study()
    row = next(a for a in aggregate(votes, assignments, items)["annotators"] if a["annotator"] == "lefty")
    assert qc_reasons(row, QualityControl(min_decisive=13)) == []  # too few left/right votes to judge
    assert qc_reasons(row, QualityControl(max_same_side=1.0)) != []  # "≥": all 12 on one side reaches 1.0
    skipper = next(a for a in aggregate(votes, assignments, items)["annotators"] if a["annotator"] == "skipper")
    assert qc_reasons(skipper, QualityControl(max_skipped=10 / 12)) == []  # "more than": exactly at it passes
    assert len(qc_reasons(skipper, QualityControl(max_skipped=0.8))) == 1


# ---------------------------------------------------------------------------------------------- agreement
KAPPA_TABLE = [["A", "A", "A"], ["A", "A", "B"], ["B", "B", "B"], ["A", "B", "tie"]]
# counts (A, B, tie) per item: (3,0,0) (2,1,0) (0,3,0) (1,1,1); P_i = 1, 1/3, 1, 0 → P̄ = 7/12;
# p = (6/12, 5/12, 1/12) → P_e = (36 + 25 + 1)/144 = 31/72; κ = (7/12 − 31/72)/(1 − 31/72) = 11/41
KAPPA = 11 / 41


def test_fleiss_kappa_matches_the_hand_computation():
    assert fleiss(KAPPA_TABLE) == pytest.approx(KAPPA)
    assert fleiss(KAPPA_TABLE[:1]) is None  # one item
    assert fleiss([["A"], ["B"]]) is None  # one rater
    assert fleiss([["A", "A"], ["A", "A"]]) is None  # undefined: every vote the same


def test_kappa_uses_only_items_every_included_annotator_judged_decisively():
    prompts = {f"k{i}": i for i in range(6)}
    plan = {name: (0, {f"k{i}": row[j] for i, row in enumerate(KAPPA_TABLE)}) for j, name in enumerate("xyz")}
    plan["x"][1]["k4"] = "A"  # k4: y skips, z leaves it unanswered → not used
    plan["y"][1]["k4"] = "skip"
    plan["x"][1]["k5"] = "B"  # k5: y and z unanswered
    r = aggregate(*_study(plan, prompts), qc=QualityControl.off())
    assert r["groups"]["0"]["kappa"] == pytest.approx(KAPPA)
    assert r["groups"]["0"]["n_items_kappa"] == 4
    assert (r["kappa"], r["n_items_kappa"], r["n_raters_kappa"]) == (pytest.approx(KAPPA), 4, 3)


def test_overall_kappa_pools_the_groups_and_excluded_annotators_do_not_count():
    prompts = {f"k{i}": i for i in range(4)}
    column = lambda j: {k: row[j] for k, row in zip(prompts, KAPPA_TABLE)}  # noqa: E731
    plan = {"x": (0, column(0)), "y": (0, column(1)), "z": (1, column(2)), "w": (1, {"k0": "A"})}
    r = aggregate(*_study(plan, prompts), qc=QualityControl(max_skipped=0.5))  # w left 3 of 4 unanswered
    assert r["qc"]["excluded"] == ["w"]
    assert r["kappa"] == pytest.approx(KAPPA) and r["n_raters_kappa"] == 3
    assert r["groups"]["1"]["kappa"] is None  # one included rater


# ---------------------------------------------------------------------------------------------- interval and rewards
def _random_study(seed: int):
    rng = np.random.default_rng(seed)
    prompts = {f"p{p}s{s}": p for p in range(15) for s in range(2)}
    plan = {f"g{g}a{a}": (g, {k: str(rng.choice(["A", "B", "tie"], p=[0.55, 0.35, 0.1])) for k in prompts})
            for g in range(3) for a in range(4)}
    return _study(plan, prompts, a_on_left=lambda k: k.endswith("s0"))


def test_bootstrap_over_prompts_contains_the_mean_and_is_deterministic():
    data = _random_study(0)
    first, again = aggregate(*data, qc=QualityControl.off()), aggregate(*data, qc=QualityControl.off())
    wr = first["win_rate"]
    assert wr == again["win_rate"]
    assert wr["ci_low"] < wr["mean"] < wr["ci_high"] and 0.0 < wr["ci_low"] and wr["ci_high"] < 1.0
    # equal items per prompt: the interval is stats.mean_ci of the (prompts, items) score array
    scores = {"A": 1.0, "tie": 0.5, "B": 0.0}
    array = np.array([[scores[first["final_labels"][f"p{p}s{s}"]] for s in range(2)] for p in range(15)])
    assert wr == stats.mean_ci(array)
    for g in first["groups"].values():
        assert g["win_rate"]["ci_low"] <= g["win_rate"]["mean"] <= g["win_rate"]["ci_high"]


def test_reward_agreement_counts_decisive_labels_and_skips_equal_rewards():
    rewards = {k: (1.0, 0.0) for k in QC_PROMPTS} | {"i0": (0.3, 0.3), "i1": (0.2, 0.9)}
    r = aggregate(*_qc_study(rewards=rewards), qc=QualityControl.off())
    # decisive labels: A on i2, i4, …, i10 (5, reward agrees), B on i1 (reward prefers B: agrees) and on
    # i3, i5, …, i11 (5, reward prefers A: disagree); i0 has equal rewards
    ra = r["reward_agreement"]
    assert (ra["n_equal_rewards"], ra["n_decisive"], ra["n_agree"]) == (1, 11, 6)
    assert ra["fraction"] == pytest.approx(6 / 11)
    assert aggregate(*_qc_study(), qc=QualityControl.off())["reward_agreement"] is None


def test_inputs_from_another_study_or_with_unknown_choices_are_refused():
    votes, assignments, items = _qc_study()
    with pytest.raises(ValueError, match="not among the study's items"):
        aggregate(votes, assignments, items[:3])
    bad = [dict(votes[0], choice="left")]
    with pytest.raises(ValueError, match="choice 'left'"):
        aggregate(bad, assignments)


def test_records_read_from_a_study_store(tmp_path):
    """The keys aggregate reads are the ones StudyStore writes."""
    items = [ItemRecord(f"prompt {i}", i, SampleRecord("A", b"a", reward=1.0), SampleRecord("B", b"b", reward=0.0))
             for i in range(3)]
    people = [AnnotatorRecord(f"g{g}a{a}", g, None, order=[2, 0, 1], a_on_left=[True, False, True])
              for g in range(3) for a in range(2)]
    store = StudyStore.create(tmp_path / "study.sqlite", meta={}, items=items, annotators=people, admin_token="t")
    keys = [it["item_key"] for it in store.items()]
    for p in people:
        store.import_votes(p.name, [(keys[0], "A"), (keys[1], "B" if p.group_index else "A"), (keys[2], "skip")])
    r = aggregate(store.votes(), store.assignments(), store.items(), qc=QualityControl.off())
    # item 0: A everywhere; item 1: A in group 0, B in groups 1 and 2 → B; item 2: skipped by all → dropped
    assert r["final_labels"] == {keys[0]: "A", keys[1]: "B"}
    assert r["num_dropped"] == 1 and r["win_rate"]["mean"] == pytest.approx(0.5)
    assert r["reward_agreement"]["n_agree"] == 1


# ---------------------------------------------------------------------------------------------- the report
def test_report_files_name_both_systems_and_the_exclusions(tmp_path):
    r = aggregate(*_qc_study())
    path = write_report(r, tmp_path / "report", names={"A": "round 2 policy", "B": "reference"},
                        title="Human study: round 2")
    assert path == tmp_path / "report" / "report.md"
    md = path.read_text()
    assert md.startswith("# Human study: round 2\n")
    assert "**round 2 policy** (A) vs **reference** (B)" in md
    assert "0.500 [0.500, 0.500]" in md and "no clear preference" in md
    assert "| lefty | 1 | same side almost always: 12 of 12" in md  # groups are numbered from 1 for people
    assert "| skipper | 1 | skips many items: 4 skipped + 6 unanswered of 12 assigned" in md
    assert "| group 1 | 2 | 12 |" in md and "## Protocol" in md
    png = (tmp_path / "report" / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    saved = json.loads((tmp_path / "report" / "result.json").read_text())
    assert saved["names"] == {"A": "round 2 policy", "B": "reference"}
    assert saved["final_labels"] == r["final_labels"] and saved["qc"]["excluded"] == ["lefty", "skipper"]
