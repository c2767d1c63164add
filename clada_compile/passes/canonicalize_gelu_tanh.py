"""The tanh GELU written out in pointwise ops (GPT-2's gelu_new, Phi's NewGELU) becomes aten.gelu.

Pattern:      mul(mul(x, 0.5), add(tanh(mul(add(x, mul(pow(x, 3), 0.044715)), sqrt(2/pi))), 1))
Replacement:  gelu(x, approximate="tanh")
Guard: the constants match to 1e-6 and every intermediate has one user.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from ._match import is_op

aten = torch.ops.aten


def _scalar_mul(node, value):
    """node == mul(a, value) (either order): return a, else None."""
    if not is_op(node, aten.mul.Tensor):
        return None
    a, b = node.args
    if isinstance(b, (int, float)) and math.isclose(b, value, rel_tol=1e-6):
        return a
    if isinstance(a, (int, float)) and math.isclose(a, value, rel_tol=1e-6):
        return b
    return None


def _match(node):
    if not is_op(node, aten.mul.Tensor):
        return None
    for half, rest in (node.args, node.args[::-1]):
        x = _scalar_mul(half, 0.5)
        if x is None or not is_op(rest, aten.add.Tensor) or rest.args[1] != 1.0:
            continue
        tanh = rest.args[0]
        if not is_op(tanh, aten.tanh.default):
            continue
        inner = _scalar_mul(tanh.args[0], math.sqrt(2.0 / math.pi))
        if not is_op(inner, aten.add.Tensor) or inner.args[0] is not x:
            continue
        cube = _scalar_mul(inner.args[1], 0.044715)
        if not is_op(cube, aten.pow.Tensor_Scalar) or cube.args != (x, 3.0):
            continue
        chain = [half, rest, tanh, tanh.args[0], inner, inner.args[1], cube]
        if all(len(n.users) == 1 for n in chain):
            return x, chain
    return None


def canonicalize_gelu_tanh(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    count = 0
    g = gm.graph
    for node in list(g.nodes):
        m = _match(node)
        if m is None:
            continue
        x, chain = m
        with g.inserting_before(node):
            gelu = g.call_function(aten.gelu.default, (x,), {"approximate": "tanh"})
        gelu.meta.update(node.meta)
        node.replace_all_uses_with(gelu)
        g.erase_node(node)
        for n in chain:
            if not n.users:
                g.erase_node(n)
        count += 1
    return gm, count
