"""kernels/attention.cpp (clada::decode_attention) and passes/attention.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx

from clada_compile import kernels
from clada_compile.passes.attention import sdpa_to_decode_attention
from conftest import graphs_for
from tiny import BUILDERS

aten = torch.ops.aten


def _oracle(q, k, v, mask, scale):
    """softmax(q k^T scale + mask) v in float64, written out (independent of aten's SDPA)."""
    q, k, v = q.double(), k.double(), v.double()
    s = torch.einsum("bhmd,bhtd->bhmt", q, k) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    p = torch.softmax(s, -1)
    return torch.einsum("bhmt,bhtd->bhmd", p, v)


SHAPES = [  # B, H, M (query rows), T (cached tokens), D, Dv
    (1, 3, 3, 385, 64, 64),  # SmolLM2 decode step: 9 query heads stacked on 3 KV heads
    (2, 2, 1, 7, 12, 12),
    (1, 4, 16, 1500, 128, 128),  # the most query rows the kernel takes; chunks of <= 1024 keys
    (1, 2, 5, 3000, 64, 32),  # value dim != key dim
    (2, 3, 2, 1, 64, 64),  # one cached token
    (1, 2, 7, 300, 64, 64),  # Qwen2.5-0.5B: 14 query heads on 2 KV heads (value rows in passes of 6 + 1)
    (1, 1, 4, 200, 256, 256),  # Gemma-3: head dim 256 (vector dot products, generic value loop)
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", [None, "float", "bool"])
def test_kernel_matches_the_float64_oracle(shape, mask_kind):
    b, h, m, t, d, dv = shape
    g = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(b, h, m, d, generator=g)
    k = torch.randn(b, h, t + 50, d, generator=g)[:, :, :t]  # a prefix view of a larger buffer
    v = torch.randn(b, h, t + 9, dv, generator=g)[:, :, :t]
    mask = None
    if mask_kind == "float":
        mask = torch.randn(b, 1, m, t, generator=g)  # broadcast over heads
    elif mask_kind == "bool":
        mask = torch.rand(1, 1, m, t, generator=g) > 0.3
        mask[..., 0] = True
    out = kernels.decode_attention(q, k, v, mask, 0.125)
    assert out.shape == (b, h, m, dv) and out.dtype == torch.float32
    # fp32 dot products over d terms and a softmax over t: error a few ulp of the outputs' scale
    torch.testing.assert_close(out.double(), _oracle(q, k, v, mask, 0.125), atol=2e-6, rtol=1e-5)


def test_fully_masked_row_is_zero_like_aten():
    q, k, v = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    mask = torch.ones(1, 1, 2, 5, dtype=torch.bool)
    mask[0, 0, 1] = False
    out = kernels.decode_attention(q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref)
    assert (out[0, 0, 1] == 0).all()


@pytest.mark.parametrize("case", ["many_rows", "fp16", "broadcast_heads"])
def test_outside_the_kernel_the_op_is_aten_sdpa(case):
    q, k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    if case == "fp16":
        q, k, v = q[:, :, :2].half(), k.half(), v.half()
    elif case == "broadcast_heads":
        q, k, v = q[:, :, :2], k[:, :1], v[:, :1]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(kernels.decode_attention(q, k, v, None, 0.3), ref, atol=0, rtol=0)


def test_compiles_as_one_opaque_node():
    q, k, v = torch.randn(1, 3, 3, 64), torch.randn(1, 3, 20, 64), torch.randn(1, 3, 20, 64)
    fn = torch.compile(lambda q, k, v: kernels.decode_attention(q, k, v, None, 0.125) * 2, fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), 2 * _oracle(q, k, v, None, 0.125).float(), atol=2e-6, rtol=1e-5)


def test_bad_input_names_the_shapes():
    with pytest.raises(ValueError, match=r"must be 4-D .* got shapes \(3, 64\)"):
        kernels.decode_attention(torch.randn(3, 64), torch.randn(1, 3, 20, 64), torch.randn(1, 3, 20, 64), None, 1.0)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_rewrite_count_one_per_layer(name):
    _, graphs = graphs_for(name)
    gm = fx.GraphModule(graphs.decode_for("dense").gm, copy.deepcopy(graphs.decode_for("dense").gm.graph))
    _, n = sdpa_to_decode_attention(gm)
    assert n == graphs.n_layers
    gm.graph.lint()
    targets = [x.target for x in gm.graph.nodes if x.op == "call_function"]
    assert aten.scaled_dot_product_attention.default not in targets
    assert targets.count(torch.ops.clada.decode_attention.default) == n


def test_must_not_match_causal_or_dropout():
    _, graphs = graphs_for("llama")
    gm = fx.GraphModule(graphs.decode_for("dense").gm, copy.deepcopy(graphs.decode_for("dense").gm.graph))
    first, second = [x for x in gm.graph.nodes if x.target is aten.scaled_dot_product_attention.default]
    first.kwargs = {**first.kwargs, "is_causal": True}
    second.kwargs = {**second.kwargs, "dropout_p": 0.1}
    before = [x.format_node() for x in gm.graph.nodes]
    _, n = sdpa_to_decode_attention(gm)
    assert n == 0 and [x.format_node() for x in gm.graph.nodes] == before


def test_bf16_kernel_matches_the_oracle_within_bf16_rounding():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 3, 3, 64, generator=g).bfloat16(), torch.randn(1, 3, 200, 64, generator=g).bfloat16(),
               torch.randn(1, 3, 200, 64, generator=g).bfloat16())
    mask = torch.randn(1, 1, 3, 200, generator=g).bfloat16()
    out = kernels.decode_attention(q, k, v, mask, 0.125)
    assert out.dtype == torch.bfloat16
    # fp32 math on the bf16 values; the result is rounded to bf16 once (relative 2^-8)
    torch.testing.assert_close(out.double(), _oracle(q, k, v, mask, 0.125), atol=1e-3, rtol=8e-3)
