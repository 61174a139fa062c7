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
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
