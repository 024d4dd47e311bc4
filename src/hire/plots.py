"""Line plots written to PNG (matplotlib, headless) for the training and tuning commands."""

from __future__ import annotations

from pathlib import Path


def save_lines(path: str | Path, series: list[dict], *, xlabel: str, ylabel: str, title: str,
               logy: bool = False, size: tuple[float, float] = (6, 3.5)) -> None:
    """One PNG with a line per entry of ``series``: dicts with ``x``, ``y`` and optional ``label``
    and matplotlib keyword arguments under ``style``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    for line in series:
        ax.plot(line["x"], line["y"], label=line.get("label"), **line.get("style", {}))
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if any(line.get("label") for line in series):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
