"""Gated MLPs (SwiGLU / GeGLU) become one mlp_site marker.

Pattern (Llama, Mistral, Qwen2, Gemma):
    linear(mul(act(linear(x, Wg, bg)), linear(x, Wu, bu)), Wd, bd)      (mul in either order)
Pattern (Phi-3, fused gate_up_proj):
    y = linear(x, Wgu, bgu); g, u = chunk(y, 2, -1)
    linear(mul(u, act(g)), Wd, bd)                                       (mul in either order)
    -> the marker takes Wg = Wgu[:d_ff], Wu = Wgu[d_ff:] as slice views.
Replacement: mlp_site(x, Wg, bg, Wu, bu, Wd, bd, act)
Guards: every intermediate has exactly one user (or two for the fused projection's chunk
outputs), one floating dtype throughout, act in {silu, gelu, gelu_tanh, relu}.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ._match import activation_of, float_dtype_ok, insert_site, is_op, linear_parts, single_use

aten = torch.ops.aten


def _split_halves(gate, up):
    """gate, up = getitem(chunk(linear(x, Wgu), 2, -1), 0/1) -> (linear node, chunk node) or None."""
    if not (is_op(gate, operator.getitem) and is_op(up, operator.getitem)):
        return None
    chunk = gate.args[0]
    if up.args[0] is not chunk or (gate.args[1], up.args[1]) != (0, 1):
        return None
    if is_op(chunk, aten.chunk.default) and chunk.args[1] == 2 and chunk.args[2:] in ((-1,), (2,)):
        return chunk.args[0], chunk
    return None


def _slice_rows(graph, w, start, end, before):
    if w is None:
        return None
    with graph.inserting_before(before):
        return graph.call_function(aten.slice.Tensor, (w, 0, start, end))


def fuse_gated_mlp(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    count = 0
    g = gm.graph
    for down in list(g.nodes):
        parts = linear_parts(down)
        if parts is None or not is_op(parts[0], aten.mul.Tensor):
            continue
        mul, w_down, b_down = parts
        if len(mul.users) != 1 or len(mul.args) != 2:
            continue
        for act_node, up in (mul.args, mul.args[::-1]):
            act = activation_of(act_node)
            if act is None or not single_use(act_node):
                continue
            gate = act_node.args[0]
            gp, up_p = linear_parts(gate), linear_parts(up)
            if gp is not None and up_p is not None and gp[0] is up_p[0] and single_use(gate, up):
                x, w_in, b_in = gp
                _, w_up, b_up = up_p
                dead = [down, mul, act_node, gate, up]
            else:
                fused = _split_halves(gate, up)
                if fused is None or linear_parts(fused[0]) is None or len(fused[1].users) != 2:
                    continue
                proj, chunk = fused
                x, w_gu, b_gu = linear_parts(proj)
                d_ff = w_gu.meta["val"].shape[0] // 2
                w_in = _slice_rows(g, w_gu, 0, d_ff, down)
                w_up = _slice_rows(g, w_gu, d_ff, 2 * d_ff, down)
                b_in = _slice_rows(g, b_gu, 0, d_ff, down)
                b_up = _slice_rows(g, b_gu, d_ff, 2 * d_ff, down)
                dead = [down, mul, act_node, gate, up, chunk, proj]
            if not float_dtype_ok(x, w_down, down):
                continue
            insert_site(g, down, x, w_in, b_in, w_up, b_up, w_down, b_down, act, "gated")
            for n in dead:
                g.erase_node(n)
            count += 1
            break
    return gm, count
