"""Export SmolLM2-135M to ONNX (prefill + decode graphs, thresholds as inputs), load it in ONNX
Runtime, generate dense and CLADA side by side.

    python examples/export_and_run_ort.py [output_dir] [model]

model: "smollm2" (default; the export and its validation take ~4 minutes on 2 cores) or any
load_model() spec (an HF directory, a .gguf).
"""

import sys
import tempfile

from clada_compile import CladaConfig
from clada_compile.calibrate import shipped_profile
from clada_compile.exporters.onnx import export_onnx
from clada_compile.exporters.ort import OrtCladaModel

out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="clada-onnx-")
model = sys.argv[2] if len(sys.argv) > 2 else "smollm2"
config = CladaConfig(profile=shipped_profile(model))
export_onnx(model, out, config, force=True, log=print)  # validated against PyTorch before it lands

engine = OrtCladaModel.from_dir(out, threads=2)  # the recorded config and profile
tok = engine.tokenizer
ids = tok("The history of the city of", return_tensors="pt").input_ids
for name, baseline in (("dense", True), ("clada", False)):
    o = engine.generate(ids, max_new_tokens=32, baseline=baseline)
    print(f"[ort {name}] {o.decode_tokens_per_s:.1f} tok/s, active {o.mean_active_fraction:.2f}: "
          f"{tok.decode(o.sequences[0, ids.shape[1]:], skip_special_tokens=True)!r}")
