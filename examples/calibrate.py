"""Calibrate per-token thresholds on a text, then measure what they cost in perplexity.

    python examples/calibrate.py [target_active]

Calibration reads the first 2048 tokens of data/wikitext-2/valid.txt; the evaluation scores 4
windows of 128 tokens after token 8192 (held out), teacher-forced through the decode path, with a
bootstrap 95% CI. Use >= 16 windows (clada-eval --windows 16) before trusting a difference.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

from clada_compile import CladaConfig, load_model, optimize
from clada_compile.calibrate import calibrate
from clada_compile.data import load_text_tokens
from clada_compile.evaluate import evaluate, windows

torch.set_num_threads(2)
target = float(sys.argv[1]) if len(sys.argv) > 1 else 0.5
text = Path(__file__).resolve().parents[1] / "data" / "wikitext-2" / "valid.txt"
model, tok = load_model("smollm2")
engine = optimize(model, CladaConfig(top_k_ratio=1.0, backend="eager"), tokenizer=tok)
ids = load_text_tokens(text, tok, 16384)

profile = calibrate(engine, ids[:2048], target_active=target, window=256, text_name=str(text), model_name="smollm2")
path = Path(tempfile.mkdtemp()) / "smollm2.profile.json"
path.write_text(json.dumps(profile))
print(f"profile: {path} (mean kept fraction {profile['achieved_active']:.3f})")

clada = engine.with_config(CladaConfig(profile=str(path), target_active=target, backend="eager"))
res, _ = evaluate(clada, windows(ids[8192:], 4, 256, 128))
lo, hi = res["ppl_increase_ci95"]
print(f"perplexity {res['dense_ppl']:.2f} -> {res['ppl']:.2f}: {res['ppl_increase_pct']:+.1f}% "
      f"(95% CI {lo:+.1f}..{hi:+.1f}%) at active fraction {res['active_fraction']:.2f}, {res['scored_tokens']} tokens")
