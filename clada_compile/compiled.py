"""optimize(model, config) -> CladaModel: the rewritten prefill/decode graphs, compiled, plus the
host-visible state the controller drives between calls (thresholds, active sets).

Thresholds and compacted weights are graph INPUTS held in tensors this module owns; setting them
copies into those tensors in place, so neither a new threshold nor a re-selection recompiles.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import fx, nn

from . import hugepages
from .config import INPUT_GROUPS, CladaConfig
from .direct import DirectCompiled
from .engine import Engine, context_length_of, position_ids_from_mask
from .graphs import CladaGraphs, build_graphs
from .passes import inline_sparse_mlp, materialize, run_passes


def _impl_for(config: CladaConfig) -> str:
    if not config.enabled or not config.uses_threshold:
        return "dense"
    return config.kernel


def cache_capacity(length: int, total: int, context_length: int | None) -> int:
    """Tokens a new KV buffer holds: more than this call's `total`, with room to grow (256 tokens
    or the cached length again, whichever is more) within the model's context when it states one.

    Always at least one row more than the tokens in it: the compiled decode graph assumes the
    mask is shorter than the buffer (a symbolic-shape guard, direct.py), and a buffer filled
    exactly would compile a second variant of the graph (over a minute with the C++ wrapper) for
    that one step."""
    capacity = max(2 * length, length + 256)
    if context_length:
        capacity = min(capacity, context_length + 1)
    return max(total + 1, capacity)


class CachePrefix(Sequence):
    """The presents of a decode step whose cache is written in place: per layer and kind, the first
    `length` rows of the engine's buffer, as a sequence of (B, H, length, D) views made when read.

    Making the 2 x n_layers views eagerly cost ~0.15 ms a step (SmolLM2: 60 slices), while the
    generation loop only hands the sequence back to the next decode, which recognizes it and
    writes on into the same buffers."""

    __slots__ = ("buffers", "length")

    def __init__(self, buffers, length: int):
        self.buffers = buffers
        self.length = length

    def __len__(self) -> int:
        return len(self.buffers)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [b[:, :, :self.length] for b in self.buffers[i]]
        return self.buffers[i][:, :, :self.length]


class CladaModel(nn.Module, Engine):
    """The torch engine (engine.Engine): the rewritten graphs under torch.compile (or eager)."""

    per_token_thresholds = True  # decode() takes (n_layers, B, S) thresholds: evaluate.score_parallel
    forward = Engine.forward  # nn.Module's placeholder forward comes first in the MRO

    def __init__(self, model, graphs: CladaGraphs, config: CladaConfig, tokenizer=None, impl: str | None = None):
        super().__init__()
        self.hf_model = model
        self.tokenizer = tokenizer
        self.graphs = graphs
        self.n_layers = graphs.n_layers
        self.impl = (impl or _impl_for(config)) if config.enabled else "dense"
        hf_cfg = model.config.get_text_config(decoder=True)
        self.context_length = context_length_of(hf_cfg)
        self.vocab_size = int(hf_cfg.vocab_size)
        pre = graphs.prefill
        self.full = []
        for site in pre.sites:
            w_in, b_in, w_up, b_up, w_down, _ = (materialize(pre.gm, a) for a in site.args)
            self.full.append(dict(w_in=w_in.detach(), b_in=None if b_in is None else b_in.detach(),
                                  w_up=None if w_up is None else w_up.detach(),
                                  b_up=None if b_up is None else b_up.detach(), w_down=w_down.detach()))
        self._init_engine(config, [f["w_in"].shape[0] for f in self.full])
        # every decode projection on the GEMV kernel (passes/gemv.py), unless the caller pinned an
        # impl (the ONNX exporter, reference tests) or asked for the reference kernel
        self.gemv = impl is None and config.kernel == "auto"
        # precision "int8": the weights are already int8 round trips (optimize() -> quantize.py);
        # the GEMV graph stores them as int8 + per-column scales, the kernel reads a quarter of the bytes
        self.quantized = self.gemv and config.precision == "int8"
        if self.quantized:
            self._quantize_full()
        self.decode_rewrites = {}
        decode = self._decode_graph(graphs.decode_for(self.impl, config.mlp_criterion))
        self.decode_graph = decode
        # the KV cache lives in buffers this engine owns, written in place (passes/kvcache.py)
        self.kv_in_place = self.decode_rewrites["kv_cache_in_place"] > 0
        self._kv = None  # the buffers, (B, H, capacity, D) per layer and kind
        self._presents = None  # the views the last decode handed out: the only `past` used in place
        # layers whose attention inputs the graph thresholds (all of them for the supported
        # architectures); none when impl is "dense"
        self.attention_layers = list(decode.attention_layers)
        self.head_thresholded = decode.head_thresholded  # the lm_head input thresholded (group "lm_head")
        # decode graph inputs after the KV cache: clada.tau, clada.tau_in, then clada.L.<key> in
        # graph order
        names = decode.input_names
        first = names.index("clada.tau_in")
        self.compact = [{} for _ in range(self.n_layers)]
        inputs = [name.split(".")[1:] for name in names[first + 1:]]  # (layer, key)
        # one huge-page mapping for all of them (hugepages.py): the step streams every one
        self._decode_weights = hugepages.empty([(self._compact_shape(int(layer), key), self._compact_dtype(key))
                                                for layer, key in inputs])
        for (layer, key), t in zip(inputs, self._decode_weights):
            self.compact[int(layer)][key] = t
        for layer in range(self.n_layers):
            self.set_active(layer, torch.arange(self.k[layer]))
        self.inlined = 0  # sparse_mlp ops inlined into the inductor decode graph
        self._prefill_fn = self._compile(pre.gm)
        self._decode_fn = self._compile(decode.gm, inline=True, decode=names[:first + 1])

    def _decode_graph(self, decode):
        """This engine's copy of the decode graph: every projection on the GEMV kernel (unless
        the caller pinned an impl or asked for the reference kernel) and the KV cache in place."""
        from .passes.attention import sdpa_to_decode_attention
        from .passes.gemv import linears_to_gemv, sparse_mlp_to_gemv
        from .passes.gqa import sdpa_without_repeat_kv
        from .passes.kvcache import kv_cache_in_place
        from .tracing import TracedGraph

        gm = fx.GraphModule(decode.gm, copy.deepcopy(decode.gm.graph))
        traced = TracedGraph(gm, "decode", list(decode.input_names), list(decode.output_names), decode.sites,
                             list(decode.attention_layers), decode.head_thresholded)
        rewrites = self.decode_rewrites
        if self.gemv:
            _, rewrites["sparse_mlp_to_gemv"] = sparse_mlp_to_gemv(traced, quantize=self.quantized)
            _, rewrites["linears_to_gemv"] = linears_to_gemv(gm, self.graphs.gemv_weights, quantize=self.quantized)
            _, rewrites["sdpa_without_repeat_kv"] = sdpa_without_repeat_kv(gm)
            _, rewrites["sdpa_to_decode_attention"] = sdpa_to_decode_attention(gm)
        _, rewrites["kv_cache_in_place"] = kv_cache_in_place(traced)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        return traced

    def _compact_shape(self, layer: int, key: str) -> tuple:
        f, k = self.full[layer], self.k[layer]
        d_model = f["w_in"].shape[1]
        return {"w_in": (k, d_model), "w_up": (k, d_model), "b_in": (k,), "b_up": (k,),
                "w_down_t": (k, f["w_down"].shape[0]), "w_in_t": (d_model, k), "w_g_t": (d_model, k),
                "w_gu_t": (d_model, 2 * k),
                "b_gu": (2 * k,), "s_in": (k,), "s_gu": (2 * k,), "s_down": (f["w_down"].shape[0],)}[key]

    def _compact_dtype(self, key: str) -> torch.dtype:
        if self.quantized and key in ("w_in_t", "w_gu_t", "w_down_t"):
            return torch.int8
        return torch.float32 if key.startswith("s_") else self.full[0]["w_in"].dtype

    def _quantize_full(self) -> None:
        """int8 copies of every MLP's weights, one scale per output channel (quantize.py): rows of
        w_in / w_up are neurons, w_down^T's columns are the model's channels. Compaction picks
        neurons from these, so the scales of a neuron never change with the active set."""
        from .quantize import quantize_columns, quantize_rows

        self.full_q = []
        for f in self.full:
            q = {"w_in": quantize_rows(f["w_in"]), "w_down_t": quantize_columns(f["w_down"].t())}
            if f["w_up"] is not None:
                q["w_up"] = quantize_rows(f["w_up"])
            self.full_q.append(q)

    def _compile(self, gm, inline: bool = False, decode: list[str] | None = None):
        """gm under the configured backend. decode: the names of the decode graph's inputs that
        change between steps (ids, mask, positions, cache, thresholds; the engine's weights follow):
        compiled without Dynamo's per-call guards (direct.py), the mask and cache lengths symbolic."""
        if self.config.backend == "eager":
            return gm
        if inline:  # on a copy: eager twins and the ONNX exporter share the graph with the op in it
            gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))
            self.inlined = run_passes(gm, (inline_sparse_mlp,))["inline_sparse_mlp"]
        if decode is not None:
            dynamic = {i: (1,) if name == "attention_mask" else (2,) for i, name in enumerate(decode)
                       if name == "attention_mask" or name.startswith("past_key_values.")}
            cpp_wrapper = None if self.config.wrapper is None else self.config.wrapper == "cpp"
            return DirectCompiled(gm, len(decode), dynamic, cpp_wrapper=cpp_wrapper)
        return torch.compile(gm, backend="inductor", fullgraph=True)

    # ---- Engine: weight compaction ---------------------------------------------------------
    def _compact(self, layer: int, idx: torch.Tensor) -> None:
        f, buf, k = self.full[layer], self.compact[layer], self.k[layer]
        q = self.full_q[layer] if self.quantized else None  # int8 weights + per-column scales
        if q is not None:
            buf["w_down_t"].copy_(torch.index_select(q["w_down_t"][0], 0, idx))
            buf["s_down"].copy_(q["w_down_t"][1])
        else:
            buf["w_down_t"].copy_(torch.index_select(f["w_down"], 1, idx).t())
        for key in ("w_in", "w_up", "b_in", "b_up"):  # neuron-major inputs (reference graphs, ONNX)
            if key in buf:
                torch.index_select(f[key], 0, idx, out=buf[key])
        if "w_g_t" in buf:  # mlp_criterion "gate": gate^T alone; up stays neuron-major (w_up above)
            buf["w_g_t"].copy_(torch.index_select(f["w_in"], 0, idx).t())
        gu = buf.get("w_gu_t", buf.get("w_in_t"))  # [gate^T | up^T]: one contiguous stream for both
        if gu is not None:
            scales = buf.get("s_gu", buf.get("s_in"))
            parts = [("w_in", slice(0, k))] + ([("w_up", slice(k, 2 * k))] if "w_gu_t" in buf else [])
            for key, cols in parts:
                gu[:, cols].copy_(torch.index_select(f[key] if q is None else q[key][0], 0, idx).t())
                if q is not None:
                    scales[cols].copy_(q[key][1][idx])
        if "b_gu" in buf:
            for part, key in ((buf["b_gu"][:k], "b_in"), (buf["b_gu"][k:], "b_up")):
                part.copy_(f[key][idx] if f[key] is not None else torch.zeros(()))

    def _make_dense(self) -> "CladaModel":
        return CladaModel(self.hf_model, self.graphs, self.config.replace(enabled=False), self.tokenizer)

    # ---- graph calls -----------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids, attention_mask=None, taus=None, score_mask=None):
        """Full-weight pass over a prompt -> (logits, presents, scores per layer).

        score_mask (B, S): tokens the Griffin scores cover (default: the unpadded tokens)."""
        feeds = self._prefill_feeds(input_ids, attention_mask, taus, score_mask)
        return self._split_outputs(self._prefill_fn(*(feeds[name] for name in self.graphs.prefill.input_names)))

    @torch.no_grad()
    def decode(self, input_ids, attention_mask, past, with_active=False, taus=None, input_taus=None):
        """Compacted-weight step(s) on top of a KV cache -> (logits, presents[, kept per layer]).

        kept: (n_layers,) neurons with |h| >= tau, summed over the step's tokens.
        taus: None (the current thresholds) or one threshold per layer AND token, (n_layers, B, S):
        teacher-forced scoring feeds a whole continuation in one call with the thresholds the
        controller chose for each of its tokens (evaluate.score_parallel). input_taus likewise:
        None or (len(INPUT_GROUPS), n_layers, B, S)."""
        self._check_past(past)
        self._check_with_active(with_active)
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
        total = attention_mask.shape[1]
        cached = past.length if isinstance(past, CachePrefix) else past[0].shape[2]  # no view made to read it
        if total != cached + input_ids.shape[1]:
            raise ValueError(f"`attention_mask` covers {total} tokens, but the cache holds {cached} and "
                             f"`input_ids` adds {input_ids.shape[1]}; pass the mask of the cache and the new tokens")
        feeds = self._cache_buffers(past, total) if self.kv_in_place else past
        out = self._decode_fn(input_ids, attention_mask, pos, *feeds, taus, input_taus, *self._decode_weights)
        if self.kv_in_place:
            logits, kept = out[0], list(out[1:])
            presents = self._presents = CachePrefix(feeds, total)
        else:
            logits, presents, kept = self._split_outputs(out)
        return self._with_active((logits, presents), kept, with_active)

    def _cache_buffers(self, past, total: int) -> list:
        """The buffers the decode graph writes the new KV rows into (passes/kvcache.py).

        In place only when `past` is what this engine's last decode returned (that CachePrefix itself:
        a prefix of it, or a cache from a prefill or another engine, is copied into new buffers,
        so a caller may branch from an older cache without it being overwritten)."""
        if past is self._presents and self._kv[0].shape[2] > total:  # never full: cache_capacity
            return self._kv
        capacity = cache_capacity(past[0].shape[2], total, self.context_length)
        bufs = []
        for t in past:
            buf = t.new_empty((t.shape[0], t.shape[1], capacity, t.shape[3]))
            buf[:, :, :t.shape[2]].copy_(t)
            bufs.append(buf)
        self._kv = bufs
        return bufs

    def with_config(self, config: CladaConfig) -> "CladaModel":
        """Another CladaModel on the same traced graphs (no re-tracing), e.g. another sparsity."""
        if config.precision != self.config.precision:
            raise ValueError(f"with_config cannot change `precision` ({self.config.precision!r} -> {config.precision!r}): "
                             "the traced graphs hold this precision's weights; call optimize() on a freshly loaded model")
        return _make(self.hf_model, self.graphs, config, self.tokenizer)

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
    if impl == "auto":
        from . import kernels

        kernels.load_cpu_extension()  # fail now, with the fix named, rather than mid-generation
    return _make(model, build_graphs(model, impl), config, tokenizer)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}


def _set_precision(model, precision: str) -> None:
    """Cast the model's floating-point weights to `precision` in place (a no-op when they already
    are): the decode GEMVs then stream weights of that width. "int8": float32 weights, each
    projection's replaced by its int8 round trip (quantize.round_trip_), stored int8 for decode."""
    dtype = _DTYPES[precision]
    if precision == "int8":
        from .quantize import round_trip_

        if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
            raise ValueError("`precision` 'int8' quantizes a float32 model; load it with dtype='fp32' "
                             "(clada CLIs do this for --precision int8)")
        round_trip_(model)
        return
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
