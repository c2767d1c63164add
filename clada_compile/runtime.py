"""prefill -> select -> decode: the CLADA generation loop, shared by every engine.

`engine` is any engine.Engine: compiled.CladaModel (torch / inductor) or
exporters.ort.OrtCladaModel (ONNX Runtime). engine.py states the contract this loop relies on.

Batches: the compacted weights belong to the graph, so a batch shares ONE active set, chosen from
the sum of its sequences' Griffin scores, and one threshold per layer; the controller sees the
batch mean of surprisal and entropy over the sequences still generating. Batch size 1 is the
case CLADA is designed for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .controller import Controller, next_token_signals


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (B, prompt + generated)
    records: list = field(default_factory=list)  # one dict per generated token
    prefill_s: float = 0.0
    decode_s: float = 0.0  # wall time of the decode steps (controller included, prefill excluded)
    new_tokens: int = 0
    events: int = 0  # re-selections

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.new_tokens - 1, 0)  # the first new token comes from the prefill logits
        # one new token (EOS at once, max_new_tokens=1) ran no decode step: no speed to report
        return steps / self.decode_s if steps and self.decode_s > 0 else float("nan")

    @property
    def mean_active_fraction(self) -> float:
        vals = [r["active_fraction"] for r in self.records if r["active_fraction"] is not None]
        return sum(vals) / len(vals) if vals else float("nan")


def _check_inputs(engine, input_ids, max_new_tokens, do_sample, temperature, top_p):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must be a 2-D (batch, seq) tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError("the prompt is empty: `input_ids` has no tokens; pass at least one token")
    _check_token_ids(engine, input_ids, "input_ids")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be an integer >= 1, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"`temperature` must be > 0 when sampling, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p!r}")
    limit = getattr(engine, "context_length", None)
    total = input_ids.shape[1] + max_new_tokens
    if limit and total > limit:
        raise ValueError(
            f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
            f"model's context of {limit} tokens; shorten the prompt or lower max_new_tokens"
        )


def _check_token_ids(engine, ids, name):
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"`{name}` must hold integer token ids (torch.long), got dtype {ids.dtype}; "
                         f"convert with .long() or use the tokenizer's output")
    vocab = getattr(engine, "vocab_size", None)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab and hi >= vocab):
        bad = lo if lo < 0 else hi
        raise ValueError(f"`{name}` holds token id {bad}, outside the model's vocabulary [0, {vocab}); "
                         f"was it tokenized with another model's tokenizer?")


def _sample_token(logits, temperature, top_p, generator):
    """(B, V) -> (B,) sampled token ids, and the (B, V) logits of the distribution they were drawn from."""
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.nan_to_num(logits.softmax(-1), nan=0.0)
    bad = probs.sum(-1) <= 0
    if bad.any():  # all-NaN logits: fall back to greedy on what is finite rather than crash
        probs[bad] = torch.nn.functional.one_hot(torch.nan_to_num(logits[bad], nan=-1e9).argmax(-1), probs.shape[-1]).float()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1), logits


def _fill_active_fractions(engine, records, pending, active_weights) -> None:
    """records[i]["active_fraction"] for every (i, kept) of `pending`: kept is a step's per-layer
    counts (decode's with_active="per_layer") or an (n_layers,) tensor (after a re-selection)."""
    if not pending:
        return
    rows = torch.stack([k if isinstance(k, torch.Tensor) else engine._kept(k) for _, k in pending])
    for (i, _), frac in zip(pending, (rows @ active_weights).tolist()):
        records[i]["active_fraction"] = frac  # mean over layers of kept / k * backbone


def generate(engine, input_ids, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, eos_token_id=None, attention_mask=None, baseline: bool = False,
             seed: int | None = None, progress: bool = False, base_taus=None, forced=None) -> GenerationOutput:
    """Generate like Hugging Face's generate (greedy by default, KV cache throughout).

    baseline=True runs the dense model through the same graphs and backend (engine.dense()).
    base_taus: per-layer base thresholds (default: the engine's current thresholds, e.g. from a
    calibration profile); the controller scales them every step.
    forced: (B, N) tokens to feed instead of choosing (teacher forcing, for perplexity); each
    record then carries the token's natural-log probability `logprob`.
    """
    if forced is not None:
        _check_token_ids(engine, forced, "forced")
        max_new_tokens = forced.shape[1]
    _check_inputs(engine, input_ids, max_new_tokens, do_sample, temperature, top_p)
    if baseline:
        engine = engine.dense()
    cfg = engine.config
    enabled = cfg.enabled
    generator = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    pad = next(iter(eos)) if eos else None  # what a finished row emits
    entry = engine.taus.clone()
    base = entry.clone() if base_taus is None else torch.as_tensor(base_taus, dtype=torch.float32)
    entry_in = engine.input_taus.clone()  # projection-input thresholds, scaled like `base`
    scale_set = None  # the controller's scale the engine's thresholds are set at (None: not yet)
    tau_mean = 0.0
    if not enabled:
        base = torch.zeros_like(base)
    ctl = Controller(cfg, base)
    n_layers = engine.n_layers
    zero = torch.zeros(n_layers)

    t0 = time.perf_counter()
    logits, past, scores = engine.prefill(input_ids, attention_mask, taus=zero)
    prompt_sq = None
    if enabled:
        engine.select(scores)
        prompt_sq = [s.float().pow(2) for s in scores]
    prefill_s = time.perf_counter() - t0

    out = GenerationOutput(sequences=input_ids)
    seqs, mask = input_ids, attention_mask
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    ks = torch.tensor(engine.k, dtype=torch.float32)
    backbone = ks / torch.tensor(engine.d_ff, dtype=torch.float32)
    dense_kept = ks * input_ids.shape[0] / backbone  # what a dense step reports: fraction 1
    active_weights = backbone / (ks * input_ids.shape[0] * n_layers)  # kept -> mean active fraction
    t_dec = time.perf_counter()
    bar = tqdm(total=max_new_tokens, desc="generate", disable=not progress, leave=False)
    kept = None
    pending = []  # (record index, that step's per-layer kept counts)
    for step in range(max_new_tokens):
        last = logits[:, -1]
        if forced is not None:
            tok, dist = forced[:, step], last
        elif do_sample:
            tok, dist = _sample_token(last, temperature, top_p, generator)
        else:  # greedy: the argmax comes with the signals, one pass over the vocabulary
            tok, dist = None, last
        tok, sur, ent, nonfinite = next_token_signals(dist, tok)
        if eos:  # finished rows emit padding; their signals are not counted (`live`)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            live = ~done
            s_mean = float(sur[live].mean()) if live.any() else 0.0
            e_mean = float(ent[live].mean()) if live.any() else 0.0
        elif sur.numel() == 1:  # batch 1: the value itself, no mean op
            s_mean, e_mean = float(sur), float(ent)
        else:  # without an EOS every row is live
            s_mean, e_mean = float(sur.mean()), float(ent.mean())
        seqs = torch.cat([seqs, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(tok[:, None])], 1)
        if eos:
            done |= torch.tensor([int(t) in eos for t in tok])
        decision = ctl.observe(s_mean, e_mean)
        # a dense step (or the dense prefill) reads every weight; otherwise the neurons kept by the
        # step that produced this token's logits, reduced after the loop (_fill_active_fractions)
        active = 1.0 if not enabled or step == 0 else None
        if active is None:
            pending.append((len(out.records), kept))
        out.records.append(dict(
            step=step, token=tok.tolist(), surprisal=s_mean, entropy=e_mean, nonfinite=bool(nonfinite.any()),
            s_threshold=ctl.s_threshold, e_threshold=ctl.e_threshold, load=decision.load,
            tau_mean=tau_mean if step else 0.0, active_fraction=active,
            reselect=decision.reselect,
        ))
        if forced is not None:
            out.records[-1]["logprob"] = torch.log_softmax(dist.float(), -1).gather(-1, tok[:, None]).squeeze(-1).tolist()
        bar.update(1)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if enabled:
            # the controller's thresholds are base * scale, for h and the inputs alike: the engine's
            # change only when the scale does (set_thresholds validates: ~30 us a call)
            if decision.scale != scale_set:
                engine.set_thresholds(decision.taus)
                engine.set_input_thresholds(entry_in * decision.scale)
                scale_set = decision.scale
                tau_mean = float(engine.taus.mean())
            if decision.reselect:
                # P600 reanalysis: a dense pass over everything so far scores the recent window in
                # context; merged with the prompt's scores it re-selects the backbone, and its
                # dense KV cache replaces the sparse one
                window = torch.zeros_like(mask)
                window[:, input_ids.shape[1]:][:, -cfg.update_window:] = 1
                logits, past, wscores = engine.prefill(seqs, mask, taus=zero, score_mask=window * mask)
                engine.select([(p + w.float().pow(2)).sqrt() for p, w in zip(prompt_sq, wscores)])
                kept = dense_kept
                continue
        if enabled:
            # the per-layer counts as the graph gives them: stacking them here cost ~0.14 ms a
            # step (SmolLM2), once per generation after the loop a few us a step
            logits, past, kept = engine.decode(tok[:, None], mask, past, with_active="per_layer")
        else:  # dense: the kept counts are all of them; not gathering them saves ~0.1 ms a step
            logits, past = engine.decode(tok[:, None], mask, past)
    bar.close()
    _fill_active_fractions(engine, out.records, pending, active_weights)
    out.decode_s = time.perf_counter() - t_dec
    engine.set_thresholds(entry)  # the controller's last scaling must not become the next call's base
    engine.set_input_thresholds(entry_in)
    out.prefill_s = prefill_s
    out.sequences = seqs
    out.new_tokens = seqs.shape[1] - input_ids.shape[1]
    out.events = ctl.events
    return out
