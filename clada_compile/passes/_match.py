"""Small helpers shared by the pattern passes: node predicates and the MLP-site marker."""

from __future__ import annotations

import re

import torch
from torch import fx

aten = torch.ops.aten

# activation node target -> canonical name used by the clada ops
_ACT_TARGETS = {
    aten.silu.default: "silu",
    aten.relu.default: "relu",
}


def is_op(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def linear_parts(node):
    """aten.linear(x, w, b=None) -> (x, w, b); None when node is not a linear."""
    if not is_op(node, aten.linear.default):
        return None
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return x, w, b


def activation_of(node) -> str | None:
    """Canonical activation name of an activation node, None when it is not one we lower."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target in _ACT_TARGETS:
        return _ACT_TARGETS[node.target]
    if node.target == aten.gelu.default:
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return "gelu_tanh" if approx == "tanh" else "gelu"
    return None


def single_use(*nodes) -> bool:
    return all(len(n.users) == 1 for n in nodes)


def float_dtype_ok(*nodes) -> bool:
    """Guard: every tensor involved is floating point and of one dtype (no mixed-precision MLPs)."""
    dtypes = set()
    for n in nodes:
        if n is None:
            continue
        val = n.meta.get("val") if isinstance(n, fx.Node) else None
        if val is None:
            continue
        if not val.dtype.is_floating_point:
            return False
        dtypes.add(val.dtype)
    return len(dtypes) <= 1


def module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def layer_index(node) -> int | None:
    """Decoder layer index from the module path (model.layers.3.mlp.down_proj -> 3)."""
    m = re.search(r"\.(?:layers|h|layer)\.(\d+)(?:\.|$)", module_path(node))
    return int(m.group(1)) if m else None


def mlp_site(x, w_in, b_in, w_up, b_up, w_down, b_down, act):
    """Marker left by the fusion passes: one matched MLP, still executable (reference math).

    The lowering passes replace every marker by a clada op; keeping it executable means the graph
    stays a runnable, lintable GraphModule between passes. Passes insert it with
    graph.call_function and nothing symbolically traces code that calls it, so it needs no
    torch.fx.wrap: the generated code reaches it through the function object, and torch.compile
    traces into its body.
    """
    from clada_compile.ops import reference_mlp

    return reference_mlp(x, w_in, b_in, w_up, b_up, w_down, b_down, act)


def insert_site(graph: fx.Graph, out_node, x, w_in, b_in, w_up, b_up, w_down, b_down, act, kind) -> fx.Node:
    """Replace the MLP ending at out_node by one mlp_site marker node."""
    with graph.inserting_before(out_node):
        site = graph.call_function(mlp_site, (x, w_in, b_in, w_up, b_up, w_down, b_down, act))
    site.meta.update(out_node.meta)
    site.meta["clada_layer"] = layer_index(out_node)
    site.meta["clada_kind"] = kind
    site.meta["clada_path"] = module_path(out_node)
    out_node.replace_all_uses_with(site)
    return site


def sites(graph: fx.Graph):
    return [n for n in graph.nodes if n.op == "call_function" and n.target is mlp_site]
