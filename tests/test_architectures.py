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
    for backend in ("eager", "inductor"):
        cm = CladaModel(model, graphs, CladaConfig(top_k_ratio=1.0, backend=backend))
        assert cm.inlined == (n if backend == "inductor" else 0)  # inductor sees the op's body
        _check(model, cm, ids)
