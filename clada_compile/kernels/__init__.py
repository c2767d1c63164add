"""The decode kernels: input-sparse GEMV (sparse_gemv.cpp, triton_gemv.py) and attention over a
KV cache (attention.cpp, ``decode_attention`` below).

The primitive is a GEMV over transposed weights that skips small inputs::

    y = sum over i with |x_i| >= tau of x_i * wt[i, :]

``wt`` is the weight transposed, shape ``(K, N)``, row-major, so each input
channel's weights are one contiguous row and a skipped channel costs no memory
traffic. Pure-torch reference: ``torch.where(x.abs() >= tau, x, 0) @ wt``.
``tau = 0`` keeps every row. The test ``|x| >= tau`` is evaluated in float32
(``|x|`` converted exactly, ``tau`` float32) for every dtype and tau shape.

Public API
----------
``sparse_gemv_t(x, wt, tau)``
    Calls the op ``torch.ops.clada.sparse_gemv_t`` (auto dispatch, below).
    ``x`` is ``(..., K)``, ``wt`` is ``(K, N)`` with ``x``'s dtype, ``tau`` is a
    1-element float32 tensor (0-dim or shape ``(1,)``); returns ``(..., N)`` in
    ``x``'s dtype. It has a fake implementation, so ``torch.compile(
    fullgraph=True)`` and ``torch.export`` treat it as one opaque node.
    Inference only: no autograd formula is registered.
``gated_rows_gemv(x, w, a, tau)``
    ``where(|a| >= tau, a * (x @ w.T), 0)`` over neuron-major ``w`` (M, D): the
    CATS baseline's up projection (``CladaConfig(mlp_criterion="gate")``), one
    kept neuron's row read at a time; same dispatch rule as below.
``reference_sparse_gemv_t(x, wt, tau)``
    The pure-torch reference. Callers that must not depend on a compiled kernel
    (``CladaConfig(kernel="reference")``) call this instead of the op.
``load_cpu_extension()``
    Builds (first use only) and loads the C++ kernel; raises
    ``KernelUnavailableError`` if the build fails.

Dispatch rule of the op (rows = prod(x.shape[:-1]))
---------------------------------------------------
1. rows == 1, CPU, float32 or bfloat16 -> C++ kernel (``sparse_gemv.cpp``),
   built on first use. A failed build raises ``KernelUnavailableError``; the op
   never falls back silently, because a silent fallback would hide a 2-5x
   slowdown.
2. rows == 1, CUDA, triton importable, float16/bfloat16/float32 -> Triton
   kernel (``triton_gemv.py``).
3. everything else -> the dense masked reference inside the op: rows > 1 (a
   GEMM is compute-bound, skipping rows does not pay), CPU float16, CUDA
   without triton, other devices.

The op's implementation is Python (``_sparse_gemv_t_impl``). Once the C++
library is loaded (first single-row CPU call, or ``load_cpu_extension()``), it
also registers a C++ implementation for the CPU dispatch key with the same
rule and the same ``ValueError`` messages; CPU calls then skip the Python
layer, which saves ~10-20 us per call (a quarter of a small layer's GEMV).
"""

from __future__ import annotations

import hashlib
import math
import platform
import threading
from pathlib import Path

import torch

__all__ = [
    "KernelUnavailableError",
    "decode_attention",
    "gated_rows_gemv",
    "load_cpu_extension",
    "reference_gated_rows_gemv",
    "reference_sparse_gemv_t",
    "reference_sparse_gemv_t_q8",
    "sparse_gemv_t",
    "sparse_gemv_t_q8",
    "token_signals_cpu",
]

_SOURCES = tuple(Path(__file__).with_name(f) for f in ("sparse_gemv.cpp", "attention.cpp", "logits.cpp"))
_CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# -fopenmp: at::parallel_for is header code that expands to OpenMP pragmas.
# -ffp-contract=fast: torch builds with -std=c++NN (ISO mode), where GCC would
# otherwise not fuse the multiply-add into an FMA.
_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast")
_LDFLAGS = ("-fopenmp",)
_ERROR_LINES = 8

# Build state, module-level so the build happens once per process; a failure is
# remembered too, so a missing compiler costs one attempt, not one per call.
_cpu_extension = None
_cpu_extension_error: KernelUnavailableError | None = None
_build_lock = threading.Lock()


class KernelUnavailableError(RuntimeError):
    """A compiled kernel could not be built or loaded."""


def reference_sparse_gemv_t(x: torch.Tensor, wt: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Pure-torch reference: ``torch.where(x.abs() >= tau, x, 0) @ wt``.

    The threshold test is done in float32 like the kernels do: with a 0-dim
    ``tau`` torch's type promotion would otherwise round ``tau`` to a bfloat16
    ``x``'s dtype, so 0-dim and (1,)-shaped ``tau`` would select different rows.
    """
    mag = x.abs()
    if mag.dtype in (torch.float16, torch.bfloat16):
        mag = mag.float()  # exact
    return torch.where(mag >= tau, x, 0) @ wt


def _extension_name() -> str:
    # -march=native binaries are CPU-specific; keying the name by the CPU keeps
    # a torch extension cache shared between machines (e.g. an NFS home) from
    # loading a binary that would die with SIGILL.
    return f"clada_sparse_gemv_{hashlib.sha1(_cpu_fingerprint().encode()).hexdigest()[:10]}"


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}|{platform.processor()}|{flags.strip()}"


def _build_error(exc: BaseException) -> KernelUnavailableError:
    lines = [line[:300] for line in str(exc).strip().splitlines() if line.strip()]
    head = lines[:_ERROR_LINES]
    # The compiler's own complaint is usually after the long command lines.
    errors = [line for line in lines[_ERROR_LINES:] if "error" in line.lower()][:_ERROR_LINES]
    detail = "\n".join(["  " + line for line in head + errors]) or f"  {type(exc).__name__}"
    return KernelUnavailableError(
        "Building the clada sparse-GEMV C++ CPU kernel failed (C++ compiler/build "
        f"error, {type(exc).__name__}):\n{detail}\n"
        'Pass `CladaConfig(kernel="reference")` to use the reference implementation.'
    )


def load_cpu_extension():
    """Build (on first use) and load the C++ CPU kernel; return its op handle.

    Uses ``torch.utils.cpp_extension.load``, so the build is cached in
    ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) and reused
    by later processes. Loading also registers the C++ CPU implementation of
    ``clada::sparse_gemv_t`` (module docstring). Raises
    ``KernelUnavailableError`` if it cannot be built.
    """
    global _cpu_extension, _cpu_extension_error
    if _cpu_extension is not None:  # hot path: every op call comes through here
        return _cpu_extension
    with _build_lock:
        if _cpu_extension is not None:
            return _cpu_extension
        if _cpu_extension_error is not None:
            raise _cpu_extension_error
        try:
            from torch.utils import cpp_extension

            cpp_extension.load(
                name=_extension_name(),
                sources=[str(src) for src in _SOURCES],
                extra_cflags=list(_CFLAGS),
                extra_ldflags=list(_LDFLAGS),
                is_python_module=False,
                verbose=False,
            )
            _cpu_extension = torch.ops.clada_cpu.sparse_gemv_t_cpu.default
        except Exception as exc:  # compiler missing, ninja missing, compile error, bad .so
            _cpu_extension_error = _build_error(exc)
            raise _cpu_extension_error from exc
        return _cpu_extension


def _check_inputs(x: torch.Tensor, wt: torch.Tensor, tau: torch.Tensor) -> None:
    if wt.dim() != 2:
        raise ValueError(f"`wt` must be 2-D (K, N), got shape {tuple(wt.shape)}")
    if x.dim() < 1:
        raise ValueError(f"`x` must have shape (..., K), got shape {tuple(x.shape)}")
    if x.shape[-1] != wt.shape[0]:
        raise ValueError(
            f"`x` last dim must equal `wt` rows (K): got x shape {tuple(x.shape)}, "
            f"wt shape {tuple(wt.shape)}"
        )
    if x.dtype != wt.dtype:
        raise ValueError(f"`x` and `wt` dtypes must match, got {x.dtype} and {wt.dtype}")
    if not x.is_floating_point():
        raise ValueError(f"`x` must be a floating-point tensor, got {x.dtype}")
    if tau.dtype != torch.float32 or tau.numel() != 1 or tau.dim() > 1:
        raise ValueError(
            "`tau` must be a 1-element float32 tensor (0-dim or shape (1,)), got "
            f"dtype {tau.dtype} shape {tuple(tau.shape)}"
        )
    if x.device != wt.device:
        raise ValueError(f"`x` and `wt` must be on one device, got {x.device} and {wt.device}")


def _run_cpu_kernel(x: torch.Tensor, wt: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    # The C++ op takes x (..., K) with one row, any wt layout, and shapes the
    # output itself: every Python-level tensor call here costs microseconds.
    if tau.device.type != "cpu":
        tau = tau.cpu()
    return load_cpu_extension()(x, wt, tau)


def _run_triton_kernel(x: torch.Tensor, wt: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    from .triton_gemv import sparse_gemv_t_triton

    y = sparse_gemv_t_triton(x.reshape(-1), wt, tau.to(x.device))
    return y.reshape(*x.shape[:-1], wt.shape[1])


def _triton_importable() -> bool:
    from .triton_gemv import triton_available

    return triton_available()


# torch.library.define + impl rather than torch.library.custom_op: custom_op adds
# Python-level autograd/dispatch wrappers costing ~15-30 us per eager call,
# which is a large share of a batch-1 GEMV on small layers (~40 us).
torch.library.define("clada::sparse_gemv_t", "(Tensor x, Tensor wt, Tensor tau) -> Tensor")


def _sparse_gemv_t_impl(x: torch.Tensor, wt: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    _check_inputs(x, wt, tau)
    rows = math.prod(x.shape[:-1])
    if rows == 1 and x.device.type == "cpu" and x.dtype in _CPU_KERNEL_DTYPES:
        return _run_cpu_kernel(x, wt, tau)
    if (
        rows == 1
        and x.device.type == "cuda"
        and x.dtype in _TRITON_DTYPES
        and _triton_importable()
    ):
        return _run_triton_kernel(x, wt, tau)
    return reference_sparse_gemv_t(x, wt, tau.to(x.device))


def _sparse_gemv_t_fake(x: torch.Tensor, wt: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    _check_inputs(x, wt, tau)
    return x.new_empty((*x.shape[:-1], wt.shape[1]))


# One Python implementation for every device; it dispatches itself (above).
torch.library.impl("clada::sparse_gemv_t", "CompositeExplicitAutograd", _sparse_gemv_t_impl)
torch.library.register_fake("clada::sparse_gemv_t", _sparse_gemv_t_fake)


_sparse_gemv_t_op = torch.ops.clada.sparse_gemv_t.default


def sparse_gemv_t(x: torch.Tensor, wt: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``where(|x| >= tau, x, 0) @ wt`` via the op ``torch.ops.clada.sparse_gemv_t``.

    Dispatch as in the module docstring. Inference only (no autograd formula).
    """
    return _sparse_gemv_t_op(x, wt, tau)


# ---- int8 weights ---------------------------------------------------------------------------
# clada::sparse_gemv_t_q8(x, wq, scale, tau) = where(|x| >= tau, x, 0) @ wq.float() * scale:
# weight-only int8, one float32 scale per OUTPUT column (quantize.py says why that layout). x is
# float32, the result float32. Dispatch like sparse_gemv_t: one row on CPU -> the C++ kernel
# (same row skipping, a quarter of the fp32 bytes); anything else -> the dequantized reference.
torch.library.define("clada::sparse_gemv_t_q8", "(Tensor x, Tensor wq, Tensor scale, Tensor tau) -> Tensor")


def reference_sparse_gemv_t_q8(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Pure-torch reference: ``(where(|x| >= tau, x, 0) @ wq.float()) * scale``."""
    return (torch.where(x.abs() >= tau, x, 0) @ wq.to(x.dtype)) * scale


def _check_inputs_q8(x, wq, scale, tau) -> None:
    if wq.dim() != 2 or wq.dtype != torch.int8:
        raise ValueError(f"`wq` must be a 2-D int8 tensor (K, N), got dtype {wq.dtype} shape {tuple(wq.shape)}")
    if x.dim() < 1 or x.shape[-1] != wq.shape[0]:
        raise ValueError(f"`x` last dim must equal `wq` rows (K): got x shape {tuple(x.shape)}, wq shape {tuple(wq.shape)}")
    if x.dtype != torch.float32:
        raise ValueError(f"`x` must be float32 for int8 weights, got {x.dtype}")
    if scale.dtype != torch.float32 or scale.dim() != 1 or scale.shape[0] != wq.shape[1]:
        raise ValueError(f"`scale` must be float32 of shape (N,) = ({wq.shape[1]},), got dtype {scale.dtype} "
                         f"shape {tuple(scale.shape)}")
    if tau.dtype != torch.float32 or tau.numel() != 1 or tau.dim() > 1:
        raise ValueError("`tau` must be a 1-element float32 tensor (0-dim or shape (1,)), got "
                         f"dtype {tau.dtype} shape {tuple(tau.shape)}")
    if not (x.device == wq.device == scale.device):
        raise ValueError(f"`x`, `wq` and `scale` must be on one device, got {x.device}, {wq.device} and {scale.device}")


def _sparse_gemv_t_q8_impl(x, wq, scale, tau):
    _check_inputs_q8(x, wq, scale, tau)
    if math.prod(x.shape[:-1]) == 1 and x.device.type == "cpu":
        load_cpu_extension()  # registers the C++ CPU implementation too; later calls skip this layer
        return torch.ops.clada_cpu.sparse_gemv_t_q8_cpu(x, wq, scale, tau.cpu())
    return reference_sparse_gemv_t_q8(x, wq, scale, tau.to(x.device))


def _sparse_gemv_t_q8_fake(x, wq, scale, tau):
    _check_inputs_q8(x, wq, scale, tau)
    return x.new_empty((*x.shape[:-1], wq.shape[1]))


torch.library.impl("clada::sparse_gemv_t_q8", "CompositeExplicitAutograd", _sparse_gemv_t_q8_impl)
torch.library.register_fake("clada::sparse_gemv_t_q8", _sparse_gemv_t_q8_fake)
_sparse_gemv_t_q8_op = torch.ops.clada.sparse_gemv_t_q8.default


def sparse_gemv_t_q8(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``where(|x| >= tau, x, 0) @ wq.float() * scale`` via ``torch.ops.clada.sparse_gemv_t_q8``."""
    return _sparse_gemv_t_q8_op(x, wq, scale, tau)


# ---- rows whose gate passes (the CATS baseline's up projection) ----------------------------
# clada::gated_rows_gemv(x, w, a, tau) = where(|a| >= tau, a * (x @ w.T), 0): w (M, D) row-major
# (neuron-major up weights), a = act(gate) (..., M). One row on CPU, float32/bfloat16 -> the C++
# kernel (sparse_gemv.cpp: reads only the rows of the kept neurons); anything else -> the reference.
torch.library.define("clada::gated_rows_gemv", "(Tensor x, Tensor w, Tensor a, Tensor tau) -> Tensor")


def reference_gated_rows_gemv(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Pure-torch reference: ``where(|a| >= tau, a * (x @ w.T), 0)`` (the test in float32)."""
    mag = a.abs()
    if mag.dtype in (torch.float16, torch.bfloat16):
        mag = mag.float()
    return torch.where(mag >= tau, a * (x @ w.t()), 0)


def _check_inputs_gated(x, w, a, tau) -> None:
    if w.dim() != 2:
        raise ValueError(f"`w` must be 2-D (M, D), got shape {tuple(w.shape)}")
    if x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"`x` last dim must equal `w` columns (D): got x shape {tuple(x.shape)}, w shape {tuple(w.shape)}")
    if a.dim() != x.dim() or a.shape[-1] != w.shape[0] or a.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"`a` must have shape (..., M) matching x's leading dims: got a shape {tuple(a.shape)}, "
                         f"x shape {tuple(x.shape)}, w shape {tuple(w.shape)}")
    if not (x.dtype == w.dtype == a.dtype):
        raise ValueError(f"`x`, `w` and `a` dtypes must match, got {x.dtype}, {w.dtype} and {a.dtype}")
    if not x.is_floating_point():
        raise ValueError(f"`x` must be a floating-point tensor, got {x.dtype}")
    if tau.dtype != torch.float32 or tau.numel() != 1 or tau.dim() > 1:
        raise ValueError("`tau` must be a 1-element float32 tensor (0-dim or shape (1,)), got "
                         f"dtype {tau.dtype} shape {tuple(tau.shape)}")


def _gated_rows_gemv_impl(x, w, a, tau):
    _check_inputs_gated(x, w, a, tau)
    if math.prod(x.shape[:-1]) == 1 and x.device.type == "cpu" and x.dtype in _CPU_KERNEL_DTYPES:
        load_cpu_extension()  # registers the C++ CPU implementation too; later calls skip this layer
        return torch.ops.clada_cpu.gated_rows_gemv_cpu(x, w, a, tau.cpu())
    return reference_gated_rows_gemv(x, w, a, tau.to(x.device))


def _gated_rows_gemv_fake(x, w, a, tau):
    _check_inputs_gated(x, w, a, tau)
    return a.new_empty(a.shape)


torch.library.impl("clada::gated_rows_gemv", "CompositeExplicitAutograd", _gated_rows_gemv_impl)
torch.library.register_fake("clada::gated_rows_gemv", _gated_rows_gemv_fake)
_gated_rows_gemv_op = torch.ops.clada.gated_rows_gemv.default


def gated_rows_gemv(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``where(|a| >= tau, a * (x @ w.T), 0)`` via ``torch.ops.clada.gated_rows_gemv``: a dropped
    neuron's row of ``w`` is never read."""
    return _gated_rows_gemv_op(x, w, a, tau)


# ---- attention at decode ---------------------------------------------------------------------
# clada::decode_attention(q, k, v, mask, scale) = scaled_dot_product_attention(q, k, v, mask,
# scale=scale) for (B, H, M, D) queries over (B, H, T, D) keys/values, no dropout, not causal.
# CPU float32 with M <= 16 query rows -> the C++ kernel (attention.cpp: the cache split between
# threads along t as well as heads); anything else -> aten's SDPA inside the op.
torch.library.define("clada::decode_attention", "(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor")


def _check_attention(q, k, v, mask) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"`q`, `k`, `v` must be 4-D (batch, heads, tokens, dim), got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if mask is not None and mask.dim() != 4:
        raise ValueError(f"`mask` must be None or 4-D (broadcastable to batch, heads, queries, keys), "
                         f"got shape {tuple(mask.shape)}")


def _decode_attention_impl(q, k, v, mask, scale):
    _check_attention(q, k, v, mask)
    if q.device.type == "cpu":
        load_cpu_extension()  # registers the C++ CPU implementation too; later calls skip this layer
        return torch.ops.clada.decode_attention(q, k, v, mask, scale)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _decode_attention_fake(q, k, v, mask, scale):
    _check_attention(q, k, v, mask)
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


torch.library.impl("clada::decode_attention", "CompositeExplicitAutograd", _decode_attention_impl)
torch.library.register_fake("clada::decode_attention", _decode_attention_fake)


def decode_attention(q, k, v, mask=None, scale: float | None = None) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, mask, scale=scale)`` via ``torch.ops.clada.decode_attention``
    (scale None: 1 / sqrt(head dim), as SDPA)."""
    return torch.ops.clada.decode_attention(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else float(scale))


def weight_bytes_read() -> int | None:
    """Weight bytes the CPU GEMV kernel has read since the process started (the rows of kept input
    channels only); None when the extension is not loaded. Differences around a decode step give
    the bytes it streamed."""
    try:
        return int(torch.ops.clada_cpu.weight_bytes_read())
    except (AttributeError, RuntimeError):
        return None


def token_signals_cpu(logits: torch.Tensor, tokens: torch.Tensor | None = None):
    """controller.token_signals with the tokens, by the C++ kernel (logits.cpp): (tokens, surprisal,
    entropy, nonfinite), tokens None = the greedy ones. None where it does not apply: logits that
    are not a CPU float32/bfloat16 (B, V) tensor, or the extension not loaded in this process
    (this never builds it: an ONNX Runtime deployment needs no compiler)."""
    if (_cpu_extension is None or logits.device.type != "cpu" or logits.dtype not in _CPU_KERNEL_DTYPES
            or logits.dim() != 2 or logits.shape[1] == 0):
        return None
    if tokens is not None and (tokens.dtype != torch.int64 or tokens.device.type != "cpu"):
        tokens = tokens.to("cpu", torch.int64)
    return torch.ops.clada_cpu.token_signals_cpu(logits, tokens)
