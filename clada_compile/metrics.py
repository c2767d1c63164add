"""Metric code for clada-eval / clada-bench: perplexity, bootstrap, ROUGE-L, interleaved timing."""

from __future__ import annotations

import math
import random
import statistics
import time


def perplexity(nlls: list[float]) -> float:
    """exp(mean negative log-likelihood in nats)."""
    if not nlls:
        raise ValueError("perplexity of zero tokens")
    return math.exp(sum(nlls) / len(nlls))


def bootstrap_ratio(dense_windows, clada_windows, reps: int = 1000, seed: int = 0):
    """Relative perplexity increase (%) and its 95% interval, resampling windows (paired).

    Each argument: list (per window) of lists of token NLLs."""
    rng = random.Random(seed)
    n = len(dense_windows)

    def inc(idx):
        d = [x for i in idx for x in dense_windows[i]]
        c = [x for i in idx for x in clada_windows[i]]
        return 100.0 * (perplexity(c) / perplexity(d) - 1.0)

    point = inc(range(n))
    samples = sorted(inc([rng.randrange(n) for _ in range(n)]) for _ in range(reps))
    return point, samples[int(0.025 * reps)], samples[int(0.975 * reps) - 1]


def rouge_l(a: list, b: list) -> float:
    """ROUGE-L F1 between two token sequences (longest common subsequence)."""
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(b), lcs / len(a)
    return 2 * p * r / (p + r)


def first_divergence(a: list, b: list) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def interleaved(fns: dict, repeats: int, warmup: int = 1):
    """Run each fn in turn (a, b, a, b, ...) `repeats` times after `warmup` rounds.

    fn() returns a measurement (e.g. tokens/s) or None to use its wall time.
    Returns {name: {"median": .., "raw": [...]}}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    raw = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            val = fn()
            raw[name].append(time.perf_counter() - t if val is None else val)
    return {name: {"median": statistics.median(v), "raw": v} for name, v in raw.items()}
