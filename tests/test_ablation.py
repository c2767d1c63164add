"""Matched-sparsity adjustment: ablation variants are compared at the same measured active fraction."""

import json

import pytest
import torch

from clada_compile import CladaConfig
from clada_compile.bench.ablation import VARIANTS, matched
from clada_compile.evaluate import windows
from conftest import toy_profile


@pytest.mark.parametrize("variant", ["static", "cont-both-denser"])
def test_matched_fraction_within_001(variant, tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(3, 90, (1200,))
    _, cm, prof = toy_profile("llama", ids[:512], tmp_path / "p.json")
    wins = windows(ids[512:], 2, 16, 40)
    base = CladaConfig(backend="eager", top_k_ratio=1.0, profile=prof, update_window=5)
    rows, t, active = matched(cm, base, VARIANTS[variant], wins, target=0.45, tol=0.01)
    assert abs(active - 0.45) <= 0.01, (variant, t, active)
    assert len(rows) == 2 and all(len(r["nll"]) == 40 for r in rows)


def test_ablation_cli(tmp_path):
    from clada_compile.cli import eval as ev
    from conftest import DATA
    from tiny import save_hf_dir

    model_dir = save_hf_dir(tmp_path / "llama")
    prof = toy_profile("llama", torch.randint(3, 90, (512,)), tmp_path / "p.json")[2]  # same weights as model_dir
    out = tmp_path / "abl.json"
    assert ev.main_impl(["--model_path", str(model_dir), "--text", str(DATA / "wikitext-2" / "valid.txt"),
                         "--ablation", "--profile", prof, "--ablation_variants", "and-denser,static",
                         "--ablation_targets", "0.5", "--windows", "2", "--prompt_tokens", "16",
                         "--continuation_tokens", "24", "--update_window", "5", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in res] == ["static", "and-denser"]  # static first: the reference
    assert all(abs(r["active_fraction"] - 0.5) <= 0.01 for r in res)
    assert "vs_static_pct" in res[1] and "vs_static_pct" not in res[0]
    assert out.with_suffix(".png").stat().st_size > 0
    table = out.with_suffix(".md").read_text()
    assert "| and-denser |" in table and "(reference)" in table
