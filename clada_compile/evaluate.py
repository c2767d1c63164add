"""Quality on real text: teacher-forced perplexity through the CLADA decode path, and greedy agreement.

For each window the first P tokens are the prompt (dense prefill, backbone selection as in
generation); the next C tokens are fed one at a time through exactly the decode path generation
uses (active set, controller, thresholds, re-selection) and scored.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .metrics import bootstrap_ratio, first_divergence, perplexity, rouge_l


def windows(ids: torch.Tensor, n: int, prompt: int, cont: int):
    """n windows of prompt+cont tokens spread evenly over the token stream."""
    span = prompt + cont
    if ids.numel() < span:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {span}")
    n = min(n, ids.numel() // span)
    stride = (ids.numel() - span) // max(n - 1, 1) if n > 1 else 0
    return [(ids[i * stride:i * stride + prompt], ids[i * stride + prompt:i * stride + span]) for i in range(n)]


def score(engine, wins, baseline: bool = False, desc: str = ""):
    """Per window: token NLLs (nats), mean active fraction, re-selections."""
    out = []
    for p, c in tqdm(wins, desc=desc or "score", leave=False):
        o = engine.generate(p.view(1, -1), forced=c.view(1, -1), baseline=baseline)
        nll = [-r["logprob"][0] for r in o.records]
        out.append(dict(nll=nll, active=o.mean_active_fraction, events=o.events))
    return out


def greedy_agreement(engine, wins, tokens: int):
    rows = []
    for p, _ in wins:
        d = engine.generate(p.view(1, -1), max_new_tokens=tokens, baseline=True).sequences[0, p.numel():].tolist()
        s = engine.generate(p.view(1, -1), max_new_tokens=tokens).sequences[0, p.numel():].tolist()
        rows.append(dict(first_divergence=first_divergence(d, s), rouge_l=rouge_l(d, s)))
    return rows


def evaluate(engine, wins, dense_scores=None, agreement_tokens: int = 0, name: str = "clada"):
    dense_scores = dense_scores or score(engine, wins, baseline=True, desc="dense")
    sparse = score(engine, wins, desc=name)
    d_nll = [w["nll"] for w in dense_scores]
    s_nll = [w["nll"] for w in sparse]
    inc, lo, hi = bootstrap_ratio(d_nll, s_nll)
    res = dict(
        method=name, windows=len(wins), scored_tokens=sum(map(len, s_nll)),
        dense_ppl=perplexity([x for w in d_nll for x in w]), ppl=perplexity([x for w in s_nll for x in w]),
        ppl_increase_pct=inc, ppl_increase_ci95=[lo, hi],
        active_fraction=sum(w["active"] for w in sparse) / len(sparse),
        reselections=sum(w["events"] for w in sparse),
    )
    if agreement_tokens:
        agr = greedy_agreement(engine, wins, agreement_tokens)
        res["greedy_first_divergence_mean"] = sum(a["first_divergence"] for a in agr) / len(agr)
        res["greedy_rouge_l_mean"] = sum(a["rouge_l"] for a in agr) / len(agr)
    if not math.isfinite(res["ppl"]):
        raise FloatingPointError(f"{name}: perplexity is not finite")
    return res, dense_scores
