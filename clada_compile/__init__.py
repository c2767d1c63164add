"""clada_compile: CLADA sparse-MLP decoding as FX passes, torch.compile and ONNX Runtime.

    model, tok = clada_compile.load_model("smollm2")
    cm = clada_compile.optimize(model, clada_compile.CladaConfig(profile=clada_compile.shipped_profile("smollm2")))
    out = cm.generate(tok("Hello", return_tensors="pt").input_ids, max_new_tokens=32)
"""

__version__ = "0.1.0"

from . import ops  # noqa: F401  (registers the clada:: custom ops)
from .compiled import CladaModel, optimize
from .calibrate import shipped_profile
from .config import CladaConfig
from .models import SUPPORTED_ARCHITECTURES, load_model
from .passes import UnmatchedMLPError


__all__ = ["optimize", "load_model", "CladaConfig", "CladaModel", "SUPPORTED_ARCHITECTURES",
           "UnmatchedMLPError", "shipped_profile", "__version__"]
