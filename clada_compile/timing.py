"""Decode throughput of several engines, interleaved in one process (the only speed claim we make).

Each round generates once with every engine in turn (dense, a, b, ..., dense, a, b, ...), so slow
drifts of the machine (thermal, other processes) hit all of them alike; the warm-up round
(compilation, caches) is dropped; the figure is the median over rounds.
"""

from __future__ import annotations

from .metrics import interleaved


def time_engines(engines: dict, prompt_ids, new_tokens: int, repeats: int, warmup: int = 1) -> dict:
    """engines: name -> (engine, baseline). Returns name -> dict(median tok/s, raw, runs)."""
    runs = {name: [] for name in engines}

    def gen(name):
        engine, baseline = engines[name]

        def fn():
            o = engine.generate(prompt_ids, max_new_tokens=new_tokens, baseline=baseline)
            runs[name].append(dict(decode_tokens_per_s=o.decode_tokens_per_s, prefill_s=o.prefill_s,
                                   decode_s=o.decode_s, active_fraction=o.mean_active_fraction, reselections=o.events))
            return o.decode_tokens_per_s
        return fn

    timing = interleaved({name: gen(name) for name in engines}, repeats=repeats, warmup=warmup)
    out = {}
    for name, t in timing.items():
        kept = runs[name][warmup:]
        out[name] = dict(median=t["median"], raw=t["raw"], runs=kept,
                         active_fraction=sum(r["active_fraction"] for r in kept) / len(kept))
    return out
