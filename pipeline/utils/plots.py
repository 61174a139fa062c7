"""Plots written to run directories (headless matplotlib, atomic PNG writes)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

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
