"""Export the CLADA prefill and decode graphs to ONNX, validate them against PyTorch.

The exported graphs are the SAME rewritten FX graphs the inductor path compiles
(``graphs.build_graphs``): torch.onnx.export(dynamo=True) translates them, and a
``custom_translation_table`` lowers the two clada ops to standard ONNX ops (MatMul / Gemm,
Sigmoid*x, Relu, Erf- or Tanh-GELU, Abs, GreaterOrEqual, Where, ReduceSum, Sqrt), so any ONNX
runtime can run them; no custom operator library is needed.

Output directory (written atomically: a temporary sibling directory is renamed into place):

    prefill.onnx              full-weight prompt pass; outputs Griffin scores per layer
    decode.onnx               compacted-weight step; the active-neuron weights are INPUTS
    mlp_weights.safetensors   full MLP weights per layer ("L.w_in", "L.b_in", "L.w_up", "L.b_up",
                              "L.w_down"), which the runtime compacts on (re-)selection
    clada.json                manifest (see ``MANIFEST``)
    profile.json              the calibration profile (when config.profile is set; also in clada.json)
    tokenizer files           when the tokenizer is known

Dynamic axes: batch, seq (new tokens), past (cached tokens), total (= past + seq, on the decode
attention_mask) and k<L> (active neurons of layer L, decode weight inputs): one export serves
every top_k_ratio; the manifest records the export's top_k_ratio as the runtime default.

Validation (always, before the directory is renamed into place): the ORT sessions and the same
GraphModules run eagerly in PyTorch on the same inputs (prefill: random ids, batch 2; decode: one
token per sequence on the PyTorch prefill's KV cache, with the active set selected from its
scores). Tolerances, max abs difference per output:

    fp32                    1e-3 on logits, KV cache and scores (observed: ~1e-5 or less)
    fp16                    5e-2 (both sides compute in half precision, in different orders)
    low_memory (int8/4-bit) weight-only quantized ORT vs fp32 PyTorch: checked on logits only,
                            max abs diff <= 0.15 * max |logit| (int8) / 0.35 (4-bit); the
                            report states the observed diffs and the greedy top-1 agreement

``clada.active.L`` (neurons kept) must match exactly (validation runs at tau = 0).
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..compiled import CladaModel, position_ids_from_mask
from ..config import INPUT_GROUPS, CladaConfig
from ..graphs import build_graphs
from ..models import DTYPES, architecture_of

MANIFEST = "clada.json"
PROFILE = "profile.json"
FORMAT_VERSION = 1
DEFAULT_OPSET = 18
SUPPORTED_OPSETS = range(18, 24)
PRECISIONS = ("fp32", "fp16")
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}
LOW_MEMORY_REL_TOLERANCE = {8: 0.15, 4: 0.35}
QUANT_ACCURACY_LEVEL = 4
FILES = {"prefill": "prefill.onnx", "decode": "decode.onnx", "mlp_weights": "mlp_weights.safetensors"}


class ExportValidationError(RuntimeError):
    """ORT and PyTorch disagree beyond the stated tolerance (the message lists every output)."""


# ---- the clada ops in ONNX ------------------------------------------------------------------


def _onnx_ops():
    from onnxscript import opset18 as op

    def c(value, like):
        return op.CastLike(op.Constant(value_float=float(value)), like)

    def act_fn(h, act):
        if act == "silu":
            return op.Mul(h, op.Sigmoid(h))
        if act == "relu":
            return op.Relu(h)
        if act == "gelu":  # 0.5 x (1 + erf(x / sqrt 2)); ORT fuses it into its Gelu kernel
            return op.Mul(op.Mul(h, c(0.5, h)), op.Add(c(1.0, h), op.Erf(op.Mul(h, c(0.7071067811865476, h)))))
        if act == "gelu_tanh":
            inner = op.Mul(c(0.7978845608028654, h), op.Add(h, op.Mul(c(0.044715, h), op.Mul(h, op.Mul(h, h)))))
            return op.Mul(op.Mul(h, c(0.5, h)), op.Add(c(1.0, h), op.Tanh(inner)))
        raise ValueError(f"clada ONNX export: unknown activation {act!r}")

    def masked(h, tau):
        keep = op.GreaterOrEqual(op.Abs(h), op.CastLike(tau, h))
        return keep, op.Where(keep, h, c(0.0, h))

    def scored_mlp(x, w_in, b_in, w_up, b_up, w_down, b_down, tau, token_mask, act):
        # full weights are initializers: MatMul with a transposed constant (folded at export),
        # the form the weight-only quantizer (MatMulNBits) recognizes
        h = op.MatMul(x, op.Transpose(w_in, perm=[1, 0]))
        if b_in is not None:
            h = op.Add(h, b_in)
        h = act_fn(h, act)
        if w_up is not None:
            u = op.MatMul(x, op.Transpose(w_up, perm=[1, 0]))
            if b_up is not None:
                u = op.Add(u, b_up)
            h = op.Mul(h, u)
        _, hm = masked(h, tau)
        out = op.MatMul(hm, op.Transpose(w_down, perm=[1, 0]))
        if b_down is not None:
            out = op.Add(out, b_down)
        # Griffin scores: rows h_t / ||h_t||, masked to the scored tokens, column L2 norm (float32)
        rows = op.Concat(op.Shape(token_mask), op.Constant(value_ints=[-1]), axis=0)
        hf = op.Cast(op.Reshape(h, rows), to=1)
        norm = op.Sqrt(op.ReduceSum(op.Mul(hf, hf), op.Constant(value_ints=[-1]), keepdims=1))
        hn = op.Div(hf, op.Max(norm, op.Constant(value_float=1e-6)))
        hn = op.Mul(hn, op.Unsqueeze(op.Cast(token_mask, to=1), op.Constant(value_ints=[-1])))
        scores = op.Sqrt(op.ReduceSum(op.Mul(hn, hn), op.Constant(value_ints=[1]), keepdims=0))
        return out, scores

    def sparse_mlp(x, w_in, b_in, w_up, b_up, w_down_t, b_down, tau, act, impl):
        # compacted weights are graph inputs (k, d): Gemm(transB) reads them in place, no transpose
        x2 = op.Reshape(x, op.Concat(op.Constant(value_ints=[-1]), op.Shape(x, start=-1), axis=0))
        h = act_fn(op.Gemm(x2, w_in, b_in, transB=1), act)
        if w_up is not None:
            h = op.Mul(h, op.Gemm(x2, w_up, b_up, transB=1))
        keep, hm = masked(h, tau)
        out = op.MatMul(h if impl == "dense" else hm, w_down_t)
        out = op.Reshape(out, op.Concat(op.Shape(x, end=-1), op.Shape(w_down_t, start=1), axis=0))
        if b_down is not None:
            out = op.Add(out, b_down)
        kept = op.ReduceSum(op.Cast(keep, to=1), keepdims=0)
        return out, kept

    return scored_mlp, sparse_mlp


def translation_table() -> dict:
    """custom_translation_table for torch.onnx.export: the clada ops -> standard ONNX ops."""
    from .. import ops  # noqa: F401  (registers torch.ops.clada)

    scored, sparse = _onnx_ops()
    return {torch.ops.clada.scored_mlp.default: scored, torch.ops.clada.sparse_mlp.default: sparse}


# ---- helpers --------------------------------------------------------------------------------


def _strip_guards(gm: torch.fx.GraphModule) -> None:
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


def _rename_dims(model, names, phase, d_ff) -> None:
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


def _fold_weight_transposes(model) -> int:
    """Transpose(initializer) -> a transposed initializer. The exporter's optimizer leaves large ones
    (e.g. a tied lm_head) unfolded; folded, their MatMul has a constant B that ORT prepacks and
    the weight-only quantizer can quantize."""
    import onnx_ir as ir

    graph = model.graph
    count = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        if src is None or not src.is_initializer() or src.const_value is None:
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        perm = node.attributes.get("perm")
        arr = src.const_value.numpy()
        arr = np.ascontiguousarray(arr.transpose(perm.as_ints() if perm is not None else None))
        new = ir.Value(name=f"{src.name}.T", shape=ir.Shape(arr.shape), type=src.type,
                       const_value=ir.tensor(arr, name=f"{src.name}.T"))
        graph.register_initializer(new)
        out.replace_all_uses_with(new)
        graph.remove(node, safe=True)
        if not src.uses() and not src.is_graph_output():
            graph.initializers.pop(src.name)
        count += 1
    return count


def _export_graph(traced, args, path: Path, phase: str, d_ff, opset: int, external: bool) -> None:
    gm = traced.gm
    table = translation_table()
    last = None
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
        except Exception as err:  # named dims can conflict with relations the model imposes
            last = err
    else:
        raise RuntimeError(f"torch.onnx.export of the {phase} graph failed: {last}") from last
    model = prog.model
    _rename_dims(model, traced.input_names, phase, d_ff)
    model.producer_name = "clada_compile"
    prog.save(path, external_data=external)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def _ort_run(path: Path, names, feed: dict, providers=None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, min(4, torch.get_num_threads()))
    sess = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    res = sess.run(None, {k: _to_numpy(v) for k, v in feed.items() if k in wanted})
    return dict(zip([o.name for o in sess.get_outputs()], res))


def _diffs(ref: dict, got: dict) -> dict:
    out = {}
    for name, r in ref.items():
        g = got[name]
        r = _to_numpy(r).astype(np.float64)
        g = np.asarray(g).astype(np.float64)
        if r.shape != g.shape:
            raise ExportValidationError(f"output {name}: ORT shape {g.shape} != PyTorch shape {r.shape}")
        out[name] = float(np.abs(r - g).max()) if r.size else 0.0
    return out


def _feeds(engine: CladaModel, vocab: int, seed: int):
    """Example/validation inputs for both graphs, as name -> tensor, plus the PyTorch outputs."""
    g = torch.Generator().manual_seed(seed)
    batch, seq, new = 2, 7, 2
    ids = torch.randint(0, vocab, (batch, seq + new), generator=g)
    mask = torch.ones_like(ids)
    n = engine.n_layers
    pre_names = engine.graphs.prefill.input_names
    dec_names = engine.graphs.decode.input_names
    pre = {"input_ids": ids[:, :seq], "attention_mask": mask[:, :seq],
           "position_ids": position_ids_from_mask(mask[:, :seq], seq),
           "clada.tau": torch.zeros(n), "clada.score_mask": mask[:, :seq]}
    unknown = [x for x in pre_names if x not in pre]
    if unknown:
        raise RuntimeError(f"the prefill graph has inputs the exporter does not know: {unknown}")
    with torch.no_grad():
        pre_out = engine.graphs.prefill.gm(*[pre[x] for x in pre_names])
    pre_ref = dict(zip(engine.graphs.prefill.output_names, pre_out))
    engine.select([pre_ref[f"clada.scores.{i}"] for i in range(n)])
    dec = {"input_ids": ids[:, seq:], "attention_mask": mask,
           "position_ids": position_ids_from_mask(mask, new), "clada.tau": torch.zeros(n),
           "clada.tau_in": torch.zeros(len(INPUT_GROUPS), n)}
    for i in range(n):
        for kind in ("key", "value"):
            dec[f"past_key_values.{i}.{kind}"] = pre_ref[f"present.{i}.{kind}"]
    for layer, buf in enumerate(engine.compact):
        for key, t in buf.items():
            dec[f"clada.{layer}.{key}"] = t
    unknown = [x for x in dec_names if x not in dec]
    if unknown:
        raise RuntimeError(f"the decode graph has inputs the exporter does not know: {unknown}")
    with torch.no_grad():
        dec_out = engine.graphs.decode.gm(*[dec[x] for x in dec_names])
    dec_ref = dict(zip(engine.graphs.decode.output_names, dec_out))
    return pre, pre_ref, dec, dec_ref


def _check(diffs: dict, tol: float, phase: str, what: str) -> list[str]:
    bad = []
    for name, d in diffs.items():
        limit = 0.5 if name.startswith("clada.active.") else tol
        if not d <= limit:  # NaN fails too
            bad.append(f"  {phase} {name}: max abs diff {d:.3g} > {limit:g}")
    return bad


def _dir_size(path: Path) -> dict:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}


def _quantize(src: Path, dst: Path, bits: int, block_size: int, external: bool) -> None:
    import logging

    import onnx_ir as ir
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = ir.load(str(src))
    # a tied lm_head is MatMul(x, Transpose(embedding)): fold it so the quantizer sees a constant
    _fold_weight_transposes(model)
    proto = ir.to_proto(model)
    del model
    # GatherBlockQuantized (the embedding) exists for 4 bits only
    ops = ("MatMul", "Gather") if bits == 4 else ("MatMul",)
    # accuracy_level 4 (int8 activations in the kernel): ORT's CPU MatMulNBits is ~15x slower per
    # decode step at levels 0/1 (measured on SmolLM2: 387 ms vs 24 ms; fp32 graph: 44 ms)
    quant = MatMulNBitsQuantizer(proto, bits=bits, block_size=block_size, is_symmetric=True,
                                 accuracy_level=QUANT_ACCURACY_LEVEL, op_types_to_quantize=ops)
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.ERROR)  # it logs every node at INFO
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant.process()
    finally:
        logger.setLevel(level)
    quant.model.save_model_to_file(str(dst), use_external_data_format=external)


def _write_support(path: Path, manifest: dict, full, store_dtype, tokenizer) -> None:
    """mlp_weights.safetensors, the tokenizer and the manifest of one export directory."""
    from safetensors.torch import save_file

    tensors = {}
    for layer, f in enumerate(full):
        for key, t in f.items():
            if t is not None:
                tensors[f"{layer}.{key}"] = t.detach().to(store_dtype).contiguous()
    save_file(tensors, str(path / FILES["mlp_weights"]), metadata={"format": "clada-mlp-weights"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    manifest = {**manifest, "tokenizer": tokenizer is not None, "file_sizes": _dir_size(path)}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _model_id(model) -> str:
    spec = getattr(model, "name_or_path_spec", None)
    return spec or getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "") or type(model).__name__


def _prepare_output(output_dir: Path, force: bool) -> None:
    if output_dir.exists():
        if not output_dir.is_dir():
            raise FileExistsError(f"{output_dir} exists and is not a directory; choose another --output")
        if any(output_dir.iterdir()) and not force:
            raise FileExistsError(
                f"{output_dir} already exists and is not empty; pass --force (force=True) to overwrite it")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_stale(output_dir: Path) -> None:
    """Delete the hidden siblings (.NAME.tmp-PID-*, .NAME.old-PID-*) that an export killed mid-way
    (SIGKILL, power loss) left behind; a sibling whose process still runs is another export's."""
    for p in output_dir.parent.glob(f".{glob.escape(output_dir.name)}.*-*"):
        kind, _, rest = p.name[len(output_dir.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("tmp", "old") and pid.isdigit() and p.is_dir() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _publishable(tmp: Path) -> None:
    """mkdtemp makes a private (0700) directory: give the export the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for p in tmp.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _commit(tmp: Path, output_dir: Path) -> None:
    old = None
    if output_dir.exists():
        old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(output_dir, old)
    try:
        os.rename(tmp, output_dir)
    except BaseException:
        if old is not None:
            os.rename(old, output_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- the exporter ---------------------------------------------------------------------------


def export_onnx(model_or_spec, output_dir, config: CladaConfig | None = None, opset: int = DEFAULT_OPSET,
                precision: str = "fp32", low_memory: bool = False, force: bool = False, tokenizer=None,
                low_memory_bits: int = 8, block_size: int = 32, dense: bool = False, seed: int = 0,
                measure_memory: bool = False, log=None) -> Path:
    """Export `model_or_spec` (a spec for load_model: "smollm2", a .gguf, an HF dir; or a loaded HF
    causal LM) to `output_dir`: prefill.onnx, decode.onnx, mlp_weights.safetensors, clada.json and
    the tokenizer. Returns the output directory.

    config: the CladaConfig recorded as the runtime default (top_k_ratio -> k, min_active_neurons,
        controller settings, calibration profile). The graphs do not depend on it (k is a dynamic
        axis); OrtCladaModel.from_dir(config=...) may override it.
    precision: "fp32" or "fp16" (the weights, activations and KV cache of the graphs).
    low_memory: weight-only quantization of the graphs' constant weights (MatMul -> MatMulNBits;
        with 4 bits also the embedding Gather -> GatherBlockQuantized), `low_memory_bits` (8 or 4)
        and `block_size`;
        the decode graph's compacted-weight inputs stay float, so re-selection still works; the
        full MLP weights for re-selection are stored in fp16.
    dense: export the baseline: the decode MLPs run a plain matmul (no threshold mask).
    force: overwrite an existing, non-empty `output_dir` (otherwise FileExistsError).

    Validation against PyTorch runs before anything is renamed into place; see the module
    docstring for the tolerances. Raises ExportValidationError listing every output over its
    tolerance. The validation report is stored in the manifest under "validation".
    """
    import onnx
    import onnxruntime

    from .. import __version__

    say = log or (lambda *_: None)
    config = config or CladaConfig()
    if not isinstance(config, CladaConfig):
        raise TypeError(f"`config` must be a CladaConfig, got {type(config).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {', '.join(map(repr, PRECISIONS))} for ONNX export, got {precision!r}")
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"`opset` must be in [{SUPPORTED_OPSETS.start}, {SUPPORTED_OPSETS.stop - 1}], got {opset!r}")
    if low_memory and low_memory_bits not in LOW_MEMORY_REL_TOLERANCE:
        raise ValueError(f"`low_memory_bits` must be 8 or 4, got {low_memory_bits!r}")
    output_dir = Path(output_dir).expanduser().absolute()
    _prepare_output(output_dir, force)

    t_start = time.perf_counter()
    dtype = DTYPES[precision]
    if isinstance(model_or_spec, (str, os.PathLike)):
        from ..models import load_model

        say(f"loading {model_or_spec} ({precision})")
        model, tok = load_model(str(model_or_spec), dtype=precision)
        tokenizer = tokenizer or tok
        model_id = str(model_or_spec)
    else:
        model = model_or_spec
        model_id = _model_id(model)
        if next(model.parameters()).dtype != dtype:
            model = copy.deepcopy(model).to(dtype)
    model.eval()
    arch = architecture_of(model)

    say("tracing and rewriting the prefill and decode graphs")
    graphs = build_graphs(model, "dense" if dense else "reference")
    _strip_guards(graphs.prefill.gm)
    _strip_guards(graphs.decode.gm)
    # validation runs a real selection (k < d_ff) whatever the recorded config says
    vconfig = config.replace(backend="eager", enabled=True, top_k_ratio=0.5)
    try:
        engine = CladaModel(model, graphs, vconfig, impl=graphs.impl)
    except TypeError:  # a CladaModel without the `impl` override
        engine = CladaModel(model, graphs, vconfig)
    n = engine.n_layers
    d_ff = list(engine.d_ff)
    d_model = int(engine.full[0]["w_in"].shape[1])
    ratio = config.top_k_ratio if config.enabled and not dense else 1.0
    k = [min(d, max(config.min_active_neurons, round(ratio * d))) for d in d_ff]
    vocab = int(model.config.get_text_config(decoder=True).vocab_size)
    pre, pre_ref, dec, dec_ref = _feeds(engine, vocab, seed)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = param_bytes > 1_800_000_000  # protobuf's 2 GB limit per file

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(output_dir)
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-{os.getpid()}-"))
    try:
        stage = tmp / "fp" if low_memory else tmp
        stage.mkdir(exist_ok=True)
        for phase, traced, feed in (("prefill", graphs.prefill, pre), ("decode", graphs.decode, dec)):
            say(f"exporting {phase}.onnx (opset {opset})")
            _export_graph(traced, [feed[x] for x in traced.input_names], stage / FILES[phase], phase, d_ff, opset,
                          external)

        say("validating ONNX Runtime against PyTorch")
        tol = TOLERANCE[precision]
        diffs = {"prefill": _diffs(pre_ref, _ort_run(stage / FILES["prefill"], graphs.prefill.input_names, pre)),
                 "decode": _diffs(dec_ref, _ort_run(stage / FILES["decode"], graphs.decode.input_names, dec))}
        bad = _check(diffs["prefill"], tol, "prefill", precision) + _check(diffs["decode"], tol, "decode", precision)
        if bad:
            raise ExportValidationError(
                f"ONNX Runtime disagrees with PyTorch beyond the {precision} tolerance ({tol:g} abs):\n"
                + "\n".join(bad))
        validation = {"tolerance": tol, "max_abs_diff": diffs, "precision": precision}

        quant = None
        if low_memory:
            say(f"quantizing weights to {low_memory_bits} bits (block {block_size})")
            for phase in ("prefill", "decode"):
                _quantize(stage / FILES[phase], tmp / FILES[phase], low_memory_bits, block_size, external)
            qp = _ort_run(tmp / FILES["prefill"], graphs.prefill.input_names, pre)
            qd = _ort_run(tmp / FILES["decode"], graphs.decode.input_names, dec)
            qdiffs = {"prefill": _diffs(pre_ref, qp), "decode": _diffs(dec_ref, qd)}
            rel = LOW_MEMORY_REL_TOLERANCE[low_memory_bits]
            agree = {}
            bad = []
            for phase, ref, got in (("prefill", pre_ref, qp), ("decode", dec_ref, qd)):
                scale = float(ref["logits"].abs().max())
                agree[phase] = float((ref["logits"].argmax(-1).numpy() == got["logits"].argmax(-1)).mean())
                if not qdiffs[phase]["logits"] <= rel * scale:
                    bad.append(f"  {phase} logits: max abs diff {qdiffs[phase]['logits']:.3g} > "
                               f"{rel:g} * max|logit| = {rel * scale:.3g}")
            if bad:
                raise ExportValidationError(
                    f"the {low_memory_bits}-bit weight-only quantized graphs drift too far from PyTorch:\n"
                    + "\n".join(bad))
            validation["low_memory"] = {"max_abs_diff": qdiffs, "rel_tolerance_logits": rel,
                                        "top1_agreement": agree}
            quant = {"method": "MatMulNBits" + ("+GatherBlockQuantized" if low_memory_bits == 4 else "")
                     + " (weight-only, symmetric, round-to-nearest)", "bits": low_memory_bits,
                     "block_size": block_size, "accuracy_level": QUANT_ACCURACY_LEVEL, "mlp_weights_dtype": "fp16"}

        say("writing mlp_weights.safetensors, manifest and tokenizer")
        profile = None
        if config.profile is not None:
            from ..calibrate import load_profile

            profile = load_profile(config.profile)
        hf_cfg = model.config.get_text_config(decoder=True)
        context = getattr(hf_cfg, "max_position_embeddings", None) or getattr(hf_cfg, "n_positions", None)
        manifest = {
            "format": "clada-onnx",
            "format_version": FORMAT_VERSION,
            "model": model_id,
            "architecture": arch,
            "n_layers": n,
            "d_model": d_model,
            "d_ff": d_ff,
            "k": k,
            "top_k_ratio": ratio,
            "vocab_size": vocab,
            "context_length": context,
            "eos_token_id": getattr(hf_cfg, "eos_token_id", None),
            "impl": graphs.impl,
            "config": {key: v for key, v in dataclasses.asdict(config).items() if key != "profile"},
            "profile": profile,
            "opset": opset,
            "precision": precision,
            "dtype": str(dtype).replace("torch.", ""),
            "low_memory": quant,
            "external_data": external,
            "files": dict(FILES),
            "tokenizer": False,
            "prefill": {"inputs": list(graphs.prefill.input_names), "outputs": list(graphs.prefill.output_names)},
            "decode": {"inputs": list(graphs.decode.input_names), "outputs": list(graphs.decode.output_names)},
            "sites": [dict(layer=s.layer, kind=s.kind, act=s.act, path=s.path, has_b_in=s.has_b_in,
                           has_b_up=s.has_b_up) for s in graphs.prefill.sites],
            # decode input clada.tau_in: (len(input_groups), n_layers) thresholds of these projection
            # inputs; the attention rows act on attention_layers only
            "input_groups": list(INPUT_GROUPS),
            "attention_layers": list(graphs.decode.attention_layers),
            "dynamic_axes": {"batch": "batch", "seq": "new tokens", "past": "cached tokens",
                             "total": "past + seq (decode attention_mask)", "k<L>": "active neurons of layer L"},
            "validation": validation,
            "versions": {"clada_compile": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__},
        }
        if low_memory and measure_memory:
            # the full-precision twin, complete, so both can be loaded and measured side by side
            _write_support(stage, {**manifest, "low_memory": None}, engine.full, dtype, None)
            say("measuring peak RSS: full precision vs low-memory")
            from .ort import measure_memory as _measure

            mem_fp = _measure(stage)
        if profile is not None:
            # the calibration profile travels with the export: the default runtime config uses it
            (tmp / PROFILE).write_text(json.dumps(profile, indent=1))
            manifest["files"]["profile"] = PROFILE
        _write_support(tmp, manifest, engine.full, torch.float16 if low_memory else dtype, tokenizer)
        manifest["tokenizer"] = tokenizer is not None
        if measure_memory:
            from .ort import measure_memory as _measure

            manifest["memory"] = {"low_memory" if low_memory else precision: _measure(tmp)}
            if low_memory:
                manifest["memory"][precision] = mem_fp
        if low_memory:
            sizes = {name: size for name, size in _dir_size(stage).items() if name != MANIFEST}
            sizes.setdefault(FILES["mlp_weights"], sum(
                t.numel() * t.element_size() for f in engine.full for t in f.values() if t is not None))
            manifest["file_sizes_fp"] = sizes
            shutil.rmtree(stage)
        manifest["file_sizes"] = _dir_size(tmp)
        manifest["export_s"] = round(time.perf_counter() - t_start, 1)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _publishable(tmp)
        _prepare_output(output_dir, force)  # still free (or forced) after the long export?
        _commit(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def read_manifest(path) -> dict:
    """The manifest of an export directory; FileNotFoundError naming the file when missing."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: {path} is not a clada ONNX export (or it is incomplete); "
            f"re-export with `clada-export --onnx --model_path MODEL --output {path} --force`")
    try:
        manifest = json.loads(file.read_text())
    except ValueError as err:
        raise ValueError(f"{file} is not valid JSON ({err}); re-export with "
                         f"`clada-export --onnx --model_path MODEL --output {path} --force`") from err
    if manifest.get("format") != "clada-onnx":
        raise ValueError(f"{file} is not a clada ONNX manifest (format={manifest.get('format')!r})")
    return manifest
