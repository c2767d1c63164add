"""Gated MLPs (SwiGLU / GeGLU) become one mlp_site marker.

Pattern (Llama, Mistral, Qwen2, Gemma):
    linear(mul(act(linear(x, Wg, bg)), linear(x, Wu, bu)), Wd, bd)      (mul in either order)
Pattern (Phi-3, fused gate_up_proj):
    y = linear(x, Wgu, bgu); g, u = chunk(y, 2, -1)
    linear(mul(u, act(g)), Wd, bd)                                       (mul in either order)
    -> the marker takes Wg = Wgu[:d_ff], Wu = Wgu[d_ff:] as slice views.
Replacement: mlp_site(x, Wg, bg, Wu, bu, Wd, bd, act)
Guards (all checked before the graph is touched, so a failed guard leaves it unchanged):
- every removed node has no user outside the MLP: mul, act, the gate and up projections (or the
  fused projection, its chunk, whose users are exactly the two getitems, and each getitem) are
  used once;
- gate and up read the same x;
- Phi-3: the chunk splits the last dim of the projection, and Wgu is 2-D with an even row count
  (so chunk's halves are exactly the row slices the marker takes);
- one floating dtype across x, every weight and bias, and the output;
- act in {silu, gelu, gelu_tanh, relu}.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
from torch import fx

from ._match import activation_of, float_dtype_ok, insert_site, is_op, linear_parts, single_use

aten = torch.ops.aten


class _Match(NamedTuple):
    act: str
    x: fx.Node
    w_in: fx.Node  # the gate weight, or Phi-3's fused gate_up weight when `split` is set
    b_in: fx.Node | None
    w_up: fx.Node | None
    b_up: fx.Node | None
    split: int | None  # Phi-3: d_ff, the row where the fused weight's up half starts
    w_down: fx.Node
    b_down: fx.Node | None
    dead: list  # nodes the rewrite erases, users before producers


def _separate(gate, up):
    """gate = linear(x, Wg, bg), up = linear(x, Wu, bu), each used once -> _Match fields or None."""
    gp, upp = linear_parts(gate), linear_parts(up)
    if gp is None or upp is None or gp[0] is not upp[0] or not single_use(gate, up):
        return None
    (x, w_in, b_in), (_, w_up, b_up) = gp, upp
    return x, w_in, b_in, w_up, b_up, None, [gate, up]


def _last_dim(node, dim) -> bool:
    val = node.meta.get("val")
    return dim == -1 or (val is not None and dim == val.dim() - 1)


def _even_rows(w):
    """Half the row count of a 2-D weight node, None when unknown, not 2-D or odd."""
    val = w.meta.get("val") if isinstance(w, fx.Node) else None
    if val is None or val.dim() != 2 or val.shape[0] % 2:
        return None
    return val.shape[0] // 2


def _fused(gate, up):
    """Phi-3: gate, up = getitem(chunk(linear(x, Wgu, bgu), 2, -1), 0/1) -> _Match fields or None.

    The projection, the chunk and both getitems are erased by the rewrite, so each must feed only
    the next node of the pattern; a graph where one has another user (a second getitem, a
    debugging tap) is left alone.
    """
    if not (is_op(gate, operator.getitem) and is_op(up, operator.getitem)):
        return None
    chunk = gate.args[0]
    if up.args[0] is not chunk or (gate.args[1], up.args[1]) != (0, 1):
        return None
    if not is_op(chunk, aten.chunk.default) or chunk.args[1] != 2 or len(chunk.args) != 3:
        return None
    proj = chunk.args[0]
    parts = linear_parts(proj)
    if parts is None or not _last_dim(proj, chunk.args[2]):
        return None
    if not single_use(gate, up, proj) or set(chunk.users) != {gate, up}:
        return None
    x, w_gu, b_gu = parts
    d_ff = _even_rows(w_gu)
    if d_ff is None:
        return None
    return x, w_gu, b_gu, None, None, d_ff, [gate, up, chunk, proj]


def _match(down) -> _Match | None:
    """The gated MLP ending at `down`, or None. Reads the graph only."""
    parts = linear_parts(down)
    if parts is None or not is_op(parts[0], aten.mul.Tensor):
        return None
    mul, w_down, b_down = parts
    if not single_use(mul) or len(mul.args) != 2:
        return None
    for act_node, up in (mul.args, mul.args[::-1]):
        act = activation_of(act_node)
        if act is None or not single_use(act_node):
            continue
        gate = act_node.args[0]
        found = _separate(gate, up) or _fused(gate, up)
        if found is None:
            continue
        *projections, removed = found
        m = _Match(act, *projections, w_down, b_down, dead=[down, mul, act_node] + removed)
        if float_dtype_ok(m.x, m.w_in, m.b_in, m.w_up, m.b_up, w_down, b_down, down):
            return m
    return None


def _slice_rows(graph, w, start, end, before):
    if w is None:
        return None
    with graph.inserting_before(before):
        return graph.call_function(aten.slice.Tensor, (w, 0, start, end))


def _rewrite(g, down, m: _Match) -> None:
    w_in, b_in, w_up, b_up = m.w_in, m.b_in, m.w_up, m.b_up
    if m.split is not None:  # Phi-3: the gate and up halves as row slices of the fused weight
        d = m.split
        w_in, w_up = _slice_rows(g, m.w_in, 0, d, down), _slice_rows(g, m.w_in, d, 2 * d, down)
        b_in, b_up = _slice_rows(g, m.b_in, 0, d, down), _slice_rows(g, m.b_in, d, 2 * d, down)
    insert_site(g, down, m.x, w_in, b_in, w_up, b_up, m.w_down, m.b_down, m.act, "gated")
    for n in m.dead:
        g.erase_node(n)


def fuse_gated_mlp(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    count = 0
    g = gm.graph
    for down in list(g.nodes):
        m = _match(down)
        if m is not None:
            _rewrite(g, down, m)
            count += 1
    return gm, count
