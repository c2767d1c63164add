"""Drop nodes that only assert or do nothing in eval, so patterns see the real dataflow."""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten


def remove_noise(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """Remove tensor-metadata asserts, eval-mode dropout and same-dtype `to` casts."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
            count += 1
        elif node.target == aten.dropout.default and node.args[2] is False:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            count += 1
        elif node.target == aten.to.dtype and len(node.args) == 2 and not node.kwargs:
            src = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
            if src is not None and src.dtype == node.args[1]:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                count += 1
    return gm, count
