"""Exporters: the rewritten prefill/decode graphs as ONNX, and an ONNX Runtime engine for them.

    from clada_compile.exporters import export_onnx, OrtCladaModel
    out = export_onnx("smollm2", "smollm2-onnx", CladaConfig(top_k_ratio=0.5))
    engine = OrtCladaModel.from_dir(out)
    engine.generate(input_ids, max_new_tokens=64)

Imports are lazy: `import clada_compile` does not import onnx / onnxruntime, and importing the
runtime (OrtCladaModel, MANIFEST) does not import the exporter or its tracing stack.
"""

from __future__ import annotations

__all__ = ["export_onnx", "OrtCladaModel", "ExportValidationError", "MANIFEST"]

# public name -> the submodule that defines it
_LAZY = {"export_onnx": "onnx", "ExportValidationError": "validation", "MANIFEST": "manifest",
         "OrtCladaModel": "ort"}


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
