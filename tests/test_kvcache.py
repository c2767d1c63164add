"""passes/kvcache.py and the torch engine's KV buffers: the cache written in place, not copied."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx

from clada_compile import CladaConfig
from clada_compile.compiled import CladaModel, cache_capacity
from clada_compile.passes.kvcache import kv_cache_in_place
from clada_compile.tracing import TracedGraph
from conftest import graphs_for
from tiny import BUILDERS, VOCAB

aten = torch.ops.aten


def _copy(traced):
    gm = fx.GraphModule(traced.gm, copy.deepcopy(traced.gm.graph))
    return TracedGraph(gm, "decode", list(traced.input_names), list(traced.output_names))


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_rewrite_count_and_no_cache_copy(name):
    _, graphs = graphs_for(name)
    traced = _copy(graphs.decode_for("dense"))
    _, n = kv_cache_in_place(traced)
    assert n == 2 * graphs.n_layers
    traced.gm.graph.lint()
    ops = _targets(traced.gm)
    assert ops.count(aten.index_put_.default) == n
    # no cat reads a cache placeholder any more, and the present.* outputs are gone
    pasts = {p for p, name_ in zip((x for x in traced.gm.graph.nodes if x.op == "placeholder"), traced.input_names)
             if name_.startswith("past_key_values.")}
    for node in traced.gm.graph.nodes:
        if node.target is aten.cat.default:
            assert not pasts & set(node.args[0])
    assert traced.output_names[0] == "logits" and not any(o.startswith("present.") for o in traced.output_names)
    out = next(x for x in traced.gm.graph.nodes if x.op == "output")
    assert len(out.args[0]) == len(traced.output_names)


def test_must_not_match_a_cache_with_another_user():
    """All or nothing: one cache read elsewhere leaves every layer's cat in place."""
    _, graphs = graphs_for("llama")
    traced = _copy(graphs.decode_for("dense"))
    g = traced.gm.graph
    past = [x for x in g.nodes if x.op == "placeholder"][traced.input_names.index("past_key_values.1.value")]
    with g.inserting_after(past):
        extra = g.call_function(aten.neg.default, (past,))
    out = next(x for x in g.nodes if x.op == "output")
    out.args = (tuple(out.args[0]) + (extra,),)
    before = [x.format_node() for x in g.nodes]
    names = list(traced.output_names)
    _, n = kv_cache_in_place(traced)
    assert n == 0 and [x.format_node() for x in g.nodes] == before and traced.output_names == names


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_steps_write_in_place_and_match_hf(backend):
    """Greedy steps on one buffer (same storage every step) give HF's logits; a cache that is not
    the last one handed out (a prefix of it, an older one) is copied, so branching is safe."""
    model, graphs = graphs_for("llama")
    cm = CladaModel(model, graphs, CladaConfig(backend=backend, enabled=False))
    assert cm.kv_in_place
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    _, past, _ = cm.prefill(ids[:, :5], taus=torch.zeros(cm.n_layers))
    steps = []
    for t in range(5, 9):
        logits, past = cm.decode(ids[:, t:t + 1], torch.ones(2, t + 1, dtype=torch.long), past)
        torch.testing.assert_close(logits[:, 0], ref[:, t], atol=1e-5, rtol=1e-4)
        steps.append(past)
        assert past[0].shape[2] == t + 1
    ptr = {p[0].untyped_storage().data_ptr() for p in steps}
    assert len(ptr) == 1  # one buffer, written in place
    # inductor: one compile for the growing cache (its length is symbolic, direct.py)
    assert backend == "eager" or cm._decode_fn.compiles == 1
    # branch from the cache of step 6 (not the last one): the result is the same, and the
    # cache handed out last is not overwritten
    last = [t.clone() for t in steps[-1]]
    logits, branch = cm.decode(ids[:, 7:8], torch.ones(2, 8, dtype=torch.long), steps[1])
    torch.testing.assert_close(logits[:, 0], ref[:, 7], atol=1e-5, rtol=1e-4)
    assert branch[0].untyped_storage().data_ptr() not in ptr
    for a, b in zip(last, steps[-1]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # a prefix of the last cache is copied too
    prefix = [t[:, :, :7] for t in steps[-1]]
    logits, _ = cm.decode(ids[:, 7:9], torch.ones(2, 9, dtype=torch.long), prefix)
    torch.testing.assert_close(logits, ref[:, 7:9], atol=1e-5, rtol=1e-4)


def test_presents_are_views_of_the_buffers():
    """What a decode step hands out: a sequence of (B, H, length, D) views of the engine's buffers,
    read like the tuple it replaces (index, slice, iterate, len)."""
    model, graphs = graphs_for("llama")
    cm = CladaModel(model, graphs, CladaConfig(backend="eager", enabled=False))
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    _, past, _ = cm.prefill(ids[:, :5], taus=torch.zeros(cm.n_layers))
    _, p6 = cm.decode(ids[:, 5:6], torch.ones(1, 6, dtype=torch.long), past)
    _, p7 = cm.decode(ids[:, 6:7], torch.ones(1, 7, dtype=torch.long), p6)
    assert len(p7) == len(past) == 2 * cm.n_layers
    assert [t.shape[2] for t in p7] == [7] * len(p7) and [t.shape[2] for t in p6] == [6] * len(p6)
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(p6, p7))  # same buffers, longer views
    assert [t.shape for t in p7[1::2]] == [p7[i].shape for i in range(1, len(p7), 2)]
    torch.testing.assert_close(p7[0][:, :, :5], past[0], atol=0, rtol=0)


def test_buffer_grows_past_its_capacity():
    model, graphs = graphs_for("llama")
    cm = CladaModel(model, graphs, CladaConfig(backend="eager", enabled=False))
    ids = torch.randint(3, VOCAB, (1, 300), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    _, past, _ = cm.prefill(ids[:, :5], taus=torch.zeros(cm.n_layers))
    _, past = cm.decode(ids[:, 5:6], torch.ones(1, 6, dtype=torch.long), past)
    assert cm._kv[0].shape[2] == cache_capacity(5, 6, cm.context_length) == 261
    logits, past = cm.decode(ids[:, 6:], torch.ones(1, 300, dtype=torch.long), past)
    assert cm._kv[0].shape[2] == 301 and past[0].shape[2] == 300
    torch.testing.assert_close(logits, ref[:, 6:], atol=1e-4, rtol=1e-4)


def test_growing_past_the_buffer_compiles_once():
    """Steps that fill the first buffer and move to a larger one run one compiled variant: the
    buffer is never exactly full (cache_capacity), which the graph's shape guards would reject."""
    model, graphs = graphs_for("llama")
    cm = CladaModel(model, graphs, CladaConfig(backend="inductor", enabled=False))
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    logits, past, _ = cm.prefill(ids, taus=torch.zeros(cm.n_layers))
    first = cache_capacity(5, 6, cm.context_length)
    t = logits[:, -1:].argmax(-1)
    for total in range(6, first + 3):
        logits, past = cm.decode(t, torch.ones(1, total, dtype=torch.long), past)
        t = logits[:, -1:].argmax(-1)
        assert cm._kv[0].shape[2] > total
    assert cm._kv[0].shape[2] > first and cm._decode_fn.compiles == 1


def test_capacity_stays_within_the_context():
    assert cache_capacity(100, 101, None) == 356
    assert cache_capacity(1000, 1001, None) == 2000
    assert cache_capacity(100, 101, 128) == 129  # the context, and the spare row
    assert cache_capacity(100, 140, 128) == 141  # a caller past the context gets what it asked for
    assert cache_capacity(5, 400, None) == 401  # never exactly full


def test_mask_that_does_not_cover_the_cache_is_an_error():
    model, graphs = graphs_for("llama")
    cm = CladaModel(model, graphs, CladaConfig(backend="eager", enabled=False))
    ids = torch.randint(3, VOCAB, (1, 6))
    _, past, _ = cm.prefill(ids[:, :5], taus=torch.zeros(cm.n_layers))
    with pytest.raises(ValueError, match="covers 5 tokens, but the cache holds 5"):
        cm.decode(ids[:, 5:], torch.ones(1, 5, dtype=torch.long), past)
