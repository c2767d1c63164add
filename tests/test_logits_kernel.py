"""kernels/logits.cpp: the host loop's argmax + surprisal + entropy in one kernel, against the
torch composition in float64 (controller.reference_token_signals, torch.argmax) as the oracle."""

from __future__ import annotations

import math

import pytest
import torch

from clada_compile import kernels
from clada_compile.controller import next_token_signals, reference_token_signals

pytestmark = pytest.mark.skipif(not hasattr(torch.backends, "cpu"), reason="CPU torch build")


@pytest.fixture(scope="module", autouse=True)
def extension():
    try:
        kernels.load_cpu_extension()
    except kernels.KernelUnavailableError as err:
        pytest.skip(f"C++ extension unavailable: {err}")


def _check(logits, tokens=None, atol=1e-6):
    got = kernels.token_signals_cpu(logits, tokens)
    assert got is not None
    tok, sur, ent, bad = got
    want_tok = logits.argmax(-1) if tokens is None else tokens
    assert tok.tolist() == want_tok.tolist()
    ref_sur, ref_ent, ref_bad = reference_token_signals(logits.double(), want_tok)
    assert bad.tolist() == ref_bad.tolist()
    torch.testing.assert_close(sur.double(), ref_sur, atol=atol, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=atol, rtol=0)


@pytest.mark.parametrize("V", [1, 7, 16, 33, 1000, 49152, 151936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_on_random_logits(V, dtype):
    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(3, V, generator=g) * 4).to(dtype)
    _check(logits)
    _check(logits, torch.randint(0, V, (3,), generator=g))


def test_peaked_flat_and_masked_rows():
    V = 517
    peaked = torch.full((V,), -30.0)
    peaked[100] = 30.0  # p ~ 1: entropy and surprisal ~ 0, the far tail under exp's range
    flat = torch.zeros(V)  # entropy 1 after normalization
    masked = torch.randn(V, generator=torch.Generator().manual_seed(0))
    masked[::3] = float("-inf")  # top-k / top-p style -inf entries: p = 0, no NaN
    ties = torch.zeros(V)
    ties[[5, 9]] = 2.0  # the first maximal index, as torch.argmax
    logits = torch.stack([peaked, flat, masked, ties])
    _check(logits)
    _check(logits, torch.tensor([0, 3, 1, 9]))  # a -inf token: infinite surprisal -> nonfinite, 1
    tok, sur, ent, bad = kernels.token_signals_cpu(logits)
    assert tok.tolist()[3] == 5 and math.isclose(float(ent[1]), 1.0, rel_tol=1e-6)


def test_nonfinite_rows():
    nan_row = torch.randn(64)
    nan_row[10] = float("nan")
    inf_row = torch.zeros(64)
    inf_row[3] = float("inf")
    logits = torch.stack([nan_row, inf_row, torch.full((64,), float("-inf")), torch.randn(64)])
    tok, sur, ent, bad = kernels.token_signals_cpu(logits)
    assert bad.tolist() == [True, True, True, False]
    assert sur[:3].tolist() == [1.0, 1.0, 1.0] and ent[:3].tolist() == [1.0, 1.0, 1.0]
    assert tok.tolist()[:2] == torch.stack([nan_row, inf_row]).argmax(-1).tolist()  # NaN counts as the max
    _check(logits[1:2])


def test_not_applicable_falls_back_to_the_same_contract():
    logits = torch.randn(2, 40, dtype=torch.float64)  # not a kernel dtype: torch computes it
    assert kernels.token_signals_cpu(logits) is None
    tok, sur, ent, bad = next_token_signals(logits)
    assert tok.tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(sur, reference_token_signals(logits, tok)[0])
    assert kernels.token_signals_cpu(torch.randn(2, 3, 40)) is None


def test_token_outside_the_vocabulary_is_an_error():
    with pytest.raises(RuntimeError, match="outside"):
        kernels.token_signals_cpu(torch.randn(1, 10), torch.tensor([10]))
