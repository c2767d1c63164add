"""Every supported architecture: all MLPs rewritten, and top_k_ratio=1, tau=0 reproduces the model."""

import pytest
import torch

from clada_compile import SUPPORTED_ARCHITECTURES, CladaConfig
from clada_compile.compiled import CladaModel
from conftest import graphs_for
from tiny import BUILDERS, COVERS

ATOL = 1e-4  # fp32 logits


def test_every_supported_architecture_has_a_test():
    missing = set(SUPPORTED_ARCHITECTURES) - set(COVERS.values())
    assert not missing, f"supported architectures without a tiny-model test: {sorted(missing)}"


def _check(model, cm, ids):
    ref = model(ids).logits
    torch.testing.assert_close(cm(ids), ref, atol=ATOL, rtol=0)
    # prefill 5 tokens, then decode the rest on the KV cache through the compacted-weight graph
    _, past, scores = cm.prefill(ids[:, :5])
    assert len(scores) == cm.n_layers and scores[0].shape == (ids.shape[0], cm.d_ff[0])
    logits, present = cm.decode(ids[:, 5:], torch.ones_like(ids), past)
    torch.testing.assert_close(logits, ref[:, 5:], atol=ATOL, rtol=0)
    assert present[0].shape[2] == ids.shape[1]


GQA_ARCHS = ("llama", "mistral", "qwen2", "gemma", "gemma3_text", "llama_mlp_bias")


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_rewrite_count_and_dense_equivalence(name):
    model, graphs = graphs_for(name)
    n = graphs.n_layers
    assert len(graphs.prefill.sites) == n and len(graphs.decode.sites) == n
    fused = graphs.rewrites["fuse_gated_mlp"] + graphs.rewrites["fuse_plain_mlp"]
    assert fused == n and graphs.rewrites["lower_prefill"] == n
    ops = [nd.target for nd in graphs.decode.gm.graph.nodes if nd.op == "call_function"]
    assert ops.count(torch.ops.clada.sparse_mlp.default) == n
    ids = torch.randint(3, 90, (2, 8))
    # every decode projection on the GEMV kernel: q/k/v/o (or a fused qkv + o) per layer + lm_head
    linears = n * (2 if name in FUSED_QKV else 4) + 1
    for backend in ("eager", "inductor"):
        cm = CladaModel(model, graphs, CladaConfig(top_k_ratio=1.0, backend=backend))
        # grouped-query attention (fewer KV heads than query heads) reads its cache un-repeated
        gqa = n if name in GQA_ARCHS else 0
        assert cm.decode_rewrites == {"sparse_mlp_to_gemv": n, "linears_to_gemv": linears, "sdpa_without_repeat_kv": gqa,
                                     "sdpa_to_decode_attention": n,
                                     "kv_cache_in_place": 2 * n}
        ops = [nd.target for nd in cm.decode_graph.gm.graph.nodes if nd.op == "call_function"]
        assert torch.ops.aten.linear.default not in ops and torch.ops.clada.sparse_mlp.default not in ops
        _check(model, cm, ids)


FUSED_QKV = ("gpt2", "gpt_neox", "phi3")  # one qkv projection (Conv1D c_attn, query_key_value, qkv_proj)


def test_reference_kernel_inlines_the_sparse_mlp_under_inductor():
    """kernel="reference": no GEMV rewrite; inductor gets the sparse block's body inlined."""
    model, graphs = graphs_for("llama")
    cm = CladaModel(model, graphs, CladaConfig(top_k_ratio=1.0, backend="inductor", kernel="reference"))
    assert not cm.gemv and cm.inlined == graphs.n_layers
    _check(model, cm, torch.randint(3, 90, (2, 8)))


def _step_by_step(model, cm, ids, steps):
    """Prefill `ids`, then decode `steps` greedy tokens one at a time; every step's logits against
    HF's full forward over the same tokens (the oracle: no cache, no clada graph)."""
    logits, past, _ = cm.prefill(ids)
    seq = ids
    for _ in range(steps):
        ref = model(seq).logits[:, -1]
        torch.testing.assert_close(logits[:, -1], ref, atol=ATOL, rtol=0)
        seq = torch.cat([seq, ref.argmax(-1, keepdim=True)], 1)
        logits, past = cm.decode(seq[:, -1:], torch.ones_like(seq), past)
    torch.testing.assert_close(logits[:, -1], model(seq).logits[:, -1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_prompts_of_one_two_three_tokens(name):
    """The traces use 3-token examples and export guards every symbolic dim >= 2: real prompts of one
    or two tokens must still run, prefill and decode."""
    model, graphs = graphs_for(name)
    cm = CladaModel(model, graphs, CladaConfig(top_k_ratio=1.0, backend="eager"))
    for length in (1, 2, 3):
        _step_by_step(model, cm, torch.randint(3, 90, (1, length)), steps=3)


@pytest.mark.parametrize("name", ["gpt2", "opt", "gemma3_text"])
def test_prompt_up_to_the_context_limit(name):
    model, graphs = graphs_for(name)
    cm = CladaModel(model, graphs, CladaConfig(top_k_ratio=1.0, backend="eager"))
    limit = cm.context_length
    assert limit == 128
    _step_by_step(model, cm, torch.randint(3, 90, (1, limit - 2)), steps=1)  # last token at limit - 1
    out = cm.generate(torch.randint(3, 90, (1, limit - 4)), max_new_tokens=4)
    assert out.sequences.shape == (1, limit)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_cpp_wrapper_decode_matches_hf(name):
    """wrapper="cpp" (the users' default; this suite compiles with the Python wrapper, conftest)."""
    model, graphs = graphs_for(name)
    cm = CladaModel(model, graphs, CladaConfig(top_k_ratio=1.0, backend="inductor", wrapper="cpp"))
    assert cm._decode_fn.cpp_wrapper
    _check(model, cm, torch.randint(3, 90, (2, 8)))
    python = CladaModel(model, graphs, CladaConfig(top_k_ratio=1.0, backend="inductor", wrapper="python"))
    assert python._decode_fn.cpp_wrapper is False  # compiled lazily, on the first decode


def test_short_prompts_under_inductor():
    model, graphs = graphs_for("llama")
    cm = CladaModel(model, graphs, CladaConfig(top_k_ratio=1.0, backend="inductor"))
    for length in (1, 2, 3):
        ids = torch.randint(3, 90, (1, length))
        ref = model.generate(ids, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids))
        assert torch.equal(cm.generate(ids, max_new_tokens=4).sequences, ref)
