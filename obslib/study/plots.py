"""Small plotting helpers shared by the notebooks (matplotlib / seaborn)."""
from __future__ import annotations

import os
import textwrap

import matplotlib.pyplot as plt
import numpy as np


def image_grid(images: np.ndarray, captions: list[str], ncols: int = 8, width: float = 1.9):
    """Images with their captions written under them."""
    n = len(images)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, width * 1.45 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, cap in zip(axes.flat, images, captions):
        ax.imshow(img, interpolation="nearest")
        ax.text(0.5, -0.03, "\n".join(textwrap.wrap(cap, 22)), fontsize=6.5, ha="center", va="top",
                transform=ax.transAxes)
    fig.tight_layout()
    return fig


def save(fig, path: str) -> None:
    """Write a PNG atomically and, inside a notebook kernel, show it as the cell's image output (papermill runs
    with the Agg backend, which draws nothing by itself: without this the executed notebooks hold no figures)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    os.replace(tmp, path)
    _show(path)
    plt.close(fig)


def _show(path: str) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and getattr(shell, "kernel", None) is not None:
        display(Image(filename=path))


def legend_outside(ax, title: str | None = None) -> None:
    """The legend to the right of the axes, off the data."""
    ax.legend(fontsize=8, title=title, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def metric_lines(summary, x: str, hue: str, metric: str, ax=None, label: str | None = None, xlabel: str | None = None,
                 legend: bool = True):
    """Mean over seeds with a band of one standard deviation, one line per hue value."""
    ax = ax or plt.gca()
    for key, g in summary.groupby(hue, sort=False):
        g = g.sort_values(x)
        m, s = g[f"{metric}_mean"].to_numpy(), g[f"{metric}_std"].fillna(0).to_numpy()
        ax.plot(g[x], m, marker="o", label=str(key))
        ax.fill_between(g[x], m - s, m + s, alpha=0.15)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(label or metric)
    if legend:
        legend_outside(ax, hue)
    return ax


def paired_differences(comparisons, ax=None, label: str | None = None):
    """Paired differences a − b with their 95% intervals, one horizontal bar per comparison, a line at zero:
    a difference whose interval misses zero is a detected one (filled marker), else hollow."""
    import pandas as pd

    ax = ax or plt.gca()
    c = pd.DataFrame(comparisons).reset_index(drop=True)
    y = np.arange(len(c))[::-1]
    detected = c.verdict != "no difference detected"
    ax.errorbar(c["diff"], y, xerr=[c["diff"] - c.lo, c.hi - c["diff"]], fmt="none", ecolor="0.35", capsize=3)
    ax.scatter(c["diff"][detected], y[detected.to_numpy()], color="C0", zorder=3, label="interval excludes 0")
    ax.scatter(c["diff"][~detected], y[~detected.to_numpy()], facecolor="white", edgecolor="C0", zorder=3,
               label="no difference detected")
    ax.axvline(0, color="k", lw=1)
    names = [f"{ctx}: {a} − {b}" if ctx else f"{a} − {b}" for ctx, a, b in zip(c.context, c.a, c.b)]
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel(label or "difference a − b (95% paired interval)")
    return ax


PANEL_LABELS = {"prompt_fidelity": "prompt fidelity difference (share of prompts)", "psnr": "PSNR difference (dB)"}


def paired_panels(comparisons, path: str, metrics=("prompt_fidelity", "psnr"), title: str | None = None) -> None:
    """One ``paired_differences`` panel per metric, side by side (names on the left panel only, legend on the
    right, off the data), saved to ``path`` and shown."""
    c = [x for x in comparisons if x["metric"] in metrics]
    rows = max(len([x for x in c if x["metric"] == m]) for m in metrics)
    fig, ax = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 0.3 * rows + 1.4), squeeze=False)
    ax = ax[0]
    for a, metric in zip(ax, metrics):
        paired_differences([x for x in c if x["metric"] == metric], a, PANEL_LABELS.get(metric, metric))
    for a in ax[1:]:
        a.set_yticklabels([])
    ax[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    save(fig, path)


def replication_panels(verdicts, path: str, metrics=("prompt_fidelity", "psnr"), title: str | None = None) -> None:
    """Each comparison of ``obslib.study.verdicts.judge`` twice: on the study seeds (filled where detected after Holm) and
    on the held-out seeds (squares, filled where detected), 95% two-level intervals, one panel per metric."""
    import pandas as pd

    v = pd.DataFrame(verdicts)
    rows = max(int((v.metric == m).sum()) for m in metrics)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.8 * len(metrics), 0.42 * rows + 1.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        c = v[v.metric == metric].reset_index(drop=True)
        y = np.arange(len(c))[::-1].astype(float)
        for dy, pre, marker, colour, name, col in ((0.15, "", "o", "C0", "study seeds", "verdict_holm"),
                                                   (-0.15, "heldout_", "s", "C1", "held-out seeds", "heldout_verdict")):
            _interval_series(ax, c[pre + "diff"], c[pre + "lo"], c[pre + "hi"], y + dy, c[col], colour, marker, name)
        _comparison_axis(ax, c, y, metric)
    _finish_panels(fig, axes, title, path)


def _interval_series(ax, d, lo, hi, y, verdicts, colour: str, marker: str, name: str) -> None:
    """One series of differences with their intervals: markers filled where detected, hollow where not."""
    det = (verdicts != "no difference detected").to_numpy()
    ax.errorbar(d, y, xerr=[d - lo, hi - d], fmt="none", ecolor=colour, capsize=2, lw=1)
    ax.scatter(d[det], y[det], color=colour, marker=marker, zorder=3, label=f"{name}, detected")
    ax.scatter(d[~det], y[~det], facecolor="white", edgecolor=colour, marker=marker, zorder=3,
               label=f"{name}, not detected")


def _comparison_axis(ax, c, y, metric: str) -> None:
    ax.axvline(0, color="k", lw=1)
    ax.set_yticks(y, [f"{ctx}: {a} − {b}" for ctx, a, b in zip(c.context, c.a, c.b)], fontsize=8)
    ax.set_xlabel(PANEL_LABELS.get(metric, metric))


def _finish_panels(fig, axes, title: str | None, path: str) -> None:
    """Comparison panels side by side: labels on the first only, the legend right of the last, saved to ``path``."""
    for ax in axes[0][1:]:
        ax.set_yticklabels([])
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    save(fig, path)


def seed_differences(df, path: str, title: str | None = None) -> None:
    """Per comparison (rows) the mean difference of every seed (dots; study seeds filled, held-out hollow): how far
    apart the seeds — calibration draws and evaluation noise — put the same comparison."""
    import pandas as pd

    d = pd.DataFrame(df)
    names = list(dict.fromkeys(d.comparison))
    fig, ax = plt.subplots(figsize=(7.5, 0.36 * len(names) + 1.4))
    y = {n: len(names) - 1 - i for i, n in enumerate(names)}
    for held, g in d.groupby("heldout"):
        ax.scatter(g["diff"], [y[n] for n in g.comparison], facecolor="white" if held else "C0", edgecolor="C0",
                   label="held-out seed" if held else "study seed", zorder=3)
    ax.axvline(0, color="k", lw=1)
    ax.set_yticks(list(y.values()), list(y.keys()), fontsize=8)
    ax.set_xlabel("mean difference a − b of one seed")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    save(fig, path)


def carry_panels(judged: dict, path: str, metrics=("prompt_fidelity", "psnr"), title: str | None = None) -> None:
    """Each comparison on two models (``judged``: model label -> ``verdicts.judge`` output on the same families): the
    study seeds' difference a − b with its 95% two-level interval, one marker per model (filled where detected after
    Holm), one panel per metric."""
    import pandas as pd

    names = list(judged)
    key = ["context", "a", "b"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.8 * len(metrics), 1.6 + 0.42 * max(
        int((pd.DataFrame(judged[names[0]]).metric == m).sum()) for m in metrics)), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        base = pd.DataFrame(judged[names[0]])
        c = base[base.metric == metric][key].reset_index(drop=True)
        y = np.arange(len(c))[::-1].astype(float)
        for i, (name, marker) in enumerate(zip(names, ("o", "D"))):
            v = pd.DataFrame(judged[name])
            d = c.merge(v[v.metric == metric], on=key, how="left")
            _interval_series(ax, d["diff"], d.lo, d.hi, y + 0.15 - 0.3 * i, d.verdict_holm, f"C{i}", marker, name)
        _comparison_axis(ax, c, y, metric)
    _finish_panels(fig, axes, title, path)
