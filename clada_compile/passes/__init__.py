"""FX passes that rewrite every MLP of a traced decoder into a clada sparse-MLP block.

Each pass is a function GraphModule -> (GraphModule, count). run_passes applies them in order,
then lints and recompiles the graph once. See README.md in this folder for the invariants.
"""

from __future__ import annotations

from torch import fx

from .canonicalize_conv1d import canonicalize_conv1d
from .canonicalize_gelu_tanh import canonicalize_gelu_tanh
from .cleanup import remove_noise
from .fuse_gated_mlp import fuse_gated_mlp
from .fuse_plain_mlp import fuse_plain_mlp
from .inline import inline_sparse_mlp
from .lower import MlpSite, UnmatchedMLPError, lower_decode, lower_prefill, materialize, ordered_sites

# order matters: canonical forms first, gated before plain (a gated down-projection reads a mul)
MLP_PASSES = (remove_noise, canonicalize_conv1d, canonicalize_gelu_tanh, fuse_gated_mlp, fuse_plain_mlp)


def run_passes(gm: fx.GraphModule, passes=MLP_PASSES) -> dict[str, int]:
    counts = {}
    for p in passes:
        gm, counts[p.__name__] = p(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return counts


__all__ = ["run_passes", "MLP_PASSES", "MlpSite", "UnmatchedMLPError", "lower_prefill", "lower_decode",
           "materialize", "ordered_sites", "canonicalize_conv1d", "canonicalize_gelu_tanh", "remove_noise",
           "fuse_gated_mlp", "fuse_plain_mlp", "inline_sparse_mlp"]
