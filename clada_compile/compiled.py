"""optimize(model, config) -> CladaModel: the rewritten prefill/decode graphs, compiled, plus the
host-visible state the controller drives between calls (thresholds, active sets).

Thresholds and compacted weights are graph INPUTS held in tensors this module owns; setting them
copies into those tensors in place, so neither a new threshold nor a re-selection recompiles.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from .config import CladaConfig
from .graphs import CladaGraphs, build_graphs
from .ops import INPUT_GROUPS
from .passes import inline_sparse_mlp, materialize, run_passes


def _impl_for(config: CladaConfig) -> str:
    if not config.enabled or not config.uses_threshold:
        return "dense"
    return config.kernel


def position_ids_from_mask(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Positions of the last `length` tokens; left padding does not advance the position."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0)[:, -length:]


def check_taus(taus, n_layers: int) -> torch.Tensor:
    """Validated (n_layers,) float32 thresholds; shared by every engine's set_thresholds."""
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
    return taus


def check_indices(indices, layer: int, k: int, d_ff: int) -> torch.Tensor:
    """Validated, sorted active-set ids of one layer; shared by every engine's set_active."""
    idx = torch.as_tensor(indices, dtype=torch.long).sort().values
    if idx.numel() != k or idx.unique().numel() != k or idx.min() < 0 or idx.max() >= d_ff:
        raise ValueError(f"layer {layer}: `indices` must be {k} distinct neuron ids in [0, {d_ff}), "
                         f"got {idx.numel()} ids")
    return idx


class CladaModel(nn.Module):
    def __init__(self, model, graphs: CladaGraphs, config: CladaConfig, tokenizer=None, impl: str | None = None):
        super().__init__()
        self.hf_model = model
        self.tokenizer = tokenizer
        self.config = config
        self.graphs = graphs
        self.n_layers = graphs.n_layers
        self.impl = (impl or _impl_for(config)) if config.enabled else "dense"
        hf_cfg = model.config.get_text_config(decoder=True)
        self.context_length = getattr(hf_cfg, "max_position_embeddings", None) or getattr(hf_cfg, "n_positions", None)
        self.vocab_size = int(hf_cfg.vocab_size)
        self._dense = None
        pre = graphs.prefill
        self.full = []
        for site in pre.sites:
            w_in, b_in, w_up, b_up, w_down, _ = (materialize(pre.gm, a) for a in site.args)
            self.full.append(dict(w_in=w_in.detach(), b_in=None if b_in is None else b_in.detach(),
                                  w_up=None if w_up is None else w_up.detach(),
                                  b_up=None if b_up is None else b_up.detach(), w_down=w_down.detach()))
        self.d_ff = [f["w_in"].shape[0] for f in self.full]
        ratio = config.top_k_ratio if config.enabled else 1.0
        self.k = [min(d, max(config.min_active_neurons, round(ratio * d))) for d in self.d_ff]
        self.taus = torch.zeros(self.n_layers, dtype=torch.float32)
        # thresholds of the projection inputs, one row per ops.INPUT_GROUPS entry (0 = dense)
        self.input_taus = torch.zeros(len(INPUT_GROUPS), self.n_layers, dtype=torch.float32)
        # every decode projection on the GEMV kernel (passes/gemv.py), unless the caller pinned an
        # impl (the ONNX exporter, reference tests) or asked for the reference kernel
        self.gemv = impl is None and config.kernel in ("auto", "cpp")
        self.gemv_rewrites = {}
        decode = graphs.decode_for(self.impl)
        if self.gemv:
            decode = self._gemv_decode(decode)
        self.decode_graph = decode
        # layers whose attention inputs the graph thresholds (all of them for the supported
        # architectures); none when impl is "dense"
        self.attention_layers = list(decode.attention_layers)
        # decode graph inputs after the KV cache: clada.tau, clada.tau_in, then clada.L.<key> in
        # graph order
        names = decode.input_names
        first = names.index("clada.tau_in")
        self.compact = [{} for _ in range(self.n_layers)]
        self._decode_weights = []
        for name in names[first + 1:]:
            _, layer, key = name.split(".")
            buf = self.compact[int(layer)]
            buf[key] = torch.empty(self._compact_shape(int(layer), key), dtype=self.full[0]["w_in"].dtype)
            self._decode_weights.append(buf[key])
        self.active = [None] * self.n_layers
        for layer in range(self.n_layers):
            self.set_active(layer, torch.arange(self.k[layer]))
        self.inlined = 0  # sparse_mlp ops inlined into the inductor decode graph
        self._prefill_fn = self._compile(pre.gm)
        self._decode_fn = self._compile(decode.gm, inline=True)

    def _gemv_decode(self, decode):
        from .passes.gemv import linears_to_gemv, sparse_mlp_to_gemv
        from .passes.gqa import sdpa_without_repeat_kv
        from .tracing import TracedGraph

        gm = fx.GraphModule(decode.gm, copy.deepcopy(decode.gm.graph))
        traced = TracedGraph(gm, "decode", list(decode.input_names), list(decode.output_names), decode.sites,
                             list(decode.attention_layers))
        _, self.gemv_rewrites["sparse_mlp_to_gemv"] = sparse_mlp_to_gemv(traced)
        _, self.gemv_rewrites["linears_to_gemv"] = linears_to_gemv(gm, self.graphs.gemv_weights)
        _, self.gemv_rewrites["sdpa_without_repeat_kv"] = sdpa_without_repeat_kv(gm)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        return traced

    def _compact_shape(self, layer: int, key: str) -> tuple:
        f, k = self.full[layer], self.k[layer]
        d_model = f["w_in"].shape[1]
        return {"w_in": (k, d_model), "w_up": (k, d_model), "b_in": (k,), "b_up": (k,),
                "w_down_t": (k, f["w_down"].shape[0]), "w_in_t": (d_model, k), "w_gu_t": (d_model, 2 * k),
                "b_gu": (2 * k,)}[key]

    def _compile(self, gm, inline: bool = False):
        if self.config.backend == "eager":
            return gm
        if inline:  # on a copy: eager twins and the ONNX exporter share the graph with the op in it
            gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))
            self.inlined = run_passes(gm, (inline_sparse_mlp,))["inline_sparse_mlp"]
        return torch.compile(gm, backend="inductor", fullgraph=True)

    # ---- host-side state -------------------------------------------------------------------
    @torch.no_grad()
    def set_thresholds(self, taus) -> None:
        self.taus.copy_(check_taus(taus, self.n_layers))

    @torch.no_grad()
    def set_input_thresholds(self, taus) -> None:
        """(len(ops.INPUT_GROUPS), n_layers) thresholds of the MLP and attention inputs."""
        self.input_taus.copy_(check_input_taus(taus, self.n_layers))

    @torch.no_grad()
    def set_active(self, layer: int, indices: torch.Tensor) -> None:
        """Make `indices` (k neuron ids of layer `layer`) the active set: compact weights in place."""
        idx = check_indices(indices, layer, self.k[layer], self.d_ff[layer])
        f, buf = self.full[layer], self.compact[layer]
        k = self.k[layer]
        buf["w_down_t"].copy_(torch.index_select(f["w_down"], 1, idx).t())
        for key in ("w_in", "b_in", "w_up", "b_up"):
            if key in buf:
                torch.index_select(f[key], 0, idx, out=buf[key])
        if "w_in_t" in buf:
            buf["w_in_t"].copy_(torch.index_select(f["w_in"], 0, idx).t())
        if "w_gu_t" in buf:  # [gate^T | up^T]: one contiguous stream for both projections
            buf["w_gu_t"][:, :k].copy_(torch.index_select(f["w_in"], 0, idx).t())
            buf["w_gu_t"][:, k:].copy_(torch.index_select(f["w_up"], 0, idx).t())
        if "b_gu" in buf:
            for part, key in ((buf["b_gu"][:k], "b_in"), (buf["b_gu"][k:], "b_up")):
                part.copy_(f[key][idx] if f[key] is not None else torch.zeros(()))
        self.active[layer] = idx

    def select(self, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        """Top-k neurons per layer from Griffin scores (B, d_ff); a batch shares one active set
        chosen from the sum of its sequences' scores (the compacted weights are per graph)."""
        chosen = []
        for layer, s in enumerate(scores):
            s = s.float().reshape(-1, self.d_ff[layer]).sum(0)
            idx = torch.topk(s, self.k[layer]).indices
            self.set_active(layer, idx)
            chosen.append(self.active[layer])
        return chosen

    # ---- graph calls -----------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids, attention_mask=None, taus=None, score_mask=None):
        """Full-weight pass over a prompt -> (logits, presents, scores per layer).

        score_mask (B, S): tokens the Griffin scores cover (default: the unpadded tokens)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pos = position_ids_from_mask(attention_mask, input_ids.shape[1])
        taus = self.taus if taus is None else taus
        score_mask = attention_mask if score_mask is None else score_mask
        out = self._prefill_fn(input_ids, attention_mask, pos, taus, score_mask)
        n = self.n_layers
        return out[0], list(out[1:1 + 2 * n]), list(out[1 + 2 * n:])

    @torch.no_grad()
    def decode(self, input_ids, attention_mask, past, with_active=False, taus=None, input_taus=None):
        """Compacted-weight step(s) on top of a KV cache -> (logits, presents[, kept per layer]).

        kept: (n_layers,) neurons with |h| >= tau, summed over the step's tokens.
        taus: None (the current thresholds) or one threshold per layer AND token, (n_layers, B, S):
        teacher-forced scoring feeds a whole continuation in one call with the thresholds the
        controller chose for each of its tokens (evaluate.score_parallel). input_taus likewise:
        None or (len(INPUT_GROUPS), n_layers, B, S)."""
        pos = position_ids_from_mask(attention_mask, input_ids.shape[1])
        if taus is None:
            taus = self.taus
        else:
            want = (self.n_layers, *input_ids.shape)
            if tuple(taus.shape) != want:
                raise ValueError(f"per-token `taus` must have shape {want} (layers, batch, seq), got {tuple(taus.shape)}")
            taus = taus.float().unsqueeze(-1)  # (L, B, S, 1): broadcasts over the neurons
        if input_taus is None:
            input_taus = self.input_taus
        else:
            want = (len(INPUT_GROUPS), self.n_layers, *input_ids.shape)
            if tuple(input_taus.shape) != want:
                raise ValueError(f"per-token `input_taus` must have shape {want} (groups, layers, batch, seq), "
                                 f"got {tuple(input_taus.shape)}")
            input_taus = input_taus.float().unsqueeze(-1)
        # the cache grows every step: compile its length as symbolic from the first call instead of
        # specializing on it and recompiling at step two (batch and step width stay static)
        for t in past:
            torch._dynamo.maybe_mark_dynamic(t, 2)
        torch._dynamo.maybe_mark_dynamic(attention_mask, 1)
        out = self._decode_fn(input_ids, attention_mask, pos, *past, taus, input_taus, *self._decode_weights)
        n = self.n_layers
        presents = list(out[1:1 + 2 * n])
        if with_active:
            return out[0], presents, torch.stack(out[1 + 2 * n:])
        return out[0], presents

    def with_config(self, config: CladaConfig) -> "CladaModel":
        """Another CladaModel on the same traced graphs (no re-tracing), e.g. another sparsity."""
        return _make(self.hf_model, self.graphs, config, self.tokenizer)

    def dense(self) -> "CladaModel":
        """The dense model through the same graphs and backend (the baseline), built once."""
        if not self.config.enabled:
            return self
        if self._dense is None:
            self._dense = CladaModel(self.hf_model, self.graphs, self.config.replace(enabled=False), self.tokenizer)
        return self._dense

    def forward(self, input_ids, attention_mask=None):
        """Logits like the HF model's, through the prefill graph with the current thresholds."""
        return self.prefill(input_ids, attention_mask)[0]

    def generate(self, input_ids, **kwargs):
        from .runtime import generate

        return generate(self, input_ids, **kwargs)

    def rewrite_summary(self) -> str:
        lines = [f"architecture: {self.graphs.arch}, layers: {self.n_layers}"]
        lines += [f"  {name}: {count}" for name, count in self.graphs.rewrites.items()]
        s = self.graphs.prefill.sites
        kinds = sorted({f"{x.kind}/{x.act}" for x in s})
        lines.append(f"MLPs rewritten: {len(s)}/{self.n_layers} ({', '.join(kinds)}); d_ff={self.d_ff[0]}, "
                     f"k={self.k[0]}, decode impl={self.impl}, backend={self.config.backend}")
        return "\n".join(lines)


def optimize(model, config: CladaConfig | None = None, tokenizer=None) -> CladaModel:
    """Rewrite every MLP of `model` into a clada sparse block and compile it.

    model: a Hugging Face causal LM (see SUPPORTED_ARCHITECTURES). Raises ValueError for an
    unknown architecture and UnmatchedMLPError when an MLP does not match a supported pattern.
    """
    config = config or CladaConfig()
    if not isinstance(config, CladaConfig):
        raise TypeError(f"`config` must be a CladaConfig, got {type(config).__name__}")
    model.eval()
    _set_precision(model, config.precision)
    impl = _impl_for(config)
    if impl in ("auto", "cpp"):
        from . import kernels

        kernels.load_cpu_extension()  # fail now, with the fix named, rather than mid-generation
    return _make(model, build_graphs(model, impl), config, tokenizer)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _set_precision(model, precision: str) -> None:
    """Cast the model's floating-point weights to `precision` in place (a no-op when they already
    are): the decode GEMVs then stream weights of that width."""
    dtype = _DTYPES[precision]
    device = next(model.parameters()).device
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("`precision` 'fp16' needs a CUDA model: the CPU kernels run fp32 and bf16 weights; "
                         "use precision='bf16' (or 'fp32') on CPU")
    if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        model.to(dtype)


def _make(model, graphs, config, tokenizer):
    cm = CladaModel(model, graphs, config, tokenizer)
    if config.profile is not None:
        from .calibrate import apply_profile

        apply_profile(cm, config.profile)
    return cm
