"""Plain MLPs (fc1 -> act -> fc2) become one mlp_site marker.

Pattern (GPT-2 after canonicalize_conv1d + canonicalize_gelu_tanh, OPT, GPT-NeoX, Phi):
    linear(act(linear(x, W1, b1)), W2, b2)
Replacement: mlp_site(x, W1, b1, None, None, W2, b2, act)
Guards (all checked before the graph is touched): fc1's output and act's output have one user
each (the rewrite erases both); one floating dtype across x, W1, b1, W2, b2 and the output;
act in {silu, gelu, gelu_tanh, relu}.
No width check: act is elementwise, so in a graph that runs fc1's output width already equals
fc2's input width (d_ff).
Run after fuse_gated_mlp: a gated MLP's down projection does not match here (its input is a mul).
"""

from __future__ import annotations

from torch import fx

from ._match import activation_of, float_dtype_ok, insert_site, linear_parts, single_use


def _match(down):
    """(x, W1, b1, W2, b2, act, nodes to erase) for the plain MLP ending at `down`, or None.
    Reads the graph only."""
    parts = linear_parts(down)
    if parts is None:
        return None
    act_node, w_down, b_down = parts
    act = activation_of(act_node)
    if act is None or not single_use(act_node):
        return None
    fc1 = act_node.args[0]
    up = linear_parts(fc1)
    if up is None or not single_use(fc1):
        return None
    x, w_in, b_in = up
    if not float_dtype_ok(x, w_in, b_in, w_down, b_down, down):
        return None
    return x, w_in, b_in, w_down, b_down, act, (down, act_node, fc1)


def fuse_plain_mlp(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    count = 0
    g = gm.graph
    for down in list(g.nodes):
        m = _match(down)
        if m is None:
            continue
        x, w_in, b_in, w_down, b_down, act, dead = m
        insert_site(g, down, x, w_in, b_in, None, None, w_down, b_down, act, "plain")
        for n in dead:
            g.erase_node(n)
        count += 1
    return gm, count
