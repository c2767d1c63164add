"""passes/gqa.py: SDPA on the un-repeated KV cache (query heads stacked per KV head)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx

from clada_compile import CladaConfig
from clada_compile.compiled import CladaModel
from clada_compile.passes.gqa import sdpa_without_repeat_kv
from conftest import graphs_for
from tiny import VOCAB

# tiny configs: num_key_value_heads < num_attention_heads for these (repeat_kv in the graph)
GQA = {"llama": 2, "mistral": 2, "qwen2": 2, "gemma": 2, "gemma3_text": 2, "llama_mlp_bias": 2}
NO_GQA = {"gpt2": 0, "opt": 0, "gpt_neox": 0, "phi": 0, "phi3": 0}


def _copy(gm):
    return fx.GraphModule(gm, copy.deepcopy(gm.graph))


def _sdpa(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and n.target is torch.ops.aten.scaled_dot_product_attention.default]


@pytest.mark.parametrize("name,count", sorted({**GQA, **NO_GQA}.items()))
def test_rewrite_count_and_the_cache_is_not_repeated(name, count):
    _, graphs = graphs_for(name)
    gm = _copy(graphs.decode_for("dense").gm)
    _, n = sdpa_without_repeat_kv(gm)
    assert n == count
    gm.graph.lint()
    if count:  # the SDPA reads the KV heads straight from the concatenated cache
        for node in _sdpa(gm):
            assert node.args[1].target is torch.ops.aten.cat.default or \
                node.args[1].args[0].target is torch.ops.aten.cat.default


@pytest.mark.parametrize("name", sorted(GQA))
def test_decode_equals_hf_batch_and_several_new_tokens(name):
    """The GEMV engine (which runs the pass) against HF's own forward: 2 sequences, 3 new tokens
    on a 6-token cache (the stacked mask covers several query positions)."""
    model, graphs = graphs_for(name)
    cm = CladaModel(model, graphs, CladaConfig(backend="eager", enabled=False))
    assert cm.decode_rewrites["sdpa_without_repeat_kv"] == graphs.n_layers
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    _, past, _ = cm.prefill(ids[:, :6], taus=torch.zeros(cm.n_layers))
    logits, _ = cm.decode(ids[:, 6:], torch.ones(2, 9, dtype=torch.long), past)
    torch.testing.assert_close(logits, ref[:, 6:], atol=1e-5, rtol=1e-4)


def test_must_not_match_a_causal_sdpa_or_a_repeat_with_another_user():
    _, graphs = graphs_for("llama")
    gm = _copy(graphs.decode_for("dense").gm)
    first, second = _sdpa(gm)
    first.kwargs = {**first.kwargs, "is_causal": False, "dropout_p": 0.0}  # not the decode form
    k_rep = second.args[1]
    with gm.graph.inserting_after(k_rep):
        extra = gm.graph.call_function(torch.ops.aten.neg.default, (k_rep,))  # the repeat used twice
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (tuple(out.args[0]) + (extra,),)
    before = [n.format_node() for n in gm.graph.nodes]
    _, n = sdpa_without_repeat_kv(gm)
    assert n == 0 and [x.format_node() for x in gm.graph.nodes] == before
