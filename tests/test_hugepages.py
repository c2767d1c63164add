"""hugepages.py: decode weights in one 2 MiB-aligned, MADV_HUGEPAGE mapping; the same values either way."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from clada_compile import CladaConfig, hugepages
from clada_compile.compiled import CladaModel
from clada_compile.graphs import build_graphs
from tiny import VOCAB, build

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
    try:
        m = re.search(r"\[(\w+)\]", THP.read_text())
    except OSError:
        return None
    return m.group(1) if m else None


SPECS = [((3, 5), torch.float32), ((0,), torch.float32), ((7,), torch.bfloat16), ((4, 4), torch.int8),
         ((2, 3, 2), torch.float32), ((1 << 20,), torch.float32)]  # 4 MiB in all: one mapping


def test_empty_shapes_dtypes_and_layout():
    out = hugepages.empty(SPECS)
    assert [(tuple(t.shape), t.dtype) for t in out] == SPECS
    assert all(t.is_contiguous() for t in out)
    for i, t in enumerate(out):  # writable, and no two tensors overlap
        t.fill_(i + 1)
    assert [float(t.float().mean()) for t in out if t.numel()] == [1.0, 3.0, 4.0, 5.0, 6.0]
    if hugepages.available():
        assert out[0].data_ptr() % hugepages.HUGE_PAGE == 0
        assert all(t.data_ptr() % 4096 == 0 for t in out)


def test_mapping_outlives_views_only():
    t = hugepages.empty([((1024,), torch.float32)])[0]
    view = t[10:20]
    del t
    view.fill_(2.0)  # the mapping is still there while a view of it is
    assert float(view.sum()) == 20.0


def test_small_groups_are_ordinary_tensors():
    out = hugepages.empty(SPECS[:-1])  # a few bytes: a 2 MiB page would be all waste
    assert len({t.untyped_storage().data_ptr() for t in out}) == len(out)


def test_without_huge_pages_ordinary_tensors(monkeypatch):
    monkeypatch.setattr(hugepages, "available", lambda: False)
    out = hugepages.empty(SPECS)
    assert [(tuple(t.shape), t.dtype) for t in out] == SPECS
    assert not any(hugepages.in_huge_pages(t) for t in out if t.numel())


@pytest.mark.skipif(not hugepages.available() or _thp_mode() not in ("always", "madvise"),
                    reason="needs Linux transparent huge pages in 'always' or 'madvise' mode")
def test_pages_are_huge_once_touched():
    t = hugepages.empty([((4 << 20,), torch.float32)])[0]  # 16 MiB
    t.fill_(1.0)
    assert hugepages.in_huge_pages(t)


def test_engine_decode_weights_in_one_mapping(monkeypatch):
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)  # the tiny model's weights are far below a huge page
    model = build("llama")  # not graphs_for's: its W^T copies may predate this test's MIN_BYTES
    graphs = build_graphs(model, impl="reference")
    cm = CladaModel(model, graphs, CladaConfig(top_k_ratio=1.0, backend="eager"))
    consts = [getattr(cm.decode_graph.gm, n) for n, _ in cm.decode_graph.gm.named_buffers()
              if n.startswith("clada_gemv_wt_")]
    assert consts and cm._decode_weights
    if hugepages.available():
        for group in (cm._decode_weights, consts):
            bases = {t.untyped_storage().data_ptr() for t in group}
            assert len(bases) == 1  # one mapping per group
            assert min(t.data_ptr() for t in group) % hugepages.HUGE_PAGE == 0
    # the same logits as HF (the layouts changed, not the numbers)
    ids = torch.randint(0, VOCAB, (1, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = model(ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
        ref = model(ids[:, 8:], attention_mask=mask, past_key_values=want.past_key_values).logits
    _, past, _ = cm.prefill(ids[:, :8], mask[:, :8])
    got, _ = cm.decode(ids[:, 8:], mask, past)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
