"""One traced graph -> one .onnx file: torch.onnx.export(dynamo=True) with the clada op table,
named dynamic axes, and the shape guard torch.export leaves behind removed.

Dynamic axes: batch, seq (new tokens), past (cached tokens), total (= past + seq, on the decode
attention_mask) and k<L> (active neurons of layer L, decode weight inputs): one export serves
every top_k_ratio.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from .translation import translation_table


def strip_guards(gm: torch.fx.GraphModule) -> None:
    """Drop the shape-guard call torch.export left in the graph: it pins the example sizes of the
    original trace, and ONNX has no guards (the graph is valid for every size)."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and "guards" in str(node.target) and not node.users:
            gm.graph.erase_node(node)
            changed = True
    if changed:
        gm.recompile()


def _dynamic_axes(name: str, phase: str, d_ff: list[int]) -> dict:
    if name in ("input_ids", "position_ids", "clada.score_mask"):
        return {0: "batch", 1: "seq"}
    if name == "attention_mask":
        return {0: "batch", 1: "total" if phase == "decode" else "seq"}
    if name.startswith("past_key_values."):
        return {0: "batch", 2: "past"}
    if name.startswith("clada.") and name.count(".") == 2:  # clada.L.w_in ...
        return {0: f"k{name.split('.')[1]}"}
    return {}


def _dynamic_shapes(names, phase, d_ff, named: bool):
    from torch.export import Dim

    dims = {}
    out = []
    for name in names:
        axes = _dynamic_axes(name, phase, d_ff)
        if not axes:
            out.append(None)
            continue
        spec = {}
        for axis, label in axes.items():
            if not named:
                spec[axis] = Dim.AUTO
                continue
            if label not in dims:
                hi = d_ff[int(label[1:])] if label.startswith("k") else None
                dims[label] = Dim(label, max=hi) if hi else Dim(label)
            spec[axis] = dims[label]
        out.append(spec)
    return tuple(out)


def rename_dims(model, names, phase, d_ff) -> None:
    """Give the symbolic dims the axis names (batch, seq, past, total, k<L>) everywhere in the IO."""
    import onnx_ir as ir

    graph = model.graph
    mapping = {}
    for value in graph.inputs:
        for axis, label in _dynamic_axes(value.name, phase, d_ff).items():
            dim = value.shape[axis] if value.shape is not None else None
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                mapping.setdefault(dim.value, label)
    if not mapping:
        return
    for value in list(graph.inputs) + list(graph.outputs):
        if value.shape is None:
            continue
        dims = []
        for dim in value.shape:
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                dims.append(re.sub(r"\b\w+\b", lambda m: mapping.get(m.group(0), m.group(0)), dim.value))
            else:
                dims.append(dim)
        value.shape = ir.Shape(dims)


def export_graph(traced, args, path: Path, phase: str, d_ff, opset: int, external: bool) -> None:
    """Write `traced` (a TracedGraph) run on the example `args` to `path` as ONNX."""
    gm = traced.gm
    table = translation_table()
    errors = []
    # named dims first (readable shapes); they can conflict with relations the model imposes
    # between dims, so a second try lets torch.export infer them (Dim.AUTO), renamed afterwards
    for named in (True, False):
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prog = torch.onnx.export(
                    gm, tuple(args), None, input_names=traced.input_names, output_names=traced.output_names,
                    dynamic_shapes=_dynamic_shapes(traced.input_names, phase, d_ff, named),
                    custom_translation_table=table, opset_version=opset, dynamo=True, verbose=False,
                )
            break
        except Exception as err:  # torch.export and onnxscript raise many unrelated types
            errors.append(err)
    else:
        raise RuntimeError(f"torch.onnx.export of the {phase} graph failed with named dynamic axes "
                           f"({errors[0]}) and with inferred ones ({errors[1]})") from errors[-1]
    model = prog.model
    rename_dims(model, traced.input_names, phase, d_ff)
    model.producer_name = "clada_compile"
    prog.save(path, external_data=external)
