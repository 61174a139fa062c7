"""Reporting, written once: numbers and intervals as text, tables as Markdown and CSV.

Every report (the rounds' ``summary.md``, the sweep's ``results.md``, ``bench/claims.py``'s
``docs/results.md``) formats an interval ``{"mean", "ci_low", "ci_high"}`` with :func:`fmt_ci` —
``0.358 [0.324, 0.395]``, or signed for differences, ``+0.109 [+0.054, +0.171]`` — and a table with
:func:`markdown_table`. A missing value prints as ``–``. Plots live in :mod:`.utils.plots`; videos are shown as
frame strips, one row per clip, groups side by side (:func:`frame_strip_grid`: a video evaluation's grid and the
rounds' paired grid of reference vs policy on the same seeds).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
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


# ------------------------------------------------------------------------------------------- frame-strip grids
#: pixels above the grid for the groups' titles, and the label margin's padding either side of the text
STRIP_HEADER, STRIP_LABEL_PAD = 14, 6


@dataclass(frozen=True)
class StripGrid:
    """What :func:`frame_strip_grid` drew: ``rows`` × ``columns`` cells (frames and the blank separators) of
    ``cell`` = (height, width) pixels after scaling, ``padding`` pixels apart, the grid's top-left corner at
    ``origin`` = (x, y), and the PNG's ``size`` = (width, height)."""

    rows: int
    columns: int
    cell: tuple[int, int]
    padding: int
    origin: tuple[int, int]
    size: tuple[int, int]


def strip_grid_geometry(rows: int, frames: int, groups: int, height: int, width: int, *, scale: int = 2,
                        label_width: int = 0) -> StripGrid:
    """The layout :func:`frame_strip_grid` uses for ``groups`` clips of ``frames`` frames of ``height`` × ``width``
    per row (``label_width``: the measured label margin). ``torchvision.utils.make_grid`` puts ``padding`` pixels
    around every cell: a grid of c columns is ``c·(w + p) + p`` wide."""
    pad = max(1, height // 16)
    columns = groups * frames + groups - 1  # a blank frame between the groups
    grid_w, grid_h = scale * (columns * (width + pad) + pad), scale * (rows * (height + pad) + pad)
    return StripGrid(rows=rows, columns=columns, cell=(scale * height, scale * width), padding=scale * pad,
                     origin=(label_width, STRIP_HEADER), size=(label_width + grid_w, STRIP_HEADER + grid_h))


def frame_strip_grid(groups: Sequence[Any], row_labels: Sequence[str], path, *, titles: Sequence[str] = (),
                     scale: int = 2) -> StripGrid:
    """Videos as frame strips, one row per clip: row r shows clip r of every group left to right (its frames in
    order, a blank frame between the groups), labelled with ``row_labels[r]``; ``titles`` name the groups above
    the grid (e.g. reference | policy on the same seeds). ``groups``: uint8 ``(rows, F, H, W, 3)`` arrays of one
    shape. Built with ``torchvision.utils.make_grid``, scaled ``scale``× (nearest), labels drawn with PIL; the
    PNG's size is :func:`strip_grid_geometry`'s. Returns the geometry."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    from .utils.atomic import atomic_write_bytes

    clips = [torch.as_tensor(np.ascontiguousarray(g)) for g in groups]
    if not clips or any(c.shape != clips[0].shape for c in clips) or clips[0].ndim != 5 or clips[0].shape[-1] != 3:
        raise ValueError(f"frame_strip_grid: expected groups of uint8 (rows, F, H, W, 3) clips of one shape, got "
                         f"{[tuple(c.shape) for c in clips]}")
    rows, frames, h, w, _ = clips[0].shape
    if len(row_labels) != rows or (titles and len(titles) != len(clips)):
        raise ValueError(f"frame_strip_grid: {rows} rows, {len(row_labels)} labels, {len(clips)} groups, "
                         f"{len(titles)} titles")
    cells = []
    for i, c in enumerate(clips):
        if i:
            cells.append(torch.ones(rows, 1, 3, h, w))
        cells.append(c.permute(0, 1, 4, 2, 3).float() / 255.0)  # (rows, F, 3, H, W)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = 2 * STRIP_LABEL_PAD + max([int(np.ceil(measure.textlength(str(t), font=font))) for t in row_labels]
                                            + [0])
    geo = strip_grid_geometry(rows, frames, len(clips), h, w, scale=scale, label_width=label_width)
    grid = make_grid(torch.cat(cells, dim=1).reshape(-1, 3, h, w), nrow=geo.columns, padding=geo.padding // scale,
                     pad_value=1.0)
    img = Image.fromarray((grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    canvas = Image.new("RGB", geo.size, "white")
    canvas.paste(img, geo.origin)
    draw = ImageDraw.Draw(canvas)
    step_x, step_y = geo.cell[1] + geo.padding, geo.cell[0] + geo.padding
    for i, title in enumerate(titles):  # centred over the group's frames
        x0 = geo.origin[0] + geo.padding + i * (frames + 1) * step_x
        x = x0 + (frames * step_x - measure.textlength(str(title), font=font)) / 2
        draw.text((x, 2), str(title), fill="black", font=font)
    for r, label in enumerate(row_labels):
        y = geo.origin[1] + geo.padding + r * step_y + geo.cell[0] / 2 - 5
        draw.text((STRIP_LABEL_PAD, y), str(label), fill="black", font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return geo
