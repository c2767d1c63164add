"""Lower mlp_site markers to the clada ops and wire their graph inputs and outputs.

lower_prefill: each site -> clada::scored_mlp on the full weights; adds the inputs `clada.tau`
               (one threshold per layer) and `clada.score_mask` (B, S: tokens the scores cover)
               and one output `clada.scores.L` (B, d_ff) per layer.
lower_decode:  each site -> clada::sparse_mlp on compacted weights that become graph inputs
               (`clada.L.w_in`, `clada.L.b_in`, `clada.L.w_up`, `clada.L.b_up`, `clada.L.w_down_t`);
               adds `clada.tau` (the threshold of h), `clada.tau_in` (ops.INPUT_GROUPS x layers:
               thresholds of the MLP's input and of the attention projections' inputs) and one
               output `clada.active.L` per layer (neurons kept this step, summed over its tokens).
               The original MLP weights drop out of the decode graph. With impl "dense" nothing
               is thresholded (both threshold inputs stay, unused); otherwise the MLP input goes
               through ops.threshold_input and projections.threshold_attention_inputs masks the
               attention inputs (`traced.attention_layers`: the layers it matched) and
               threshold_head_input the lm_head's input (`traced.head_thresholded`).
               criterion "gate" (CladaConfig.mlp_criterion, the CATS baseline): each gated site
               -> clada::gate_sparse_mlp instead (same inputs; tau thresholds |act(gate)|); a
               plain MLP is an error. With impl "dense" the criterion does not matter.
Both return (gm, count) and append to the TracedGraph's name lists in the order they add nodes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from ..config import MLP_CRITERIA
from ..ops import INPUT_GROUPS, threshold_input
from ._match import sites
from .projections import attention_projections, threshold_attention_inputs, threshold_head_input

clada = torch.ops.clada


@dataclass
class MlpSite:
    """What the host needs to know about one rewritten MLP (layer order)."""

    layer: int
    kind: str  # "gated" | "plain"
    act: str
    path: str
    has_b_in: bool
    has_b_up: bool
    args: tuple  # the marker's weight args (fx nodes) in the prefill graph, for materialize()


class UnmatchedMLPError(ValueError):
    pass


def ordered_sites(gm: fx.GraphModule, n_layers: int, arch: str):
    found = sites(gm.graph)
    layers = [n.meta.get("clada_layer") for n in found]
    missing = sorted(set(range(n_layers)) - set(layers))
    if missing or len(found) != n_layers or len(set(layers)) != len(layers):
        raise UnmatchedMLPError(
            f"{arch}: rewrote {len(found)} MLPs for {n_layers} layers; layers without a matched MLP: "
            f"{missing or 'none'} (matched: {sorted(l for l in layers if l is not None)}). The passes know "
            "gated (act(x@Wg)*(x@Wu))@Wd and plain act(x@W1)@W2 MLPs with silu/gelu/gelu_tanh/relu; "
            "this model's MLP is not one of them."
        )
    return sorted(found, key=lambda n: n.meta["clada_layer"])


def _last_placeholder(graph):
    return [n for n in graph.nodes if n.op == "placeholder"][-1]


def _add_input(traced, graph, name: str, after):
    with graph.inserting_after(after):
        node = graph.placeholder(name.replace(".", "_"))
    traced.input_names.append(name)
    return node


def lower_prefill(traced, n_layers: int, arch: str):
    gm = traced.gm
    g = gm.graph
    found = ordered_sites(gm, n_layers, arch)
    tau = _add_input(traced, g, "clada.tau", _last_placeholder(g))
    # which tokens the Griffin scores cover: the prompt at prefill, the recent window on re-scoring
    mask = _add_input(traced, g, "clada.score_mask", tau)
    out_node = next(n for n in g.nodes if n.op == "output")
    scores = []
    for site in found:
        layer = site.meta["clada_layer"]
        x, w_in, b_in, w_up, b_up, w_down, b_down, act = site.args
        with g.inserting_before(site):
            t = g.call_function(torch.ops.aten.select.int, (tau, 0, layer))
            call = g.call_function(clada.scored_mlp.default, (x, w_in, b_in, w_up, b_up, w_down, b_down, t, mask, act))
            out = g.call_function(operator.getitem, (call, 0))
            scores.append(g.call_function(operator.getitem, (call, 1)))
        out.meta.update(site.meta)
        traced.sites.append(MlpSite(layer, site.meta["clada_kind"], act, site.meta["clada_path"],
                                    b_in is not None, b_up is not None, (w_in, b_in, w_up, b_up, w_down, b_down)))
        site.replace_all_uses_with(out)
        g.erase_node(site)
    out_node.args = (tuple(out_node.args[0]) + tuple(scores),)
    traced.output_names += [f"clada.scores.{s.layer}" for s in traced.sites]
    return gm, len(found)


def lower_decode(traced, n_layers: int, arch: str, impl: str, criterion: str = "h"):
    if criterion not in MLP_CRITERIA:
        raise ValueError(f"`criterion` must be one of {MLP_CRITERIA}, got {criterion!r}")
    gm = traced.gm
    g = gm.graph
    found = ordered_sites(gm, n_layers, arch)
    gate = criterion == "gate" and impl != "dense"
    plain = [s.meta["clada_layer"] for s in found if s.args[3] is None]
    if gate and plain:
        raise ValueError(f"`mlp_criterion` 'gate' (CATS) needs gated MLPs, act(x@Wg)*(x@Wu); {arch}'s MLPs in layers "
                         f"{plain} are plain act(x@W1), where the default 'h' already thresholds the activation")
    op = clada.gate_sparse_mlp.default if gate else clada.sparse_mlp.default
    tau = _add_input(traced, g, "clada.tau", _last_placeholder(g))
    last = tau_in = _add_input(traced, g, "clada.tau_in", tau)
    kept = []
    for site in found:
        layer = site.meta["clada_layer"]
        x, w_in, b_in, w_up, b_up, w_down, b_down, act = site.args
        new = {}
        for key, present in (("w_in", True), ("b_in", b_in is not None), ("w_up", w_up is not None),
                             ("b_up", b_up is not None), ("w_down_t", True)):
            if present:
                last = new[key] = _add_input(traced, g, f"clada.{layer}.{key}", last)
        with g.inserting_before(site):
            t = g.call_function(torch.ops.aten.select.int, (tau, 0, layer))
            if impl != "dense":
                row = g.call_function(torch.ops.aten.select.int, (tau_in, 0, INPUT_GROUPS.index("mlp_in")))
                x = g.call_function(threshold_input, (x, g.call_function(torch.ops.aten.select.int, (row, 0, layer))))
                x.meta.update(site.args[0].meta)
            call = g.call_function(op, (
                x, new["w_in"], new.get("b_in"), new.get("w_up"), new.get("b_up"), new["w_down_t"],
                b_down, t, act, impl))
            out = g.call_function(operator.getitem, (call, 0))
            kept.append(g.call_function(operator.getitem, (call, 1)))
        out.meta.update(site.meta)
        traced.sites.append(MlpSite(layer, site.meta["clada_kind"], act, site.meta["clada_path"],
                                    b_in is not None, b_up is not None, (w_in, b_in, w_up, b_up, w_down, b_down)))
        site.replace_all_uses_with(out)
        g.erase_node(site)
    out_node = next(n for n in g.nodes if n.op == "output")
    out_node.args = (tuple(out_node.args[0]) + tuple(kept),)
    traced.output_names += [f"clada.active.{s.layer}" for s in traced.sites]
    traced.attention_layers = []
    traced.head_thresholded = False
    if impl != "dense":
        traced.attention_layers = sorted(attention_projections(g))
        threshold_attention_inputs(gm, tau_in)
        traced.head_thresholded = threshold_head_input(gm, tau_in)[1] == 1
    return gm, len(found)


def materialize(gm: fx.GraphModule, node):
    """Evaluate a weight expression (get_attr, possibly through t/slice/permute) to a tensor."""
    if node is None:
        return None
    if not isinstance(node, fx.Node):
        return node
    if node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj
    if node.op == "call_function":
        args = [materialize(gm, a) if isinstance(a, fx.Node) else a for a in node.args]
        return node.target(*args, **node.kwargs)
    raise ValueError(f"cannot materialize weight node {node.format_node()}")
