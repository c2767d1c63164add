"""Input thresholds on the attention projections and the lm_head (TEAL-style activation sparsity).

A projection y = x W^T whose input channel i is dropped (|x_i| < tau) never needs row i of W^T:
the input-sparse GEMV skips it. lower_decode thresholds the MLP's input and its hidden h; this
pass does the same for the two attention projections of every decoder layer:

  attn_in   the input of q/k/v (one node feeds all three, or Phi-3's qkv_proj, GPT-2's c_attn,
            GPT-NeoX's query_key_value)
  attn_out  the input of o (o_proj, out_proj, dense, c_proj)

Pattern:      per decoder layer, the linears outside the MLP (the MLP is already a clada op),
              grouped by their input node in graph order: exactly two groups, the first is
              attn_in, the second attn_out
Replacement:  x -> ops.threshold_input(x, tau_in[group, layer]) for those linears only (other
              users of x, e.g. the residual, keep the unmasked x)
Guards:       the layer index comes from the module path (layers.N / h.N); a layer whose
              attention does not split into exactly two input groups is left untouched and not
              counted; only float inputs
Returns (gm, count): layers whose two attention inputs were thresholded. The caller compares
count with the layer count: optimize() refuses `sparsify` attention groups on a model where a
layer did not match, rather than ignoring thresholds silently.

threshold_head_input does the same for the output projection (group "lm_head"):

Pattern:      the one linear outside every decoder layer (no layers.N in its module path): the
              lm_head, whatever the architecture calls it
Replacement:  x -> ops.threshold_input(x, tau_in[lm_head, 0]) for that linear only
Guards:       exactly one such linear (zero or several: nothing rewritten, count 0); a float input
Returns (gm, count): 1 when the lm_head was thresholded. Engine.set_input_thresholds refuses an
lm_head threshold on a graph where count was 0.

passes.gemv folds threshold_input into the GEMV kernel's threshold (the dropped rows are never
read); on other paths (reference, ONNX) it is a mask: abs, compare, where.
"""

from __future__ import annotations

import torch
from torch import fx

from ..ops import INPUT_GROUPS, threshold_input
from ._match import layer_index, linear_parts

ATTENTION_GROUPS = ("attn_in", "attn_out")


def attention_projections(graph: fx.Graph) -> dict[int, dict[str, list[fx.Node]]]:
    """{layer: {"attn_in": [linears], "attn_out": [linears]}} for layers that match the pattern."""
    per_layer: dict[int, dict[fx.Node, list[fx.Node]]] = {}
    for node in graph.nodes:
        parts = linear_parts(node)
        layer = layer_index(node) if parts is not None else None
        if layer is None:
            continue
        per_layer.setdefault(layer, {}).setdefault(parts[0], []).append(node)
    found = {}
    for layer, groups in per_layer.items():
        if len(groups) != 2:
            continue
        ins = list(groups)
        if not all(_is_float(x) for x in ins):
            continue
        found[layer] = {"attn_in": groups[ins[0]], "attn_out": groups[ins[1]]}
    return found


def _is_float(node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val is not None and val.dtype.is_floating_point


def threshold_attention_inputs(gm: fx.GraphModule, tau_in: fx.Node) -> tuple[fx.GraphModule, int]:
    """tau_in: the (len(INPUT_GROUPS), n_layers) threshold input of the decode graph."""
    g = gm.graph
    found = attention_projections(g)
    for layer, groups in found.items():
        for name in ATTENTION_GROUPS:
            linears = groups[name]
            x = linears[0].args[0]
            with g.inserting_before(linears[0]):
                row = g.call_function(torch.ops.aten.select.int, (tau_in, 0, INPUT_GROUPS.index(name)))
                t = g.call_function(torch.ops.aten.select.int, (row, 0, layer))
                xm = g.call_function(threshold_input, (x, t))
            xm.meta.update(x.meta)
            for lin in linears:
                lin.replace_input_with(x, xm)
    return gm, len(found)


def head_projection(graph: fx.Graph) -> fx.Node | None:
    """The lm_head linear: the only linear outside the decoder layers, None when not exactly one."""
    outside = [n for n in graph.nodes if linear_parts(n) is not None and layer_index(n) is None]
    if len(outside) != 1 or not _is_float(outside[0].args[0]):
        return None
    return outside[0]


def threshold_head_input(gm: fx.GraphModule, tau_in: fx.Node) -> tuple[fx.GraphModule, int]:
    """tau_in: the (len(INPUT_GROUPS), n_layers) threshold input; the lm_head reads column 0 of its row."""
    g = gm.graph
    head = head_projection(g)
    if head is None:
        return gm, 0
    x = head.args[0]
    with g.inserting_before(head):
        row = g.call_function(torch.ops.aten.select.int, (tau_in, 0, INPUT_GROUPS.index("lm_head")))
        t = g.call_function(torch.ops.aten.select.int, (row, 0, 0))
        xm = g.call_function(threshold_input, (x, t))
    xm.meta.update(x.meta)
    head.replace_input_with(x, xm)
    return gm, 1


__all__ = ["ATTENTION_GROUPS", "attention_projections", "head_projection", "threshold_attention_inputs",
           "threshold_head_input"]
