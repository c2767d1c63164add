"""Per pass: a tiny module per source variant, the exact rewrite count, eager and compiled equality
with the original, and variants that must not match."""

import copy
import functools
import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clada_compile import passes
from clada_compile.passes._match import mlp_site, sites

ATOL = 1e-5


def export_flat(module, *args):
    """torch.export -> flat GraphModule, the way tracing.trace prepares model graphs."""
    with torch.no_grad():
        gm = torch.export.export(module, args, strict=False).module()
    gm._forward_pre_hooks.clear()
    gm.graph.set_codegen(torch.fx.graph.CodeGen())
    gm.recompile()
    return gm


def run(gm, pass_fns, *args):
    ref = gm(*args)
    counts = passes.run_passes(gm, pass_fns)
    out = gm(*args)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    compiled = torch.compile(gm, backend="inductor", fullgraph=True)
    torch.testing.assert_close(compiled(*args), ref, atol=ATOL, rtol=0)
    return counts


class Gated(nn.Module):
    def __init__(self, act=F.silu, bias=False, swap=False):
        super().__init__()
        self.gate, self.up = nn.Linear(16, 24, bias=bias), nn.Linear(16, 24, bias=bias)
        self.down = nn.Linear(24, 16, bias=bias)
        self.act, self.swap = act, swap

    def forward(self, x):
        g, u = self.act(self.gate(x)), self.up(x)
        return self.down(u * g if self.swap else g * u)


class FusedGated(nn.Module):  # Phi-3
    def __init__(self):
        super().__init__()
        self.gate_up, self.down = nn.Linear(16, 48, bias=False), nn.Linear(24, 16, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(u * F.silu(g))


class Plain(nn.Module):
    def __init__(self, act=F.relu, bias=True):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(16, 24, bias=bias), nn.Linear(24, 16, bias=bias), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def new_gelu(x):  # GPT-2's gelu_new, written out
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Conv1DMLP(nn.Module):  # GPT-2: Conv1D is view -> addmm -> view with (in, out) weights
    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(16, 24)), nn.Parameter(torch.randn(24))
        self.w2, self.b2 = nn.Parameter(torch.randn(24, 16)), nn.Parameter(torch.randn(16))

    def forward(self, x):
        h = torch.addmm(self.b1, x.view(-1, 16), self.w1).view(*x.shape[:-1], 24)
        h = new_gelu(h)
        return torch.addmm(self.b2, h.view(-1, 24), self.w2).view(*x.shape[:-1], 16)


X = torch.randn(2, 5, 16)
FUSE = (passes.remove_noise, passes.canonicalize_conv1d, passes.canonicalize_gelu_tanh,
        passes.fuse_gated_mlp, passes.fuse_plain_mlp)


@pytest.mark.parametrize("act", [F.silu, F.gelu, lambda h: F.gelu(h, approximate="tanh"), F.relu])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("swap", [False, True])
def test_fuse_gated_variants(act, bias, swap):
    gm = export_flat(Gated(act, bias, swap), X)
    counts = run(gm, (passes.remove_noise, passes.fuse_gated_mlp), X)
    assert counts["fuse_gated_mlp"] == 1
    (site,) = sites(gm.graph)
    assert (site.args[2] is not None) == bias


def test_fuse_gated_phi3_fused_projection():
    gm = export_flat(FusedGated(), X)
    assert run(gm, (passes.remove_noise, passes.fuse_gated_mlp), X)["fuse_gated_mlp"] == 1


@pytest.mark.parametrize("act", [F.relu, F.gelu])
@pytest.mark.parametrize("bias", [False, True])
def test_fuse_plain_variants(act, bias):
    gm = export_flat(Plain(act, bias), X)
    counts = run(gm, FUSE, X)
    assert counts["fuse_plain_mlp"] == 1 and counts["fuse_gated_mlp"] == 0


def test_gpt2_conv1d_and_gelu_new_canonicalize_then_fuse():
    gm = export_flat(Conv1DMLP(), X)
    counts = run(gm, FUSE, X)
    assert counts["canonicalize_conv1d"] == 2
    assert counts["canonicalize_gelu_tanh"] == 1
    assert counts["fuse_plain_mlp"] == 1
    (site,) = sites(gm.graph)
    assert site.args[-1] == "gelu_tanh"


class Sigmoid(Plain):
    def __init__(self):
        super().__init__(act=torch.sigmoid)


class GateUsedTwice(Gated):
    def forward(self, x):
        g = F.silu(self.gate(x))
        return self.down(g * self.up(x)) + g.sum(-1, keepdim=True)


class GateProjectionUsedTwice(Gated):
    def forward(self, x):
        h = self.gate(x)
        return self.down(F.silu(h) * self.up(x)) + h.sum(-1, keepdim=True)


class UpUsedTwice(Gated):
    def forward(self, x):
        u = self.up(x)
        return self.down(F.silu(self.gate(x)) * u) + u.sum(-1, keepdim=True)


class Fc1UsedTwice(Plain):
    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(self.act(h)) + h.sum(-1, keepdim=True)


def almost_new_gelu(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.05 * torch.pow(x, 3.0))))


@pytest.mark.parametrize("module", [Sigmoid(), GateUsedTwice(), GateProjectionUsedTwice(), UpUsedTwice(),
                                    Fc1UsedTwice(), Plain(act=almost_new_gelu)],
                         ids=["unsupported-activation", "activation-reused", "gate-projection-reused", "up-reused",
                              "plain-fc1-reused", "wrong-gelu-constant"])
def test_must_not_match(module):
    gm = export_flat(module, X)
    passes.run_passes(gm, (passes.remove_noise,))
    before = str(gm.graph)
    counts = run(gm, FUSE, X)
    assert str(gm.graph) == before  # not even half rewritten
    assert counts["fuse_gated_mlp"] == counts["fuse_plain_mlp"] == counts["canonicalize_gelu_tanh"] == 0
    assert not any(n.target is mlp_site for n in gm.graph.nodes)


class FusedGatedTapped(FusedGated):
    """Phi-3's MLP with one intermediate of the fused pattern also read outside the MLP."""

    def __init__(self, tap):
        super().__init__()
        self.tap = tap

    def forward(self, x):
        y = self.gate_up(x)
        g, u = y.chunk(2, dim=-1)
        extra = {"projection": y, "gate": g, "up": u}[self.tap]
        return self.down(u * F.silu(g)) + extra.sum(-1, keepdim=True)


@pytest.mark.parametrize("tap", ["projection", "gate", "up"])
def test_phi3_intermediate_reused_leaves_graph_unchanged(tap):
    """The rewrite erases the fused projection and both chunk halves; when one has another user the
    pass must leave the graph exactly as it was (no dangling slices, no failed erase_node)."""
    gm = export_flat(FusedGatedTapped(tap), X)
    passes.run_passes(gm, (passes.remove_noise,))
    before, ref = str(gm.graph), gm(X)
    _, count = passes.fuse_gated_mlp(gm)
    assert count == 0 and str(gm.graph) == before
    gm.graph.lint()
    gm.recompile()
    torch.testing.assert_close(gm(X), ref, atol=0, rtol=0)


def test_phi3_failed_dtype_guard_leaves_no_slices():
    """The dtype guard fails after the structural ones: the weight slices must not exist yet. A mixed
    dtype MLP cannot be exported (linear rejects it), so the down weight's recorded dtype is edited."""
    gm = export_flat(FusedGated(), X)
    passes.run_passes(gm, (passes.remove_noise,))
    w_down = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "down.weight")
    w_down.meta["val"] = w_down.meta["val"].double()
    before = str(gm.graph)
    _, count = passes.fuse_gated_mlp(gm)
    assert count == 0 and str(gm.graph) == before


@functools.lru_cache(maxsize=None)
def _phi3_decode_trace():
    from clada_compile.tracing import trace
    from tiny import build

    model = build("phi3")
    traced = trace(model, "decode")
    passes.run_passes(traced.gm, (passes.remove_noise,))
    return model, traced.gm


def _phi3_inputs(model):
    from clada_compile.tracing import _kv_shape, num_layers

    torch.manual_seed(0)
    past = [torch.randn(_kv_shape(model, 1, 5)[0]) for _ in range(2 * num_layers(model))]
    return (torch.randint(3, 90, (1, 3)), torch.ones(1, 8, dtype=torch.long), torch.arange(5, 8).view(1, 3), *past)


@pytest.mark.parametrize("tap", ["projection", "chunk", "gate", "up"])
def test_phi3_model_layer_with_extra_user_is_left_alone(tap):
    """Tiny Phi-3 decode trace; layer 0's fused gate_up projection, its chunk or one half gets an
    extra (dead) user: layer 0 stays as traced, layer 1 is still fused, the graph runs unchanged."""
    model, traced = _phi3_decode_trace()
    gm = torch.fx.GraphModule(traced, copy.deepcopy(traced.graph))
    g = gm.graph
    chunk = next(n for n in g.nodes if n.target is torch.ops.aten.chunk.default)
    halves = sorted(chunk.users, key=lambda n: n.args[1])
    target = {"projection": chunk.args[0], "chunk": chunk, "gate": halves[0], "up": halves[1]}[tap]
    with g.inserting_after(target):
        if tap == "chunk":  # a chunk's users are getitems
            g.call_function(operator.getitem, (chunk, 0))
        else:
            g.call_function(torch.ops.aten.sum.default, (target,))
    gm.recompile()
    args = _phi3_inputs(model)
    ref = gm(*args)
    layer0 = [n.name for n in g.nodes if n in (chunk, chunk.args[0], *halves)]
    _, count = passes.fuse_gated_mlp(gm)
    assert count == 1
    (site,) = sites(g)
    assert site.meta["clada_layer"] == 1
    assert [n.name for n in g.nodes if n.name in layer0] == layer0
    assert not any(n.target is torch.ops.aten.slice.Tensor and n.args[0] is chunk.args[0].args[1]
                   for n in g.nodes)  # no slices of layer 0's fused weight left behind
    g.lint()
    gm.recompile()
    torch.testing.assert_close(gm(*args), ref, atol=1e-5, rtol=0)


class SparseMLPCall(nn.Module):  # what lower_decode leaves in a decode graph: one op per layer
    def __init__(self, impl, bias):
        super().__init__()
        self.impl = impl
        self.w_in, self.w_up = nn.Parameter(torch.randn(24, 16)), nn.Parameter(torch.randn(24, 16))
        self.w_down_t = nn.Parameter(torch.randn(24, 16))
        self.b_down = nn.Parameter(torch.randn(16)) if bias else None

    def forward(self, x, tau):
        out, kept = torch.ops.clada.sparse_mlp.default(x, self.w_in, None, self.w_up, None, self.w_down_t, self.b_down,
                                               tau, "silu", self.impl)
        out2, kept2 = torch.ops.clada.sparse_mlp.default(out, self.w_in, None, self.w_up, None, self.w_down_t, None,
                                                 tau, "silu", self.impl)
        return out2, kept + kept2


@pytest.mark.parametrize("impl", ["dense", "reference", "auto"])
@pytest.mark.parametrize("rows", [1, 5])
def test_inline_sparse_mlp(impl, rows):
    import clada_compile.ops  # noqa: F401  (registers clada::sparse_mlp)

    gm = torch.fx.symbolic_trace(SparseMLPCall(impl, bias=True))
    x, tau = torch.randn(1, rows, 16), torch.tensor(0.5)
    with torch.no_grad():
        ref = gm(x, tau)
        counts = passes.run_passes(gm, (passes.inline_sparse_mlp,))
        assert counts == {"inline_sparse_mlp": 2}
        assert not any(n.target is torch.ops.clada.sparse_mlp.default for n in gm.graph.nodes)
        torch.testing.assert_close(gm(x, tau), ref, atol=ATOL, rtol=0)
        compiled = torch.compile(gm, backend="inductor", fullgraph=True)
        out, kept = compiled(x, tau)
    torch.testing.assert_close(out, ref[0], atol=ATOL, rtol=1e-5)
    assert kept == ref[1]  # the kept count is exact, not approximately equal


def test_inline_sparse_mlp_leaves_the_prefill_op():
    """clada::scored_mlp (prefill) takes the same weights as clada::sparse_mlp but returns scores,
    not a kept count: inlining it as sparse_mlp_math would be wrong. Tiny Llama, 2 layers."""
    from conftest import graphs_for

    _, graphs = graphs_for("llama")
    src = graphs.prefill.gm
    gm = torch.fx.GraphModule(src, copy.deepcopy(src.graph))
    before = str(gm.graph)
    _, count = passes.inline_sparse_mlp(gm)
    assert count == 0 and str(gm.graph) == before
    assert sum(n.target is torch.ops.clada.scored_mlp.default for n in gm.graph.nodes) == 2


# ---- linears_to_gemv / sparse_mlp_to_gemv (passes/gemv.py) -----------------------------------
class Attn(nn.Module):
    """q/k/v on one input (grouped into one GEMV), o on another, a bias on v only."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(16, 16, bias=False), nn.Linear(16, 8, bias=False)
        self.v, self.o = nn.Linear(16, 8, bias=True), nn.Linear(8, 16, bias=False)

    def forward(self, x, w_in):
        q, k, v = self.q(x), self.k(x), self.v(x)
        h = (q[..., :8] * k).softmax(-1) * v
        # a linear whose weight is a graph input: not a constant, must not match
        return self.o(h) + F.linear(x, w_in)


def _gemv_calls(gm):
    return sum(n.target is torch.ops.clada.sparse_gemv_t.default for n in gm.graph.nodes)


@pytest.mark.parametrize("rows", [1, 3])
def test_linears_to_gemv_groups_by_input(rows):
    from clada_compile.passes.gemv import linears_to_gemv

    x, w_in = torch.randn(1, rows, 16), torch.randn(16, 16)
    gm = export_flat(Attn(), x, w_in)
    counts = run(gm, (passes.remove_noise, linears_to_gemv), x, w_in)
    assert counts["linears_to_gemv"] == 4  # q, k, v, o; not the graph-input weight
    assert _gemv_calls(gm) == 2  # [q|k|v] fused, o alone
    linears = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linears) == 1 and linears[0].args[1].op == "placeholder"


def test_linears_to_gemv_must_not_match_other_dtypes():
    from clada_compile.passes.gemv import linears_to_gemv

    m = Attn().half()
    x, w_in = torch.randn(1, 1, 16).half(), torch.randn(16, 16).half()
    gm = export_flat(m, x, w_in)
    before = str(gm.graph)
    _, count = linears_to_gemv(gm)
    assert count == 0 and str(gm.graph) == before  # fp16 is not a kernel dtype: nothing touched


@pytest.mark.parametrize("name", ["llama", "gpt2", "phi3", "opt", "llama_mlp_bias"])
def test_gemv_decode_matches_reference_engine(name, tmp_path):
    """The torch engine's GEMV decode graph (every projection on the kernel, gate/up fused) against
    the reference engine (lower_decode's graph, masked matmuls) with the same selection and
    thresholds: same logits within fp32 tolerance, same kept counts. The rewrite counts are exact."""
    from clada_compile import CladaConfig
    from clada_compile.compiled import CladaModel
    from conftest import graphs_for

    import json

    layers = [{"layer": i, "tau": 0.05, "active_fraction": 0.5, "rel_error": 0.1, "curve": []} for i in range(2)]
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"format": "clada-profile/1", "n_layers": 2, "target_active": 0.5,
                                   "achieved_active": 0.5, "layers": layers}))
    model, graphs = graphs_for(name)
    cfg = CladaConfig(top_k_ratio=0.5, backend="eager", target_active=0.5, profile=str(profile), kernel="auto")
    ref = CladaModel(model, graphs, cfg, impl="reference")
    cm = CladaModel(model, graphs, cfg)
    assert cm.impl == "auto" and cm.gemv and cm.decode_rewrites["sparse_mlp_to_gemv"] == 2
    # the dense twin reads the same transposed weights, not a second copy
    wt = [b for n, b in cm.decode_graph.gm.named_buffers() if n.startswith("clada_gemv_wt_")]
    wt_dense = [b for n, b in cm.dense().decode_graph.gm.named_buffers() if n.startswith("clada_gemv_wt_")]
    assert wt and [t.data_ptr() for t in wt] == [t.data_ptr() for t in wt_dense]
    # 2 layers x (q, k, v, o, or a fused qkv + o) + lm_head
    assert cm.decode_rewrites["linears_to_gemv"] == {"llama": 9, "gpt2": 5, "phi3": 5, "opt": 9, "llama_mlp_bias": 9}[name]
    ids = torch.randint(3, 90, (1, 9))
    _, past, scores = ref.prefill(ids[:, :6])
    for engine in (ref, cm):
        engine.select(scores)
        engine.set_thresholds([0.05, 0.1])
    pa = pb = past
    for t in range(6, 9):
        mask = torch.ones(1, t + 1, dtype=torch.long)
        la, pa, ka = ref.decode(ids[:, t:t + 1], mask, pa, with_active=True)
        lb, pb, kb = cm.decode(ids[:, t:t + 1], mask, pb, with_active=True)
        torch.testing.assert_close(lb, la, atol=1e-4, rtol=0)
        assert torch.equal(ka, kb) and 0 < ka.sum() < sum(cm.k)
