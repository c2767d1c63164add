"""Grouped-query attention without the repeated KV cache (decode graphs).

HF's repeat_kv materializes every KV head n_rep times before SDPA: at decode that copies the whole
cache per layer per step (SmolLM2: 9 query heads on 3 KV heads, ~3.4 MB per layer per step at 320
cached tokens, written and read again: about a sixth of the weight bytes a step streams). The
query heads that share a KV head can instead be stacked along the query axis: attention is
per-head, so the result is the same numbers with the cache read once.

Pattern:      sdpa(q, rep(k), rep(v), mask) with rep(x) = reshape(expand(unsqueeze(x, 2) [through
              full-range slices], (B, KVH, R, T, D)), (B, KVH*R, T, D))
Replacement:  q' = reshape(q.view(B, KVH, R, S, D), (B, KVH, R*S, D)); mask' likewise stacked
              R times along its query axis (it has one head); o = sdpa(q', k, v, mask');
              out = reshape(o.view(B, KVH, R, S, D), (B, KVH*R, S, D))
Guards:       k and v repeated by the same R over the same KVH; q has KVH*R heads; the mask is
              None or has one head; no is_causal, no dropout; the repeats used only by this SDPA
Returns (gm, count): SDPA nodes rewritten.
"""

from __future__ import annotations

import contextlib
import operator

import torch
from torch import fx
from torch._guards import detect_fake_mode

from ._match import is_op

aten = torch.ops.aten
FULL = 2**63 - 1


def _through_full_slices(node):
    while is_op(node, aten.slice.Tensor) and node.args[2:4] in ((0, FULL), (0, None)) and len(node.args) <= 4:
        node = node.args[0]
    return node


def _repeated(node):
    """(source (B, KVH, T, D) node, KVH, R) when node = repeat_kv(source), else None."""
    if not is_op(node, aten.reshape.default) or len(node.users) != 1:
        return None
    exp = node.args[0]
    if not is_op(exp, aten.expand.default) or len(exp.users) != 1:
        return None
    src = _through_full_slices(exp.args[0])
    if not is_op(src, aten.unsqueeze.default) or src.args[1] != 2:
        return None
    sizes = exp.args[1]
    if len(sizes) != 5 or not all(isinstance(s, int) for s in sizes[1:3]):
        return None
    kv = _through_full_slices(src.args[0])
    val = kv.meta.get("val") if isinstance(kv, fx.Node) else None
    if val is None or val.dim() != 4 or val.shape[1] != sizes[1]:
        return None
    return kv, sizes[1], sizes[2]


def sdpa_without_repeat_kv(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    g = gm.graph
    count = 0
    for node in list(g.nodes):
        if not is_op(node, aten.scaled_dot_product_attention.default):
            continue
        q, k, v = node.args[:3]
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if len(node.args) > 4 or set(node.kwargs) - {"scale", "attn_mask"}:
            continue  # dropout / is_causal / enable_gqa: not the decode form
        rk, rv = _repeated(k), _repeated(v)
        if rk is None or rv is None or rk[1:] != rv[1:]:
            continue
        (k0, kvh, rep), (v0, _, _) = rk, rv
        qv, mv = q.meta.get("val"), mask.meta.get("val") if isinstance(mask, fx.Node) else None
        if qv is None or qv.dim() != 4 or qv.shape[1] != kvh * rep or rep == 1:
            continue
        if mask is not None and (mv is None or mv.dim() != 4 or mv.shape[1] != 1):
            continue
        with g.inserting_before(node):
            b = g.call_function(aten.sym_size.int, (q, 0))
            s = g.call_function(aten.sym_size.int, (q, 2))
            d = qv.shape[3]
            rs = g.call_function(operator.mul, (s, rep))
            q2 = g.call_function(aten.reshape.default, (q, [b, kvh, rs, d]))
            m2 = mask
            if mask is not None:
                mb = g.call_function(aten.sym_size.int, (mask, 0))
                t = g.call_function(aten.sym_size.int, (mask, 3))
                m5 = g.call_function(aten.unsqueeze.default, (mask, 2))  # (B, 1, 1, S, T)
                m5 = g.call_function(aten.expand.default, (m5, [mb, 1, rep, s, t]))
                m2 = g.call_function(aten.reshape.default, (m5, [mb, 1, rs, t]))
            kwargs = {k_: v_ for k_, v_ in node.kwargs.items() if k_ != "attn_mask"}
            o = g.call_function(aten.scaled_dot_product_attention.default, (q2, k0, v0, m2), kwargs)
            out = g.call_function(aten.reshape.default, (o, [b, kvh * rep, s, d]))
        # shapes of the new attention's inputs and output, for the passes after this one
        with detect_fake_mode([qv]) or contextlib.nullcontext():
            q2.meta["val"] = qv.reshape(qv.shape[0], kvh, qv.shape[2] * rep, d)
            o.meta["val"] = q2.meta["val"].new_empty((*q2.meta["val"].shape[:3], node.meta["val"].shape[-1]))
            if mask is not None:
                m2.meta["val"] = mv.unsqueeze(2).expand(mv.shape[0], 1, rep, *mv.shape[2:]).reshape(
                    mv.shape[0], 1, mv.shape[2] * rep, mv.shape[3])
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        g.erase_node(node)
        count += 1
    g.eliminate_dead_code()
    return gm, count


__all__ = ["sdpa_without_repeat_kv"]
