"""Decode weights in 2 MiB pages: one anonymous mapping per group of tensors, madvise(MADV_HUGEPAGE).

A decode step streams every weight once, from ~100 tensors of 1-300 MB. In 4 KiB pages each
stream crosses a page boundary every 4 KiB: a TLB miss and a page walk, and the hardware
prefetchers stop at the boundary. On this project's CPU (Zen 4 VM, THP "madvise" mode, so
torch's own allocations get 4 KiB pages) a plain two-thread read of 1 GB went 29-41 -> 58 GB/s
in 2 MiB pages, and one step's GEMVs, the same tensors in both kinds of pages alternated in one
process (median of paired ratios): Qwen2.5-0.5B bf16 1.02x dense / 1.07x half the rows kept,
fp32 1.05x, int8 1.03x; SmolLM2 bf16 1.04x (docs/BENCHMARKS.md).

Where the OS has no transparent huge pages (not Linux, THP "never") the tensors are ordinary
ones: the same numbers, only the speed differs. Nothing here changes a result.
"""

from __future__ import annotations

import mmap
import sys

import torch

HUGE_PAGE = 1 << 21
_ALIGN = 4096  # each tensor starts on a page of its own: no two tensors share a cache line or a TLB entry
# Below one huge page of tensors in all (the tiny test models) there is nothing to gain, and the
# first touch would still fault in a whole 2 MiB page: ordinary tensors then.
MIN_BYTES = HUGE_PAGE


def available() -> bool:
    """True where anonymous private mappings can be advised into transparent huge pages."""
    return sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for size in shape:
        n *= int(size)
    return n


def empty(specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """Uninitialized tensors of the given (shape, dtype), all in one huge-page mapping.

    The mapping is unmapped when the last of the tensors (views of it) is freed: torch.frombuffer
    keeps a reference to the mmap object."""
    offsets, total = [], 0
    for shape, dtype in specs:
        offsets.append(total)
        total += -(-_nbytes(shape, dtype) // _ALIGN) * _ALIGN
    if not available() or total < MIN_BYTES:
        return [torch.empty(shape, dtype=dtype) for shape, dtype in specs]
    # private and anonymous: Python's default MAP_SHARED would be shmem, which follows
    # shmem_enabled (usually "never"), not the anonymous THP setting
    mm = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: the pages are faulted in at 2 MiB
    raw = torch.frombuffer(mm, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE  # the first tensor on a huge page boundary
    return [raw[start + off:start + off + _nbytes(shape, dtype)].view(dtype).view(shape)
            for (shape, dtype), off in zip(specs, offsets)]


def in_huge_pages(t: torch.Tensor) -> bool:
    """Whether t's memory is backed by transparent huge pages now (Linux: /proc/self/smaps), for
    tests and diagnostics. False where that cannot be read."""
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    addr = t.data_ptr()
    inside = False
    for line in lines:
        head = line.split()[0] if line else ""
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) > 0
    return False
