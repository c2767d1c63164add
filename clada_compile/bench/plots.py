"""PNG plots: per-prompt controller traces and the speed/quality frontier.

matplotlib is an optional extra (clada_compile[bench]): the library and clada-generate's text
outputs work without it; the commands whose product is a plot check for it before loading a model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..io import atomic_write

INSTALL_HINT = "pip install 'clada_compile[bench]'"


class MissingExtraError(ImportError):
    """An optional dependency is missing; the message names the pip command that installs it."""


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def require_matplotlib(what: str) -> None:
    """Fail early (before minutes of model loading) when `what` needs a plot and cannot make one."""
    if not have_matplotlib():
        raise MissingExtraError(f"{what} draws a PNG and needs matplotlib, which is not installed; "
                                f"install it with: {INSTALL_HINT}")


def save_figure(fig, ax, path, title: str, legend_size: float) -> Path:
    """Title, legend, tight layout, PNG at 110 dpi; closes the figure."""
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    _plt().close(fig)
    return Path(path)


def _plt():
    require_matplotlib("this plot")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; set on use, not at import
    import matplotlib.pyplot as plt

    return plt


def plot_trace(records: list[dict], path, title: str = "") -> Path:
    plt = _plt()
    steps = [r["step"] for r in records]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 5), sharex=True, gridspec_kw=dict(height_ratios=[3, 1]))
    ax.plot(steps, [r["surprisal"] for r in records], label="surprisal", color="tab:blue", lw=1)
    ax.plot(steps, [r["entropy"] for r in records], label="entropy", color="tab:orange", lw=1)
    ax.step(steps, [r["s_threshold"] if r["s_threshold"] is not None else float("nan") for r in records],
            where="post", color="tab:blue", ls="--", lw=0.8, label="surprisal threshold")
    ax.step(steps, [r["e_threshold"] if r["e_threshold"] is not None else float("nan") for r in records],
            where="post", color="tab:orange", ls="--", lw=0.8, label="entropy threshold")
    for r in records:
        if r["reselect"]:
            ax.axvline(r["step"], color="red", alpha=0.5, lw=1)
    if any(r["reselect"] for r in records):
        ax.plot([], [], color="red", label="re-selection")
    ax.set_ylabel("normalized bits")
    ax.legend(fontsize=7, ncol=3, loc="upper right")
    ax.set_title(title[:90], fontsize=9)
    ax2.plot(steps, [r["active_fraction"] if r["active_fraction"] is not None else float("nan") for r in records],
             color="tab:green", lw=1)
    ax2.set_ylabel("active frac.")
    ax2.set_xlabel("generated token")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return Path(path)


def plot_frontier(curves: dict[str, list[tuple]], path, title: str = "") -> Path:
    """curves: method -> [(ppl increase %, speedup)] or [(ppl increase %, speedup, low, high)]:
    low..high (e.g. the slowest and fastest run) is drawn as a vertical bar."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    xs = []
    for name, pts in curves.items():
        pts = sorted(pts)
        xs += [p[0] for p in pts]
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)[0]
        for p in pts:
            if len(p) == 4:
                ax.vlines(p[0], p[2], p[3], color=line.get_color(), alpha=0.35, lw=3)
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xscale("symlog", linthresh=2.0)  # a few % and +100% on one axis
    ax.set_xlim(left=min([0.0] + xs))
    ax.set_xlabel("perplexity increase vs dense (%, linear below 2, log above)")
    ax.set_ylabel("decode speedup vs dense (x)")
    return save_figure(fig, ax, path, title, legend_size=8)


def plot_compare(report: dict, path, title: str = "") -> Path:
    """clada-bench --compare's report: each measured engine's decode tok/s, one bar at the median
    and a dot per round (the spread the table's medians hide), grouped by precision as listed."""
    plt = _plt()
    rows = [(name, r) for name, r in report["engines"].items() if "skipped" not in r]
    if not rows:
        raise ValueError("the report has no measured engine to plot (every engine was skipped)")
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(rows) + 1.4))
    kinds = (("llama.cpp", "tab:gray"), ("clada-dense", "tab:blue"), ("clada", "tab:orange"), ("", "tab:green"))
    labelled = set()
    for i, (name, r) in enumerate(rows):
        kind, color = next(k for k in kinds if name.startswith(k[0]))  # first matching prefix; "" = other engines
        kind = kind or "other"
        ax.barh(i, r["tok_s"], color=color, alpha=0.55, label=None if kind in labelled else kind)
        labelled.add(kind)
        ax.plot(r["rounds"], [i] * len(r["rounds"]), "k.", ms=4)
        ax.text(0, i, f" {r['tok_s']:.1f}", va="center", fontsize=7)  # inside the bar, clear of the dots
    ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"decode tok/s (bar: median of {report['rounds']} rounds; dots: each round)")
    return save_figure(fig, ax, path, title, legend_size=7)
