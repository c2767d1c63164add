"""SDPA at decode on the clada attention kernel (torch engine's decode graphs).

A decode step's attention is a few query rows over the whole KV cache: memory-bound, and aten's
CPU SDPA splits it by head only (kernels/attention.cpp says why that idles a thread).

Pattern:      scaled_dot_product_attention(q, k, v, mask) without dropout, causal flag or
              enable_gqa, on 4-D float q/k/v (after sdpa_without_repeat_kv: KV heads un-repeated)
Replacement:  clada::decode_attention(q, k, v, mask, scale), scale = SDPA's (default
              1 / sqrt(head dim)); the op runs aten's SDPA itself where its kernel does not apply
Guards:       dropout_p 0, is_causal and enable_gqa false, q/k/v 4-D floating point, mask None or
              4-D, the head dim static
Returns (gm, count): SDPA nodes replaced.
"""

from __future__ import annotations

import torch
from torch import fx

from .. import kernels  # noqa: F401  (defines clada::decode_attention)
from ._match import is_op

aten = torch.ops.aten


def _param(node, index, name, default):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def sdpa_to_decode_attention(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    g = gm.graph
    count = 0
    for node in list(g.nodes):
        if not is_op(node, aten.scaled_dot_product_attention.default):
            continue
        q, k, v = node.args[:3]
        mask = _param(node, 3, "attn_mask", None)
        if _param(node, 4, "dropout_p", 0.0) != 0.0 or _param(node, 5, "is_causal", False) \
                or _param(node, 7, "enable_gqa", False):
            continue
        vals = [x.meta.get("val") if isinstance(x, fx.Node) else None for x in (q, k, v)]
        if any(t is None or t.dim() != 4 or not t.is_floating_point() for t in vals):
            continue
        head_dim = vals[0].shape[-1]
        if not isinstance(head_dim, int):
            continue
        mv = mask.meta.get("val") if isinstance(mask, fx.Node) else None
        if mask is not None and (mv is None or mv.dim() != 4):
            continue
        scale = _param(node, 6, "scale", None)
        scale = head_dim ** -0.5 if scale is None else float(scale)
        with g.inserting_before(node):
            new = g.call_function(torch.ops.clada.decode_attention.default, (q, k, v, mask, scale))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        count += 1
    return gm, count


__all__ = ["sdpa_to_decode_attention"]
