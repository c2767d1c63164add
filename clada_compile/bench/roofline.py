"""The machine's read bandwidth at the moment: the roofline a decode step's GB/s is measured against.

A decode step at batch 1 streams every weight once, so its speed is bounded by how fast the cores
can read memory. On a shared VM that bound moves: on this project's 2-core EPYC VM a plain
two-thread read measured 29-58 GB/s on different days (docs/BENCHMARKS.md), and every engine's
tokens/s moves with it. clada-bench --compare therefore measures the read bandwidth after every
round and reports each engine's GB/s as a fraction of it: how far an engine is from the bound,
whatever the machine's phase.

The probe: the float32 sum of a buffer far larger than any last-level cache (512 MiB), in 2 MiB
pages where the OS allows (hugepages.py; decode weights live there too), at torch's current
thread count; the median of `repeats` timed passes after one untimed pass. A sum is a read at
one add per 4 bytes: on this CPU it streams as fast as a hand-written AVX-512 read loop
(33.1 vs 34.1 GB/s, same minutes).
"""

from __future__ import annotations

import statistics
import time

import torch

from .. import hugepages

PROBE_BYTES = 512 << 20


def read_bandwidth(nbytes: int = PROBE_BYTES, repeats: int = 5) -> float:
    """GB/s (1e9 bytes/s) of reading `nbytes` once, median of `repeats` passes."""
    if not isinstance(nbytes, int) or nbytes < 4:
        raise ValueError(f"`nbytes` must be an integer >= 4, got {nbytes!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"`repeats` must be an integer >= 1, got {repeats!r}")
    buf = hugepages.empty([((nbytes // 4,), torch.float32)])[0]
    buf.fill_(1.0)  # every page mapped before the clock runs
    buf.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    return buf.numel() * 4 / statistics.median(times) / 1e9
