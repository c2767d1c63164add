"""GPT-2's Conv1D (view -> addmm -> view) becomes aten.linear with a transposed weight view.

Pattern:      view(addmm(b, view(x, [-1, d]), W), [*x.shape[:-1], n])
Replacement:  linear(x, t(W), b)
Guard: x is 2-D or more, W is 2-D, the outer view restores x's leading dims.
"""

from __future__ import annotations

import torch
from torch import fx

from ._match import is_op

aten = torch.ops.aten


def canonicalize_conv1d(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    count = 0
    g = gm.graph
    for outer in list(g.nodes):
        if not is_op(outer, aten.view.default, aten.reshape.default):
            continue
        mm = outer.args[0]
        if not is_op(mm, aten.addmm.default) or len(mm.users) != 1 or mm.kwargs:
            continue
        bias, inner, weight = mm.args[:3]
        if not is_op(inner, aten.view.default, aten.reshape.default) or len(inner.users) != 1:
            continue
        x = inner.args[0]
        xv, wv, ov = (n.meta.get("val") for n in (x, weight, outer))
        if xv is None or wv is None or ov is None or xv.dim() < 2 or wv.dim() != 2 or ov.dim() != xv.dim():
            continue
        with g.inserting_before(outer):
            wt = g.call_function(aten.t.default, (weight,))
            lin = g.call_function(aten.linear.default, (x, wt, bias))
        lin.meta.update(outer.meta)
        lin.meta["val"] = ov
        outer.replace_all_uses_with(lin)
        for n in (outer, mm, inner):
            g.erase_node(n)
        count += 1
    return gm, count
