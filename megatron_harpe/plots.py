"""Pictures: HARPE bases (per-head attention waveforms, their mean, the bases), data-mixture histograms, NIAH heatmaps."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from megatron_harpe.bases import attention_waveform


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> str:
    fig.tight_layout(rect=rect)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_bases(bases: Sequence[float], path: str, *, head_dim: int, target_length: int,
               single_base: float | None = None, compare: Sequence[float] | None = None,
               compare_label: str = "paper Table 2", title: str = "HARPE bases") -> str:
    """Write a PNG: waveforms per head and averaged (against one ABF base), and the base of each head."""
    plt = _pyplot()
    fig, (wave_ax, base_ax) = plt.subplots(2, 1, figsize=(11, 8), gridspec_kw={"height_ratios": [3, 2]})
    colours = plt.cm.viridis(np.linspace(0, 1, len(bases)))
    waves = []
    for colour, base in zip(colours, bases):
        distance, wave = attention_waveform(base, head_dim=head_dim, target_length=target_length)
        waves.append(wave)
        wave_ax.plot(distance, wave, color=colour, lw=0.5, alpha=0.5)
    wave_ax.plot(distance, np.mean(waves, axis=0), color="black", lw=1.8, label=f"mean of {len(bases)} heads")
    if single_base is not None:
        distance, wave = attention_waveform(single_base, head_dim=head_dim, target_length=target_length)
        wave_ax.plot(distance, wave, color="red", lw=1.2, ls="--", label=f"single base {single_base:.3g} (ABF)")
    wave_ax.set_xscale("symlog", linthresh=1024)
    wave_ax.set_xlabel("relative distance (tokens)")
    wave_ax.set_ylabel("attention upper bound (box-filtered)")
    wave_ax.set_title(f"{title}: RoPE attention waveforms, head_dim={head_dim}, up to {target_length} tokens")
    wave_ax.legend(loc="upper right")

    heads = np.arange(1, len(bases) + 1)
    base_ax.plot(heads, np.asarray(bases) / 1e6, "o-", label="these bases")
    if compare is not None:
        base_ax.plot(np.arange(1, len(compare) + 1), np.asarray(compare) / 1e6, "s--", alpha=0.7, label=compare_label)
    base_ax.set_xlabel("head (query group)")
    base_ax.set_ylabel("RoPE base (millions)")
    base_ax.legend()
    return _save(fig, path)


def plot_length_histogram(histogram: dict, sources: Sequence[dict], path: str) -> str:
    """Write a PNG: token share per document-length bin (sources vs mixture) and each source's share."""
    plt = _pyplot()
    fig, (bins_ax, share_ax) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(histogram["bins"]))
    bins_ax.bar(x - 0.2, np.asarray(histogram["sources"]["tokens"]) * 100, 0.4, label="source mix, not upsampled")
    bins_ax.bar(x + 0.2, np.asarray(histogram["mixture"]["tokens"]) * 100, 0.4, label="upsampled mixture")
    bins_ax.set_xticks(x, histogram["bins"], rotation=30)
    bins_ax.set_xlabel("document length (tokens)")
    bins_ax.set_ylabel("share of tokens (%)")
    bins_ax.set_title("Document lengths before and after per-source upsampling")
    bins_ax.legend()
    names = [s["name"] for s in sources]
    y = np.arange(len(names))
    total = sum(s["tokens"] for s in sources) or 1
    share_ax.barh(y - 0.27, [100 * s["tokens"] / total for s in sources], 0.27, label="datasets given")
    share_ax.barh(y, [100 * s["weight"] for s in sources], 0.27, label="spec")
    share_ax.barh(y + 0.27, [100 * s["share"] for s in sources], 0.27, label="mixture")
    share_ax.set_yticks(y, names)
    share_ax.set_xlabel("share of tokens (%)")
    share_ax.set_title("Source mix")
    share_ax.legend()
    return _save(fig, path)


def plot_niah_heatmap(grid: np.ndarray, lengths: Sequence[int], depths: Sequence[float], path: str,
                      title: str = "Needle in a Haystack") -> str:
    """Write the familiar green (found) to red (missed) heatmap: depth down, context length across, mean in the title."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(lengths) + 2), max(4, 0.45 * len(depths) + 1.5)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{title} (mean score {np.nanmean(grid):.3f})")
    fig.colorbar(image, ax=ax, label="score")
    return _save(fig, path)


def plot_niah_comparison(grids: Sequence[np.ndarray], labels: Sequence[str], lengths: Sequence[int],
                         depths: Sequence[float], path: str) -> str:
    """Two NIAH heatmaps side by side and their difference (first minus second; blue = first better)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(max(12, 2.6 * len(lengths) + 4), max(4, 0.45 * len(depths) + 1.5)))
    xticks = [f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n) for n in lengths]
    difference = grids[0] - grids[1]
    panels = [(grids[0], "RdYlGn", 0, 1, f"{labels[0]} (mean {np.nanmean(grids[0]):.3f})"),
              (grids[1], "RdYlGn", 0, 1, f"{labels[1]} (mean {np.nanmean(grids[1]):.3f})"),
              (difference, "coolwarm_r", -1, 1, f"{labels[0]} - {labels[1]} ({np.nanmean(difference):+.3f})")]
    for ax, (grid, cmap, low, high, title) in zip(axes, panels):
        image = ax.imshow(grid, cmap=cmap, vmin=low, vmax=high, aspect="auto")
        ax.set_xticks(range(len(lengths)), xticks)
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title)
        fig.colorbar(image, ax=ax)
    axes[0].set_ylabel("needle depth")
    return _save(fig, path)


def plot_accuracy_vs_length(panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]],
                            lengths: Sequence[int], path: str, *, trained_length: int | None = None,
                            title: str = "", limits: tuple[float, float] | None = None) -> str:
    """Write a PNG: one panel per metric (``{metric: {method: (means, stds)}}``), score against context length,
    one line per method with its spread over seeds (clipped to ``limits``, a score's range, where given); a dashed
    line at the trained length; one legend for all panels, below them."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    for ax, (metric, methods) in zip(axes[0], panels.items()):
        for method, (means, stds) in methods.items():
            means, stds = np.asarray(means, dtype=float), np.asarray(stds, dtype=float)
            low, high = means - stds, means + stds
            if limits:
                low, high = np.clip(low, *limits), np.clip(high, *limits)
            (line,) = ax.plot(lengths, means, marker="o", label=method)
            ax.fill_between(lengths, low, high, color=line.get_color(), alpha=0.15)
        if limits:
            margin = 0.03 * (limits[1] - limits[0])
            ax.set_ylim(limits[0] - margin, limits[1] + margin)
        if trained_length:
            ax.axvline(trained_length, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(lengths), [str(n) for n in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    return _save(fig, path, rect=(0, 0.08, 1, 1))  # room for the legend row
