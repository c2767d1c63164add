"""Exporters: the rewritten prefill/decode graphs as ONNX, and an ONNX Runtime engine for them.

    from clada_compile.exporters import export_onnx, OrtCladaModel
    out = export_onnx("smollm2", "smollm2-onnx", CladaConfig(top_k_ratio=0.5))
    engine = OrtCladaModel.from_dir(out)
    engine.generate(input_ids, max_new_tokens=64)

Imports are lazy: `import clada_compile` does not import onnx / onnxruntime.
"""

from __future__ import annotations

__all__ = ["export_onnx", "OrtCladaModel", "ExportValidationError", "MANIFEST"]


def __getattr__(name):
    if name in ("export_onnx", "ExportValidationError", "MANIFEST"):
        from . import onnx as _onnx

        return getattr(_onnx, name)
    if name == "OrtCladaModel":
        from .ort import OrtCladaModel

        return OrtCladaModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
