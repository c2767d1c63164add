"""The speed-vs-quality frontier (clada-bench --sweep): one point per method and sparsity budget.

Quality: teacher-forced perplexity increase on text windows (evaluate.score through an eager twin
of each configuration: same graphs, same numbers, no compile per point), bootstrap CI over windows.
Speed: greedy decode tokens/s on the benchmark's backend, dense and EVERY configuration interleaved
round-robin in one process (dense, p1, p2, ..., dense, p1, ...), warm-up round excluded, median of
the repeats; speedup = median(point) / median(dense).

Methods (the issue's baselines):
  griffin     static prompt selection at top_k_ratio r, no controller, no per-token threshold
  paper       CLADA as the paper configures it: top_k_ratio r, AND rule at percentiles 0.7,
              window 10, re-selection on high-load events
  calibrated  full backbone, per-token thresholds from the calibration profile at target_active t
              (the MLP's hidden h only)
  inputs      calibrated, plus every input group of the profile (gate/up, q/k/v, o inputs) at
              kept fraction f: one point per (t, f) in targets x input fractions (TEAL-style
              sparsity on every decode projection; needs a profile made with --inputs)
  cats        CATS (arXiv 2404.08763): full backbone, a per-layer threshold on |act(gate)| at
              kept fraction t (the profile's gate curves, same calibration text), up and down
              rows of the dropped neurons skipped (CladaConfig(mlp_criterion="gate"))
"""

from __future__ import annotations

from tqdm.auto import tqdm

from ..config import CladaConfig
from ..evaluate import score
from ..metrics import bootstrap_ratio
from .timing import paired_ratio, time_engines

METHODS = ("griffin", "paper", "calibrated", "inputs", "cats")


def sweep_points(methods, top_ks, targets, backend: str, kernel: str = "auto", profile=None, input_fractions=()):
    """[(method, knob, value, CladaConfig)] for the grid."""
    pts = []
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown sweep method {m!r}; choose from {', '.join(METHODS)}")
        if m in ("griffin", "paper"):
            pts += [(m, "top_k_ratio", r, CladaConfig.preset(m, top_k_ratio=r, backend=backend)) for r in top_ks]
        elif m in ("calibrated", "cats"):
            if profile is None:
                raise ValueError(f"sweep method {m!r} needs a profile (--profile, or the model's shipped one)")
            pts += [(m, "target_active", t, CladaConfig.preset(m, profile=profile, target_active=t, backend=backend,
                                                               kernel=kernel, sparsify=("mlp_down",))) for t in targets]
        else:
            pts += _input_points(profile, targets, input_fractions, backend, kernel)
    return pts


def _input_points(profile, targets, fractions, backend, kernel):
    from ..calibrate import load_profile, profile_groups

    if profile is None:
        raise ValueError("sweep method 'inputs' needs a profile calibrated with input groups "
                         "(clada-calibrate --inputs mlp_in=0.8,attn_in=0.7,attn_out=0.7)")
    groups = profile_groups(load_profile(profile))[1:]
    if not groups:
        raise ValueError(f"sweep method 'inputs': the profile {profile} has no input groups; "
                         f"recalibrate with clada-calibrate --inputs ...")
    if not fractions:
        raise ValueError("sweep method 'inputs' needs input fractions (--sweep_inputs 0.9,0.8,0.7)")
    return [("inputs", "target_active / input_active", f"{t} / {f}",
             CladaConfig.preset("calibrated", profile=profile, target_active=t, backend=backend, kernel=kernel,
                                input_active={g: f for g in groups}))
            for t in targets for f in fractions]


def run_sweep(cm, points, wins, prompt_ids, new_tokens: int, repeats: int):
    """cm: any CladaModel of the model (its traced graphs are shared by every point)."""
    cache = {}
    eager = cm.with_config(CladaConfig(backend="eager", enabled=False))
    dense_nll = [w["nll"] for w in score(eager, wins, baseline=True, desc="dense", cache=cache)]
    rows = []
    for method, knob, value, cfg in tqdm(points, desc="quality"):
        s = score(cm.with_config(cfg.replace(backend="eager")), wins, desc=f"{method} {value}", cache=cache)
        inc, lo, hi = bootstrap_ratio(dense_nll, [w["nll"] for w in s])
        rows.append(dict(method=method, knob=knob, value=value, ppl_increase_pct=inc, ppl_increase_ci95=[lo, hi],
                         eval_active_fraction=sum(w["active"] for w in s) / len(s)))

    engines = {"dense": (cm.with_config(points[0][3]).dense(), True)}
    engines.update({f"p{i}": (cm.with_config(cfg), False) for i, (*_, cfg) in enumerate(points)})
    timing = time_engines(engines, prompt_ids, new_tokens, repeats)
    d = timing["dense"]["median"]
    for i, row in enumerate(rows):
        t = timing[f"p{i}"]
        row.update(tokens_per_s=t["median"], speedup=t["median"] / d, raw_tokens_per_s=t["raw"],
                   paired_speedup=paired_ratio(t["raw"], timing["dense"]["raw"]),
                   decode_active_fraction=t["active_fraction"])
    return dict(dense_tokens_per_s=d, dense_raw_tokens_per_s=timing["dense"]["raw"], points=rows)


def frontier_table(res) -> str:
    lines = ["| method | knob | value | PPL increase % (95% CI) | active frac. (eval / decode) | tok/s | speedup | paired |",
             "|---|---|---|---|---|---|---|---|",
             f"| dense | | | 0 | 1.000 / 1.000 | {res['dense_tokens_per_s']:.2f} | 1.000x | |"]
    for r in res["points"]:
        lo, hi = r["ppl_increase_ci95"]
        paired = f"{r['paired_speedup']:.3f}x" if "paired_speedup" in r else "-"  # older JSON lacks it
        lines.append(f"| {r['method']} | {r['knob']} | {r['value']} | {r['ppl_increase_pct']:+.2f} ({lo:+.2f}..{hi:+.2f}) | "
                     f"{r['eval_active_fraction']:.3f} / {r['decode_active_fraction']:.3f} | {r['tokens_per_s']:.2f} | "
                     f"{r['speedup']:.3f}x | {paired} |")
    return "\n".join(lines)


def plot_sweep(res, path, title: str = ""):
    from .plots import plot_frontier

    curves = {}
    for r in res["points"]:
        # the bar: slowest and fastest run of the point against the median dense run
        d = res["dense_tokens_per_s"]
        lo, hi = min(r["raw_tokens_per_s"]) / d, max(r["raw_tokens_per_s"]) / d
        curves.setdefault(r["method"], []).append((r["ppl_increase_pct"], r["speedup"], lo, hi))
    return plot_frontier(curves, path, title)
