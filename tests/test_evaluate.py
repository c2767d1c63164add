"""The parallel teacher-forced scorer gives the sequential decode path's numbers."""

import pytest
import torch

from clada_compile import CladaConfig
from clada_compile.compiled import CladaModel
from clada_compile.evaluate import score, score_parallel, windows
from conftest import graphs_for, toy_profile

# (architecture, config overrides): the controller's step and continuous schedules, a partial
# backbone, and OPT, whose MLP sees its tokens flattened to (B*S, d)
CASES = [
    ("llama", dict(schedule="static")),
    ("llama", dict(schedule="clada", load_signal="both", high_load_scale=0.5, low_load_scale=1.3)),
    ("llama", dict(schedule="clada", load_signal="entropy", high_load_scale=1.3, low_load_scale=0.5)),
    ("llama", dict(schedule="continuous", load_signal="surprisal", high_load_scale=0.5, low_load_scale=1.3)),
    ("llama", dict(schedule="clada", top_k_ratio=0.6, min_active_neurons=4)),
    ("opt", dict(schedule="clada", load_signal="entropy", high_load_scale=0.5, low_load_scale=1.3)),
    # the CATS baseline: the kernels' single-row path (sequential) vs the masked per-token path (parallel)
    ("llama", dict(schedule="clada", load_signal="both", high_load_scale=0.5, low_load_scale=1.3,
                   mlp_criterion="gate")),
]


@pytest.mark.parametrize("arch,over", CASES)
def test_parallel_matches_sequential(arch, over, tmp_path):
    torch.manual_seed(1)
    ids = torch.randint(3, 90, (900,))
    _, cm, prof = toy_profile(arch, ids[:512], tmp_path / "p.json")
    wins = windows(ids[512:], 2, 12, 30)
    cfg = CladaConfig(backend="eager", top_k_ratio=1.0, profile=prof, update_window=5).replace(**over)
    eng = cm.with_config(cfg)
    seq = score(eng, wins, scorer="sequential")
    par = score_parallel(eng, wins)
    for s, p in zip(seq, par):
        assert torch.allclose(torch.tensor(s["nll"]), torch.tensor(p["nll"]), atol=1e-4), (arch, over)
        assert abs(s["active"] - p["active"]) < 1e-6, (s["active"], p["active"])
    # the thresholds bite (not a dense run in disguise), and the controller needed more than one round
    assert all(p["active"] < 0.95 for p in par)
    if over.get("schedule", "static") != "static":
        assert max(p["rounds"] for p in par) > 1


def test_dense_baseline_and_dispatch(tmp_path):
    model, graphs = graphs_for("llama")
    cm = CladaModel(model, graphs, CladaConfig(backend="eager", top_k_ratio=0.5, min_active_neurons=4),
                    impl="reference")
    wins = windows(torch.randint(3, 90, (200,)), 2, 10, 20)
    cache = {}
    d_par = score(cm, wins, baseline=True, cache=cache)
    assert len(cache) == 2  # prompt prefills shared by later configurations
    d_seq = score(cm, wins, baseline=True, scorer="sequential")
    for s, p in zip(d_seq, d_par):
        assert torch.allclose(torch.tensor(s["nll"]), torch.tensor(p["nll"]), atol=1e-4)
        assert p["active"] == pytest.approx(1.0)
    resel = cm.with_config(cm.config.replace(reselect=True, schedule="clada"))
    with pytest.raises(ValueError, match="re-selection"):
        score(resel, wins, scorer="parallel")
    with pytest.raises(ValueError, match="scorer"):
        score(cm, wins, scorer="fast")


def test_per_token_taus_shape_is_checked():
    model, graphs = graphs_for("llama")
    cm = CladaModel(model, graphs, CladaConfig(backend="eager"), impl="reference")
    ids = torch.randint(3, 90, (1, 6))
    _, past, _ = cm.prefill(ids[:, :4])
    with pytest.raises(ValueError, match=r"per-token `taus` must have shape \(2, 1, 2\)"):
        cm.decode(ids[:, 4:], torch.ones(1, 6, dtype=torch.long), past, taus=torch.zeros(2, 3))


def test_eval_calibrated_method_defaults_to_the_shipped_profile():
    """`clada-eval --methods calibrated` without --profile uses the model's shipped profile, as the
    other commands do; with --profile none (or a model without one) it is a clear error."""
    import argparse

    from clada_compile.calibrate import shipped_profile
    from clada_compile.cli.common import add_clada_flags, add_model_flags, config_from_args
    from clada_compile.cli.eval import method_configs

    p = argparse.ArgumentParser()
    add_model_flags(p)
    add_clada_flags(p)
    p.add_argument("--methods", default="calibrated")
    args = p.parse_args(["--model_path", "smollm2"])
    assert method_configs(args, config_from_args(args))["calibrated"].profile == shipped_profile("smollm2")
    args = p.parse_args(["--model_path", "smollm2", "--profile", "none"])
    with pytest.raises(ValueError, match="needs a profile: --profile FILE.*--profile none turned it off"):
        method_configs(args, config_from_args(args))
