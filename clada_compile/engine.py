"""The engine contract: what runtime.generate and evaluate drive, whatever runs the graphs.

Two engines implement it: compiled.CladaModel (torch.compile / eager on the FX graphs) and
exporters/ort.py's OrtCladaModel (ONNX Runtime on an export directory). `Engine` owns everything
they share: k from top_k_ratio, selection from Griffin scores, the dense twin, validation of
thresholds and active sets, the graphs' input/output conventions and the host-side state. An
engine implements only the three things that differ per backend:

    prefill(input_ids, attention_mask=None, taus=None, score_mask=None)
        -> (logits, presents, scores per layer)       full weights over a prompt
    decode(input_ids, attention_mask, past, with_active=False, taus=None, input_taus=None)
        -> (logits, presents[, kept per layer])       compacted weights on a KV cache
        (with_active=True: kept as one (n_layers,) float32 tensor; "per_layer": the graph's
        per-layer outputs as they come, for a caller that reduces many steps at once: _kept)
    _compact(layer, idx)                              make the sorted ids `idx` layer's active set
    _make_dense()                                     the engine with config.enabled=False

and calls `_init_engine(config, d_ff)` from its constructor. Attributes every engine has:
config, tokenizer, n_layers, d_ff, k, taus, input_taus, active, profile, context_length,
vocab_size, attention_layers, head_thresholded.

This module imports torch and config only: the ONNX Runtime engine must not pull in the FX stack.
"""

from __future__ import annotations

import torch

from .config import INPUT_GROUPS, CladaConfig


def backbone_ratio(config: CladaConfig) -> float:
    """The fraction of each MLP's neurons the backbone keeps: all of them when CLADA is off."""
    return config.top_k_ratio if config.enabled else 1.0


def backbone_sizes(d_ff, ratio: float, min_active_neurons: int) -> list[int]:
    """k per layer: max(min_active_neurons, round(ratio * d_ff)), never more than d_ff."""
    return [min(d, max(min_active_neurons, round(ratio * d))) for d in d_ff]


def context_length_of(text_config) -> int | None:
    """The model's context length from its HF (text) config; None when it states none."""
    return getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)


def position_ids_from_mask(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Positions of the last `length` tokens; left padding does not advance the position."""
    if length == 1:  # a decode step: the count of real tokens so far, two ops instead of four
        return (attention_mask.sum(-1, keepdim=True, dtype=torch.long) - 1).clamp_min_(0)
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0)[:, -length:].contiguous()  # compiled graphs see one layout whatever the mask length


def check_taus(taus, n_layers: int) -> torch.Tensor:
    """Validated (n_layers,) float32 thresholds."""
    taus = torch.as_tensor(taus, dtype=torch.float32).reshape(-1)
    if taus.numel() != n_layers:
        raise ValueError(f"`taus` must have one value per layer ({n_layers}), got {taus.numel()}")
    if not torch.isfinite(taus).all() or (taus < 0).any():
        raise ValueError(f"`taus` must be finite and >= 0, got {taus.tolist()}")
    return taus


def check_input_taus(taus, n_layers: int) -> torch.Tensor:
    """Validated (len(INPUT_GROUPS), n_layers) float32 input thresholds (rows: INPUT_GROUPS)."""
    taus = torch.as_tensor(taus, dtype=torch.float32)
    want = (len(INPUT_GROUPS), n_layers)
    if tuple(taus.shape) != want:
        raise ValueError(f"input thresholds must have shape {want} (rows {', '.join(INPUT_GROUPS)}; one column "
                         f"per layer), got {tuple(taus.shape)}")
    if not torch.isfinite(taus).all() or (taus < 0).any():
        raise ValueError(f"input thresholds must be finite and >= 0, got {taus.tolist()}")
    head = taus[INPUT_GROUPS.index("lm_head")]
    if (head != head[0]).any():  # one lm_head, one threshold: a per-layer row would be read as column 0 only
        raise ValueError(f"the 'lm_head' row of the input thresholds must hold one value in every column (the "
                         f"model has one lm_head), got {head.tolist()}")
    return taus


def check_indices(indices, layer: int, k: int, d_ff: int) -> torch.Tensor:
    """Validated, sorted active-set ids of one layer."""
    idx = torch.as_tensor(indices, dtype=torch.long).sort().values
    if idx.numel() != k or idx.unique().numel() != k or idx.min() < 0 or idx.max() >= d_ff:
        raise ValueError(f"layer {layer}: `indices` must be {k} distinct neuron ids in [0, {d_ff}), "
                         f"got {idx.numel()} ids")
    return idx


class Engine:
    """Base of every CLADA engine; see the module docstring for what a subclass implements."""

    #: decode() takes one threshold per layer AND token (taus (n_layers, B, S), input_taus
    #: (groups, n_layers, B, S)): what evaluate.score_parallel needs to score a whole
    #: teacher-forced continuation in one call
    per_token_thresholds: bool = False

    def _init_engine(self, config: CladaConfig, d_ff) -> None:
        """The shared host-side state; the caller sets n_layers first and fills the active sets after."""
        if not isinstance(config, CladaConfig):
            raise TypeError(f"`config` must be a CladaConfig, got {type(config).__name__}")
        self.config = config
        self.d_ff = [int(d) for d in d_ff]
        self.k = backbone_sizes(self.d_ff, backbone_ratio(config), config.min_active_neurons)
        self.taus = torch.zeros(self.n_layers, dtype=torch.float32)
        # thresholds of the projection inputs, one row per INPUT_GROUPS entry (0 = dense)
        self.input_taus = torch.zeros(len(INPUT_GROUPS), self.n_layers, dtype=torch.float32)
        self.active = [None] * self.n_layers
        self.profile = None
        self._dense = None

    # ---- what a backend implements ---------------------------------------------------------
    def prefill(self, input_ids, attention_mask=None, taus=None, score_mask=None):
        raise NotImplementedError(f"{type(self).__name__} must implement prefill()")

    def decode(self, input_ids, attention_mask, past, with_active=False, taus=None, input_taus=None):
        raise NotImplementedError(f"{type(self).__name__} must implement decode()")

    def _compact(self, layer: int, idx: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _compact()")

    def _make_dense(self) -> "Engine":
        raise NotImplementedError(f"{type(self).__name__} must implement _make_dense()")

    # ---- host-side state -------------------------------------------------------------------
    @torch.no_grad()
    def set_thresholds(self, taus) -> None:
        """Per-layer thresholds of h; in place, so a graph input bound to self.taus keeps its address."""
        self.taus.copy_(check_taus(taus, self.n_layers))

    @torch.no_grad()
    def set_input_thresholds(self, taus) -> None:
        """(len(INPUT_GROUPS), n_layers) thresholds of the MLP, attention and lm_head inputs."""
        taus = check_input_taus(taus, self.n_layers)
        applied = self._thresholded_groups()
        ignored = [g for i, g in enumerate(INPUT_GROUPS) if taus[i].any() and g not in applied]
        if ignored:  # never a silently ignored setting
            why = ("a dense engine: optimize() with a profile in the config thresholds inputs"
                   if getattr(self, "impl", None) == "dense" else
                   "no matched projection; for 'lm_head' on an ONNX export made before that group: re-export")
            raise ValueError(f"input thresholds > 0 for {ignored}, but this engine's decode graph does not threshold "
                             f"those inputs ({why}); set their rows to 0")
        self.input_taus.copy_(taus)

    def _thresholded_groups(self) -> set:
        """The INPUT_GROUPS this engine's decode graph applies thresholds to."""
        if getattr(self, "impl", None) == "dense":
            return set()
        groups = {"mlp_in"}
        if getattr(self, "attention_layers", None):
            groups |= {"attn_in", "attn_out"}
        if getattr(self, "head_thresholded", False):
            groups.add("lm_head")
        return groups

    @torch.no_grad()
    def set_active(self, layer: int, indices) -> None:
        """Make `indices` (k neuron ids of layer `layer`) the active set: compact weights in place."""
        if not 0 <= layer < self.n_layers:  # else self.k[layer]: a bare IndexError (or, negative, another layer)
            raise ValueError(f"`layer` must be a layer index in [0, {self.n_layers}), got {layer}")
        idx = check_indices(indices, layer, self.k[layer], self.d_ff[layer])
        self._compact(layer, idx)
        self.active[layer] = idx

    def select(self, scores) -> list[torch.Tensor]:
        """Top-k neurons per layer from Griffin scores (B, d_ff); a batch shares one active set
        chosen from the sum of its sequences' scores (the compacted weights are per graph)."""
        chosen = []
        for layer, s in enumerate(scores):
            s = torch.as_tensor(s).float().reshape(-1, self.d_ff[layer]).sum(0)
            self.set_active(layer, torch.topk(s, self.k[layer]).indices)
            chosen.append(self.active[layer])
        return chosen

    def dense(self) -> "Engine":
        """The dense model through the same graphs and backend (the baseline), built once."""
        if not self.config.enabled:
            return self
        if self._dense is None:
            self._dense = self._make_dense()
        return self._dense

    # ---- the graphs' conventions -----------------------------------------------------------
    def _prefill_feeds(self, input_ids, attention_mask, taus, score_mask) -> dict:
        """Prefill graph inputs by name: defaults for the mask (all tokens), the thresholds (the
        current ones) and the scored tokens (the unpadded ones)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "position_ids": position_ids_from_mask(attention_mask, input_ids.shape[1]).contiguous(),
                "clada.tau": self.taus if taus is None else taus,
                "clada.score_mask": attention_mask if score_mask is None else score_mask}

    def _check_past(self, past) -> None:
        if len(past) != 2 * self.n_layers:
            raise ValueError(f"`past` must hold {2 * self.n_layers} tensors (key and value per layer), "
                             f"got {len(past)}; pass the presents of the previous prefill/decode call")

    def _split_outputs(self, out):
        """Graph outputs (logits, present.* per layer, then one per layer) -> (logits, presents, rest)."""
        n = self.n_layers
        return out[0], list(out[1:1 + 2 * n]), list(out[1 + 2 * n:])

    @staticmethod
    def _check_with_active(with_active) -> None:
        """decode() checks its `with_active` before running the graph, not after."""
        if isinstance(with_active, str) and with_active != "per_layer":
            raise ValueError(f"`with_active` must be False, True or 'per_layer', got {with_active!r}")

    def _with_active(self, out, kept, with_active):
        """decode()'s return value for its (checked) `with_active` argument."""
        if with_active == "per_layer":
            return (*out, list(kept))
        return (*out, self._kept(kept)) if with_active else out

    @staticmethod
    def _kept(rest) -> torch.Tensor:
        """The decode graph's clada.active.L outputs -> (n_layers,) float32."""
        first = rest[0]
        if isinstance(first, torch.Tensor) and first.numel() == 1:
            try:  # one op (~10 us a step instead of ~110); stack itself checks that the shapes agree
                return torch.stack(rest).reshape(-1).float()
            except (TypeError, RuntimeError):
                pass
        return torch.stack([torch.as_tensor(t).reshape(()).float() for t in rest])

    # ---- calls -----------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None):
        """Logits through the prefill graph with the current thresholds."""
        return self.prefill(input_ids, attention_mask)[0]

    def __call__(self, *args, **kwargs):  # nn.Module engines use their own (it calls forward too)
        return self.forward(*args, **kwargs)

    def generate(self, input_ids, **kwargs):
        """runtime.generate on this engine (greedy by default; see its docstring)."""
        from .runtime import generate

        return generate(self, input_ids, **kwargs)
