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

Input groups (config.INPUT_GROUPS: the MLP's input x for gate/up, the attention projections'
inputs, the lm_head's input): the same text, the same graph; each requested group keeps its
target fraction of input channels in every layer (uniform), tau = that quantile of |x| over the
sampled tokens. Their curves (fraction -> tau) let a sweep move along them without
recalibrating. Profile format 2 adds them under "inputs" ("lm_head" has one entry in "layers":
the model has one lm_head); format 1 profiles (h only) still load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx
from tqdm.auto import tqdm

from . import __version__
from .ops import ACTIVATIONS, _hidden

FRACTIONS = [round(1.0 - 0.05 * i, 2) for i in range(19)]  # 1.00 .. 0.10
ALLOCATIONS = ("uniform", "greedy")
PROFILE_FORMAT = "clada-profile/2"
READABLE_FORMATS = ("clada-profile/1", PROFILE_FORMAT)


class _Collector(fx.Interpreter):
    """Samples, per layer, rows of h (store[layer]) and of the watched projection inputs
    (store[(group, layer)]): the same rows of one window for every tensor."""

    def __init__(self, gm, store, max_rows, generator, watch):
        super().__init__(gm)
        self.store, self.max_rows, self.gen, self.layer, self.watch = store, max_rows, generator, 0, watch
        self.take = None

    def _sample(self, key, t):
        t = t.reshape(-1, t.shape[-1])
        if self.take is None:  # every tensor of a window has the window's rows
            self.take = torch.randperm(t.shape[0], generator=self.gen)[: self.max_rows]
        self.store.setdefault(key, []).append(t[self.take].float())

    def run_node(self, n):
        if n in self.watch:  # a projection whose input is thresholded: record that input
            self._sample(self.watch[n], self.env[n.args[0]])
        return super().run_node(n)

    def call_function(self, target, args, kwargs):
        if target is torch.ops.clada.scored_mlp.default:
            x, w_in, b_in, w_up, b_up, w_down, b_down = args[:7]
            self._sample(("mlp_in", self.layer), x)
            self._sample(self.layer, _hidden(x, w_in, b_in, w_up, b_up, args[9]))
            if w_up is not None:  # act(gate): what mlp_criterion "gate" (CATS) thresholds
                self._sample(("mlp_gate", self.layer), ACTIVATIONS[args[9]](F.linear(x, w_in, b_in)))
            self.layer += 1
        return super().call_function(target, args, kwargs)


def _watched(gm) -> dict:
    """First linear of each attention input group of the prefill graph -> (group, layer), and the
    lm_head -> ("lm_head", 0)."""
    from .passes.projections import attention_projections, head_projection

    watch = {linears[0]: (group, layer) for layer, groups in attention_projections(gm.graph).items()
             for group, linears in groups.items()}
    head = head_projection(gm.graph)
    if head is not None:
        watch[head] = ("lm_head", 0)
    return watch


def collect_activations(cm, token_ids: torch.Tensor, window: int, rows_per_window: int = 128, seed: int = 0):
    """Run the prefill graph over consecutive windows of token_ids -> {layer: (N, d_ff) h rows,
    (group, layer): (N, d_in) rows of that projection input}."""
    store: dict = {}
    gen = torch.Generator().manual_seed(seed)
    n = token_ids.numel() // window
    if n == 0:
        raise ValueError(f"the calibration text has {token_ids.numel()} tokens, fewer than one window of {window}")
    gm = cm.graphs.prefill.gm
    watch = _watched(gm)
    for i in tqdm(range(n), desc="calibrate", leave=False):
        ids = token_ids[i * window:(i + 1) * window].view(1, -1)
        mask = torch.ones_like(ids)
        pos = torch.arange(window).view(1, -1)
        with torch.no_grad():
            col = _Collector(gm, store, rows_per_window, gen, watch)
            col.run(ids, mask, pos, torch.zeros(cm.n_layers), mask)
    return {k: torch.cat(v) for k, v in store.items()}


def input_curve(x: torch.Tensor, extra: tuple = ()):
    """For each fraction in FRACTIONS (and `extra`): (fraction, tau) keeping that fraction of |x|."""
    mags = x.abs().flatten().sort().values
    out = []
    for f in sorted(set(FRACTIONS) | set(extra), reverse=True):
        out.append((f, 0.0 if f >= 1.0 else float(mags[min(int((1.0 - f) * mags.numel()), mags.numel() - 1)])))
    return out


def check_input_targets(input_targets) -> dict:
    """{group: kept fraction} for the input groups; a clear error for anything else."""
    from .config import INPUT_GROUPS

    if not isinstance(input_targets, dict):
        raise ValueError(f"`input_targets` must be a dict {{group: fraction}}, got {input_targets!r}")
    for g, f in input_targets.items():
        if g not in INPUT_GROUPS:
            raise ValueError(f"unknown input group {g!r}; choose from {', '.join(INPUT_GROUPS)}")
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(f"the target of {g!r} must be in (0, 1], got {f!r}")
    return dict(input_targets)


def layer_curve(h: torch.Tensor, w_down: torch.Tensor, extra: tuple = (), by: torch.Tensor | None = None):
    """For each fraction in FRACTIONS (and `extra`): (fraction, tau, mean relative output error).
    by: the tensor whose magnitude decides which neurons are dropped (the same rows as h): h itself
    (default), or act(gate) for mlp_criterion "gate" (CATS)."""
    by = h if by is None else by
    mags = by.abs().flatten().sort().values  # one sort; every quantile is then an index
    h, by = h[:1024], by[:1024]  # the error estimate needs fewer rows than the quantiles
    ref = h @ w_down.float().t()
    ref_norm = ref.norm(dim=-1).clamp_min(1e-9)
    curve = []
    for f in sorted(set(FRACTIONS) | set(extra), reverse=True):
        tau = 0.0 if f >= 1.0 else float(mags[min(int((1.0 - f) * mags.numel()), mags.numel() - 1)])
        masked = torch.where(by.abs() >= tau, h, torch.zeros_like(h))
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
              window: int = 256, text_name: str = "", model_name: str = "", allocation: str = "uniform",
              input_targets: dict | None = None) -> dict:
    """input_targets: {input group: kept fraction}, e.g. {"mlp_in": 0.8, "attn_in": 0.7}; those
    groups get thresholds too (uniform over layers)."""
    input_targets = check_input_targets(input_targets or {})
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
    gate = None
    if all(("mlp_gate", layer) in acts for layer in range(cm.n_layers)):  # gated MLPs: CATS's thresholds too
        target = round(target_active, 6)
        glayers = []
        for layer in range(cm.n_layers):
            c = layer_curve(acts[layer], cm.full[layer]["w_down"], (target,), by=acts[("mlp_gate", layer)])
            f, tau, err = next(p for p in c if p[0] == target)
            glayers.append(dict(layer=layer, tau=tau, active_fraction=f, rel_error=err,
                                curve=[dict(active_fraction=a, tau=t, rel_error=e) for a, t, e in c]))
        gate = dict(target_active=target_active, achieved_active=target_active, layers=glayers)
    inputs = {}
    for group, target in input_targets.items():
        if group == "lm_head":  # one projection: one "layer" entry, whose tau fills the whole row
            if ("lm_head", 0) not in acts:
                raise ValueError(f"{cm.graphs.arch}: no single lm_head linear outside the decoder layers found; "
                                 f"the 'lm_head' group does not apply to this architecture")
            own = [0]
        else:
            own = range(cm.n_layers)
            missing = [layer for layer in own if (group, layer) not in acts]
            if missing:
                raise ValueError(f"{cm.graphs.arch}: no {group!r} projection input found in layers {missing}; "
                                 f"this architecture's attention does not match passes/projections.py")
        glayers = []
        for layer in own:
            curve = input_curve(acts[(group, layer)], (round(target, 6),))
            f, tau = next(p for p in curve if p[0] == round(target, 6))
            glayers.append(dict(layer=layer, tau=tau, active_fraction=f,
                                curve=[dict(active_fraction=a, tau=t) for a, t in curve]))
        inputs[group] = dict(target_active=target, achieved_active=target, layers=glayers)
    return dict(format=PROFILE_FORMAT, clada_compile=__version__, model=model_name, architecture=cm.graphs.arch,
                n_layers=cm.n_layers, d_ff=cm.d_ff, allocation=allocation, target_active=target_active,
                achieved_active=achieved,
                error_budget=error_budget, text=text_name, tokens=int(token_ids.numel() // window * window),
                window=window, layers=layers, inputs=inputs, **({"gate": gate} if gate else {}))


def save_profile(prof: dict, path) -> None:
    """Write atomically: a temporary sibling renamed over `path` (no half-written profile)."""
    from .io import atomic_write_json

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"the profile path {path} is a directory; give a file name like {path / 'profile.json'}")
    atomic_write_json(path, prof, indent=1)


def load_profile(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration profile not found: {path} (make one with clada-calibrate)")
    try:
        prof = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"calibration profile {path} is not valid JSON: {e}") from None
    if not isinstance(prof, dict) or prof.get("format") not in READABLE_FORMATS:
        found = prof.get("format") if isinstance(prof, dict) else type(prof).__name__
        raise ValueError(f"{path} is not a clada calibration profile (format {found!r}, "
                         f"expected one of {READABLE_FORMATS})")
    prof.setdefault("inputs", {})  # format 1: thresholds of h only
    return prof


def profile_groups(prof: dict) -> tuple:
    """The threshold groups a profile was calibrated for (config.GROUPS order)."""
    from .config import GROUPS

    return tuple(g for g in GROUPS if g == "mlp_down" or g in prof.get("inputs", {}))


def profile_taus(prof: dict, n_layers: int, target_active: float | None = None, group: str = "mlp_down",
                 criterion: str = "h") -> torch.Tensor:
    """Per-layer thresholds of `group`: the profile's choice, or, for another target, the profile's
    curves scaled so the mean kept fraction matches `target_active` (linear interpolation on the grid).
    criterion "gate": the "mlp_down" thresholds on |act(gate)| (CladaConfig.mlp_criterion, CATS)."""
    if prof["n_layers"] != n_layers:
        raise ValueError(f"the profile is for {prof['n_layers']} layers, the model has {n_layers}")
    if group != "mlp_down" and group not in prof.get("inputs", {}):
        raise ValueError(f"the profile has no thresholds for {group!r} (it has {profile_groups(prof)})")
    if group == "mlp_down" and criterion == "gate" and "gate" not in prof:
        raise ValueError("`mlp_criterion` 'gate' needs a profile with thresholds on act(gate), which clada-calibrate "
                         "writes for gated MLPs since this version; recalibrate (this profile has h thresholds only)")
    part = prof if group == "mlp_down" else prof["inputs"][group]
    if group == "mlp_down" and criterion == "gate":
        part = prof["gate"]
    if target_active is None or abs(target_active - part["achieved_active"]) < 1e-9:
        taus = [layer["tau"] for layer in part["layers"]]
    else:
        shift = target_active / part["achieved_active"]
        taus = []
        for layer in part["layers"]:
            want = min(1.0, layer["active_fraction"] * shift)
            pts = sorted((p["active_fraction"], p["tau"]) for p in layer["curve"])
            taus.append(max(0.0, _interp(want, pts)))  # interpolation rounding must not go negative
    if group == "lm_head":  # one entry (the model's one lm_head): its tau fills the row
        taus = taus * n_layers
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
    """Base thresholds from a profile for the groups cm.config.sparsify selects (h re-targeted to
    config.target_active; input groups at their calibrated targets)."""
    from .config import INPUT_GROUPS

    prof = load_profile(path)
    groups = cm.config.groups(profile_groups(prof))
    n = cm.n_layers
    if "mlp_down" in groups:
        cm.set_thresholds(profile_taus(prof, n, cm.config.target_active, criterion=cm.config.mlp_criterion))
    else:
        cm.set_thresholds(torch.zeros(n))
    inputs = torch.zeros(len(INPUT_GROUPS), n)
    targets = dict(cm.config.input_active or ())
    for i, g in enumerate(INPUT_GROUPS):
        if g in groups:
            inputs[i] = profile_taus(prof, n, targets.get(g), group=g)
    attention = [INPUT_GROUPS.index(g) for g in ("attn_in", "attn_out")]
    if inputs[attention].any():  # attention thresholds need every layer's attention in the graph
        missing = sorted(set(range(n)) - set(getattr(cm, "attention_layers", range(n))))
        if missing:
            raise ValueError(f"`sparsify` thresholds attention inputs, but layers {missing} of this "
                             f"{prof.get('architecture')} model have no matched attention projections")
    # (an lm_head threshold on a graph without the matched lm_head: set_input_thresholds refuses it)
    cm.set_input_thresholds(inputs)
    cm.profile = prof
    return prof
