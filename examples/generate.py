"""Load the embedded SmolLM2-135M, optimize it, generate, print tok/s and the active fraction.

    python examples/generate.py ["a prompt"]
"""

import sys

import torch

from clada_compile import CladaConfig, load_model, optimize
from clada_compile.calibrate import shipped_profile

torch.set_num_threads(2)
model, tok = load_model("smollm2")
# the default CLADA operating point: full backbone, calibrated per-token thresholds keeping ~50% of
# each MLP's neurons at the down projection (+1-3% perplexity on WikiText-2, see docs/BENCHMARKS.md)
engine = optimize(model, CladaConfig(profile=shipped_profile("smollm2"), backend="eager"), tokenizer=tok)
prompt = sys.argv[1] if len(sys.argv) > 1 else "The history of the city of"
ids = tok(prompt, return_tensors="pt").input_ids

for name, baseline in (("dense", True), ("clada", False)):
    out = engine.generate(ids, max_new_tokens=48, baseline=baseline, eos_token_id=tok.eos_token_id)
    text = tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"[{name}] {out.decode_tokens_per_s:.1f} tok/s, active fraction {out.mean_active_fraction:.2f}")
    print(f"  {prompt}{text}\n")
