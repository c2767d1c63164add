"""Triton split-K input-sparse GEMV (CUDA): ``y = where(|x| >= tau, x, 0) @ wt``.

Imports triton lazily: this module imports fine without triton, and
``triton_available()`` says whether the kernel can be used.

Each program owns a ``BLOCK_N`` slice of output columns and a ``k_per_split``
slice of input channels. The weight tile load is masked by the threshold test
per row, so the rows of inactive channels issue no memory transactions; a
batch-1 GEMV is bandwidth-bound, so that is where the time goes. Partial sums
of the K splits are written to a float32 buffer and summed afterwards (no
atomics, so results are deterministic). Accumulation is float32 for every
weight dtype (float16, bfloat16, float32).

The threshold test is done in float32 (``|x|`` converted exactly to float32,
compared with the float32 ``tau``), the same as ``reference_sparse_gemv_t``.

``TRITON_INTERPRET=1`` runs the kernel on CPU tensors through Triton's
interpreter (for tests; slow). It must be set before triton is first imported
in the process: triton builds its own library functions (``tl.sum``) at import,
compiled or interpreted, for good.
"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["sparse_gemv_t_triton", "triton_available"]

BLOCK_N = 128
BLOCK_K = 32
# Programs per SM to aim for when choosing the K split: enough to hide memory
# latency at batch 1 where a single column split gives only N / BLOCK_N programs.
_PROGRAMS_PER_SM = 4
_INTERPRETER_PROGRAMS = 8

# One kernel object per TRITON_INTERPRET setting: triton decides at decoration
# time whether a function is compiled or interpreted.
_kernels: dict[str, object] = {}


def triton_available() -> bool:
    """True when triton can be imported."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install failing at import
        return False
    return True


def _get_kernel():
    key = os.environ.get("TRITON_INTERPRET", "0")
    if key not in _kernels:
        _kernels[key] = _define_kernel()
    return _kernels[key]


def _define_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def sparse_gemv_t_kernel(
        x_ptr,
        wt_ptr,
        tau_ptr,
        part_ptr,
        K,
        N,
        stride_wk,
        k_per_split,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        tau = tl.load(tau_ptr)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        k_start = pid_k * k_per_split
        for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xv = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            active = k_mask & (tl.abs(xv) >= tau)
            w = tl.load(
                wt_ptr + offs_k[:, None] * stride_wk + offs_n[None, :],
                mask=active[:, None] & n_mask[None, :],
                other=0.0,
            )
            acc += tl.sum(w.to(tl.float32) * xv[:, None], axis=0)
        tl.store(part_ptr + pid_k * N + offs_n, acc, mask=n_mask)

    return sparse_gemv_t_kernel


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split_k(K: int, N: int, device: torch.device) -> tuple[int, int]:
    """(number of K splits, channels per split), the latter a multiple of BLOCK_K."""
    if device.type == "cuda":
        target = _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = _INTERPRETER_PROGRAMS
    splits = max(1, min(_cdiv(K, BLOCK_K), target // _cdiv(N, BLOCK_N)))
    k_per_split = _cdiv(_cdiv(K, splits), BLOCK_K) * BLOCK_K
    return _cdiv(K, k_per_split), k_per_split


def sparse_gemv_t_triton(x: torch.Tensor, wt: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Single-row sparse GEMV: ``x`` (K,), ``wt`` (K, N), ``tau`` 1-element float32 on x's device.

    Returns (N,) in ``x``'s dtype. Inputs are assumed validated by the caller
    (``clada_compile.kernels.sparse_gemv_t``).
    """
    K, N = wt.shape
    if K == 0 or N == 0:
        return torch.zeros(N, dtype=x.dtype, device=x.device)
    x = x.reshape(-1).contiguous()
    if wt.stride(1) != 1:
        wt = wt.contiguous()
    tau = tau.reshape(1).to(device=x.device, dtype=torch.float32)
    splits, k_per_split = _split_k(K, N, x.device)
    partial = torch.empty((splits, N), dtype=torch.float32, device=x.device)
    grid = (_cdiv(N, BLOCK_N), splits)
    kernel = _get_kernel()
    # Triton launches on the current CUDA device, not on the tensors' device.
    device_ctx = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with device_ctx:
        kernel[grid](
            x, wt, tau, partial, K, N, wt.stride(0), k_per_split, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N
        )
    y = partial[0] if splits == 1 else partial.sum(0)
    return y.to(x.dtype)
