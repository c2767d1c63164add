"""Micro-benchmark: the sparse GEMV op vs torch's dense ``F.linear``, batch 1.

Dense baseline is what a dense model does at decode time: ``F.linear(x, W)``
with ``W`` (N, K) contiguous. Sparse is the public op ``sparse_gemv_t`` on
``wt = W.T.contiguous()``, so the timing includes the op's dispatch and input
checks. The first sparse call builds/loads the C++ kernel (a warm-up call).

Method: same process; the dense and sparse calls alternate so both see the
same machine state (frequency, other load, cache contents); warm-up calls are
excluded; medians are reported. Each iteration uses the next of a pool of
random ``x`` vectors, each with its own ``tau`` set to the ``1 - fraction``
quantile of its ``|x|``, so the active rows change from call to call as they
do between tokens (a fixed ``x`` would let the sparse kernel re-read the same
rows from cache). Weights of the small shapes fit in L3 and stay there for
both methods, as in any loop over one layer.

Run as ``python -m clada_compile.kernels.bench`` to print the table.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from . import sparse_gemv_t

__all__ = ["format_table", "run_kernel_bench"]

DEFAULT_SHAPES = ((576, 1536), (1536, 576), (4096, 11008), (11008, 4096))
_X_POOL = 8
_WARMUP = 3
# Auto repeat counts keep the default run (4 shapes x 2 fractions) well under a
# minute: big shapes cost ~10 ms per dense call, small ones ~0.1 ms.
_BIG_WEIGHT_ELEMENTS = 10_000_000
_REPEATS_BIG = 30
_REPEATS_SMALL = 1000


def _inputs(K: int, fraction: float, dtype: torch.dtype, generator: torch.Generator):
    pool = []
    for _ in range(_X_POOL):
        x = torch.randn(1, K, generator=generator).to(dtype)
        tau = torch.quantile(x.float().abs().flatten(), 1.0 - fraction).reshape(1)
        pool.append((x, tau))
    return pool


def _time_pair(W, wt, pool, repeats: int):
    dense, sparse = [], []
    for it in range(_WARMUP + repeats):
        x, tau = pool[it % len(pool)]
        t0 = time.perf_counter()
        F.linear(x, W)
        t1 = time.perf_counter()
        sparse_gemv_t(x, wt, tau)
        t2 = time.perf_counter()
        if it >= _WARMUP:
            dense.append((t1 - t0) * 1e3)
            sparse.append((t2 - t1) * 1e3)
    return dense, sparse


def _realized_fraction(pool) -> float:
    return statistics.fmean((x.float().abs() >= tau).float().mean().item() for x, tau in pool)


def run_kernel_bench(
    shapes=DEFAULT_SHAPES,
    fractions=(0.5, 0.3),
    threads: int = 2,
    repeats: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[dict]:
    """Time dense ``F.linear`` vs ``sparse_gemv_t`` for each (K, N) and active fraction.

    ``repeats=None`` picks a count per shape (30 for 7B-class, 1000 for small).
    Sets torch's intra-op threads to ``threads`` for the run and restores them.
    Returns one dict per (shape, fraction) with medians, speedup
    (dense / sparse) and the raw per-call timings in milliseconds.
    """
    for fraction in fractions:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"`fractions` entries must be in (0, 1], got {fraction}")
    if threads < 1:
        raise ValueError(f"`threads` must be >= 1, got {threads}")
    generator = torch.Generator().manual_seed(seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for K, N in shapes:
            W = torch.randn(N, K, generator=generator).to(dtype)
            wt = W.t().contiguous()
            n_repeats = repeats or (_REPEATS_BIG if K * N >= _BIG_WEIGHT_ELEMENTS else _REPEATS_SMALL)
            for fraction in fractions:
                pool = _inputs(K, fraction, dtype, generator)
                dense, sparse = _time_pair(W, wt, pool, n_repeats)
                dense_med, sparse_med = statistics.median(dense), statistics.median(sparse)
                rows.append(
                    {
                        "K": K,
                        "N": N,
                        "active_fraction": fraction,
                        "realized_fraction": _realized_fraction(pool),
                        "dtype": str(dtype).removeprefix("torch."),
                        "threads": threads,
                        "dense_ms_median": dense_med,
                        "sparse_ms_median": sparse_med,
                        "speedup": dense_med / sparse_med,
                        "dense_ms": dense,
                        "sparse_ms": sparse,
                    }
                )
            del W, wt
    finally:
        torch.set_num_threads(previous_threads)
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of ``run_kernel_bench`` rows."""
    lines = [
        "| K | N | dtype | active | dense ms | sparse ms | speedup |",
        "|---:|---:|:---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['K']} | {r['N']} | {r['dtype']} | {r['active_fraction']:.0%} "
            f"| {r['dense_ms_median']:.3f} | {r['sparse_ms_median']:.3f} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    for bench_dtype in (torch.float32, torch.bfloat16):
        print(format_table(run_kernel_bench(dtype=bench_dtype)))
