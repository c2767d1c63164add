"""Decode projections -> the input-sparse GEMV op over input-channel-major weights (W^T).

At batch 1 a decode step reads every weight once, so its speed is bytes / bandwidth. torch's
single-row linear goes to MKL sgemv, which streams a third of this CPU's bandwidth; the clada
GEMV kernel (kernels/sparse_gemv.cpp) streams near the limit and can skip the rows of dropped
input channels. These passes run on the torch engine's decode graph (a copy; ONNX keeps the
op contract of lower_decode), after lowering:

linears_to_gemv
  Pattern:      linear(x, W, b) for every constant W (get_attr, possibly through t(): GPT-2's
                Conv1D after canonicalize_conv1d), grouped by their input node x
                (q/k/v share one, Phi-3's gate_up and lm_head stand alone)
  Replacement:  y = clada.sparse_gemv_t(x, Wg^T, 0) with Wg^T = [W1^T | W2^T | ...] (one new
                constant per group: one stream over the fused weights), + bias, then one
                slice of y per original linear. An input x = ops.threshold_input(x0, tau)
                (projections.py) folds into the kernel: ops.gemv_in(x0, Wg^T, tau), whose
                dropped channels' rows are never read
  Guards:       W materializes from constants only (not a graph input), 2-D, x's dtype is
                float32/bfloat16 and equals W's (the kernel's dtypes); otherwise left alone
  quantize=True (precision "int8"): Wg^T is stored as int8 with one float32 scale per column
                (quantize.quantize_columns) and the call is clada.sparse_gemv_t_q8(x, Wq, s, tau);
                float32 x only (a bf16 graph is left alone)

sparse_mlp_to_gemv
  Pattern:      clada.sparse_mlp(x, w_in, b_in, w_up, b_up, w_down_t, b_down, tau, act, impl) whose
                weights are the graph inputs clada.L.w_in / w_up / b_in / b_up (each used once)
  Replacement:  ops.gemv_mlp(x, w_gu_t, b_gu, w_down_t, b_down, tau, tau_in, act, gated, impl) on
                new inputs clada.L.w_gu_t (d_model, 2k) = [gate^T | up^T] and clada.L.b_gu (2k),
                or, for plain MLPs, clada.L.w_in_t (d_model, k) and clada.L.b_in: gate and up
                are one GEMV over one contiguous buffer. The placeholders are renamed in place
                (same positions), so the TracedGraph's input names stay aligned. x =
                ops.threshold_input(x0, tau_in) (the mlp_in threshold) folds into gemv_mlp's
                tau_in; otherwise tau_in is the float32 zero (dense gate/up).
  quantize=True: the engine feeds the three weights as int8; new inputs clada.L.s_gu (s_in)
                and clada.L.s_down follow w_gu_t (w_in_t) and w_down_t with their per-column
                scales, passed to gemv_mlp as s_gu / s_down. Guard: w_down_t is a placeholder.
  CATS variant: clada.gate_sparse_mlp(same args) (mlp_criterion "gate") -> ops.gemv_gate_mlp(x,
                w_g_t, w_up, w_down_t, b_down, tau, tau_in, act) on clada.L.w_g_t (d_model, k) =
                gate^T (renamed from w_in) and the neuron-major clada.L.w_up it already has: the
                up rows of dropped neurons are never read. Guards: no gate/up biases, no quantize.

Both return (gm, count): linears rewritten, MLPs rewritten. Numerics: the same sums in another
order (fp32 accumulation); tests compare with HF within the fp32 tolerance.
"""

from __future__ import annotations

import torch
from torch import fx

from .. import hugepages, kernels  # noqa: F401  (kernels registers torch.ops.clada.sparse_gemv_t)
from ..ops import gemv_gate_mlp, gemv_in, gemv_mlp, threshold_input
from ..quantize import quantize_columns
from ._match import is_op

aten = torch.ops.aten
GEMV_DTYPES = (torch.float32, torch.bfloat16)
ZERO = "clada_tau_zero"


def _zero(gm: fx.GraphModule) -> fx.Node:
    """get_attr of a shared float32 zero threshold (dense GEMV), registered once."""
    if not hasattr(gm, ZERO):
        gm.register_buffer(ZERO, torch.zeros(1, dtype=torch.float32))
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    existing = next((n for n in gm.graph.nodes if n.op == "get_attr" and n.target == ZERO), None)
    if existing is not None:
        return existing
    with gm.graph.inserting_before(first):
        return gm.graph.get_attr(ZERO)


def _constant(gm, node):
    """The tensor a weight expression evaluates to, or None when it depends on a graph input."""
    from .lower import materialize

    def constant_only(n):
        if n.op == "get_attr":
            return True
        return n.op == "call_function" and all(constant_only(a) for a in n.args if isinstance(a, fx.Node))

    if not isinstance(node, fx.Node) or not constant_only(node):
        return None
    return materialize(gm, node)


def _unmask(x):
    """(x0, tau) for x = threshold_input(x0, tau), else (x, None)."""
    if isinstance(x, fx.Node) and x.op == "call_function" and x.target is threshold_input:
        return x.args[0], x.args[1]
    return x, None


def linears_to_gemv(gm: fx.GraphModule, cache: dict | None = None, quantize: bool = False) -> tuple[fx.GraphModule, int]:
    """cache: (data_ptr, ...) of a group's weights -> its fused W^T, so engines that share a
    model (CLADA and its dense twin) share the transposed copies. quantize: store each fused W^T
    as int8 with per-column scales (quantize.py) and call clada.sparse_gemv_t_q8 (float32 only)."""
    g = gm.graph
    groups: dict[fx.Node, list] = {}
    for node in g.nodes:
        if not is_op(node, aten.linear.default):
            continue
        x, w = node.args[:2]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        xv = x.meta.get("val") if isinstance(x, fx.Node) else None
        wt = _constant(gm, w)
        bt = _constant(gm, b) if b is not None else None
        if xv is None or wt is None or wt.dim() != 2 or (b is not None and bt is None):
            continue
        if xv.dtype not in GEMV_DTYPES or wt.dtype != xv.dtype or (quantize and xv.dtype != torch.float32):
            continue
        groups.setdefault(x, []).append((node, wt, bt))
    count = 0
    cache = {} if cache is None else cache
    keys = {x: (quantize, *((w.data_ptr(), tuple(w.shape)) for _, w, _ in members)) for x, members in groups.items()}
    _fuse_into_cache(cache, {keys[x]: members for x, members in groups.items() if keys[x] not in cache}, quantize)
    for i, (x, members) in enumerate(groups.items()):
        fused, scale = cache[keys[x]]
        name = f"clada_gemv_wt_{i}"
        gm.register_buffer(name, fused)
        if scale is not None:
            gm.register_buffer(f"clada_gemv_s_{i}", scale)
        bias = None
        if any(b is not None for _, _, b in members):
            with torch.no_grad():
                bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for _, w, b in members])
            gm.register_buffer(f"clada_gemv_b_{i}", bias)
        x0, tau = _unmask(x)
        first = members[0][0]
        if tau is None:
            tau = _zero(gm)
        with g.inserting_before(first):
            w_node = g.get_attr(name)
            if scale is not None:
                s_node = g.get_attr(f"clada_gemv_s_{i}")
                if tau.op == "get_attr":
                    y = g.call_function(torch.ops.clada.sparse_gemv_t_q8.default, (x0, w_node, s_node, tau))
                else:
                    y = g.call_function(gemv_in, (x0, w_node, tau, s_node))
            elif tau.op == "get_attr":  # dense: the op itself, no Python function in the graph
                y = g.call_function(torch.ops.clada.sparse_gemv_t.default, (x0, w_node, tau))
            else:
                y = g.call_function(gemv_in, (x0, w_node, tau))
            if bias is not None:
                y = g.call_function(aten.add.Tensor, (y, g.get_attr(f"clada_gemv_b_{i}")))
            start = 0
            for node, w, _ in members:
                out = y
                if len(members) > 1:
                    out = g.call_function(aten.slice.Tensor, (y, -1, start, start + w.shape[0]))
                start += w.shape[0]
                out.meta.update(node.meta)
                node.replace_all_uses_with(out)
        for node, _, _ in members:
            g.erase_node(node)
            count += 1
    g.eliminate_dead_code()
    return gm, count


def _fuse_into_cache(cache: dict, todo: dict, quantize: bool) -> None:
    """cache[key] = (W^T of the group's weights side by side, per-column scales or None) for each
    key -> members of `todo`, every W^T in one huge-page mapping (hugepages.py): the decode step
    streams them all."""
    if not todo:
        return
    specs = [((members[0][1].shape[1], sum(w.shape[0] for _, w, _ in members)),
              torch.int8 if quantize else members[0][1].dtype) for members in todo.values()]
    with torch.no_grad():
        for (key, members), buf in zip(todo.items(), hugepages.empty(specs)):
            if quantize:
                q, scale = quantize_columns(torch.cat([w.t() for _, w, _ in members], 1))
                cache[key] = (buf.copy_(q), scale)
            else:
                cache[key] = (torch.cat([w.t() for _, w, _ in members], 1, out=buf), None)


def _input(node, args_index):
    """The placeholder at args[args_index] of a sparse_mlp call, if it is one used only there."""
    a = node.args[args_index]
    if a is None:
        return None
    if not isinstance(a, fx.Node) or a.op != "placeholder" or len(a.users) != 1:
        raise _NoMatch
    return a


class _NoMatch(Exception):
    pass


def sparse_mlp_to_gemv(traced, quantize: bool = False) -> tuple[fx.GraphModule, int]:
    """traced: the TracedGraph of a lowered decode graph; its input names follow the renames.
    quantize: the engine feeds w_gu_t / w_in_t / w_down_t as int8 with their per-column scales on
    new inputs clada.L.s_gu (or s_in) and clada.L.s_down, right after each weight."""
    gm = traced.gm
    g = gm.graph
    count = 0
    cats_op = torch.ops.clada.gate_sparse_mlp.default
    for node in list(g.nodes):
        if not (node.op == "call_function" and node.target in (torch.ops.clada.sparse_mlp.default, cats_op)):
            continue
        x, _, _, _, _, w_down_t, b_down, tau, act, impl = node.args
        try:
            w_in, b_in, w_up, b_up = (_input(node, i) for i in range(1, 5))
        except _NoMatch:
            continue
        if quantize and not (isinstance(w_down_t, fx.Node) and w_down_t.op == "placeholder"):
            continue  # the engine quantizes only the weights it feeds (checked before any rewrite)
        cats = node.target is cats_op
        if cats and (quantize or b_in is not None or b_up is not None):
            continue  # gemv_gate_mlp has no biases and no int8 rows; the op's masked form runs
        gated = w_up is not None
        names = traced.input_names
        phs = [n for n in g.nodes if n.op == "placeholder"]
        layer = names[phs.index(w_in)].split(".")[1]

        def rename(old, new_name):
            idx = phs.index(old)
            with g.inserting_before(old):
                new = g.placeholder(new_name.replace(".", "_"))
            new.meta.update(old.meta)
            names.insert(idx, new_name)  # placeholders and names stay aligned; the old one goes below
            phs.insert(idx, new)
            return new

        def add_after(ph, new_name):
            idx = phs.index(ph) + 1
            with g.inserting_after(ph):
                new = g.placeholder(new_name.replace(".", "_"))
            names.insert(idx, new_name)
            phs.insert(idx, new)
            return new

        x0, tau_in = _unmask(x)
        if tau_in is None:
            tau_in = _zero(gm)
        if cats:  # gate^T for the gate GEMV; w_up stays the neuron-major input it is
            w_g_t = rename(w_in, f"clada.{layer}.w_g_t")
            target, args, kwargs = gemv_gate_mlp, (x0, w_g_t, w_up, w_down_t, b_down, tau, tau_in, act), {}
            dropped = (w_in,)
        else:
            w_new = rename(w_in, f"clada.{layer}.{'w_gu_t' if gated else 'w_in_t'}")
            kwargs = {}
            if quantize:
                kwargs = dict(s_gu=add_after(w_new, f"clada.{layer}.{'s_gu' if gated else 's_in'}"),
                              s_down=add_after(w_down_t, f"clada.{layer}.s_down"))
            b_new = None
            if b_in is not None or b_up is not None:
                b_new = rename(b_in if b_in is not None else b_up, f"clada.{layer}.{'b_gu' if gated else 'b_in'}")
            target, args = gemv_mlp, (x0, w_new, b_new, w_down_t, b_down, tau, tau_in, act, gated, impl)
            dropped = (w_in, b_in, w_up, b_up)
        with g.inserting_before(node):
            new = g.call_function(target, args, kwargs)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        for old in dropped:
            if old is not None:
                del names[[n for n in g.nodes if n.op == "placeholder"].index(old)]
                g.erase_node(old)
        count += 1
    return gm, count


__all__ = ["linears_to_gemv", "sparse_mlp_to_gemv"]
