"""Matched-sparsity adjustment: ablation variants are compared at the same measured active fraction."""

import json

import pytest
import torch

from clada_compile import CladaConfig
from clada_compile.ablation import VARIANTS, matched
from clada_compile.calibrate import calibrate
from clada_compile.compiled import CladaModel
from clada_compile.evaluate import windows
from conftest import graphs_for


@pytest.mark.parametrize("variant", ["static", "cont-both-denser"])
def test_matched_fraction_within_001(variant, tmp_path):
    model, graphs = graphs_for("llama")
    cm = CladaModel(model, graphs, CladaConfig(backend="eager"), impl="reference")
    torch.manual_seed(0)
    ids = torch.randint(3, 90, (1200,))
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps(calibrate(cm, ids[:512], target_active=0.5, error_budget=10.0, window=64)))
    wins = windows(ids[512:], 2, 16, 40)
    base = CladaConfig(backend="eager", top_k_ratio=1.0, profile=str(prof), update_window=5)
    rows, t, active = matched(cm, base, VARIANTS[variant], wins, target=0.45, tol=0.01)
    assert abs(active - 0.45) <= 0.01, (variant, t, active)
    assert len(rows) == 2 and all(len(r["nll"]) == 40 for r in rows)
