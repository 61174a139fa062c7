"""Plots written to run directories (headless matplotlib, atomic PNG writes)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .atomic import atomic_write_bytes  # noqa: E402


def plot_curves(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *,
                xlabel: str = "step", ylabel: str = "", title: str = "") -> None:
    """One line per named (x, y) series on shared axes, saved as PNG."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for name, (x, y) in series.items():
        ax.plot(list(x), list(y), label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def save_labelled_grid(images, row_labels: Sequence[str], ncols: int, path: str | Path, *,
                       scores=None, scale: float = 0.9) -> None:
    """A grid of uint8 NHWC images, one labelled row per prompt (optionally the reward under each image)."""
    rows = len(row_labels)
    fig, axes = plt.subplots(rows, ncols, figsize=(ncols * scale + 2.6, rows * scale), dpi=110, squeeze=False)
    for r in range(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.imshow(images[r * ncols + c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if scores is not None:
                ax.set_xlabel(f"{float(scores[r][c]):.2f}", fontsize=6, labelpad=1)
        axes[r][0].set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout(pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_scatter_panels(panels: Mapping[str, Mapping[str, Sequence]], path: str | Path, *, ylabel: str = "",
                        title: str = "", band: tuple[float, float, float] | None = None, band_label: str = "",
                        log_x: Sequence[str] = ()) -> None:
    """One panel per name, sharing the y axis: points ``x``, ``y`` with error bars from ``lo`` to ``hi``;
    points flagged in ``hollow`` are drawn unfilled. ``band`` = (centre, low, high) is drawn in every panel
    as a line with a shaded interval (e.g. a baseline's mean and confidence interval)."""
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 0.6, 3.4), dpi=120, sharey=True, squeeze=False)
    for ax, (name, p) in zip(axes[0], panels.items()):
        if band is not None:
            ax.axhline(band[0], color="grey", lw=1, ls="--", label=band_label or None)
            ax.axhspan(band[1], band[2], color="grey", alpha=0.15)
        hollow = list(p.get("hollow", [False] * len(p["x"])))
        for flag, marker_face, label in ((False, "C0", p.get("label", "")), (True, "none", p.get("hollow_label", ""))):
            idx = [i for i, h in enumerate(hollow) if bool(h) == flag]
            if not idx:
                continue
            x = [p["x"][i] for i in idx]
            y = [p["y"][i] for i in idx]
            err = [[y[j] - p["lo"][i] for j, i in enumerate(idx)], [p["hi"][i] - y[j] for j, i in enumerate(idx)]]
            ax.errorbar(x, y, yerr=err, fmt="o", color="C0", mfc=marker_face, capsize=3, lw=1, label=label or None)
        if name in log_x:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    legend = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, h)
    if legend:
        axes[0][0].legend(list(legend.values()), list(legend), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_bands(series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float], Sequence[float]]],
               path: str | Path, *, xlabel: str = "", ylabel: str = "", title: str = "", log_x: bool = False,
               markers: bool = False, hline: float | None = None) -> None:
    """One line per name: ``(x, mean, low, high)`` with the interval shaded (e.g. a mean over seeds and its
    confidence interval); ``hline`` marks a baseline."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    if hline is not None:
        ax.axhline(hline, color="grey", lw=1, ls="--")
    for i, (name, (x, mean, lo, hi)) in enumerate(series.items()):
        ax.plot(list(x), list(mean), label=name, color=f"C{i}", marker="o" if markers else None)
        ax.fill_between(list(x), list(lo), list(hi), color=f"C{i}", alpha=0.18, lw=0)
    if log_x:
        ax.set_xscale("log")
    elif all(float(v).is_integer() for x, *_ in series.values() for v in x):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds and steps: no 1.25
    _finish(fig, ax, path, xlabel=xlabel, ylabel=ylabel, title=title)


#: The training-curve panels: (title, ((metric, label), …)). A panel is drawn when any of its metrics was logged.
TRAINING_PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("loss", (("loss", "loss"),)),
    ("margin (reference − policy, winner − loser)", (("margin", "margin"),)),
    ("denoising residuals", (("residual_w", "policy, winner"), ("residual_l", "policy, loser"),
                             ("ref_residual_w", "reference, winner"), ("ref_residual_l", "reference, loser"))),
    ("implicit accuracy", (("implicit_acc", "implicit accuracy"),)),
    ("safeguard λ", (("lambda_mean", "mean λ"), ("lambda_active_frac", "active fraction (λ < 1)"))),
    ("importance weight", (("iw_mean", "mean"), ("iw_min", "min"))),
    ("masked fraction", (("masked_frac", "masked fraction"),)),
    ("gradient norm (before clipping)", (("grad_norm", "grad norm"),)),
)
SAFEGUARD_PANEL = "safeguard λ"


def _finish(fig, ax, path: str | Path, *, xlabel: str, ylabel: str, title: str = "") -> None:
    """Labels, grid and legend of a one-panel figure, then write it (atomically) as PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_bytes(path, _png(fig))


def _png(fig, **kw) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kw)
    plt.close(fig)
    return buf.getvalue()


def plot_training_curves(histories: Sequence[Sequence[Mapping]], path: str | Path, *, title: str = "",
                         xlabel: str = "optimizer step", safeguard: bool | None = None,
                         segment_label: str = "round") -> list[str]:
    """Training metrics in separate panels (:data:`TRAINING_PANELS`), a point at every logged step.

    ``histories``: one list of logged metric dicts (each with its ``step``) per segment — e.g. one per online
    round; segments are laid end to end on the step axis with a dashed line (and ``segment_label k``) at each
    boundary. The λ panel is drawn when ``safeguard`` is on (``None``: when any λ < 1 was logged). Returns the
    titles of the panels drawn."""
    xs: list[float] = []
    rows: list[Mapping] = []
    bounds: list[float] = []
    offset = 0.0
    for hist in histories:
        hist = [h for h in hist if h.get("loss") is not None]
        if not hist:
            continue
        if xs:  # a gap (NaN point) at the boundary, so no line joins two segments
            bounds.append(offset)
            xs.append(offset + 0.5)
            rows.append({})
        xs += [offset + float(h.get("step", i + 1)) for i, h in enumerate(hist)]
        rows += hist
        offset = xs[-1]

    def values(key):
        return [float(h[key]) if isinstance(h.get(key), (int, float)) else float("nan") for h in rows]

    if safeguard is None:
        safeguard = any(v < 1 for v in values("lambda_mean") if v == v)
    panels = []
    for name, metrics in TRAINING_PANELS:
        if name == SAFEGUARD_PANEL and not safeguard:
            continue
        series = [(label, values(key)) for key, label in metrics if any(key in h for h in rows)]
        if series:
            panels.append((name, series))
    n = max(len(panels), 1)
    ncols = min(3, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.8 * nrows + 0.4), dpi=110, squeeze=False)
    styles = ("-", "-", "--", "--")
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.set_visible(False)
            continue
        name, series = panels[k]
        for j, (label, ys) in enumerate(series):
            ax.plot(xs, ys, label=label, lw=1.2, color=f"C{j % 2 if name == 'denoising residuals' else j}",
                    ls=styles[j] if name == "denoising residuals" else "-",
                    marker="." if len(xs) <= 40 else None, ms=3)
        for b in bounds:
            ax.axvline(b, color="grey", lw=0.8, ls=":")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    if bounds and panels:
        axes.flat[0].text(0.0, 1.12, f"dotted lines: {segment_label} boundaries", transform=axes.flat[0].transAxes,
                          fontsize=7, color="grey")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write_bytes(path, _png(fig))
    return [name for name, _ in panels]


def paired_grid(ref_images, policy_images, row_labels: Sequence[str], deltas: Sequence[float], path: str | Path, *,
                ref_scores=None, policy_scores=None, titles: tuple[str, str] = ("reference", "policy"),
                scale: float = 0.9) -> tuple[int, int]:
    """Reference and policy images on the same seeds, side by side: row r is prompt r, its ``S`` reference
    samples then its ``S`` policy samples (the same seed in the same place of each half), labelled with the
    prompt and its paired Δ (policy − reference, mean over the row's seeds). Images: uint8 ``(rows, S, H, W, 3)``
    (or float ``(rows, S, 3, H, W)`` in [0, 1]); optional scores ``(rows, S)`` are printed under each image.
    Built with ``torchvision.utils.make_grid``; returns (rows, columns) of the grid."""
    import numpy as np
    import torch
    from torchvision.utils import make_grid

    def chw(a) -> torch.Tensor:
        t = torch.as_tensor(np.ascontiguousarray(a))
        if t.dtype == torch.uint8:
            t = t.permute(0, 1, 4, 2, 3).float() / 255.0
        return t

    ref, pol = chw(ref_images), chw(policy_images)
    if ref.shape != pol.shape:
        raise ValueError(f"paired_grid: reference {tuple(ref.shape)} and policy {tuple(pol.shape)} images differ")
    rows, per = ref.shape[:2]
    if len(row_labels) != rows or len(deltas) != rows:
        raise ValueError(f"paired_grid: {rows} rows of images, {len(row_labels)} labels, {len(deltas)} deltas")
    h, w = ref.shape[-2:]
    pad = max(1, h // 16)
    gap = torch.ones(rows, 1, 3, h, w)  # a blank column between the halves
    cells = torch.cat([ref, gap, pol], dim=1).reshape(-1, 3, h, w)
    ncols = 2 * per + 1
    grid = make_grid(cells, nrow=ncols, padding=pad, pad_value=1.0)
    img = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    cell_w, cell_h = w + pad, h + pad
    fig_w = ncols * scale + 3.2
    fig, ax = plt.subplots(figsize=(fig_w, rows * scale + 0.6), dpi=110)
    ax.imshow(img, interpolation="nearest")
    ax.set_xticks([pad + cell_w * (per / 2) - cell_w / 2, pad + cell_w * (per + 1 + per / 2) - cell_w / 2])
    ax.set_xticklabels(list(titles), fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([pad + cell_h * r + h / 2 for r in range(rows)])
    ax.set_yticklabels([f"{lab}   Δ {float(d):+.2f}" for lab, d in zip(row_labels, deltas)], fontsize=7)
    ax.tick_params(length=0)
    ax.set_xlabel("the same seed in the same column of each half; Δ = policy − reference reward, mean over the "
                  "row's seeds", fontsize=7)
    for s in ax.spines.values():
        s.set_visible(False)
    for scores, start in ((ref_scores, 0), (policy_scores, per + 1)):
        if scores is None:
            continue
        for r in range(rows):
            for c in range(per):
                ax.text(pad + cell_w * (start + c) + w / 2, pad + cell_h * r + h - 1, f"{float(scores[r][c]):.2f}",
                        ha="center", va="bottom", fontsize=5, color="white",
                        bbox=dict(boxstyle="square,pad=0.05", fc="black", alpha=0.5, lw=0))
    atomic_write_bytes(path, _png(fig, bbox_inches="tight", pad_inches=0.05))  # the prompts are wide labels
    return rows, ncols


def plot_intervals(labels: Sequence[str], mean: Sequence[float], low: Sequence[float], high: Sequence[float],
                   path: str | Path, *, ylabel: str = "", title: str = "", band: tuple[float, float, float] | None = None,
                   band_label: str = "", xlabel: str = "") -> None:
    """Point estimates with error bars (e.g. 95% intervals) at integer positions labelled ``labels`` (rounds:
    integer ticks only); ``band`` = (centre, low, high) is drawn as a dashed line with a shaded interval
    (e.g. the reference's)."""
    x = list(range(len(labels)))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 * len(x) + 2.0), 3.5), dpi=120)
    if band is not None:
        ax.axhline(band[0], color="grey", lw=1, ls="--", label=band_label or None)
        ax.axhspan(band[1], band[2], color="grey", alpha=0.15, lw=0)
    m = [float(v) for v in mean]
    err = [[mi - float(lo) for mi, lo in zip(m, low)], [float(hi) - mi for mi, hi in zip(m, high)]]
    ax.errorbar(x, m, yerr=err, fmt="o-", color="C0", capsize=4, lw=1.2, label="mean (95% CI)")
    ax.set_xticks(x)
    ax.set_xticklabels(list(labels), fontsize=8)
    ax.set_xlim(-0.5, len(x) - 0.5)
    _finish(fig, ax, path, xlabel=xlabel, ylabel=ylabel, title=title)


def plot_preference(labels: Sequence[str], intervals: Sequence[Mapping | None], splits: Sequence[Mapping | None],
                    path: str | Path, *, a_name: str = "A", b_name: str = "B", title: str = "") -> None:
    """A pairwise preference study in two panels sharing the x positions ``labels`` (e.g. all groups, then
    each group): left, A's win rate with its interval ``{"mean", "ci_low", "ci_high"}`` against the 0.5 of no
    preference; right, the win / tie / loss fractions ``{"win", "tie", "loss"}`` as stacked bars. The first
    position is drawn apart (it is the pooled result). A None entry leaves its position empty."""
    x = list(range(len(labels)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8.0, 1.5 * len(x) + 4.5), 3.8), dpi=120)
    left.axhline(0.5, color="grey", lw=1, ls="--", label="no preference (0.5)")
    for i, m in zip(x, intervals):
        if m is None or m.get("mean") is None:
            continue
        y = float(m["mean"])
        err = [[y - float(m["ci_low"])], [float(m["ci_high"]) - y]]
        left.errorbar([i], [y], yerr=err, fmt="D" if i == 0 else "o", color="C3" if i == 0 else "C0", capsize=4,
                      lw=1.4, label=("pooled (95% CI)" if i == 0 else "group (95% CI)") if i <= 1 else None)
        left.annotate(f"{y:.2f}", (i, y), textcoords="offset points", xytext=(7, -3), fontsize=7)
    left.set_ylim(0, 1)
    left.set_ylabel(f"win rate of {a_name}\nover {b_name}")
    left.set_title("win rate (ties count ½)", fontsize=10)
    parts = (("win", f"{a_name} preferred", "#4C72B0"), ("tie", "tie", "#BBBBBB"),
             ("loss", f"{b_name} preferred", "#DD8452"))
    bottom = [0.0] * len(x)
    for key, name, color in parts:
        h = [float(s[key]) if s is not None and s.get(key) is not None else 0.0 for s in splits]
        right.bar(x, h, bottom=bottom, color=color, width=0.6, label=name)
        for i, (b, v) in enumerate(zip(bottom, h)):
            if v >= 0.06:
                right.text(i, b + v / 2, f"{v:.0%}", ha="center", va="center", fontsize=7)
        bottom = [b + v for b, v in zip(bottom, h)]
    right.set_ylim(0, 1.2)  # room above the bars for the legend
    right.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    right.set_ylabel("fraction of labelled items")
    right.set_title("win / tie / loss", fontsize=10)
    for ax in (left, right):
        ax.set_xticks(x)
        ax.set_xticklabels(list(labels), fontsize=8)
        ax.set_xlim(-0.6, len(x) - 0.4)
        if len(x) > 1:
            ax.axvline(0.5, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3, axis="y")
    left.legend(fontsize=7, loc="lower right", framealpha=0.85)
    right.legend(fontsize=7, loc="upper center", ncol=3, framealpha=0.85)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write_bytes(path, _png(fig))
