"""direct.DirectCompiled: inductor without Dynamo, checked only on the inputs that vary.

Oracle: the same FX graph run eagerly. Counts: compiles per signature / guard failure."""

import pytest
import torch
from torch import fx

from clada_compile.direct import DirectCompiled


def _step(ids, mask, cache, w):  # a decode step in miniature: attend over the first `mask` rows
    n = mask.shape[1]
    return (cache[:, :n] * w).sum(1) + ids


def _compiled(**kw):
    return DirectCompiled(fx.symbolic_trace(_step), 3, {1: (1,), 2: (1,)}, **kw)


def _args(batch=2, length=5, capacity=16):
    g = torch.Generator().manual_seed(batch * 100 + length)
    return (torch.randn(batch, 8, generator=g), torch.ones(batch, length),
            torch.randn(batch, capacity, 8, generator=g), torch.randn(8, generator=g))


@torch.no_grad()
def test_growing_length_compiles_once_and_matches_eager():
    fn = _compiled()
    for length in (5, 9, 12, 15):
        args = _args(length=length)
        torch.testing.assert_close(fn(*args), _step(*args), atol=1e-5, rtol=1e-5)
    assert fn.compiles == 1
    # a longer buffer is the same signature (its length is symbolic too)
    args = _args(length=20, capacity=40)
    torch.testing.assert_close(fn(*args), _step(*args), atol=1e-5, rtol=1e-5)
    assert fn.compiles == 1


@torch.no_grad()
def test_new_signature_or_failed_shape_guard_compiles_a_variant():
    fn = _compiled()
    fn(*_args(batch=2))
    args = _args(batch=3)  # static dim changed: new signature
    torch.testing.assert_close(fn(*args), _step(*args), atol=1e-5, rtol=1e-5)
    assert fn.compiles == 2
    # the first variant assumed a mask shorter than the buffer (inductor's guard on the slice):
    # a mask that fills it fails that guard and gets its own variant, correct again
    args = _args(batch=2, length=16, capacity=16)
    torch.testing.assert_close(fn(*args), _step(*args), atol=1e-5, rtol=1e-5)
    assert fn.compiles == 3
    assert len(fn.variants) == 2 and sum(len(v) for v in fn.variants.values()) == 3


@torch.no_grad()
def test_dtype_is_part_of_the_signature():
    fn = _compiled()
    fn(*_args())
    ids, mask, cache, w = _args()
    out = fn(ids.double(), mask, cache.double(), w.double())
    assert out.dtype == torch.float64 and fn.compiles == 2


@torch.no_grad()
def test_past_max_variants_warns_and_runs_eagerly():
    fn = _compiled(max_variants=1)
    fn(*_args(batch=2))
    args = _args(batch=4)
    with pytest.warns(RuntimeWarning, match="compiled for 1 call signatures"):
        out = fn(*args)
    torch.testing.assert_close(out, _step(*args), atol=1e-5, rtol=1e-5)
    assert fn.compiles == 1


@torch.no_grad()
def test_cpp_wrapper_matches_eager_and_keeps_the_symbolic_length():
    fn = _compiled(cpp_wrapper=True)
    assert fn.cpp_wrapper
    for length in (5, 9, 12):
        args = _args(length=length)
        torch.testing.assert_close(fn(*args), _step(*args), atol=1e-5, rtol=1e-5)
    assert fn.compiles == 1



def test_guards_index_the_sizes_and_strides_read_once():
    from clada_compile.direct import _fast_guards

    code = "L['t1'].stride()[0] == L['t1'].size()[1] and L['t12'].size()[2] >= 2"
    assert _fast_guards(code) == "T[1][0] == S[1][1] and S[12][2] >= 2"
    other = "L['t1'].size()[0] == 2 and L['t1'].storage_offset() == 0"  # not sizes/strides only: kept over L
    assert _fast_guards(other) == other
