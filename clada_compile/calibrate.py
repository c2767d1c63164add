"""Offline per-layer thresholds from real text -> a JSON profile.

For every layer, the MLP's intermediate activations h are collected on real text through the
SAME prefill graph the model runs (a torch.fx.Interpreter intercepts each clada::scored_mlp).
A threshold tau keeps the neurons with |h| >= tau; for a grid of kept fractions f we measure the
relative error of the MLP output, ||mask(h) Wd - h Wd|| / ||h Wd||, averaged over tokens.
Layers then get their fractions by one of two allocations:
  uniform  (default) every layer keeps `target_active` of its neurons (its own quantile of |h|);
  greedy   starting dense, repeatedly lower the fraction of the layer whose next step costs the
           least output error, never past `error_budget` per layer, until the mean fraction
           reaches `target_active`.
Why uniform is the default: greedy minimises the SUM of per-layer relative MLP output errors,
which is not what perplexity sees. On SmolLM2 it pushed the first and last layers to 25% and
20% kept and cost +3.3% / +4.1% perplexity at 50% mean kept (8 / 16 windows), where uniform
costs +1.4% / +3.0% (docs/BENCHMARKS.md, "Calibration: uniform vs greedy"). The profile stores each layer's chosen
tau and its whole fraction -> (tau, error) curve, so a controller can move along it.

Thresholds apply inside the backbone; the calibration runs with the full backbone (top_k = 1).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import fx
from tqdm.auto import tqdm

from . import __version__
from .ops import _hidden

FRACTIONS = [round(1.0 - 0.05 * i, 2) for i in range(19)]  # 1.00 .. 0.10
ALLOCATIONS = ("uniform", "greedy")
PROFILE_FORMAT = "clada-profile/1"


class _Collector(fx.Interpreter):
    def __init__(self, gm, store, max_rows, generator):
        super().__init__(gm)
        self.store, self.max_rows, self.gen, self.layer = store, max_rows, generator, 0

    def call_function(self, target, args, kwargs):
        if target is torch.ops.clada.scored_mlp.default:
            x, w_in, b_in, w_up, b_up, w_down, b_down = args[:7]
            h = _hidden(x, w_in, b_in, w_up, b_up, args[9]).reshape(-1, w_in.shape[0])
            rows = self.store.setdefault(self.layer, [])
            take = torch.randperm(h.shape[0], generator=self.gen)[: self.max_rows]
            rows.append(h[take].float())
            self.layer += 1
        return super().call_function(target, args, kwargs)


def collect_activations(cm, token_ids: torch.Tensor, window: int, rows_per_window: int = 128, seed: int = 0):
    """Run the prefill graph over consecutive windows of token_ids -> {layer: (N, d_ff) h rows}."""
    store: dict = {}
    gen = torch.Generator().manual_seed(seed)
    n = token_ids.numel() // window
    if n == 0:
        raise ValueError(f"the calibration text has {token_ids.numel()} tokens, fewer than one window of {window}")
    gm = cm.graphs.prefill.gm
    for i in tqdm(range(n), desc="calibrate", leave=False):
        ids = token_ids[i * window:(i + 1) * window].view(1, -1)
        mask = torch.ones_like(ids)
        pos = torch.arange(window).view(1, -1)
        with torch.no_grad():
            col = _Collector(gm, store, rows_per_window, gen)
            col.run(ids, mask, pos, torch.zeros(cm.n_layers), mask)
    return {k: torch.cat(v) for k, v in store.items()}


def layer_curve(h: torch.Tensor, w_down: torch.Tensor, extra: tuple = ()):
    """For each fraction in FRACTIONS (and `extra`): (fraction, tau, mean relative output error)."""
    mags = h.abs().flatten().sort().values  # one sort; every quantile is then an index
    h = h[:1024]  # the error estimate needs fewer rows than the quantiles
    ref = h @ w_down.float().t()
    ref_norm = ref.norm(dim=-1).clamp_min(1e-9)
    curve = []
    for f in sorted(set(FRACTIONS) | set(extra), reverse=True):
        tau = 0.0 if f >= 1.0 else float(mags[min(int((1.0 - f) * mags.numel()), mags.numel() - 1)])
        masked = torch.where(h.abs() >= tau, h, torch.zeros_like(h))
        err = ((masked @ w_down.float().t() - ref).norm(dim=-1) / ref_norm).mean()
        curve.append((f, tau, float(err)))
    return curve


def allocate(curves, target_active: float, error_budget: float):
    """Greedy: lower, one grid step at a time, the layer with the least added error per step."""
    idx = [0] * len(curves)  # index into FRACTIONS, 0 = dense
    def mean_f():
        return sum(FRACTIONS[i] for i in idx) / len(idx)
    while mean_f() > target_active + 1e-9:
        best, best_cost = None, math.inf
        for layer, c in enumerate(curves):
            i = idx[layer]
            if i + 1 >= len(c) or c[i + 1][2] > error_budget:
                continue
            cost = c[i + 1][2] - c[i][2]
            if cost < best_cost:
                best, best_cost = layer, cost
        if best is None:
            break  # every layer is at its error budget
        idx[best] += 1
    return idx


def calibrate(cm, token_ids: torch.Tensor, target_active: float = 0.5, error_budget: float = 0.25,
              window: int = 256, text_name: str = "", model_name: str = "", allocation: str = "uniform") -> dict:
    if not 0 < target_active <= 1:
        raise ValueError(f"`target_active` must be in (0, 1], got {target_active}")
    if not error_budget > 0:
        raise ValueError(f"`error_budget` must be > 0, got {error_budget}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"`allocation` must be one of {ALLOCATIONS}, got {allocation!r}")
    acts = collect_activations(cm, token_ids, window)
    # uniform: the target itself is a curve point, so every layer sits exactly on it
    extra = (round(target_active, 6),) if allocation == "uniform" else ()
    curves = [layer_curve(acts[layer], cm.full[layer]["w_down"], extra) for layer in range(cm.n_layers)]
    if allocation == "uniform":
        idx = [[f for f, _, _ in c].index(extra[0]) for c in curves]
    else:
        idx = allocate(curves, target_active, error_budget)
    layers = []
    for layer, (c, i) in enumerate(zip(curves, idx)):
        f, tau, err = c[i]
        layers.append(dict(layer=layer, tau=tau, active_fraction=f, rel_error=err,
                           curve=[dict(active_fraction=a, tau=t, rel_error=e) for a, t, e in c]))
    achieved = sum(layer["active_fraction"] for layer in layers) / len(layers)
    return dict(format=PROFILE_FORMAT, clada_compile=__version__, model=model_name, architecture=cm.graphs.arch,
                n_layers=cm.n_layers, d_ff=cm.d_ff, allocation=allocation, target_active=target_active,
                achieved_active=achieved,
                error_budget=error_budget, text=text_name, tokens=int(token_ids.numel() // window * window),
                window=window, layers=layers)


def load_profile(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration profile not found: {path} (make one with clada-calibrate)")
    try:
        prof = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"calibration profile {path} is not valid JSON: {e}") from None
    if prof.get("format") != PROFILE_FORMAT:
        raise ValueError(f"{path} is not a clada calibration profile (format {prof.get('format')!r}, "
                         f"expected {PROFILE_FORMAT!r})")
    return prof


def profile_taus(prof: dict, n_layers: int, target_active: float | None = None) -> torch.Tensor:
    """Per-layer thresholds: the profile's choice, or, for another target, the profile's curves
    scaled so the mean kept fraction matches `target_active` (linear interpolation on the grid)."""
    if prof["n_layers"] != n_layers:
        raise ValueError(f"the profile is for {prof['n_layers']} layers, the model has {n_layers}")
    if target_active is None or abs(target_active - prof["achieved_active"]) < 1e-9:
        return torch.tensor([layer["tau"] for layer in prof["layers"]], dtype=torch.float32)
    shift = target_active / prof["achieved_active"]
    taus = []
    for layer in prof["layers"]:
        want = min(1.0, layer["active_fraction"] * shift)
        pts = sorted((p["active_fraction"], p["tau"]) for p in layer["curve"])
        taus.append(max(0.0, _interp(want, pts)))  # interpolation rounding must not go negative
    return torch.tensor(taus, dtype=torch.float32)


def _interp(x, pts):
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y0
    return pts[-1][1]


def shipped_profile(name: str) -> str | None:
    """Path of the calibration profile shipped for an embedded model ("smollm2",
    "qwen2.5-coder-0.5b", ...), or None."""
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        return None  # a path, not an embedded model name
    path = Path(__file__).parent / "profiles" / f"{name}.json"
    return str(path) if path.is_file() else None


def apply_profile(cm, path) -> dict:
    prof = load_profile(path)
    target = cm.config.target_active
    cm.set_thresholds(profile_taus(prof, cm.n_layers, target))
    cm.profile = prof
    return prof
