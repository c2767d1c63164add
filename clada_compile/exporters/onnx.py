"""export_onnx: the CLADA prefill and decode graphs as ONNX, validated against PyTorch.

The exported graphs are the SAME rewritten FX graphs the inductor path compiles
(``graphs.build_graphs``). This module runs the steps; each lives in its own module, as in
Hugging Face Optimum's exporters:

    translation.py   the clada ops -> standard ONNX ops (custom_translation_table)
    convert.py       one traced graph -> one .onnx file (dynamic axes, dim names)
    validation.py    ORT vs PyTorch on the same inputs, tolerances, ExportValidationError
    quantization.py  low-memory mode: weight-only MatMulNBits
    manifest.py      the directory layout and clada.json (also read by the runtime, ort.py)
    publish.py       the atomic write: a temporary sibling renamed into place
    memory.py        peak RSS of a fresh process that loads the export

Output directory:

    prefill.onnx              full-weight prompt pass; outputs Griffin scores per layer
    decode.onnx               compacted-weight step; the active-neuron weights are INPUTS
    mlp_weights.safetensors   full MLP weights per layer ("L.w_in", "L.b_in", "L.w_up", "L.b_up",
                              "L.w_down"), which the runtime compacts on (re-)selection
    clada.json                manifest (see manifest.build_manifest)
    profile.json              the calibration profile (when config.profile is set; also in clada.json)
    tokenizer files           when the tokenizer is known

k is a dynamic axis: one export serves every top_k_ratio; the manifest records the export's
top_k_ratio as the runtime default.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import torch

from ..compiled import CladaModel
from ..config import CladaConfig
from ..engine import backbone_sizes
from ..graphs import build_graphs
from ..models import DTYPES, architecture_of
from .convert import export_graph, strip_guards
from .manifest import FILES, FORMAT_VERSION, MANIFEST, PROFILE, build_manifest, dir_sizes, read_manifest, write_support
from .publish import check_output, remove_stale, staged
from .quantization import BITS, QUANT_ACCURACY_LEVEL, describe, quantize
from .translation import translation_table
from .validation import (LOW_MEMORY_REL_TOLERANCE, PHASES, TOLERANCE, ExportValidationError, example_feeds,
                         validate, validate_quantized)

# the names this module offered before the split (tests, CLI, benchmarks import them from here)
__all__ = ["export_onnx", "ExportValidationError", "MANIFEST", "PROFILE", "FILES", "FORMAT_VERSION", "DEFAULT_OPSET",
           "SUPPORTED_OPSETS", "PRECISIONS", "TOLERANCE", "LOW_MEMORY_REL_TOLERANCE", "QUANT_ACCURACY_LEVEL",
           "read_manifest", "translation_table"]
_remove_stale = remove_stale  # tests/test_onnx.py

DEFAULT_OPSET = 18
SUPPORTED_OPSETS = range(18, 24)
PRECISIONS = ("fp32", "fp16")
# protobuf's 2 GB limit per file: larger models keep their weights in external data files
EXTERNAL_DATA_BYTES = 1_800_000_000


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
        and `block_size`; the decode graph's compacted-weight inputs stay float, so re-selection
        still works; the full MLP weights for re-selection are stored in fp16.
    dense: export the baseline: the decode MLPs run a plain matmul (no threshold mask).
    force: overwrite an existing, non-empty `output_dir` (otherwise FileExistsError).
    measure_memory: record the peak RSS of a fresh process running the export (memory.py).

    Validation against PyTorch runs before anything is renamed into place; see validation.py for
    the tolerances. Raises ExportValidationError listing every output over its tolerance. The
    validation report is stored in the manifest under "validation".
    """
    say = log or (lambda *_: None)
    config = CladaConfig() if config is None else config
    _check_args(config, precision, opset, low_memory, low_memory_bits)
    output_dir = Path(output_dir).expanduser().absolute()
    check_output(output_dir, force)  # before the minutes of tracing, not after

    t_start = time.perf_counter()
    dtype = DTYPES[precision]
    model, tokenizer, model_id = _load(model_or_spec, precision, tokenizer, say)

    say("tracing and rewriting the prefill and decode graphs")
    graphs = build_graphs(model, "dense" if dense else "reference")
    strip_guards(graphs.prefill.gm)
    strip_guards(graphs.decode.gm)
    # validation runs a real selection (k < d_ff) whatever the recorded config says; impl pinned to
    # the graphs' own (the torch engine would otherwise rewrite decode for its GEMV kernel)
    engine = CladaModel(model, graphs, config.replace(backend="eager", enabled=True, top_k_ratio=0.5),
                        impl=graphs.impl)
    hf_cfg = model.config.get_text_config(decoder=True)
    feeds = example_feeds(engine, int(hf_cfg.vocab_size), seed)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = param_bytes > EXTERNAL_DATA_BYTES

    with staged(output_dir, force) as tmp:
        # low-memory: the full-precision graphs go to a side directory first, validated, then quantized
        stage = tmp / "fp" if low_memory else tmp
        stage.mkdir(exist_ok=True)
        for phase in PHASES:
            traced = getattr(graphs, phase)
            say(f"exporting {phase}.onnx (opset {opset})")
            args = [feeds[phase][0][name] for name in traced.input_names]
            export_graph(traced, args, stage / FILES[phase], phase, engine.d_ff, opset, external)

        say("validating ONNX Runtime against PyTorch")
        validation = validate({p: stage / FILES[p] for p in PHASES}, feeds, precision)
        quant = None
        if low_memory:
            say(f"quantizing weights to {low_memory_bits} bits (block {block_size})")
            for phase in PHASES:
                quantize(stage / FILES[phase], tmp / FILES[phase], low_memory_bits, block_size, external)
            validation["low_memory"] = validate_quantized({p: tmp / FILES[p] for p in PHASES}, feeds, low_memory_bits)
            quant = describe(low_memory_bits, block_size)

        say("writing mlp_weights.safetensors, manifest and tokenizer")
        profile = None
        if config.profile is not None:
            from ..calibrate import load_profile

            profile = load_profile(config.profile)
        ratio = config.top_k_ratio if config.enabled and not dense else 1.0
        manifest = build_manifest(
            model_id=model_id, arch=architecture_of(model), graphs=graphs,
            d_model=int(engine.full[0]["w_in"].shape[1]), d_ff=engine.d_ff,
            k=backbone_sizes(engine.d_ff, ratio, config.min_active_neurons), top_k_ratio=ratio, text_config=hf_cfg,
            config={key: v for key, v in dataclasses.asdict(config).items() if key != "profile"}, profile=profile,
            opset=opset, precision=precision, dtype=str(dtype).replace("torch.", ""), quant=quant,
            external=external, validation=validation, versions=_versions())
        manifest = _write(tmp, stage, manifest, engine.full, dtype, tokenizer, profile, low_memory, measure_memory,
                          say)
        manifest["export_s"] = round(time.perf_counter() - t_start, 1)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return output_dir


def _check_args(config, precision, opset, low_memory, low_memory_bits) -> None:
    if not isinstance(config, CladaConfig):
        raise TypeError(f"`config` must be a CladaConfig, got {type(config).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {', '.join(map(repr, PRECISIONS))} for ONNX export, got {precision!r}")
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"`opset` must be in [{SUPPORTED_OPSETS.start}, {SUPPORTED_OPSETS.stop - 1}], got {opset!r}")
    if config.mlp_criterion != "h":
        raise ValueError(f"the ONNX export thresholds h; `mlp_criterion` {config.mlp_criterion!r} (CATS) is a torch-engine "
                         f"baseline (clada_compile.optimize); export with mlp_criterion 'h'")
    if low_memory and low_memory_bits not in BITS:
        raise ValueError(f"`low_memory_bits` must be 8 or 4, got {low_memory_bits!r}")


def _load(model_or_spec, precision: str, tokenizer, say):
    """(model in `precision`, eval mode; tokenizer; the id the manifest records)."""
    dtype = DTYPES[precision]
    if isinstance(model_or_spec, (str, os.PathLike)):
        from ..models import load_model

        say(f"loading {model_or_spec} ({precision})")
        model, tok = load_model(str(model_or_spec), dtype=precision)
        return model.eval(), tokenizer or tok, str(model_or_spec)
    model = model_or_spec
    model_id = _model_id(model)
    if next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model).to(dtype)  # the caller's model stays as it was
    return model.eval(), tokenizer, model_id


def _model_id(model) -> str:
    spec = getattr(model, "name_or_path_spec", None)
    return spec or getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "") or type(model).__name__


def _versions() -> dict:
    import onnx
    import onnxruntime

    from .. import __version__

    return {"clada_compile": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def _write(tmp: Path, stage: Path, manifest: dict, full, dtype, tokenizer, profile, low_memory: bool,
           measure_memory: bool, say) -> dict:
    """The export's support files; returns the manifest completed with file sizes (and, when asked,
    peak RSS), for the caller to write last."""
    from .memory import measure_memory as measure

    mem_fp = None
    if low_memory and measure_memory:
        # the full-precision twin, complete, so both can be loaded and measured side by side
        write_support(stage, {**manifest, "low_memory": None}, full, dtype, None)
        say("measuring peak RSS: full precision vs low-memory")
        mem_fp = measure(stage)
    if profile is not None:
        # the calibration profile travels with the export: the default runtime config uses it
        (tmp / PROFILE).write_text(json.dumps(profile, indent=1))
        manifest["files"]["profile"] = PROFILE
    write_support(tmp, manifest, full, torch.float16 if low_memory else dtype, tokenizer)
    manifest["tokenizer"] = tokenizer is not None
    if measure_memory:
        manifest["memory"] = {"low_memory" if low_memory else manifest["precision"]: measure(tmp)}
        if low_memory:
            manifest["memory"][manifest["precision"]] = mem_fp
    if low_memory:
        sizes = {name: size for name, size in dir_sizes(stage).items() if name != MANIFEST}
        sizes.setdefault(FILES["mlp_weights"], sum(
            t.numel() * t.element_size() for f in full for t in f.values() if t is not None))
        manifest["file_sizes_fp"] = sizes
        shutil.rmtree(stage)
    manifest["file_sizes"] = dir_sizes(tmp)
    return manifest
