"""The CLADA controller: cognitive-load signals -> per-layer thresholds, once per generated token.

Plain Python over tensors, no graph: it runs on the host between decode steps.

- surprisal_t = -log2 p(token_t), entropy_t = -sum p log2 p of the distribution token_t was drawn
  from, both divided by log2(vocab) so they lie in [0, 1].
- Every `update_window` tokens the surprisal / entropy thresholds become the configured
  percentiles of the window just finished. Before the first window closes there are no
  thresholds and no events.
- High load ("P600"): both signals above their thresholds. With `reselect`, the runtime re-scores
  the recent window densely and re-selects the backbone (at most once per window); counted in
  `events`.
- tau_l(t) = base_l * g(load_t) for every thresholded group (h and the projection inputs): schedule "static" -> g = 1; "clada" -> high_load_scale under
  high load (denser), low_load_scale when the signal(s) are below their thresholds, 1 otherwise;
  "continuous" -> a linear blend of the two scales at the signal's percentile rank in the window.
  `load_signal` picks which signal drives g: both (AND rule), entropy or surprisal.
- Non-finite logits (NaN / inf) do not crash the controller: the step is recorded as maximal
  load (surprisal = entropy = 1), flagged `nonfinite`, and thresholds stay finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .config import CladaConfig
from .kernels import token_signals_cpu


def token_signals(logits: torch.Tensor, tokens: torch.Tensor):
    """(B, V) logits of the distribution each token was drawn from, (B,) tokens ->
    (surprisal, entropy, nonfinite), each (B,), normalized by log2(V)."""
    return next_token_signals(logits, tokens)[1:]


def next_token_signals(logits: torch.Tensor, tokens: torch.Tensor | None = None):
    """token_signals, and the tokens: None picks the greedy ones (the first argmax) -> (tokens,
    surprisal, entropy, nonfinite). On CPU float32/bfloat16 logits with the C++ extension loaded,
    one kernel does it all in two passes over the vocabulary (kernels/logits.cpp: ~8x less than
    the torch composition below, which is the reference and the path everywhere else)."""
    got = token_signals_cpu(logits, tokens)
    if got is not None:
        return got
    if tokens is None:
        tokens = logits.argmax(-1)
    return (tokens, *reference_token_signals(logits, tokens))


def reference_token_signals(logits: torch.Tensor, tokens: torch.Tensor):
    """token_signals in torch ops."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64
    norm = math.log2(logits.shape[-1])
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    ent = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1) / math.log(2) / norm
    sur = -logp.gather(-1, tokens.view(-1, 1)).squeeze(-1) / math.log(2) / norm
    nonfinite = ~(torch.isfinite(ent) & torch.isfinite(sur))
    ent = torch.where(nonfinite, torch.ones_like(ent), ent.clamp(0, 1))
    sur = torch.where(nonfinite, torch.ones_like(sur), sur.clamp(0, 1))
    return sur, ent, nonfinite


@dataclass(frozen=True)
class Decision:
    base_taus: torch.Tensor  # (n_layers,) the controller's base thresholds (not copied: read only)
    load: str  # "high" | "low" | "mid" | "warmup"
    reselect: bool
    scale: float = 1.0  # the runtime scales the input thresholds alike

    @property
    def taus(self) -> torch.Tensor:
        """(n_layers,) thresholds for the next step, base_taus * scale: made when read (the
        generation loop reads them only when the scale changes, not every step)."""
        return self.base_taus * self.scale


@dataclass
class Controller:
    config: CladaConfig
    base_taus: torch.Tensor  # (n_layers,)
    surprisal: list = field(default_factory=list)
    entropy: list = field(default_factory=list)
    s_threshold: float | None = None
    e_threshold: float | None = None
    events: int = 0
    last_event: int = -(10**9)

    def observe(self, surprisal: float, entropy: float) -> Decision:
        """Record one token's (batch-mean) signals and decide the next step's thresholds."""
        cfg = self.config
        self.surprisal.append(float(surprisal))
        self.entropy.append(float(entropy))
        n = len(self.surprisal)
        if n % cfg.update_window == 0:
            w = cfg.update_window
            self.s_threshold = _percentile(self.surprisal[-w:], cfg.surprisal_threshold)
            self.e_threshold = _percentile(self.entropy[-w:], cfg.entropy_threshold)
        if self.s_threshold is None:
            return Decision(self.base_taus, "warmup", False, 1.0)
        above = {"surprisal": surprisal > self.s_threshold, "entropy": entropy > self.e_threshold}
        # the paper's AND rule defines high-load events (re-selection) whatever signal tau follows
        high = above["surprisal"] and above["entropy"]
        low = not above["surprisal"] and not above["entropy"]
        load = "high" if high else ("low" if low else "mid")
        sig_high, sig_low = high, low
        if cfg.load_signal != "both":
            sig_high, sig_low = above[cfg.load_signal], not above[cfg.load_signal]
        scale = 1.0
        if cfg.schedule == "clada":
            scale = cfg.high_load_scale if sig_high else (cfg.low_load_scale if sig_low else 1.0)
        elif cfg.schedule == "continuous":
            r = self._rank(surprisal, entropy)
            scale = cfg.low_load_scale + (cfg.high_load_scale - cfg.low_load_scale) * r
        # at most one re-selection per window: a burst of hard tokens is one reanalysis
        reselect = bool(high and cfg.reselect and n - self.last_event >= cfg.update_window)
        if reselect:
            self.events += 1
            self.last_event = n
        return Decision(self.base_taus, load, reselect, float(scale))


    def _rank_in(self, values, v):
        w = values[-self.config.update_window:]
        return sum(x <= v for x in w) / len(w)

    def _rank(self, surprisal, entropy):
        """Percentile rank (0..1) of the current signal(s) within the recent window."""
        ranks = {"surprisal": self._rank_in(self.surprisal, surprisal), "entropy": self._rank_in(self.entropy, entropy)}
        if self.config.load_signal == "both":
            return (ranks["surprisal"] + ranks["entropy"]) / 2
        return ranks[self.config.load_signal]


def _percentile(values, q: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))
