"""Micro-benchmark: the sparse GEMV op vs torch's dense ``F.linear``, batch 1.

Dense baseline is what a dense model does at decode time: ``F.linear(x, W)``
with ``W`` (N, K) contiguous. Sparse is the public op ``sparse_gemv_t`` on
``wt = W.T.contiguous()``, so the timing includes the op's dispatch and input
checks. The first sparse call builds/loads the C++ kernel (a warm-up call).

Method: same process; the dense and sparse calls alternate so both see the
same machine state (frequency, other load); warm-up calls are excluded;
medians are reported. Each shape gets several independent weight matrices,
enough to fill a working set larger than the last-level cache
(``working_set_mb``, default 4x the L3 size), and every timed iteration runs
each of them once, as a decode step runs its layers: a single matrix would sit
in the cache and overstate the bandwidth. Each iteration uses the next of a
pool of random ``x`` vectors, each with its own ``tau`` set to the
``1 - fraction`` quantile of its ``|x|``, so the active rows change from call
to call as they do between tokens. ``fraction`` 1.0 is the dense GEMV
(tau = 0): its GB/s column is the kernel's streaming bandwidth.

Run as ``python -m clada_compile.bench.kernels`` to print the table.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from ..kernels import sparse_gemv_t

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


def _llc_bytes() -> int:
    try:
        size = open("/sys/devices/system/cpu/cpu0/cache/index3/size").read().strip()
        return int(size.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
    except (OSError, ValueError):
        return 32 << 20


def _time_pair(mats, pool, repeats: int):
    """Per-matrix ms of F.linear and sparse_gemv_t, each iteration over every matrix once."""
    dense, sparse = [], []
    for it in range(_WARMUP + repeats):
        x, tau = pool[it % len(pool)]
        t0 = time.perf_counter()
        for W, _ in mats:
            F.linear(x, W)
        t1 = time.perf_counter()
        for _, wt in mats:
            sparse_gemv_t(x, wt, tau)
        t2 = time.perf_counter()
        if it >= _WARMUP:
            dense.append((t1 - t0) * 1e3 / len(mats))
            sparse.append((t2 - t1) * 1e3 / len(mats))
    return dense, sparse


def _realized_fraction(pool) -> float:
    return statistics.fmean((x.float().abs() >= tau).float().mean().item() for x, tau in pool)


def run_kernel_bench(
    shapes=DEFAULT_SHAPES,
    fractions=(1.0, 0.5, 0.3),
    threads: int = 2,
    repeats: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    working_set_mb: float | None = None,
) -> list[dict]:
    """Time dense ``F.linear`` vs ``sparse_gemv_t`` for each (K, N) and active fraction.

    ``repeats=None`` picks a count per shape (30 for 7B-class, 1000 for small).
    ``working_set_mb``: bytes of weights cycled per shape (default 4x the L3).
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
        working_set = (working_set_mb * 2**20) if working_set_mb is not None else 4 * _llc_bytes()
        for K, N in shapes:
            nbytes = K * N * torch.finfo(dtype).bits // 8
            n_mats = max(1, -(-int(working_set) // nbytes))
            mats = []
            for _ in range(n_mats):
                W = torch.randn(N, K, generator=generator).to(dtype)
                mats.append((W, W.t().contiguous()))
            n_repeats = repeats or (_REPEATS_BIG if K * N >= _BIG_WEIGHT_ELEMENTS else _REPEATS_SMALL // n_mats + 3)
            for fraction in fractions:
                pool = _inputs(K, fraction, dtype, generator)
                dense, sparse = _time_pair(mats, pool, n_repeats)
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
                        "matrices": n_mats,
                        "dense_gb_s": nbytes / dense_med / 1e6,
                        "sparse_gb_s": nbytes * _realized_fraction(pool) / sparse_med / 1e6,
                        "dense_ms": dense,
                        "sparse_ms": sparse,
                    }
                )
            del mats
    finally:
        torch.set_num_threads(previous_threads)
    all_rows = {(r["K"], r["N"]): r["sparse_ms_median"] for r in rows if r["active_fraction"] == 1.0}
    for r in rows:  # time relative to the same kernel reading every row, when fraction 1.0 was run
        full = all_rows.get((r["K"], r["N"]))
        r["vs_all_rows"] = r["sparse_ms_median"] / full if full else None
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of ``run_kernel_bench`` rows."""
    lines = [
        "| K | N | dtype | active | matrices cycled | F.linear ms (GB/s) | sparse_gemv_t ms (GB/s of kept rows) | speedup "
        "| time vs all rows |",
        "|---:|---:|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        full = "-" if r.get("vs_all_rows") is None else f"{r['vs_all_rows']:.2f}"
        lines.append(
            f"| {r['K']} | {r['N']} | {r['dtype']} | {r['active_fraction']:.0%} | {r['matrices']} "
            f"| {r['dense_ms_median']:.3f} ({r['dense_gb_s']:.1f}) | {r['sparse_ms_median']:.3f} ({r['sparse_gb_s']:.1f}) "
            f"| {r['speedup']:.2f}x | {full} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    for bench_dtype in (torch.float32, torch.bfloat16):
        print(format_table(run_kernel_bench(dtype=bench_dtype)))
