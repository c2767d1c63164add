"""Decode throughput of several engines, interleaved in one process (the only speed claim we make).

Each round generates once with every engine in turn (dense, a, b, ..., dense, a, b, ...), so slow
drifts of the machine (thermal, other processes) hit all of them alike; the warm-up round
(compilation, caches) is dropped; the figure is the median over rounds.
"""

from __future__ import annotations

import statistics
import time

from ..metrics import interleaved


def paired_ratio(a: list, b: list) -> float | None:
    """Median over rounds of a[i] / b[i]: both engines ran in round i, back to back, so the
    machine's drift between rounds (tens of percent on this VM) cancels in each ratio, where the
    ratio of the two medians may pair a fast round of one engine with a slow round of the other."""
    if not a or not b or len(a) != len(b):
        return None
    return statistics.median(x / y for x, y in zip(a, b))


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


def decode_profile(engine, prompt_ids, steps: int = 16, baseline: bool = False) -> dict:
    """Where one decode step's time goes (torch.profiler, eager graphs): ms per token in the MLP
    blocks (and their down projection), the lm_head, and everything else (attention, norms,
    embedding, host work). Static thresholds, greedy tokens, batch of prompt_ids."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if baseline:
        engine = engine.dense()
    ids = prompt_ids
    mask = torch.ones_like(ids)
    logits, past, scores = engine.prefill(ids, mask, taus=torch.zeros(engine.n_layers))
    if engine.config.enabled:
        engine.select(scores)
    tok = logits[:, -1].argmax(-1, keepdim=True)
    # warm-up, outside the profile: under inductor the first step compiles (the cache length
    # symbolic, direct.py), and the buffers' first pages are touched
    for _ in range(2):
        mask = torch.cat([mask, torch.ones_like(tok)], 1)
        logits, past = engine.decode(tok, mask, past)
        tok = logits[:, -1].argmax(-1, keepdim=True)
    from .. import kernels

    read0 = kernels.weight_bytes_read()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            logits, past = engine.decode(tok, mask, past)
            tok = logits[:, -1].argmax(-1, keepdim=True)
        wall = time.perf_counter() - t0
    read1 = kernels.weight_bytes_read()
    vocab = logits.shape[-1]
    if getattr(engine, "gemv", False):
        return _gemv_profile(prof, engine, vocab, wall, steps, (read1 - read0) if read0 is not None else 0)
    d_ff = set(engine.k)
    mlp = down = head = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        shapes = [tuple(s) for s in (e.input_shapes or []) if s]
        if e.key == "clada::sparse_mlp":
            mlp += e.cpu_time_total
        elif e.key == "clada::sparse_gemv_t" or (e.key == "aten::matmul" and len(shapes) == 2
                                                  and shapes[1][0] in d_ff and shapes[0][-1] in d_ff):
            down += e.cpu_time_total  # h @ w_down_t (k, d_model): the down projection
        elif e.key == "aten::linear" and any(s[0] == vocab for s in shapes if len(s) == 2):
            head += e.cpu_time_total
    per = 1e3 / steps
    total = wall * per
    return dict(ms_per_token=total, mlp_ms=mlp / 1e3 * per / 1e3, mlp_down_ms=down / 1e3 * per / 1e3,
                lm_head_ms=head / 1e3 * per / 1e3, other_ms=total - (mlp + head) / 1e3 * per / 1e3, steps=steps)


GEMV_OPS = ("clada::sparse_gemv_t", "clada::sparse_gemv_t_q8")
ATTENTION_OPS = ("clada::decode_attention", "aten::_scaled_dot_product_flash_attention_for_cpu")


def _gemv_profile(prof, engine, vocab, wall, steps, weight_bytes) -> dict:
    """Every projection runs a clada GEMV: its calls split by weight shape (d_model, k|2k)
    gate/up, (k, d_model) down, (d_model, vocab) lm_head, the rest attention projections; the
    attention itself (clada::decode_attention, or aten's SDPA where it runs) apart."""
    ks = set(engine.k)
    gu = down = head = attn = sdpa = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in ATTENTION_OPS:
            sdpa += e.cpu_time_total
        if e.key not in GEMV_OPS or not e.input_shapes or len(e.input_shapes[1]) != 2:
            continue
        rows, cols = e.input_shapes[1]
        if cols == vocab:
            head += e.cpu_time_total
        elif rows in ks:
            down += e.cpu_time_total
        elif cols in ks or cols // 2 in ks:
            gu += e.cpu_time_total
        else:
            attn += e.cpu_time_total
    ms = 1e-3 / steps  # profiler us over all steps -> ms per token
    total = wall * 1e3 / steps
    gbps = weight_bytes / steps / (total * 1e-3) / 1e9 if weight_bytes else float("nan")
    return dict(ms_per_token=total, mlp_ms=(gu + down) * ms, mlp_down_ms=down * ms, mlp_gate_up_ms=gu * ms,
                attn_proj_ms=attn * ms, attention_ms=sdpa * ms, lm_head_ms=head * ms,
                other_ms=total - (gu + down + head + attn + sdpa) * ms, weight_gb_per_s=gbps, steps=steps)
