"""The comparison panels of chapters 09 and 10 draw every comparison once per series, filled where detected."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from obslib.study import plots  # noqa: E402


def _rows(shift=0.0):
    rows = []
    for metric in ("prompt_fidelity", "psnr"):
        for i, (ctx, detected) in enumerate((("50%", True), ("60%", False))):
            d = 0.1 * (i + 1) + shift
            rows.append(dict(metric=metric, context=ctx, a="OBS-Diff", b="Wanda", diff=d, lo=d - 0.05, hi=d + 0.05,
                             verdict_holm="a higher" if detected else "no difference detected",
                             heldout_diff=d, heldout_lo=d - 0.1, heldout_hi=d + 0.1,
                             heldout_verdict="no difference detected"))
    return rows


@pytest.fixture
def figures(monkeypatch):
    made = []
    monkeypatch.setattr(plots, "save", lambda fig, path: made.append(fig))
    yield made
    plt.close("all")


def _filled(ax):
    """(filled, hollow) marker counts of an axis' scatter series."""
    from matplotlib.collections import PathCollection

    filled = hollow = 0
    for c in [c for c in ax.collections if isinstance(c, PathCollection)]:
        n = len(c.get_offsets())
        if n and c.get_facecolor().size and c.get_facecolor()[0][:3].tolist() == [1.0, 1.0, 1.0]:
            hollow += n
        elif n:
            filled += n
    return filled, hollow


def test_replication_panels(figures):
    plots.replication_panels(_rows(), "unused.png")
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["50%: OBS-Diff − Wanda", "60%: OBS-Diff − Wanda"]
    assert _filled(ax) == (1, 3)  # study seeds: one detected; held-out: none


def test_carry_panels(figures):
    plots.carry_panels({"SD3": _rows(), "Flux": _rows(0.2)}, "unused.png")
    ax = figures[0].axes[1]
    assert _filled(ax) == (2, 2) and len(figures[0].axes) == 2
