"""Every PNG HiRE writes (matplotlib, headless): training and tuning curves, the bench breakdown,
the tensor-parallel bench and the scaling model. The one module that imports matplotlib.

Each plot takes the result dict its command returns, and is written atomically (a temporary
file renamed into place), so a crash never leaves half an image under the asked name.
"""

from __future__ import annotations

from pathlib import Path

from hire.files import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, dpi: int) -> None:
    plt = _pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def save_lines(path: str | Path, series: list[dict], *, xlabel: str, ylabel: str, title: str,
               logy: bool = False, size: tuple[float, float] = (6, 3.5)) -> None:
    """One PNG with a line per entry of ``series``: dicts with ``x``, ``y`` and optional ``label``
    and matplotlib keyword arguments under ``style``."""
    plt = _pyplot()
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
    _save(fig, path, dpi=120)


def plot_bench(result: dict, path: str | Path) -> None:
    """``hire bench --plot``: ms per decoded token by part, and bytes per token by part, dense vs HiRE."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    parts = ["head", "ffn", "attention", "other"]
    for ax, key_d, key_h, unit, title in (
        (axes[0], "ms_per_part_dense", "ms_per_part_hire", "ms / token", "decode time per token"),
        (axes[1], "bytes_dense", "bytes_hire", "MiB / token", "weights read per token"),
    ):
        if key_d not in result:
            ax.set_visible(False)
            continue
        div = 2**20 if unit.startswith("MiB") else 1
        bottom_d = bottom_h = 0.0
        for i, part in enumerate(parts):
            # the embedding is a row gather: shown with "other" in the bytes panel
            dv = result[key_d].get(part, 0) / div + (result[key_d].get("embedding", 0) / div if part == "other" and div > 1 else 0)
            hv = result[key_h].get(part, 0) / div + (result[key_h].get("embedding", 0) / div if part == "other" and div > 1 else 0)
            color = f"C{i}"
            ax.bar(0, dv, bottom=bottom_d, color=color, label=part)
            ax.bar(1, hv, bottom=bottom_h, color=color)
            bottom_d += dv
            bottom_h += hv
        ax.set_xticks([0, 1], ["dense", "HiRE"])
        ax.set_ylabel(unit)
        ax.set_title(title)
    visible = [ax for ax in axes if ax.get_visible()]
    visible[0].legend(loc="upper right")
    fig.suptitle(
        f"{result.get('model', '')}: {result['tokens_per_s_dense']:.1f} -> {result['tokens_per_s_hire']:.1f} tokens/s "
        f"({result['speedup']:.2f}x; ideal from bytes {result['ideal_speedup']:.2f}x)"
    )
    fig.tight_layout()
    _save(fig, path, dpi=110)


def plot_tp_bench(result: dict, path: str | Path) -> None:
    """``hire bench --tp P --plot``: measured tokens/s and collectives per token of each mode."""
    plt = _pyplot()
    modes = list(result["modes"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].bar(modes, [result["modes"][m]["tokens_per_s"] for m in modes], color=["C0", "C1", "C2"][: len(modes)])
    axes[0].set_ylabel("decode tokens/s (median)")
    sel = [result["modes"][m]["selection_collectives_per_token"] for m in modes]
    tot = [result["modes"][m]["collectives_per_token"] for m in modes]
    axes[1].bar(modes, [t - s for t, s in zip(tot, sel)], label="all-reduces + the head's final top-k gather")
    axes[1].bar(modes, sel, bottom=[t - s for t, s in zip(tot, sel)], label="selection gathers")
    axes[1].set_ylabel("collectives per token")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{result.get('model', '')}: tensor parallel over {result['tp']} ranks ({result.get('backend', '')})")
    fig.tight_layout()
    _save(fig, path, dpi=110)


def plot_scaling(rows: list[dict], path: str | Path, title: str = "") -> None:
    """``hire scaling --plot``: modelled tokens/s vs devices, one panel per hardware, a line per
    model and mode (rows of ``hire.distributed.scaling.scaling_table``)."""
    plt = _pyplot()
    hws = list(dict.fromkeys(r["hardware"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, len(hws), figsize=(6 * len(hws), 4.6), squeeze=False)
    styles = {"dense": ":", "exact": "--", "da": "-"}
    for ax, hw in zip(axes[0], hws):
        for i, model in enumerate(models):
            for mode in modes:
                pts = [r for r in rows if r["hardware"] == hw and r["model"] == model and r["mode"] == mode]
                ax.plot([r["devices"] for r in pts], [r["tokens_per_s"] for r in pts], styles.get(mode, "-"),
                        color=f"C{i}", marker="o" if mode == "da" else None, ms=3, label=f"{model} {mode}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("devices P (tensor parallel)")
        ax.set_ylabel("tokens/s (one sequence, modelled)")
        ax.set_title(hw)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7, ncol=len(models))
    fig.suptitle(title or "Modelled decode tokens/s: dense (dotted), exact global top-k (dashed), DA-TOP-k (solid)")
    fig.tight_layout()
    _save(fig, path, dpi=110)
