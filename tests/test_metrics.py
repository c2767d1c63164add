"""Metric code and the clada-bench / clada-eval / clada-calibrate smoke runs on a tiny model."""

import json
import math

import pytest
import torch

from clada_compile import metrics
from conftest import DATA, graphs_for
from tiny import save_hf_dir


def test_perplexity_of_known_distribution():
    # a uniform model over 8 symbols has perplexity 8
    assert metrics.perplexity([math.log(8)] * 50) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        metrics.perplexity([])


def test_bootstrap_ratio():
    dense = [[1.0] * 10 for _ in range(6)]
    clada = [[1.0 + 0.01] * 10 for _ in range(6)]
    inc, lo, hi = metrics.bootstrap_ratio(dense, clada, reps=200)
    assert inc == pytest.approx(100 * (math.exp(0.01) - 1))
    assert lo == pytest.approx(inc) and hi == pytest.approx(inc)  # identical windows: no spread


def test_rouge_l_and_divergence():
    assert metrics.rouge_l(list("abcd"), list("abcd")) == 1.0
    assert metrics.rouge_l(list("abcd"), list("xyz")) == 0.0
    # LCS("abcde", "ace") = 3: P = 3/3, R = 3/5 -> F1 = 0.75
    assert metrics.rouge_l(list("abcde"), list("ace")) == pytest.approx(0.75)
    assert metrics.first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert metrics.first_divergence([1, 2], [1, 2, 3]) == 2


def test_interleaved_order_and_median():
    calls = []
    vals = {"a": iter([9, 1, 2, 3]), "b": iter([9, 10, 30, 20])}
    fns = {k: (lambda k=k: calls.append(k) or next(vals[k])) for k in vals}
    res = metrics.interleaved(fns, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert res["a"]["raw"] == [1, 2, 3] and res["a"]["median"] == 2
    assert res["b"]["median"] == 20


@pytest.mark.parametrize("allocation,target", [("uniform", 0.63), ("greedy", 0.6)])
def test_calibration_hits_target_on_tiny_model(allocation, target):
    from clada_compile import CladaConfig
    from clada_compile.calibrate import calibrate, profile_taus
    from clada_compile.compiled import CladaModel

    model, graphs = graphs_for("llama")
    cm = CladaModel(model, graphs, CladaConfig(backend="eager"), impl="reference")
    ids = torch.randint(3, 90, (256,))
    prof = calibrate(cm, ids, target_active=target, error_budget=10.0, window=64, allocation=allocation)
    assert prof["allocation"] == allocation
    assert prof["achieved_active"] == pytest.approx(target, abs=0.026)
    if allocation == "uniform":  # every layer exactly on the target, even off the 5% grid
        assert [layer["active_fraction"] for layer in prof["layers"]] == [target] * cm.n_layers
    assert all(0 < layer["tau"] for layer in prof["layers"])
    taus = profile_taus(prof, cm.n_layers)
    cm.set_thresholds(taus)
    # the chosen thresholds keep about the chosen fraction on the calibration text itself
    _, past, _ = cm.prefill(ids[:64].view(1, -1), taus=torch.zeros(2))
    _, _, kept = cm.decode(ids[64:65].view(1, 1), torch.ones(1, 65, dtype=torch.long), past, with_active=True)
    assert 0.2 < float((kept / torch.tensor(cm.k)).mean()) < 1.0


def test_calibration_rejects_unknown_allocation():
    from clada_compile import CladaConfig
    from clada_compile.calibrate import calibrate
    from clada_compile.compiled import CladaModel

    model, graphs = graphs_for("llama")
    cm = CladaModel(model, graphs, CladaConfig(backend="eager"), impl="reference")
    with pytest.raises(ValueError, match="`allocation` must be one of .*got 'even'"):
        calibrate(cm, torch.randint(3, 90, (128,)), 0.5, window=64, allocation="even")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_hf_dir(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.mark.slow
def test_bench_and_eval_smoke(tiny_dir, tmp_path):
    from clada_compile import CladaConfig
    from clada_compile.calibrate import calibrate
    from clada_compile.cli import bench, eval as ev
    from clada_compile.compiled import CladaModel

    text = DATA / "wikitext-2" / "valid.txt"
    torch.manual_seed(0)  # the calibration ids: the active-fraction checks below read one profile
    prof = tmp_path / "p.json"
    model, graphs = graphs_for("llama")  # same weights as tiny_dir (seed 0)
    cm = CladaModel(model, graphs, CladaConfig(backend="eager"), impl="reference")
    prof.write_text(json.dumps(calibrate(cm, torch.randint(3, 90, (256,)), 0.5, 10.0, window=64)))
    out = tmp_path / "bench.json"
    assert bench.main_impl(["--model_path", str(tiny_dir), "--backend", "eager", "--prompt_len", "16",
                            "--new_tokens", "8", "--repeats", "2", "--top_k_ratio", "0.5", "--json", str(out)]) == 0
    b = json.loads(out.read_text())
    # speeds are timings (not checkable here); which engine ran is: the dense runs keep every
    # neuron, the CLADA runs about top_k_ratio of them (k rounds up), one record per repeat
    assert [r["active_fraction"] for r in b["runs"]["dense"]] == [1.0, 1.0]
    assert len(b["runs"]["clada"]) == 2 and 0.45 < b["clada_active_fraction"] < 0.6
    out = tmp_path / "kernel_ab.json"
    assert bench.main_impl(["--model_path", str(tiny_dir), "--backend", "eager", "--prompt_len", "16",
                            "--new_tokens", "8", "--repeats", "2", "--profile", str(prof), "--target_active", "0.5",
                            "--kernel_ab", "--json", str(out)]) == 0
    k = json.loads(out.read_text())["results"]
    assert set(k) == {"dense", "kernel_off", "kernel_on"} and k["dense"]["active_fraction"] == 1.0
    # same thresholds either way: the kernel changes the speed, not what is kept
    out = tmp_path / "profile.json"
    assert bench.main_impl(["--model_path", str(tiny_dir), "--backend", "eager", "--prompt_len", "16",
                            "--new_tokens", "4", "--profile", str(prof), "--target_active", "0.5",
                            "--profile_decode", "--json", str(out)]) == 0
    for r in json.loads(out.read_text())["results"].values():
        # attribution, not timing (profiler times against wall time can flake under load): every
        # bucket found its ops; a shape rule that misses the gate/up, down or lm_head ops leaves it 0
        assert r["steps"] == 4 and r["mlp_down_ms"] > 0 and r["mlp_ms"] > r["mlp_down_ms"] and r["lm_head_ms"] > 0
        assert r["attention_ms"] > 0 and r["attn_proj_ms"] > 0 and r["weight_gb_per_s"] > 0
    with pytest.raises(ValueError, match="--profile_decode with --backend inductor needs --kernel auto, got --kernel reference"):
        bench.main_impl(["--model_path", str(tiny_dir), "--backend", "inductor", "--kernel", "reference", "--profile_decode"])
    assert abs(k["kernel_on"]["active_fraction"] - k["kernel_off"]["active_fraction"]) < 1e-6 < 1 - k["kernel_on"]["active_fraction"]
    out = tmp_path / "eval.json"
    assert ev.main_impl(["--model_path", str(tiny_dir), "--text", str(text), "--windows", "2",
                         "--prompt_tokens", "16", "--continuation_tokens", "8", "--agreement_tokens", "4",
                         "--methods", "griffin,calibrated", "--profile", str(prof), "--json", str(out)]) == 0
    e = json.loads(out.read_text())
    assert e["windows"] == 2 and [r["method"] for r in e["results"]] == ["griffin", "calibrated"]
    griffin, r = e["results"]
    # one dense model on the same windows: every method reports the same baseline
    assert griffin["dense_ppl"] == r["dense_ppl"] and r["scored_tokens"] == 16
    # griffin keeps about top_k_ratio=0.5 (its default), the profile about its target 0.5
    assert 0.45 < griffin["active_fraction"] < 0.6 and abs(r["active_fraction"] - 0.5) < 0.1
    lo, hi = r["ppl_increase_ci95"]
    assert lo <= r["ppl_increase_pct"] <= hi
    assert 0 <= r["greedy_first_divergence_mean"] <= 4 and 0 <= r["greedy_rouge_l_mean"] <= 1


@pytest.mark.slow
def test_sweep_smoke(tiny_dir, tmp_path):
    from clada_compile import CladaConfig
    from clada_compile.calibrate import calibrate
    from clada_compile.cli import bench
    from clada_compile.compiled import CladaModel

    torch.manual_seed(0)  # the calibration ids: the active-fraction checks below read one profile
    prof = tmp_path / "p.json"
    model, graphs = graphs_for("llama")
    cm = CladaModel(model, graphs, CladaConfig(backend="eager"), impl="reference")
    prof.write_text(json.dumps(calibrate(cm, torch.randint(3, 90, (256,)), 0.5, 10.0, window=64)))
    out = tmp_path / "sweep.json"
    text = DATA / "wikitext-2" / "valid.txt"
    assert bench.main_impl(["--model_path", str(tiny_dir), "--backend", "eager", "--sweep", "--text", str(text),
                            "--profile", str(prof), "--sweep_top_k", "0.75,0.5", "--sweep_targets", "0.6",
                            "--sweep_methods", "griffin,paper,calibrated,cats",
                            "--windows", "2", "--prompt_tokens", "16", "--continuation_tokens", "8",
                            "--prompt_len", "16", "--new_tokens", "6", "--repeats", "2", "--json", str(out)]) == 0
    s = json.loads(out.read_text())
    assert [(p["method"], p["value"]) for p in s["points"]] == [
        ("griffin", 0.75), ("griffin", 0.5), ("paper", 0.75), ("paper", 0.5), ("calibrated", 0.6), ("cats", 0.6)]
    point = {(p["method"], p["value"]): p for p in s["points"]}
    for method in ("griffin", "paper"):  # a smaller top_k_ratio keeps fewer neurons, scoring and decoding
        for key in ("eval_active_fraction", "decode_active_fraction"):
            assert point[(method, 0.5)][key] < point[(method, 0.75)][key] < 1.0, (method, key)
    assert abs(point[("calibrated", 0.6)]["eval_active_fraction"] - 0.6) < 0.1
    assert abs(point[("cats", 0.6)]["eval_active_fraction"] - 0.6) < 0.1  # the gate thresholds' target
    for p in s["points"]:
        lo, hi = p["ppl_increase_ci95"]
        assert lo <= p["ppl_increase_pct"] <= hi and len(p["raw_tokens_per_s"]) == 2
        ratios = sorted(a / b for a, b in zip(p["raw_tokens_per_s"], s["dense_raw_tokens_per_s"]))
        assert p["paired_speedup"] == pytest.approx(sum(ratios) / 2)  # the median of two rounds' ratios
    assert out.with_suffix(".png").stat().st_size > 0
    with pytest.raises(ValueError, match="--text"):
        bench.main_impl(["--model_path", str(tiny_dir), "--backend", "eager", "--sweep"])
