"""trace -> passes -> lowering: the prefill and decode graphs of one model.

The same function feeds torch.compile (compiled.py) and the ONNX exporter (exporters/onnx.py):
one pass library for both backends.
"""

from __future__ import annotations

from dataclasses import dataclass

from .models import architecture_of
from .passes import lower_decode, lower_prefill, run_passes
from .tracing import TracedGraph, num_layers, trace


@dataclass
class CladaGraphs:
    arch: str
    n_layers: int
    prefill: TracedGraph
    decode: TracedGraph
    rewrites: dict  # pass name -> count, for the prefill trace (the decode trace matches it)
    impl: str  # how the decode graph's sparse_mlp runs its down projection (ops.IMPLS)


def _rewrite(model, phase, arch, n, impl):
    traced = trace(model, phase)
    counts = run_passes(traced.gm)
    if phase == "prefill":
        _, counts["lower_prefill"] = lower_prefill(traced, n, arch)
    else:
        _, counts["lower_decode"] = lower_decode(traced, n, arch, impl)
    traced.gm.graph.eliminate_dead_code()
    traced.gm.graph.lint()
    traced.gm.recompile()
    return traced, counts


def build_graphs(model, impl: str = "auto") -> CladaGraphs:
    arch = architecture_of(model)
    n = num_layers(model)
    prefill, counts = _rewrite(model, "prefill", arch, n, impl)
    decode, _ = _rewrite(model, "decode", arch, n, impl)
    return CladaGraphs(arch, n, prefill, decode, counts, impl)
