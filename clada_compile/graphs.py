"""trace -> passes -> lowering: the prefill and decode graphs of one model.

The same graphs feed torch.compile (compiled.py) and the ONNX exporter (exporters/onnx.py):
one pass library for both backends. Tracing is the expensive part (torch.export of the whole
model), so it runs once per phase; lowering the fused decode graph to another `impl` copies only
the graph (the weights stay shared).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import fx

from .models import architecture_of
from .passes import lower_decode, lower_prefill, run_passes
from .tracing import TracedGraph, num_layers, trace


@dataclass
class CladaGraphs:
    arch: str
    n_layers: int
    prefill: TracedGraph
    fused_decode: TracedGraph  # decode trace with mlp_site markers, not yet lowered
    rewrites: dict  # pass name -> count, for the prefill trace (the decode trace matches it)
    impl: str  # default impl of `decode` (ops.IMPLS)
    _lowered: dict = field(default_factory=dict)
    # fused W^T constants of passes.gemv.linears_to_gemv, made once per traced model and shared by
    # every engine on these graphs (CLADA and its dense twin)
    gemv_weights: dict = field(default_factory=dict)

    def decode_for(self, impl: str, criterion: str = "h") -> TracedGraph:
        """The decode graph whose MLP ops run with `impl` and drop neurons by `criterion`
        (CladaConfig.mlp_criterion), built once per pair."""
        key = (impl, criterion if impl != "dense" else "h")
        if key not in self._lowered:
            src = self.fused_decode
            gm = fx.GraphModule(src.gm, copy.deepcopy(src.gm.graph))
            traced = TracedGraph(gm, "decode", list(src.input_names), list(src.output_names))
            lower_decode(traced, self.n_layers, self.arch, *key)
            _finish(gm)
            self._lowered[key] = traced
        return self._lowered[key]

    @property
    def decode(self) -> TracedGraph:
        return self.decode_for(self.impl)


def _finish(gm):
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def build_graphs(model, impl: str = "auto") -> CladaGraphs:
    arch = architecture_of(model)
    n = num_layers(model)
    prefill = trace(model, "prefill")
    counts = run_passes(prefill.gm)
    _, counts["lower_prefill"] = lower_prefill(prefill, n, arch)
    _finish(prefill.gm)
    decode = trace(model, "decode")
    run_passes(decode.gm)
    return CladaGraphs(arch, n, prefill, decode, counts, impl)
