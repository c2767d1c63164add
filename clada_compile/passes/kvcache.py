"""A KV cache written in place (torch engine's decode graphs).

The traced decode step appends to the cache the way HF's DynamicCache does: cat(past, new) per
layer, key and value, which copies the whole cache into a fresh tensor every step. At 384 cached
tokens that is SmolLM2's 18 MB read and written per step, measured at ~130 us per layer: a third
of an int8 decode step. With the cache in a preallocated buffer the step writes only the new rows.

Pattern:      cat([past, new], dim=2) for every past_key_values.L.key/value placeholder `past`,
              also behind HF's lazy-init cat([empty 1-D, past]); the result feeds attention and the
              present.L.* output; sym_size(past, 2) anywhere (cache and mask lengths)
Replacement:  past is now a buffer (B, H, capacity, D) holding the cache in [0, start);
              start = attention_mask.size(1) - input_ids.size(1), end = attention_mask.size(1);
              w = index_put_(past, [None, None, arange(start, end)], new); view = slice(w, 2, 0, end)
              takes the cat's place; sym_size(past, 2) -> start; the present.* outputs go (the
              engine hands out views of its buffers, compiled.py)
Guards:       every past placeholder matches (all or nothing: the engine's calling convention
              changes for the whole graph), 4-D past and new, the append is the past's only
              non-size user, on the sequence dim
Returns (gm, count): caches rewritten (2 per layer, or 0).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ._match import is_op

aten = torch.ops.aten


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _append_of(past: fx.Node):
    """The cat(past, new) node that appends to `past` and the nodes it replaces, or None."""
    users = [u for u in past.users if not is_op(u, aten.sym_size.int)]
    if len(users) != 1 or _val(past) is None or _val(past).dim() != 4:
        return None
    node, dropped = past, []
    user = users[0]
    # HF's DynamicLayer starts from an empty 1-D tensor: cat([empty, past]) is past
    if is_op(user, aten.cat.default) and len(user.args[0]) == 2 and user.args[0][1] is past:
        empty = _val(user.args[0][0])
        if empty is not None and empty.dim() == 1 and empty.numel() == 0 and len(user.users) == 1:
            node, dropped = user, [user]
            user = next(iter(user.users))
    if not is_op(user, aten.cat.default) or len(user.args[0]) != 2 or user.args[0][0] is not node:
        return None
    dim = user.args[1] if len(user.args) > 1 else 0
    new = user.args[0][1]
    if dim not in (2, -2) or _val(new) is None or _val(new).dim() != 4:
        return None
    return user, new, dropped


def kv_cache_in_place(traced) -> tuple[fx.GraphModule, int]:
    """traced: the decode TracedGraph (its input/output name lists are updated too)."""
    gm, g = traced.gm, traced.gm.graph
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    by_name = dict(zip(traced.input_names, placeholders))
    pasts = [by_name[name] for name in traced.input_names if name.startswith("past_key_values.")]
    matches = [_append_of(p) for p in pasts]
    if not pasts or any(m is None for m in matches):
        return gm, 0
    with g.inserting_after(placeholders[-1]):
        end = g.call_function(aten.sym_size.int, (by_name["attention_mask"], 1))
    with g.inserting_after(end):
        seq = g.call_function(aten.sym_size.int, (by_name["input_ids"], 1))
    with g.inserting_after(seq):
        start = g.call_function(operator.sub, (end, seq))
    device = _val(pasts[0]).device
    with g.inserting_after(start):
        pos = g.call_function(aten.arange.start, (start, end), {"dtype": torch.long, "device": device})
    views = set()
    for past, (append, new, dropped) in zip(pasts, matches):
        for size in [u for u in past.users if is_op(u, aten.sym_size.int) and u.args[1] in (2, -2)]:
            size.replace_all_uses_with(start)
            g.erase_node(size)
        with g.inserting_before(append):
            written = g.call_function(aten.index_put_.default, (past, [None, None, pos], new))
            view = g.call_function(aten.slice.Tensor, (written, 2, 0, end))
        view.meta.update(append.meta)
        append.replace_all_uses_with(view)
        g.erase_node(append)
        for node in reversed(dropped):
            g.erase_node(node)
        views.add(view)
    out = next(n for n in g.nodes if n.op == "output")
    kept = [(name, v) for name, v in zip(traced.output_names, out.args[0]) if v not in views]
    out.args = (tuple(v for _, v in kept),)
    traced.output_names[:] = [name for name, _ in kept]
    g.eliminate_dead_code()
    return gm, len(pasts)


__all__ = ["kv_cache_in_place"]
