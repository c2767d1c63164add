"""Quality on real text: teacher-forced perplexity through the CLADA decode path, and greedy agreement.

For each window the first P tokens are the prompt (dense prefill, backbone selection as in
generation); the next C tokens are scored through the decode path generation uses (active set,
controller, thresholds, re-selection).

Two scorers, same numbers (tests/test_evaluate.py holds them to 1e-4 in NLL):
  sequential  generate(forced=...): one decode step per token, exactly as generation runs.
  parallel    the continuation goes through the SAME decode graph in one call, with one threshold
              per token. Under teacher forcing the tokens are known, so the only sequential
              dependency is the controller's: tau_t depends on the logits before t. Iterating
              "score all tokens -> replay the controller on their signals -> new taus" fixes one
              more position per round at worst; the controller's decisions are discrete (step
              scales, window ranks), so the iteration stops at the exact fixed point, typically in
              2-3 rounds. The dense prompt prefill is done once per window and shared by every
              configuration. ~10-30x faster on CPU; re-selection (a dense re-prefill mid-stream)
              has no parallel form, so configs with `reselect` are scored sequentially.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .controller import Controller, token_signals
from .metrics import bootstrap_ratio, first_divergence, perplexity, rouge_l


def windows(ids: torch.Tensor, n: int, prompt: int, cont: int):
    """n windows of prompt+cont tokens spread evenly over the token stream."""
    span = prompt + cont
    if ids.numel() < span:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {span}")
    n = min(n, ids.numel() // span)
    stride = (ids.numel() - span) // max(n - 1, 1) if n > 1 else 0
    return [(ids[i * stride:i * stride + prompt], ids[i * stride + prompt:i * stride + span]) for i in range(n)]


def score(engine, wins, baseline: bool = False, desc: str = "", scorer: str = "auto", cache=None):
    """Per window: token NLLs (nats), mean active fraction, re-selections.

    scorer: "sequential", "parallel" or "auto" (parallel where it is exact: an engine with
    per_token_thresholds, without re-selection). cache: a dict shared across calls on the same
    windows (prompt prefills)."""
    if scorer not in ("auto", "parallel", "sequential"):
        raise ValueError(f"`scorer` must be 'auto', 'parallel' or 'sequential', got {scorer!r}")
    can = parallel_ok(engine, baseline)
    if scorer == "parallel" and not can:
        raise ValueError("parallel scoring cannot replay re-selection (a dense re-prefill mid-stream) and needs an "
                         "engine whose decode takes per-token thresholds (the torch engine, CladaModel; not "
                         f"{type(engine).__name__}); use scorer='sequential'")
    if scorer != "sequential" and can:
        return score_parallel(engine, wins, baseline, desc, cache)
    out = []
    for p, c in tqdm(wins, desc=desc or "score", leave=False):
        o = engine.generate(p.view(1, -1), forced=c.view(1, -1), baseline=baseline)
        nll = [-r["logprob"][0] for r in o.records]
        out.append(dict(nll=nll, active=o.mean_active_fraction, events=o.events))
    return out


def parallel_ok(engine, baseline: bool = False) -> bool:
    """Parallel scoring is exact here: the engine's decode takes per-token thresholds
    (engine.Engine.per_token_thresholds) and no re-selection has to be replayed."""
    cfg = engine.config
    per_token = bool(getattr(engine, "per_token_thresholds", False))
    return per_token and (baseline or not (cfg.enabled and cfg.reselect))


@torch.no_grad()
def score_parallel(engine, wins, baseline: bool = False, desc: str = "", cache=None, max_rounds: int | None = None):
    """score() with each continuation in one decode call per controller round (module docstring)."""
    if baseline:
        engine = engine.dense()
    cfg = engine.config
    cache = {} if cache is None else cache
    n_layers = engine.n_layers
    ks = torch.tensor(engine.k, dtype=torch.float64)
    backbone = ks / torch.tensor(engine.d_ff, dtype=torch.float64)
    out = []
    for i, (p, c) in enumerate(tqdm(wins, desc=desc or "score", leave=False)):
        key = (i, p.numel(), int(p[0]), int(p[-1]))
        if key not in cache:  # the dense prompt pass does not depend on the configuration
            logits, past, scores = engine.prefill(p.view(1, -1), torch.ones(1, p.numel(), dtype=torch.long),
                                                  taus=torch.zeros(n_layers))
            cache[key] = (logits[0, -1], past, scores)
        first, past, scores = cache[key]
        if cfg.enabled:
            engine.select(scores)
        base = engine.taus.clone() if cfg.enabled else torch.zeros(n_layers)
        base_in = engine.input_taus.clone() if cfg.enabled else torch.zeros_like(engine.input_taus)
        n = c.numel()
        inp = c[:-1].view(1, -1)
        mask = torch.ones(1, p.numel() + n - 1, dtype=torch.long)
        taus = base[:, None].expand(n_layers, n - 1).clone()  # round 0: the static thresholds
        scales = torch.ones(n - 1)  # the controller's scale per token (input thresholds follow it)
        dists, presents, start, kept, full = first[None], None, 0, torch.zeros(n_layers), True
        for rounds in range(1, (max_rounds or n + 1) + 1):
            if start < n - 1:
                # positions before `start` kept their thresholds: their logits and KV entries stand
                pre = past if start == 0 else [t[:, :, :p.numel() + start] for t in presents]
                logits, presents, kept = engine.decode(inp[:, start:], mask, pre, with_active=True,
                                                       taus=taus[:, None, start:],
                                                       input_taus=_scaled(base_in, scales[start:]))
                full = start == 0
                dists = torch.cat([dists[:start + 1], logits[0]], 0)
            sur, ent, _nonfinite = token_signals(dists, c)
            ctl = Controller(cfg, base)
            decided = [ctl.observe(float(sur[j]), float(ent[j])) for j in range(n - 1)]
            new = torch.stack([d.taus for d in decided], 1) if decided else taus
            new_scales = torch.tensor([d.scale for d in decided]) if decided else scales
            changed = ((new != taus).any(0) | (new_scales != scales)).nonzero()
            if changed.numel() == 0:
                break
            start, taus, scales, full = int(changed[0]), new, new_scales, False
        else:
            raise RuntimeError(f"window {i}: the controller replay did not converge in {max_rounds} rounds")
        if not full:  # neurons kept, summed over the whole continuation, at the converged thresholds
            kept = engine.decode(inp, mask, past, with_active=True, taus=taus[:, None, :],
                                 input_taus=_scaled(base_in, scales))[2]
        nll = (-torch.log_softmax(dists.float(), -1).gather(-1, c.view(-1, 1)).squeeze(-1)).tolist()
        # as generation reports it: the first token comes from the dense prefill (fraction 1)
        stepped = float((backbone / ks * kept.double()).mean()) if n > 1 else 0.0
        out.append(dict(nll=nll, active=(1.0 + stepped) / n, events=0, rounds=rounds))
    return out


def _scaled(base_in: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(groups, layers) base input thresholds x one scale per token -> (groups, layers, 1, tokens)."""
    return base_in[:, :, None, None] * scales.view(1, 1, 1, -1)


def greedy_agreement(engine, wins, tokens: int):
    rows = []
    for p, _ in wins:
        d = engine.generate(p.view(1, -1), max_new_tokens=tokens, baseline=True).sequences[0, p.numel():].tolist()
        s = engine.generate(p.view(1, -1), max_new_tokens=tokens).sequences[0, p.numel():].tolist()
        rows.append(dict(first_divergence=first_divergence(d, s), rouge_l=rouge_l(d, s)))
    return rows


def evaluate(engine, wins, dense_scores=None, agreement_tokens: int = 0, name: str = "clada", scorer: str = "auto",
             cache=None):
    dense_scores = dense_scores or score(engine, wins, baseline=True, desc="dense", scorer=scorer, cache=cache)
    sparse = score(engine, wins, desc=name, scorer=scorer, cache=cache)
    d_nll = [w["nll"] for w in dense_scores]
    s_nll = [w["nll"] for w in sparse]
    inc, lo, hi = bootstrap_ratio(d_nll, s_nll)
    res = dict(
        method=name, windows=len(wins), scored_tokens=sum(map(len, s_nll)),
        dense_ppl=perplexity([x for w in d_nll for x in w]), ppl=perplexity([x for w in s_nll for x in w]),
        ppl_increase_pct=inc, ppl_increase_ci95=[lo, hi],
        active_fraction=sum(w["active"] for w in sparse) / len(sparse),
        reselections=sum(w["events"] for w in sparse),
        scorer="parallel" if scorer != "sequential" and parallel_ok(engine) else "sequential",
    )
    if agreement_tokens:
        agr = greedy_agreement(engine, wins, agreement_tokens)
        res["greedy_first_divergence_mean"] = sum(a["first_divergence"] for a in agr) / len(agr)
        res["greedy_rouge_l_mean"] = sum(a["rouge_l"] for a in agr) / len(agr)
    if not math.isfinite(res["ppl"]):
        raise FloatingPointError(f"{name}: perplexity is not finite")
    return res, dense_scores
