"""Does modulating sparsity by cognitive load beat static thresholds? Ablation at MATCHED sparsity.

Every variant is scored on the same windows with base thresholds from one calibration profile,
re-targeted (profile_taus) until its measured mean active fraction is within `tol` of the target:
variants are never compared at different sparsity.
"""

from __future__ import annotations

from ..evaluate import score
from ..metrics import bootstrap_ratio

_DENSER, _SPARSER = dict(high_load_scale=0.5, low_load_scale=1.3), dict(high_load_scale=1.3, low_load_scale=0.5)

# name -> settings. "denser": tau x0.5 under high load, x1.3 under low load (the paper's
# direction: more neurons when the model is uncertain); "sparser": the reverse.
VARIANTS = {
    "static": dict(schedule="static"),
    "entropy-denser": dict(schedule="clada", load_signal="entropy", **_DENSER),
    "entropy-sparser": dict(schedule="clada", load_signal="entropy", **_SPARSER),
    "surprisal-denser": dict(schedule="clada", load_signal="surprisal", **_DENSER),
    "surprisal-sparser": dict(schedule="clada", load_signal="surprisal", **_SPARSER),
    "and-denser": dict(schedule="clada", load_signal="both", **_DENSER),  # the paper's AND rule
    "and-sparser": dict(schedule="clada", load_signal="both", **_SPARSER),
    "cont-entropy-denser": dict(schedule="continuous", load_signal="entropy", **_DENSER),
    "cont-entropy-sparser": dict(schedule="continuous", load_signal="entropy", **_SPARSER),
    "cont-both-denser": dict(schedule="continuous", load_signal="both", **_DENSER),
    "and-denser-reselect": dict(schedule="clada", load_signal="both", reselect=True, **_DENSER),
    "and-denser-w5": dict(schedule="clada", load_signal="both", update_window=5, **_DENSER),
    "and-denser-w20": dict(schedule="clada", load_signal="both", update_window=20, **_DENSER),
}


def _active(rows):
    return sum(r["active"] for r in rows) / len(rows)


def matched(cm, base_config, variant: dict, wins, target: float, tol: float = 0.01, search_windows: int = 2,
            max_iter: int = 6, cache=None, start: float | None = None):
    """Score `variant` with its profile target adjusted until the mean active fraction is within
    tol of `target`. Returns (rows per window, profile target used, measured active fraction).
    cache: prompt prefills shared across calls (evaluate.score); start: first profile target tried."""
    t = target if start is None else start
    search = wins[:search_windows]
    for _ in range(max_iter):  # cheap search on a few windows: active fraction is ~linear in t
        rows = score(cm.with_config(base_config.replace(target_active=t, **variant)), search, desc="search", cache=cache)
        a = _active(rows)
        if abs(a - target) <= tol / 2:
            break
        t = min(0.999, max(0.02, t + (target - a)))
    for _ in range(max_iter):  # confirm (and correct) on every window
        rows = score(cm.with_config(base_config.replace(target_active=t, **variant)), wins, desc="score", cache=cache)
        a = _active(rows)
        if abs(a - target) <= tol:
            break
        t = min(0.999, max(0.02, t + (target - a)))
    return rows, t, a


def run_ablation(cm, base_config, wins, targets=(0.4, 0.5, 0.6), variants=None, dense=None, tol: float = 0.01):
    variants = variants or VARIANTS
    cache = {}
    dense = dense or score(cm, wins, baseline=True, desc="dense", cache=cache)
    d_nll = [w["nll"] for w in dense]
    results = []
    static = {}  # target -> static rows: each variant is also compared with static, paired by window
    if "static" in variants:
        variants = {"static": variants["static"], **variants}
    for target in targets:
        for name, var in variants.items():
            rows, t, a = matched(cm, base_config, var, wins, target, tol, cache=cache)
            inc, lo, hi = bootstrap_ratio(d_nll, [w["nll"] for w in rows])
            row = dict(variant=name, target_active=target, profile_target=t, active_fraction=a,
                       matched=abs(a - target) <= tol, ppl_increase_pct=inc, ci95=[lo, hi],
                       reselections=sum(w["events"] for w in rows), settings=var)
            if name == "static":
                static[target] = rows
            elif target in static:  # the question the ablation asks: better than static, same sparsity?
                v, vlo, vhi = bootstrap_ratio([w["nll"] for w in static[target]], [w["nll"] for w in rows])
                row.update(vs_static_pct=v, vs_static_ci95=[vlo, vhi])
            results.append(row)
            vs = f" | vs static {row['vs_static_pct']:+.2f}% [{row['vs_static_ci95'][0]:+.2f}, " \
                 f"{row['vs_static_ci95'][1]:+.2f}]" if "vs_static_pct" in row else ""
            print(f"  active {target:.2f} | {name:<22} | measured {a:.3f} | ppl {inc:+.2f}% [{lo:+.2f}, {hi:+.2f}]{vs}",
                  flush=True)
    return results


def plot_ablation(results, path, title=""):
    from .plots import _plt, save_figure

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    names = list(dict.fromkeys(r["variant"] for r in results))
    for name in names:
        pts = sorted((r["active_fraction"], r["ppl_increase_pct"]) for r in results if r["variant"] == name)
        style = dict(lw=2.5, color="black") if name == "static" else dict(lw=1, alpha=0.8)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, **style)
    ax.set_xlabel("measured mean active fraction of MLP neurons")
    ax.set_ylabel("perplexity increase vs dense (%)")
    save_figure(fig, ax, path, title, legend_size=6.5)


def ablation_table(results) -> str:
    """Markdown: one row per variant, per target the PPL increase vs dense and the paired
    difference vs static (95% CIs), with the measured active fraction."""
    targets = sorted({r["target_active"] for r in results})
    head = "| variant | " + " | ".join(f"active {t:.2f}: measured / PPL vs dense / vs static" for t in targets) + " |"
    lines = [head, "|---|" + "---|" * len(targets)]
    for name in dict.fromkeys(r["variant"] for r in results):
        cells = []
        for t in targets:
            r = next((x for x in results if x["variant"] == name and x["target_active"] == t), None)
            if r is None:
                cells.append("-")
                continue
            lo, hi = r["ci95"]
            vs = "(reference)" if name == "static" else (
                f"{r['vs_static_pct']:+.2f}% [{r['vs_static_ci95'][0]:+.2f}, {r['vs_static_ci95'][1]:+.2f}]"
                if "vs_static_pct" in r else "-")
            cells.append(f"{r['active_fraction']:.3f} / {r['ppl_increase_pct']:+.2f}% [{lo:+.2f}, {hi:+.2f}] / {vs}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
