"""The human study's report: ``report.md`` (what a researcher reads), ``report.png`` and ``result.json``.

It renders the dict :func:`pipeline.human.aggregate.aggregate` returns and computes nothing new, so the
Markdown, the plot and the JSON always show the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from ..reporting import MISSING, fmt_ci, fmt_num, markdown_table
from ..stats import describe
from ..utils.atomic import atomic_write_bytes
from ..utils.plots import plot_preference


def _pct(v) -> str:
    return MISSING if v is None else f"{v:.0%}"


def _wtl(counts: Mapping, fractions: Mapping) -> str:
    """``55% / 14% / 31% (11 / 3 / 6)``: win / tie / loss of A."""
    keys = ("win", "tie", "loss")
    return " / ".join(_pct(fractions[k]) for k in keys) + " (" + " / ".join(str(counts[k]) for k in keys) + ")"


def _verdict(m: Mapping | None, a: str, b: str) -> str:
    """What the interval says against 0.5 (no preference)."""
    if m is None:
        return "no item was labelled, so there is no win rate"
    if m["ci_low"] > 0.5:
        return f"{a} is preferred"
    if m["ci_high"] < 0.5:
        return f"{b} is preferred"
    return "no clear preference (the interval includes 0.5)"


def _thresholds(t: Mapping) -> str:
    same = ("off" if t["max_same_side"] is None else
            f"the same screen side in at least {t['max_same_side']:g} of their left/right votes "
            f"(judged with at least {t['min_decisive']} such votes)")
    skip = "off" if t["max_skipped"] is None else f"more than {t['max_skipped']:g} of their items skipped or unanswered"
    return f"same-side check: {same}; skip check: {skip}"


def _headline(r: Mapping, a: str, b: str) -> list[str]:
    wr = r["win_rate"]
    lines = [f"**{a}** (A) vs **{b}** (B): win rate of {a} = **{fmt_ci(wr)}** — {_verdict(wr, a, b)}.", ""]
    lines.append(f"- Win / tie / loss of {a}: {_wtl(r['counts'], r['fractions'])} of {r['num_labelled']} "
                 f"labelled items, {r['num_prompts']} prompts.")
    lines.append(f"- Items without a label from any group (left out): {r['num_dropped']} of {r['num_items']}.")
    lines.append(f"- Interval: {describe()}; ties count ½.")
    return lines


def _groups(r: Mapping) -> list[str]:
    rows = [("all groups", len(r["annotators"]) - len(r["qc"]["excluded"]), r["num_labelled"], fmt_ci(r["win_rate"]),
             _wtl(r["counts"], r["fractions"]), fmt_num(r["kappa"]), r["n_items_kappa"])]
    for g, row in r["groups"].items():
        rows.append((f"group {int(g) + 1}", len(row["annotators"]), row["num_labelled"], fmt_ci(row["win_rate"]),
                     _wtl(row["counts"], row["fractions"]), fmt_num(row["kappa"]), row["n_items_kappa"]))
    cols = ("scope", "annotators (included)", "labelled items", "win rate of A [95% CI]", "W / T / L",
            "Fleiss' κ", "items for κ")
    note = "Each group's own labels (step 1 only); *all groups* is the final label (steps 1–2)."
    return ["## Groups", "", note, "", markdown_table(cols, rows)]


def _agreement(r: Mapping) -> list[str]:
    lines = ["## Agreement", "",
             f"Fleiss' κ over A / B / tie on the items where every included annotator of the scope gave a decisive "
             f"vote: {fmt_num(r['kappa'])} for all {r['n_raters_kappa']} included annotators together "
             f"({r['n_items_kappa']} items); per group in the table above. κ is – with fewer than 2 such items or "
             f"2 annotators, or when every vote is the same."]
    ra = r.get("reward_agreement")
    if ra is not None:
        lines += ["", f"Automatic reward: {_pct(ra['fraction'])} of the {ra['n_decisive']} decisive final labels "
                      f"prefer the system with the higher reward ({ra['n_equal_rewards']} items with equal rewards "
                      f"left out)."]
    return lines


def _qc(r: Mapping) -> list[str]:
    qc = r["qc"]
    lines = ["## Quality control", "", f"Exclusion rules — {_thresholds(qc['thresholds'])}.", ""]
    if not qc["flagged"]:
        return lines + ["No annotator was excluded."]
    rows = [(f["annotator"], f["group"] + 1, "; ".join(f["reasons"])) for f in qc["flagged"]]
    table = markdown_table(("annotator", "group", "reason"), rows)
    return lines + [f"Excluded before counting ({len(rows)}):", "", table]


def _annotators(r: Mapping) -> list[str]:
    def agree(a):
        return MISSING if a["fraction"] is None else f"{a['fraction']:.2f} ({a['n']})"

    rows = [(a["annotator"], a["group"] + 1, "excluded" if a["excluded"] else "included", a["assigned"], a["A"], a["B"],
             a["tie"], a["skipped"], a["unanswered"], fmt_num(a["left_fraction"], digits=2),
             agree(a["agreement_group"]), agree(a["agreement_final"])) for a in r["annotators"]]
    cols = ("annotator", "group", "status", "assigned", "A", "B", "tie", "skipped", "unanswered", "left fraction",
            "agrees with group label (items)", "agrees with final label (items)")
    return ["## Annotators", "", markdown_table(cols, rows), "",
            "Left fraction: share of their A/B votes given to the sample on the left of the screen. Agreement: share "
            "of their decisive votes equal to the label (their group's, or the final one)."]


def _protocol(a: str, b: str) -> list[str]:
    return ["## Protocol", "",
            f"Each item pairs a sample of {a} (A) and of {b} (B) for the same prompt and seed, and every group of "
            f"annotators judges every item as A, B, tie or skip. "
            "Before counting, annotators who chose the same screen side almost always or skipped many items are "
            "excluded (the rules are under Quality control). "
            "Within a group an item's label is the option with strictly the most decisive votes (a shared top is a "
            "tie), and across groups A or B wins an item only with a strict majority of the groups that labelled it, "
            "otherwise it is a tie. "
            "The win rate is the mean item score (A 1, tie ½, B 0) with a 95% bootstrap interval over prompts, and "
            "Fleiss' κ is computed on the items that every included annotator of the scope judged decisively."]


def _plot(r: Mapping, path: Path, a: str, b: str, title: str) -> None:
    labels = ["all groups"] + [f"group {int(g) + 1}" for g in r["groups"]]
    intervals = [r["win_rate"]] + [g["win_rate"] for g in r["groups"].values()]
    splits = [r["fractions"]] + [g["fractions"] for g in r["groups"].values()]
    plot_preference(labels, intervals, splits, path, a_name=a, b_name=b, title=title)


def write_report(result: dict, out_dir: Path, *, names: dict[str, str], title: str) -> Path:
    """Write ``report.md``, ``report.png`` and ``result.json`` into ``out_dir`` (each atomically) and return the
    Markdown's path. ``names`` gives the systems' names (``{"A": "round 2 policy", "B": "reference"}``)."""
    out_dir = Path(out_dir)
    a, b = names.get("A", "A"), names.get("B", "B")
    atomic_write_bytes(out_dir / "result.json",
                       (json.dumps({"title": title, "names": {"A": a, "B": b}, **result}, indent=2, allow_nan=False)
                        + "\n").encode())
    _plot(result, out_dir / "report.png", a, b, title)
    sections = [[f"# {title}", ""] + _headline(result, a, b) + ["", "![win rate and win / tie / loss](report.png)"],
                _groups(result), _agreement(result), _qc(result), _annotators(result), _protocol(a, b)]
    text = "\n\n".join("\n".join(s) for s in sections) + "\n"
    path = out_dir / "report.md"
    atomic_write_bytes(path, text.encode())
    return path
