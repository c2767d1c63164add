"""Tests of clada_compile.kernels: the sparse GEMV op, its dispatch, the C++ and
Triton kernels against the reference, torch.compile / torch.export support.

The first test that reaches the C++ kernel builds it (~15-40 s, once; cached in
torch's extension dir, not in the working directory)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clada_compile.kernels as kernels
from clada_compile.kernels import (
    KernelUnavailableError,
    reference_sparse_gemv_t,
    sparse_gemv_t,
)
from clada_compile.kernels import triton_gemv
from clada_compile.bench.kernels import format_table, run_kernel_bench

# Shapes deliberately off the vector width (8 fp32 lanes, 32-column tiles; bf16
# with AVX-512: 32-column [even | odd] tiles, two at a time, 8-row groups) so
# every tail path of the C++ kernel runs.
SHAPES = [(1, 1), (5, 17), (9, 32), (37, 129), (64, 64), (13, 95), (300, 1000), (1031, 77)]
KEEP_FRACTIONS = [0.0, 0.5, 1.0]

# fp32: the kernel only reorders fp32 sums (and fuses multiply-adds), so the
# error is a few ulps of the sum of |terms|.
FP32_RTOL = 1e-5
# bf16 (looser): products and sums are fp32, but the output is rounded to bf16
# (8 significant bits, relative step 2**-8 = 0.4%); allow ~2 bf16 ulps.
BF16_RTOL = 1e-2


def _tau_for(x: torch.Tensor, keep: float) -> torch.Tensor:
    """A float32 threshold keeping about `keep` of the entries of x."""
    mag = x.float().abs().flatten()
    if keep == 0.0:
        return (mag.max() + 1.0).reshape(())
    if keep == 1.0:
        return torch.zeros(())
    return torch.quantile(mag, 1.0 - keep).reshape(())


def _exact(x: torch.Tensor, wt: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Reference in float64 on the same (rounded) inputs, with the fp32 threshold test."""
    keep = x.float().abs() >= tau
    return torch.where(keep, x.double(), 0.0) @ wt.double()


def _scale(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    # Sum of |terms| bounds the rounding error of any summation order.
    return x.double().abs() @ wt.double().abs() + 1e-30


def _assert_close(y, x, wt, tau, rtol):
    exact = _exact(x, wt, tau)
    assert y.dtype == x.dtype
    assert y.shape == exact.shape
    err = (y.double() - exact).abs()
    bound = rtol * _scale(x, wt) + rtol * exact.abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3e}"


@pytest.fixture
def kernel_calls():
    """Calls of the C++ single-row kernel since the test started."""
    kernels.load_cpu_extension()
    counter = torch.ops.clada_cpu.kernel_calls
    start = counter()
    return lambda: counter() - start


@pytest.fixture
def python_kernel_calls(monkeypatch):
    """Calls from the op's Python implementation into the C++ kernel."""
    calls = []
    real = kernels._run_cpu_kernel

    def spy(x, wt, tau):
        calls.append(tuple(x.shape))
        return real(x, wt, tau)

    monkeypatch.setattr(kernels, "_run_cpu_kernel", spy)
    return calls


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("keep", KEEP_FRACTIONS)
def test_cpu_kernel_fp32_matches_reference(shape, keep, kernel_calls):
    K, N = shape
    g = torch.Generator().manual_seed(K * 1000 + N)
    x = torch.randn(K, generator=g)
    wt = torch.randn(K, N, generator=g)
    tau = _tau_for(x, keep)
    y = sparse_gemv_t(x, wt, tau)
    _assert_close(y, x, wt, tau, FP32_RTOL)
    atol = FP32_RTOL * _scale(x, wt).max().item()
    torch.testing.assert_close(y, reference_sparse_gemv_t(x, wt, tau), rtol=FP32_RTOL, atol=atol)
    assert kernel_calls() == 1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("keep", KEEP_FRACTIONS)
def test_cpu_kernel_bf16_matches_reference(shape, keep, kernel_calls):
    K, N = shape
    g = torch.Generator().manual_seed(K * 1000 + N + 1)
    x = torch.randn(1, K, generator=g).bfloat16()
    wt = torch.randn(K, N, generator=g).bfloat16()
    tau = _tau_for(x, keep)
    y = sparse_gemv_t(x, wt, tau)
    _assert_close(y, x, wt, tau, BF16_RTOL)
    atol = BF16_RTOL * _scale(x, wt).max().item()
    torch.testing.assert_close(y, reference_sparse_gemv_t(x, wt, tau), rtol=BF16_RTOL, atol=atol)
    assert kernel_calls() == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [32, 64, 96 + 13, 2 * 8192 + 4096 + 45])
def test_cpu_kernel_exact_on_small_integers(dtype, N, kernel_calls):
    """Small integers make every product and partial sum exact in fp32, so the kernel must equal
    the float64 result rounded once to the output dtype, whatever its summation order: a column
    that lands in the wrong place (the bf16 kernel keeps [even | odd] column tiles internally)
    or is dropped shows up exactly. N = 20525 crosses two 8192-column accumulator pieces and ends
    in a 45-column tail; K = 40 with ~6/7 kept gives both threads rows and an odd group."""
    K = 40
    g = torch.Generator().manual_seed(N)
    x = torch.randint(-3, 4, (K,), generator=g).to(dtype)
    wt = torch.randint(-8, 9, (K, N), generator=g).to(dtype)
    for tau in (torch.tensor(0.0), torch.tensor([0.5]), torch.tensor(2.5)):
        y = sparse_gemv_t(x, wt, tau)
        assert torch.equal(y, _exact(x, wt, tau).to(dtype))
    assert kernel_calls() == 3


def test_keep_none_and_keep_all_are_exact_special_cases():
    x = torch.randn(37)
    wt = torch.randn(37, 129)
    none = sparse_gemv_t(x, wt, torch.tensor(float("inf")))
    assert torch.equal(none, torch.zeros(129))
    every = sparse_gemv_t(x, wt, torch.tensor(0.0))
    torch.testing.assert_close(every, x @ wt, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tau_shape", [(), (1,)])
@pytest.mark.parametrize("x_shape", [(64,), (1, 64), (1, 1, 64)])
def test_single_row_shapes_use_cpu_kernel(x_shape, tau_shape, kernel_calls):
    x = torch.randn(x_shape)
    wt = torch.randn(64, 40)
    tau = torch.full(tau_shape, 0.7)
    y = sparse_gemv_t(x, wt, tau)
    assert y.shape == (*x_shape[:-1], 40)
    torch.testing.assert_close(y, reference_sparse_gemv_t(x, wt, tau), rtol=1e-5, atol=1e-5)
    assert kernel_calls() == 1


@pytest.mark.parametrize("x_shape", [(3, 37), (2, 3, 37), (0, 37)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_rows_use_reference_path(x_shape, dtype, kernel_calls):
    x = torch.randn(x_shape).to(dtype)
    wt = torch.randn(37, 129).to(dtype)
    tau = torch.tensor([0.5])
    y = sparse_gemv_t(x, wt, tau)
    assert y.shape == (*x_shape[:-1], 129)
    assert y.dtype == dtype
    assert torch.equal(y, reference_sparse_gemv_t(x, wt, tau))
    assert kernel_calls() == 0


def test_cpu_fp16_uses_reference_path(kernel_calls):
    x = torch.randn(37).half()
    wt = torch.randn(37, 20).half()
    tau = torch.tensor(0.5)
    assert torch.equal(sparse_gemv_t(x, wt, tau), reference_sparse_gemv_t(x, wt, tau))
    assert kernel_calls() == 0


@pytest.mark.parametrize(
    ("x_shape", "dtype", "uses_kernel"),
    [
        ((37,), torch.float32, True),
        ((1, 1, 37), torch.bfloat16, True),
        ((3, 37), torch.float32, False),
        ((37,), torch.float16, False),
    ],
)
def test_python_implementation_dispatch(x_shape, dtype, uses_kernel, python_kernel_calls):
    # The op's Python implementation (used until the C++ library registers its
    # CPU implementation, and for other devices) follows the same rule.
    x = torch.randn(x_shape).to(dtype)
    wt = torch.randn(37, 20).to(dtype)
    tau = torch.tensor(0.5)
    y = kernels._sparse_gemv_t_impl(x, wt, tau)
    assert torch.equal(y, sparse_gemv_t(x, wt, tau))
    assert python_kernel_calls == ([x_shape] if uses_kernel else [])


def test_non_row_major_wt_is_accepted():
    x = torch.randn(37)
    w = torch.randn(129, 37)
    wt_view = w.t()  # (K, N) with column stride K: not row-major
    tau = torch.tensor(0.5)
    torch.testing.assert_close(
        sparse_gemv_t(x, wt_view, tau), reference_sparse_gemv_t(x, wt_view, tau), rtol=1e-5, atol=1e-5
    )


def test_bf16_threshold_uses_fp32_for_both_tau_shapes():
    # tau = 0.505 lies between the bf16 values 0.50390625 and 0.5078125. Plain
    # torch promotion would round a 0-dim tau to bf16 (0.50390625) and keep
    # x = 0.50390625; the op and the reference compare in fp32 and drop it.
    x = torch.tensor([0.5078125, 0.50390625, 2.0]).bfloat16()
    wt = torch.eye(3).bfloat16()
    tau = 0.505
    expected = torch.tensor([0.5078125, 0.0, 2.0]).bfloat16()
    for t in (torch.tensor(tau), torch.tensor([tau])):
        assert torch.equal(sparse_gemv_t(x, wt, t), expected)
        assert torch.equal(reference_sparse_gemv_t(x, wt, t), expected)


@pytest.mark.parametrize(
    ("x", "wt", "tau", "match"),
    [
        (torch.randn(3), torch.randn(3), torch.tensor(0.0), r"`wt` must be 2-D \(K, N\), got shape \(3,\)"),
        (torch.randn(4), torch.randn(3, 5), torch.tensor(0.0), r"`x` last dim must equal `wt` rows"),
        (torch.randn(3), torch.randn(3, 5).double(), torch.tensor(0.0), r"dtypes must match"),
        (torch.randn(3), torch.randn(3, 5), torch.tensor([0.0, 1.0]), r"`tau` must be a 1-element float32"),
        (torch.randn(3), torch.randn(3, 5), torch.tensor(0.0).double(), r"`tau` must be a 1-element float32"),
        (torch.randn(3), torch.randn(3, 5), torch.tensor([[0.0]]), r"got dtype torch.float32 shape \(1, 1\)"),
        (torch.tensor(1.0), torch.randn(1, 5), torch.tensor(0.0), r"`x` must have shape \(\.\.\., K\)"),
        (torch.ones(3, dtype=torch.int32), torch.ones(3, 5, dtype=torch.int32), torch.tensor(0.0), "floating"),
    ],
)
def test_bad_inputs_raise_value_error(x, wt, tau, match, kernel_calls):
    # kernel_calls loads the C++ library, so the op runs its C++ CPU
    # implementation; the Python implementation must give the same message.
    # Without a C++ CPU kernel both calls run the same Python code and the
    # comparison could not fail: check that the op really dispatches to C++.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("clada::sparse_gemv_t", "CPU")
    with pytest.raises(ValueError, match=match) as from_op:
        sparse_gemv_t(x, wt, tau)
    with pytest.raises(ValueError, match=match) as from_python:
        kernels._sparse_gemv_t_impl(x, wt, tau)
    assert str(from_op.value) == str(from_python.value)


def test_build_failure_raises_kernel_unavailable(monkeypatch):
    from torch.utils import cpp_extension

    def broken_load(*args, **kwargs):
        raise RuntimeError("Error building extension\nc++: fatal error: no such compiler")

    monkeypatch.setattr(kernels, "_cpu_extension", None)
    monkeypatch.setattr(kernels, "_cpu_extension_error", None)
    monkeypatch.setattr(cpp_extension, "load", broken_load)
    with pytest.raises(KernelUnavailableError) as info:
        # The Python implementation: in this process the C++ one may already be
        # registered for CPU by earlier tests.
        kernels._sparse_gemv_t_impl(torch.randn(8), torch.randn(8, 4), torch.tensor(0.1))
    message = str(info.value)
    assert "C++ compiler/build" in message
    assert "no such compiler" in message
    assert 'CladaConfig(kernel="reference")' in message
    assert isinstance(info.value, RuntimeError)
    # The failure is remembered: no second build attempt per call.
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("rebuilt"))
    with pytest.raises(KernelUnavailableError):
        kernels.load_cpu_extension()


def test_opcheck():
    x = torch.randn(37)
    wt = torch.randn(37, 129)
    for tau in (torch.tensor(0.5), torch.tensor([0.5])):
        torch.library.opcheck(torch.ops.clada.sparse_gemv_t.default, (x, wt, tau))
        torch.library.opcheck(torch.ops.clada.sparse_gemv_t.default, (x.reshape(1, 1, 37), wt, tau))
        torch.library.opcheck(torch.ops.clada.sparse_gemv_t.default, (torch.randn(3, 37), wt, tau))


class _SparseLinear(torch.nn.Module):
    def __init__(self, K: int, N: int):
        super().__init__()
        self.wt = torch.nn.Parameter(torch.randn(K, N), requires_grad=False)
        self.register_buffer("tau", torch.tensor([0.5]))

    def forward(self, x):
        return torch.relu(sparse_gemv_t(x * 2.0, self.wt, self.tau)) + 1.0


def test_torch_compile_fullgraph_no_graph_break():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    model = _SparseLinear(37, 129).eval()
    x = torch.randn(1, 37)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    assert counter.frame_count == 1
    assert counter.op_count >= 3


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_backends(backend):
    torch._dynamo.reset()
    model = _SparseLinear(37, 129).eval()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        for x in (torch.randn(1, 37), torch.randn(37)):
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_torch_export():
    model = _SparseLinear(37, 129).eval()
    x = torch.randn(1, 37)
    exported = torch.export.export(model, (x,))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.clada.sparse_gemv_t.default in targets
    torch.testing.assert_close(exported.module()(x), model(x))


# --- Triton ---------------------------------------------------------------------------


def _require_triton():
    if not triton_gemv.triton_available():
        pytest.skip("triton is not importable in this environment")


TRITON_CASES = [
    (dtype, shape, keep)
    for dtype in ("float32", "float16", "bfloat16")
    for shape in ((1, 1), (37, 129), (300, 200))
    for keep in KEEP_FRACTIONS
]

# One fresh interpreter checks what must hold in a new process:
# - importing the package builds nothing and does not import triton;
# - the Triton kernel under TRITON_INTERPRET=1, which must be set before triton
#   is first imported (triton builds its own library functions, e.g. tl.sum, at
#   import), and this pytest process may already have imported it.
_CHILD = """
import os, sys, torch
import clada_compile.kernels, clada_compile.bench.kernels
from clada_compile.kernels import triton_gemv
cases, out = eval(sys.argv[1]), sys.argv[2]
import_report = {
    "triton_imported": "triton" in sys.modules,
    "extension_built": os.path.exists(os.environ["TORCH_EXTENSIONS_DIR"]),
}
results = None
if triton_gemv.triton_available():
    results = []
    for dtype, (K, N), keep in cases:
        g = torch.Generator().manual_seed(7 * K + N)
        x = torch.randn(K, generator=g).to(getattr(torch, dtype))
        wt = torch.randn(K, N, generator=g).to(getattr(torch, dtype))
        mag = x.float().abs()
        tau = {0.0: mag.max() + 1.0, 1.0: torch.tensor(0.0)}.get(keep, torch.quantile(mag, 1.0 - keep))
        tau = tau.reshape(())
        results.append((x, wt, tau, triton_gemv.sparse_gemv_t_triton(x, wt, tau)))
torch.save({"import": import_report, "triton": results}, out)
"""


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fresh")
    env = {**os.environ, "TRITON_INTERPRET": "1", "TORCH_EXTENSIONS_DIR": str(tmp / "ext")}
    root = Path(kernels.__file__).resolve().parents[2]
    out = tmp / "results.pt"
    subprocess.run([sys.executable, "-c", _CHILD, repr(TRITON_CASES), str(out)], check=True, env=env, cwd=root)
    return torch.load(out)


def test_import_builds_nothing_and_skips_triton(fresh_process):
    assert fresh_process["import"] == {"triton_imported": False, "extension_built": False}


@pytest.mark.parametrize("case", range(len(TRITON_CASES)), ids=[str(c) for c in TRITON_CASES])
def test_triton_interpreter_matches_reference(fresh_process, case):
    if fresh_process["triton"] is None:
        pytest.skip("triton is not importable in this environment")
    x, wt, tau, y = fresh_process["triton"][case]
    _assert_close(y, x, wt, tau, FP32_RTOL if x.dtype == torch.float32 else BF16_RTOL)


def test_triton_split_k_covers_all_channels():
    # Whatever the split, the channel ranges must tile [0, K) exactly.
    for K, N in [(1, 1), (37, 129), (4096, 11008), (11008, 4096), (100000, 8)]:
        splits, per_split = triton_gemv._split_k(K, N, torch.device("cpu"))
        assert per_split % triton_gemv.BLOCK_K == 0
        assert (splits - 1) * per_split < K <= splits * per_split


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("keep", [0.0, 0.3, 1.0])
def test_triton_cuda_through_op(dtype, keep):
    _require_triton()
    x = torch.randn(1, 4096, device="cuda").to(dtype)
    wt = torch.randn(4096, 1000, device="cuda").to(dtype)
    tau = _tau_for(x, keep).cuda()
    y = sparse_gemv_t(x, wt, tau)
    _assert_close(y.cpu(), x.cpu(), wt.cpu(), tau.cpu(), BF16_RTOL)


# --- bench ----------------------------------------------------------------------------


def test_bench_smoke():
    """Several matrices are cycled so the working set exceeds the cache as in decode (here 0.1 MB
    of 24 KiB matrices: 5 of them); the thresholds keep the requested fraction."""
    rows = run_kernel_bench(shapes=((64, 96),), fractions=(1.0, 0.5), threads=1, repeats=3, working_set_mb=0.1)
    dense_gemv, row = rows
    assert (row["K"], row["N"], row["active_fraction"], row["dtype"], row["matrices"]) == (64, 96, 0.5, "float32", 5)
    assert len(row["dense_ms"]) == len(row["sparse_ms"]) == 3
    assert abs(row["realized_fraction"] - 0.5) < 0.05 and dense_gemv["realized_fraction"] == 1.0
    assert dense_gemv["vs_all_rows"] == 1.0
    assert row["vs_all_rows"] == row["sparse_ms_median"] / dense_gemv["sparse_ms_median"]
    table = format_table(rows)
    assert table.count("\n") == 3 and "| 64 | 96 | float32 | 50% | 5 |" in table
    assert table.splitlines()[-1].endswith(f"| {row['vs_all_rows']:.2f} |")
    assert run_kernel_bench(shapes=((64, 96),), fractions=(0.5,), threads=1, repeats=1,
                            working_set_mb=0.01)[0]["vs_all_rows"] is None  # no all-rows run to compare with


@pytest.mark.parametrize("args, msg", [
    (["--shapes", "576x"], "`--shapes` entries must be KxN with positive integers, e.g. 576x1536, got '576x'"),
    (["--shapes", "0x8"], "got '0x8'"),
    (["--fractions", "1,1.5"], "`--fractions` entries must be in \\(0, 1\\], got 1.5"),
])
def test_bench_cli_rejects_bad_shapes_and_fractions(args, msg):
    from clada_compile.cli.bench import main_impl

    with pytest.raises(ValueError, match=msg):
        main_impl(["kernels", *args])


def test_bf16_output_rounds_like_torch_bit_for_bit(kernel_calls):
    """The kernel's fp32 -> bf16 store (vectorized) against torch's conversion of the same fp32 sums:
    two rows with x = (1, 1) make each output one fp32 addition, exactly what torch computes."""
    g = torch.Generator().manual_seed(7)
    N = 16 * 70 + 9  # vector body and scalar tail
    a = torch.randn(N, generator=g) * torch.logspace(-40, 38, N).float()  # denormals to huge
    b = torch.randn(N, generator=g) * 1e-3
    a[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    wt = torch.stack([a, b]).to(torch.bfloat16)
    x = torch.ones(1, 2, dtype=torch.bfloat16)
    got = sparse_gemv_t(x, wt, torch.zeros(()))
    want = (wt[0].float() + wt[1].float()).to(torch.bfloat16)[None]
    assert kernel_calls() == 1
    assert torch.isnan(got[0, 0]) and torch.isnan(want[0, 0])  # NaN's bits: c10's 0x7FC0 vs torch's payload
    assert torch.equal(got[:, 1:].view(torch.int16), want[:, 1:].view(torch.int16))
