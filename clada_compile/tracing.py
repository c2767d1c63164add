"""Trace a Hugging Face causal LM into two flat FX graphs: prefill and decode.

torch.export (non-strict) of a small wrapper whose forward takes the KV cache as explicit tensors
and returns the new cache, so both torch.compile and ONNX see the cache as plain inputs/outputs.
The graphs get a plain (non-pytree) calling convention: forward(*inputs) -> tuple(outputs), with
the Optimum names of every input and output kept next to the graph. Passes may then add
inputs (thresholds, compacted weights) and outputs (neuron scores) freely.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.export import Dim


@dataclass
class TracedGraph:
    gm: torch.fx.GraphModule
    phase: str  # "prefill" | "decode"
    input_names: list[str]
    output_names: list[str]
    sites: list = field(default_factory=list)  # MlpSite per rewritten MLP, layer order
    # decode: layers whose attention inputs carry thresholds (passes.projections)
    attention_layers: list = field(default_factory=list)
    # decode: whether the lm_head's input carries the "lm_head" threshold (passes.projections)
    head_thresholded: bool = False


def num_layers(model) -> int:
    cfg = model.config.get_text_config(decoder=True)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise ValueError(f"cannot find the layer count in {type(cfg).__name__}")


def kv_names(n_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]


class _StepModule(nn.Module):
    """forward(input_ids, attention_mask, position_ids, past) -> (logits, presents) with flat caches."""

    def __init__(self, model, with_past: bool):
        super().__init__()
        self.model = model
        self.with_past = with_past

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        # full-length cache layers for every layer, also the sliding-window ones (Gemma-3, Mistral):
        # a sliding layer crops its cache depending on the sequence length, which export would
        # freeze into a guard (seq <= window - 2); the sliding window stays in the attention mask
        if self.with_past:
            cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])))
        else:
            cache = DynamicCache()
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return out.logits, presents


def _kv_shape(model, batch: int, length: int):
    """Shape of one cached key/value tensor, read off a real forward so every architecture agrees."""
    ids = torch.zeros((batch, 1), dtype=torch.long)
    with torch.no_grad():
        out = _StepModule(model, with_past=False)(ids, torch.ones_like(ids), torch.zeros_like(ids), [])
    k = out[1][0]
    return (batch, k.shape[1], length, k.shape[3]), k.dtype


def _export(model, with_past, args, dyn):
    # under no_grad the model's own no_grad regions (rotary embeddings) leave no grad-mode
    # higher-order ops in the graph, which Dynamo could not re-trace
    with torch.no_grad():
        return torch.export.export(_StepModule(model, with_past), args, dynamic_shapes=dyn, strict=False)


def trace(model, phase: str) -> TracedGraph:
    if phase not in ("prefill", "decode"):
        raise ValueError(f"`phase` must be 'prefill' or 'decode', got {phase!r}")
    n = num_layers(model)
    with_past = phase == "decode"
    batch, seq, past_len = 2, 3, 5
    ids = torch.randint(0, 10, (batch, seq))
    total = seq + (past_len if with_past else 0)
    mask = torch.ones((batch, total), dtype=torch.long)
    pos = torch.arange(total - seq, total).expand(batch, seq).contiguous()
    past = []
    if with_past:
        shape, dtype = _kv_shape(model, batch, past_len)
        past = [torch.randn(shape, dtype=dtype) for _ in range(2 * n)]
    b, s, p, t = Dim("batch"), Dim("seq"), Dim("past"), Dim("total")
    dyn = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: t if with_past else s},
        "position_ids": {0: b, 1: s},
        "past": [{0: b, 2: p} for _ in past],
    }
    try:
        ep = _export(model, with_past, (ids, mask, pos, past), dyn)
    except Exception:
        # some models relate the dims in ways the named Dims cannot state; let export infer them
        dyn = {k: ({i: Dim.AUTO for i in v} if isinstance(v, dict) else [{i: Dim.AUTO for i in d} for d in v])
               for k, v in dyn.items()}
        ep = _export(model, with_past, (ids, mask, pos, past), dyn)
    gm = ep.module()
    # ep.module() checks calls against the pytree spec of the trace; the passes change the
    # signature, and the flat calling convention below replaces that spec
    gm._forward_pre_hooks.clear()
    # export's input guards restate the trace's 0/1 specialization: every symbolic dim >= 2, so the
    # decode mask (past + seq) >= 4 and a one- or two-token prompt would fail them. The graph itself
    # is size-generic (tests compare prompts of 1, 2, 3 tokens with HF), so the guards go.
    for nd in [nd for nd in gm.graph.nodes if nd.op == "call_module" and nd.target == "_guards_fn"]:
        gm.graph.erase_node(nd)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.graph.set_codegen(torch.fx.graph.CodeGen())
    gm.recompile()
    inputs = ["input_ids", "attention_mask", "position_ids"] + (kv_names(n, "past_key_values") if with_past else [])
    outputs = ["logits"] + kv_names(n, "present")
    placeholders = [nd for nd in gm.graph.nodes if nd.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise RuntimeError(f"traced graph has {len(placeholders)} inputs, expected {len(inputs)}")
    return TracedGraph(gm, phase, inputs, outputs)
