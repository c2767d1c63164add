"""clada_compile: CLADA sparse-MLP decoding as FX passes, torch.compile and ONNX Runtime.

    model, tok = clada_compile.load_model("smollm2")
    cm = clada_compile.optimize(model, clada_compile.CladaConfig(profile=clada_compile.shipped_profile("smollm2")))
    out = cm.generate(tok("Hello", return_tensors="pt").input_ids, max_new_tokens=32)

The names below the config are imported on first use (module __getattr__): a deployment that only
runs an ONNX export (clada_compile.exporters.ort) never loads the tracing and pass stack.
"""

__version__ = "0.1.0"

from importlib import import_module

from . import ops  # noqa: F401  (registers the clada:: custom ops)
from .config import CladaConfig

# public name -> the submodule that defines it
_LAZY = {
    "optimize": "compiled",
    "CladaModel": "compiled",
    "shipped_profile": "calibrate",
    "load_model": "models",
    "SUPPORTED_ARCHITECTURES": "models",
    "UnmatchedMLPError": "passes",
}

__all__ = ["optimize", "load_model", "CladaConfig", "CladaModel", "SUPPORTED_ARCHITECTURES",
           "UnmatchedMLPError", "shipped_profile", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # once: later lookups do not come back here
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
