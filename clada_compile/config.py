"""CladaConfig: the one validated, frozen configuration of clada_compile.

Field names mirror the seed's command-line flags so a config and a CLI invocation read the same.
Presets (``CladaConfig.preset(name)``) name the configurations the benchmarks compare.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

BACKENDS = ("inductor", "eager")
KERNELS = ("auto", "reference")
WRAPPERS = ("cpp", "python")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
SCHEDULES = ("static", "clada", "continuous")
SIGNALS = ("both", "entropy", "surprisal")
MLP_CRITERIA = ("h", "gate")
# Projection inputs that can carry a per-token threshold (drop channel i when |x_i| < tau; the
# GEMV then never reads row i of W^T): "mlp_down" is the MLP's hidden h (the decode graph input
# clada.tau), the others are the rows of clada.tau_in, in this order. "lm_head" is the input of the
# output projection (the final hidden state): one threshold for the whole model, held in every
# column of its row (the graph reads column 0; engine.check_input_taus keeps the row constant).
INPUT_GROUPS = ("mlp_in", "attn_in", "attn_out", "lm_head")
GROUPS = ("mlp_down",) + INPUT_GROUPS


def _check_range(name: str, value, lo, hi, lo_open=False, hi_open=False):
    bad = (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or math.isnan(value)
        or (value <= lo if lo_open else value < lo)
        or (value >= hi if hi_open else value > hi)
    )
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ValueError(f"`{name}` must be in {left}{lo}, {hi}{right}, got {value!r}")


def _check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclass(frozen=True)
class CladaConfig:
    """How sparse each MLP runs and how the controller moves it.

    top_k_ratio: fraction of each MLP's neurons kept in the per-sequence backbone (Griffin).
    min_active_neurons: floor on the backbone size k.
    surprisal_threshold / entropy_threshold: percentiles (0..1) of the recent window above which
        a token counts as high-load on that signal (CLADA's AND rule needs both).
    update_window: tokens per controller window (thresholds refresh, high-load check).
    target_active: fraction of backbone neurons the per-token threshold on h keeps on average;
        None (default) = the profile's own calibrated target. A number re-targets the profile's
        per-layer thresholds along its curves to that fraction (1.0 turns h's threshold off).
    profile: path of a calibration profile JSON (clada-calibrate) with per-layer base thresholds;
        None = no per-token threshold (backbone only). `clada_compile.shipped_profile("smollm2")`
        is the profile shipped for the embedded model.
    schedule: "static" (tau = base), "clada" (a step: tau scaled by high_load_scale when the load
        signal is above its window threshold, low_load_scale when below) or "continuous" (tau
        scaled by a linear blend of the two scales at the signal's percentile rank in the window).
    load_signal: "both" (the paper's AND rule over surprisal and entropy), "entropy" or "surprisal".
    high_load_scale / low_load_scale: tau multipliers; < 1 under high load = denser when the model
        is uncertain (the paper's direction), > 1 = sparser.
    reselect: re-select the backbone on high-load events.
    enabled: False runs the dense model through the same graphs (baseline).
    backend: "inductor" (torch.compile) or "eager" (the rewritten graph run as Python, for debugging).
    wrapper: the code around the decode graph's inductor kernels (direct.py), backend="inductor"
        only: "cpp" (the default there: inductor's C++ wrapper, 1.1-1.5x faster SmolLM2 steps, about
        twice the compile time) or "python" (inductor's Python wrapper: quicker to compile).
    kernel: "auto": every decode projection (q/k/v/o, gate/up, down, lm_head) on the C++
        input-sparse GEMV kernel (passes/gemv.py; error if the build fails); "reference": the
        masked dense matmul of lower_decode's graph (torch's linear for the other projections).
    precision: "fp32" or "bf16" (both run on the CPU kernels); "fp16" needs a CUDA model.
        optimize() casts the model's floating-point weights to it, in place. "int8": weight-only
        int8 with one scale per output channel (quantize.py) on every decode projection, lm_head
        included; float32 activations; needs a float32 model (its weights become their int8
        round trips in place, so prefill computes with the same weights on torch's GEMM).
    sparsify: which projection inputs the profile's thresholds apply to, a tuple of GROUPS:
        "mlp_down" (the MLP's hidden h, the paper's threshold), "mlp_in" (gate/up input),
        "attn_in" (q/k/v input), "attn_out" (o input), "lm_head" (the final hidden state, input of
        the output projection: 20-30% of a small model's decode bytes). None (default) = every group the profile
        was calibrated for. A group the profile lacks is an error (recalibrate with it).
    input_active: kept fraction per input group, e.g. {"mlp_in": 0.8, "attn_in": 0.7}: those
        groups' thresholds are re-targeted along the profile's curves (as target_active does for
        h); groups not named keep the profile's calibrated target. None = the profile's targets.
    mlp_criterion: what the "mlp_down" threshold compares: "h" (default: drop neuron j when
        |h_j| < tau, h = act(gate) * up, the down projection's input) or "gate" (the CATS baseline,
        arXiv 2404.08763: drop it when |act(gate_j)| < tau, so its up and down rows are skipped
        and only the gate is computed in full). "gate" needs gated MLPs, a profile with gate
        thresholds (clada-calibrate writes them) and fp32/bf16 weights.
    """

    top_k_ratio: float = 1.0
    min_active_neurons: int = 16
    surprisal_threshold: float = 0.7
    entropy_threshold: float = 0.7
    update_window: int = 10
    target_active: float | None = None
    profile: str | None = None
    schedule: str = "static"
    load_signal: str = "both"
    high_load_scale: float = 0.5
    low_load_scale: float = 1.0
    reselect: bool = False
    enabled: bool = True
    backend: str = "inductor"
    wrapper: str | None = None
    kernel: str = "auto"
    precision: str = "fp32"
    sparsify: tuple | None = None
    input_active: tuple | None = None
    mlp_criterion: str = "h"
    seed: int = 0

    def __post_init__(self):
        _check_range("top_k_ratio", self.top_k_ratio, 0, 1, lo_open=True)
        if not isinstance(self.min_active_neurons, int) or self.min_active_neurons < 1:
            raise ValueError(f"`min_active_neurons` must be an integer >= 1, got {self.min_active_neurons!r}")
        _check_range("surprisal_threshold", self.surprisal_threshold, 0, 1)
        _check_range("entropy_threshold", self.entropy_threshold, 0, 1)
        if not isinstance(self.update_window, int) or self.update_window < 2:
            raise ValueError(f"`update_window` must be an integer >= 2, got {self.update_window!r}")
        if self.target_active is not None:
            _check_range("target_active", self.target_active, 0, 1, lo_open=True)
        _check_range("high_load_scale", self.high_load_scale, 0, 10)
        _check_range("low_load_scale", self.low_load_scale, 0, 10)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("load_signal", self.load_signal, SIGNALS)
        _check_choice("backend", self.backend, BACKENDS)
        if self.wrapper is not None:
            _check_choice("wrapper", self.wrapper, WRAPPERS)
            if self.backend != "inductor":
                raise ValueError(f"`wrapper` applies to backend='inductor' (the compiled decode graph), got backend="
                                 f"{self.backend!r}; leave `wrapper` unset")
        if self.kernel == "cpp":  # the old synonym of "auto": one name per behaviour
            raise ValueError("`kernel` 'cpp' is now called 'auto' (the C++ GEMV kernel on CPU); pass kernel='auto'")
        _check_choice("kernel", self.kernel, KERNELS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("mlp_criterion", self.mlp_criterion, MLP_CRITERIA)
        if self.mlp_criterion == "gate" and self.precision == "int8":
            raise ValueError("`mlp_criterion` 'gate' (CATS) runs fp32/bf16 weights (its up projection reads "
                             "neuron-major rows, which the int8 kernel does not); use precision 'fp32' or 'bf16'")
        if self.sparsify is not None:
            if isinstance(self.sparsify, str) or not isinstance(self.sparsify, (tuple, list)):
                raise ValueError(f"`sparsify` must be a tuple of group names from {GROUPS} (or None for the "
                                 f"profile's groups), got {self.sparsify!r}")
            for name in self.sparsify:
                _check_choice("sparsify", name, GROUPS)
            if len(set(self.sparsify)) != len(self.sparsify):
                raise ValueError(f"`sparsify` names a group twice: {tuple(self.sparsify)!r}")
            # canonical order, hashable: equal configs compare equal
            object.__setattr__(self, "sparsify", tuple(g for g in GROUPS if g in self.sparsify))
        if self.input_active is not None:
            items = self.input_active.items() if isinstance(self.input_active, dict) else self.input_active
            try:
                pairs = dict(items)
            except (TypeError, ValueError):
                raise ValueError(f"`input_active` must be a dict {{group: kept fraction}}, got {self.input_active!r}") from None
            for name, frac in pairs.items():
                _check_choice("input_active", name, INPUT_GROUPS)
                _check_range(f"input_active[{name!r}]", frac, 0, 1, lo_open=True)
                if self.sparsify is not None and name not in self.sparsify:
                    raise ValueError(f"`input_active` sets {name!r}, which `sparsify` {self.sparsify!r} leaves off; "
                                     f"add it to `sparsify` or drop it from `input_active`")
            object.__setattr__(self, "input_active", tuple((g, float(pairs[g])) for g in INPUT_GROUPS if g in pairs))

    def replace(self, **changes) -> "CladaConfig":
        return dataclasses.replace(self, **changes)

    @property
    def uses_threshold(self) -> bool:
        """Whether decode thresholds anything: a profile, and h below the full backbone or an input
        group (sparsify None may enable the profile's input groups)."""
        if not (self.enabled and self.profile is not None):
            return False
        return (self.target_active is None or self.target_active < 1.0 or self.sparsify is None or bool(self.input_active)
                or any(g in INPUT_GROUPS for g in self.sparsify))

    def groups(self, available) -> tuple:
        """The groups thresholded with a profile calibrated for `available` groups."""
        wanted = self.sparsify if self.sparsify is not None else tuple(dict(self.input_active or ()))
        missing = [g for g in wanted if g not in available]
        if self.sparsify is None:
            if missing:
                raise ValueError(f"`input_active` sets {missing}, but the profile has thresholds only for "
                                 f"{tuple(available)}; recalibrate with clada-calibrate --inputs including them")
            return tuple(g for g in GROUPS if g in available)
        if missing:
            raise ValueError(f"`sparsify` names {missing}, but the profile has thresholds only for "
                             f"{tuple(available)}; recalibrate with clada-calibrate --inputs including them")
        return self.sparsify

    @classmethod
    def preset(cls, name: str, **overrides) -> "CladaConfig":
        """Named configurations: dense, griffin, paper, calibrated, cats."""
        presets = {
            # the dense model through the same graphs
            "dense": dict(enabled=False),
            # static per-sequence selection only (Griffin): no controller, no per-token threshold
            "griffin": dict(top_k_ratio=0.5, target_active=1.0, schedule="static", reselect=False),
            # CLADA as arXiv 2502.19078 configures it
            "paper": dict(top_k_ratio=0.5, target_active=1.0, schedule="clada", reselect=True,
                          surprisal_threshold=0.7, entropy_threshold=0.7, update_window=10),
            # full backbone, calibrated per-token thresholds (needs `profile`)
            "calibrated": dict(top_k_ratio=1.0, target_active=0.5, schedule="static"),
            # the CATS baseline (arXiv 2404.08763): threshold on |act(gate)|, h only (needs `profile`)
            "cats": dict(top_k_ratio=1.0, target_active=0.5, schedule="static", sparsify=("mlp_down",),
                         mlp_criterion="gate"),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
        return cls(**{**presets[name], **overrides})
