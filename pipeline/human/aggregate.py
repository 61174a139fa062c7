"""From a study's votes to a win rate: the protocol of the SIPO paper's human study (appendix E).

Two systems ``A`` and ``B`` are compared on items (one prompt, one seed: A's sample against B's). Annotators
work in groups, and every group annotates every item. The rules, applied in this order:

1. *Quality control* (:class:`QualityControl`): an annotator who picks the same screen side almost always, or
   who skips (or leaves unanswered) many items, is excluded before anything is counted.
2. *Within a group*, per item: the label is the option (A, B or tie) with strictly the most decisive votes
   of the group's included annotators; a shared top is a tie; no decisive vote leaves the group without a
   label for that item (:func:`group_label`).
3. *Across groups*, per item: A (or B) when strictly more than half of the groups that labelled the item say
   so, otherwise a tie (:func:`cross_group_label`). Items no group labelled are dropped and counted.
4. The *win rate* of A is the mean item score (A 1, tie ½, B 0) with a bootstrap interval over prompts
   (:func:`pipeline.stats.mean_ci`), since items of one prompt are correlated. Fleiss' kappa measures the
   agreement per group and overall.

:func:`aggregate` takes the plain records :class:`~pipeline.human.store.StudyStore` returns (``votes()``,
``assignments()``, ``items()``), so the same code reads the app's votes and imported ones.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..stats import mean_ci

DECISIVE = ("A", "B", "tie")  # Fleiss' categories, in this order
CHOICES = DECISIVE + ("skip",)
SCORES = {"A": 1.0, "tie": 0.5, "B": 0.0}


@dataclass(frozen=True)
class QualityControl:
    """When an annotator is excluded. ``None`` turns a check off (see :meth:`off`).

    ``max_same_side``: excluded when the more frequent screen side reaches this fraction of the annotator's
    left/right votes (the system behind each side is randomised, so a careful annotator splits near ½), judged
    only with at least ``min_decisive`` such votes. ``max_skipped``: excluded when skipped plus unanswered
    items exceed this fraction of the items assigned."""

    max_same_side: float | None = 0.9
    min_decisive: int = 10
    max_skipped: float | None = 0.2

    @classmethod
    def off(cls) -> "QualityControl":
        """Checks that never trigger: to see what the exclusions change."""
        return cls(max_same_side=None, max_skipped=None)


# ---------------------------------------------------------------------------------------------- the rules
def group_label(counts: Mapping[str, int] | Iterable[str]) -> str | None:
    """One group's label of one item from its decisive vote counts (``{"A": 3, "B": 1}``, or the choices
    themselves): the option with strictly the most votes, ``"tie"`` for a shared top, None without any
    decisive vote. ``skip`` (and any other key) is ignored: it is no opinion."""
    if not isinstance(counts, Mapping):
        counts = Counter(counts)
    votes = {c: int(counts.get(c, 0)) for c in DECISIVE}
    top = max(votes.values())
    if top <= 0:
        return None
    leaders = [c for c, n in votes.items() if n == top]
    return leaders[0] if len(leaders) == 1 else "tie"


def cross_group_label(labels: Iterable[str | None]) -> str | None:
    """The final label of one item from its group labels: A or B with a strict majority of the groups that
    labelled it (None entries did not), else ``"tie"``; None when no group labelled it."""
    given = [lab for lab in labels if lab is not None]
    if not given:
        return None
    counts = Counter(given)
    for side in ("A", "B"):
        if counts[side] * 2 > len(given):
            return side
    return "tie"


# ---------------------------------------------------------------------------------------------- the inputs
@dataclass
class _Annotator:
    name: str
    group: int
    assigned: set = field(default_factory=set)
    votes: dict = field(default_factory=dict)  # item -> (choice, side)

    def decisive(self, item: str) -> str | None:
        choice = self.votes.get(item, (None, None))[0]
        return choice if choice in DECISIVE else None


def _collect(votes: Sequence[dict], assignments: Sequence[dict]) -> dict[str, _Annotator]:
    """Annotators in assignment order, each with its assigned items and votes. A voted item counts as
    assigned too (a vote can only exist for an assigned item in the store)."""
    people: dict[str, _Annotator] = {}

    def person(rec: dict) -> _Annotator:
        a = people.setdefault(rec["annotator"], _Annotator(rec["annotator"], rec["group"]))
        if a.group != rec["group"]:
            raise ValueError(f"annotator {a.name!r} appears in groups {a.group} and {rec['group']}")
        return a

    for rec in assignments:
        person(rec).assigned.add(rec["item"])
    for rec in votes:
        if rec["choice"] not in CHOICES:
            raise ValueError(f"vote of {rec['annotator']!r} on {rec['item']!r}: choice {rec['choice']!r} is not one "
                             f"of {list(CHOICES)}")
        a = person(rec)
        if rec["item"] in a.votes:
            raise ValueError(f"annotator {a.name!r} has two votes on item {rec['item']!r}")
        a.assigned.add(rec["item"])
        a.votes[rec["item"]] = (rec["choice"], rec.get("side"))
    return people


def _item_prompts(items: Sequence[dict] | None, assignments: Sequence[dict], votes: Sequence[dict]) -> dict[str, int]:
    """item key -> prompt index: from ``items`` when given (every item of the study, voted on or not), else
    from the assignments and votes."""
    if items is None:
        return {rec["item"]: rec["prompt_index"] for rec in (*assignments, *votes)}
    prompts = {it["item_key"]: it["prompt_index"] for it in items}
    unknown = sorted({rec["item"] for rec in (*assignments, *votes)} - set(prompts))
    if unknown:
        raise ValueError(f"{len(unknown)} voted or assigned items are not among the study's items "
                         f"(e.g. {unknown[0]!r}): votes and items from different studies?")
    return prompts


# ---------------------------------------------------------------------------------------------- quality control
def _annotator_stats(a: _Annotator) -> dict:
    choices = Counter(choice for choice, _ in a.votes.values())
    sides = Counter(side for _, side in a.votes.values() if side in ("left", "right"))
    lr = sides["left"] + sides["right"]
    assigned = len(a.assigned)
    unanswered = assigned - len(a.votes)
    return {"annotator": a.name, "group": a.group, "assigned": assigned, "votes": len(a.votes),
            "decisive": sum(choices[c] for c in DECISIVE), "A": choices["A"], "B": choices["B"],
            "tie": choices["tie"], "skipped": choices["skip"], "unanswered": unanswered,
            "left": sides["left"], "right": sides["right"], "left_right": lr,
            "left_fraction": sides["left"] / lr if lr else None,
            "skipped_fraction": (choices["skip"] + unanswered) / assigned if assigned else None}


def qc_reasons(stats: dict, qc: QualityControl) -> list[str]:
    """Why an annotator (their :func:`_annotator_stats` row) is excluded, in words with the numbers; empty
    when they pass."""
    reasons = []
    lr = stats["left_right"]
    if qc.max_same_side is not None and lr and lr >= qc.min_decisive:
        top, side = max((stats["left"], "left"), (stats["right"], "right"))
        if top / lr >= qc.max_same_side:
            reasons.append(f"same side almost always: {top} of {lr} left/right votes on the {side} "
                           f"({top / lr:.2f} ≥ {qc.max_same_side:g})")
    frac = stats["skipped_fraction"]
    if qc.max_skipped is not None and frac is not None and frac > qc.max_skipped:
        reasons.append(f"skips many items: {stats['skipped']} skipped + {stats['unanswered']} unanswered of "
                       f"{stats['assigned']} assigned ({frac:.2f} > {qc.max_skipped:g})")
    return reasons


# ---------------------------------------------------------------------------------------------- labels and scores
def _group_labels(members: Sequence[_Annotator], items: Iterable[str]) -> dict[str, str | None]:
    return {item: group_label(Counter(c for a in members if (c := a.decisive(item)) is not None)) for item in items}


def _win_rate(labels: Mapping[str, str | None], prompts: Mapping[str, int]) -> dict:
    """Win rate of A with its bootstrap interval over prompts, and the win/tie/loss split, of the labelled
    items. Prompts with unequal numbers of labelled items are averaged per prompt first (each prompt weighs
    the same), so the mean is then the mean of per-prompt win rates."""
    by_prompt: dict[int, list[float]] = defaultdict(list)
    for item, lab in labels.items():
        if lab is not None:
            by_prompt[prompts[item]].append(SCORES[lab])
    counts = Counter(lab for lab in labels.values() if lab is not None)
    n = sum(counts.values())
    split = {"win": counts["A"], "tie": counts["tie"], "loss": counts["B"]}
    out = {"num_labelled": n, "num_prompts": len(by_prompt), "counts": split,
           "fractions": {k: (v / n if n else None) for k, v in split.items()}, "win_rate": None}
    if n:
        rows = [by_prompt[p] for p in sorted(by_prompt)]
        equal = len({len(r) for r in rows}) == 1
        out["win_rate"] = mean_ci(np.array(rows) if equal else np.array([np.mean(r) for r in rows]))
    return out


def fleiss(ratings: Sequence[Sequence[str]]) -> float | None:
    """Fleiss' kappa of an (items, raters) table of decisive choices over the categories A/B/tie; None with
    fewer than 2 items or 2 raters, or when it is undefined (every rating in one category)."""
    from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

    if len(ratings) < 2 or len(ratings[0]) < 2:
        return None
    codes = np.array([[DECISIVE.index(c) for c in row] for row in ratings])
    table, _ = aggregate_raters(codes, n_cat=len(DECISIVE))
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = float(fleiss_kappa(table, method="fleiss"))
    return kappa if math.isfinite(kappa) else None


def _kappa(members: Sequence[_Annotator], items: Iterable[str]) -> dict:
    """Fleiss' kappa of ``members`` on the items where every one of them gave a decisive vote."""
    rows = [[a.decisive(item) for a in members] for item in items]
    rows = [r for r in rows if r and all(c is not None for c in r)]
    return {"kappa": fleiss(rows), "n_items_kappa": len(rows), "n_raters_kappa": len(members)}


def _agreement(a: _Annotator, labels: Mapping[str, str | None]) -> dict:
    """How often the annotator's decisive votes equal a label (over items with both)."""
    pairs = [(c, labels.get(item)) for item in a.votes if (c := a.decisive(item)) is not None]
    pairs = [(c, lab) for c, lab in pairs if lab is not None]
    return {"n": len(pairs), "fraction": (sum(c == lab for c, lab in pairs) / len(pairs)) if pairs else None}


def _reward_agreement(final: Mapping[str, str | None], items: Sequence[dict] | None) -> dict | None:
    """Share of decisive final labels (A or B) that prefer the system with the higher automatic reward;
    items with equal rewards are left out. None when no item carries both rewards."""
    rewarded = [it for it in items or () if it.get("reward_a") is not None and it.get("reward_b") is not None]
    if not rewarded:
        return None
    equal = [it for it in rewarded if it["reward_a"] == it["reward_b"]]
    pairs = [(final.get(it["item_key"]), "A" if it["reward_a"] > it["reward_b"] else "B")
             for it in rewarded if it["reward_a"] != it["reward_b"]]
    decisive = [(lab, pref) for lab, pref in pairs if lab in ("A", "B")]
    agree = sum(lab == pref for lab, pref in decisive)
    return {"n_items_with_rewards": len(rewarded), "n_equal_rewards": len(equal), "n_decisive": len(decisive),
            "n_agree": agree, "fraction": agree / len(decisive) if decisive else None}


# ---------------------------------------------------------------------------------------------- the whole study
def aggregate(votes: list[dict], assignments: list[dict], items: list[dict] | None = None,
              qc: QualityControl = QualityControl()) -> dict:
    """The study's result as a JSON-serialisable dict (see the module docstring for the rules).

    Keys: ``final_labels`` {item: A/B/tie, labelled items only}; ``win_rate`` {mean, ci_low, ci_high} (None
    without a labelled item); ``fractions`` and ``counts`` (win/tie/loss of A); ``groups`` {group: win rate,
    fractions, kappa, n_items_kappa, annotators, excluded}; ``kappa`` (all included annotators); ``qc``
    {thresholds, flagged, excluded}; ``annotators`` (one row each); ``num_items``, ``num_labelled``,
    ``num_dropped``; ``reward_agreement`` (None without automatic rewards); ``group_labels`` {group: {item:
    label or None}}."""
    people = _collect(votes, assignments)
    prompts = _item_prompts(items, assignments, votes)
    keys = list(prompts)

    stats = {name: _annotator_stats(a) for name, a in people.items()}
    flagged = [{"annotator": n, "group": s["group"], "reasons": r}
               for n, s in stats.items() if (r := qc_reasons(s, qc))]
    excluded = {f["annotator"] for f in flagged}
    included = [a for a in people.values() if a.name not in excluded]

    groups = sorted({a.group for a in people.values()})
    members = {g: [a for a in included if a.group == g] for g in groups}
    labels = {g: _group_labels(members[g], keys) for g in groups}
    final_all = {item: cross_group_label(labels[g][item] for g in groups) for item in keys}
    final = {item: lab for item, lab in final_all.items() if lab is not None}

    overall = _win_rate(final_all, prompts)
    group_rows = {}
    for g in groups:
        wr = _win_rate(labels[g], prompts)
        group_rows[str(g)] = {**wr, **_kappa(members[g], keys), "annotators": [a.name for a in members[g]],
                              "excluded": sorted(n for n in excluded if people[n].group == g)}

    table = []
    for name, a in people.items():
        table.append({**stats[name], "excluded": name in excluded,
                      "agreement_group": _agreement(a, labels[a.group]), "agreement_final": _agreement(a, final)})

    return {
        "final_labels": final,
        "win_rate": overall["win_rate"],
        "fractions": overall["fractions"],
        "counts": overall["counts"],
        "num_items": len(keys),
        "num_labelled": overall["num_labelled"],
        "num_dropped": len(keys) - overall["num_labelled"],
        "num_prompts": overall["num_prompts"],
        "groups": group_rows,
        **_kappa(included, keys),
        "qc": {"thresholds": asdict(qc), "flagged": flagged, "excluded": sorted(excluded)},
        "annotators": table,
        "reward_agreement": _reward_agreement(final, items),
        "group_labels": {str(g): labels[g] for g in groups},
    }


def aggregate_study(store) -> dict:
    """:func:`aggregate` of a study database (a :class:`.store.StudyStore`) with the quality-control thresholds the
    study was created with: what the report, the export and the admin route all read."""
    from ..config import build

    qc = build(QualityControl, store.meta()["config"].get("qc", {}))
    return aggregate(store.votes(), store.assignments(), store.items(), qc=qc)
