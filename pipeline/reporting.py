"""Reporting, written once: numbers and intervals as text, tables as Markdown and CSV.

Every report (the rounds' ``summary.md``, the sweep's ``results.md``, ``bench/claims.py``'s
``docs/results.md``) formats an interval ``{"mean", "ci_low", "ci_high"}`` with :func:`fmt_ci` —
``0.358 [0.324, 0.395]``, or signed for differences, ``+0.109 [+0.054, +0.171]`` — and a table with
:func:`markdown_table`. A missing value prints as ``–``. Plots live in :mod:`.utils.plots`.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Iterable, Mapping, Sequence

MISSING = "–"


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def fmt_num(v, *, digits: int = 3, signed: bool = False) -> str:
    """``0.358`` (``+0.109`` signed); a count as itself (``724``); ``–`` for None or NaN."""
    if _missing(v):
        return MISSING
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:{'+' if signed else ''}d}"
    return f"{float(v):{'+' if signed else ''}.{digits}f}"


def fmt_ci(m: Mapping | None, *, signed: bool = False, digits: int = 3) -> str:
    """An interval as ``0.358 [0.324, 0.395]`` (``signed``: ``+0.109 [+0.054, +0.171]``); ``–`` for None or a
    missing mean."""
    if m is None or _missing(m.get("mean")):
        return MISSING
    f = lambda v: fmt_num(v, digits=digits, signed=signed)  # noqa: E731
    return f"{f(m['mean'])} [{f(m.get('ci_low'))}, {f(m.get('ci_high'))}]"


def _cell(v: Any) -> str:
    if _missing(v):
        return MISSING
    if isinstance(v, float):
        return fmt_num(v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (no trailing newline): a header row, ``|---|`` separators, one line per row. Cells
    are ``str()``-ed as they are (format them first); floats get 3 decimals, None/NaN ``–``; a ``|`` inside a
    cell is escaped."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        r = list(r)
        if len(r) != len(columns):
            raise ValueError(f"markdown_table: a row has {len(r)} cells for {len(columns)} columns: {r!r}")
        lines.append("| " + " | ".join(_cell(c) for c in r) + " |")
    return "\n".join(lines)


def csv_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """CSV text with a header of ``columns``; one line per row mapping (missing keys are empty, unknown keys
    are left out)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow(dict(r))
    return buf.getvalue()


def legend(entries: Mapping[str, str]) -> str:
    """A Markdown bullet list ``- **name**: meaning`` explaining a table's columns."""
    return "\n".join(f"- **{k}**: {v}" for k, v in entries.items())
