"""The CATS baseline (CladaConfig(mlp_criterion="gate"), arXiv 2404.08763): neuron j is dropped when
|act(gate_j)| < tau, and the GEMV path never reads its up and down rows.

Oracles independent of the passes: the Hugging Face model with its MLP forward replaced by the
textbook CATS MLP (written out below), and the plain-torch formula for the kernel.
"""

from __future__ import annotations

import json

import pytest
import torch

from clada_compile import CladaConfig, kernels
from clada_compile.bench.sweep import sweep_points
from clada_compile.calibrate import apply_profile, calibrate, load_profile, profile_taus
from clada_compile.compiled import CladaModel
from clada_compile.ops import ACTIVATIONS, gemv_gate_mlp
from conftest import graphs_for
from tiny import VOCAB


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _profile(name, tmp_path):
    model, graphs = graphs_for(name)
    ids = torch.randint(0, VOCAB, (512,), generator=torch.Generator().manual_seed(0))
    cal = CladaModel(model, graphs, CladaConfig(backend="eager"), impl="reference")
    prof = calibrate(cal, ids, 0.5, 10.0, 64)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(prof))
    return model, graphs, str(path), prof


# ---- the kernel -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau", [0.0, 0.6, 1e9])
def test_gated_rows_gemv_matches_the_formula(dtype, tau):
    g = torch.Generator().manual_seed(1)
    w, x, a = torch.randn(200, 72, generator=g), torch.randn(1, 72, generator=g), torch.randn(1, 200, generator=g)
    t = torch.tensor([tau])
    y = kernels.gated_rows_gemv(x.to(dtype), w.to(dtype), a.to(dtype), t)
    xf, wf, af = (v.to(dtype).float() for v in (x, w, a))
    want = torch.where(af.abs() >= tau, af * (xf @ wf.t()), torch.zeros(()))
    assert y.dtype == dtype and y.shape == (1, 200)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.5, rtol=1e-2)
    torch.testing.assert_close(y.float(), want, **tol)
    assert ((y == 0) == (af.abs() < tau)).all() or tau == 0.0


def test_gated_rows_gemv_reads_only_kept_rows_and_serves_many_rows():
    w, x, a = torch.randn(300, 64), torch.randn(1, 64), torch.randn(1, 300)
    t = torch.tensor([0.8])
    before = kernels.weight_bytes_read()
    kernels.gated_rows_gemv(x, w, a, t)
    assert kernels.weight_bytes_read() - before == int((a.abs() >= 0.8).sum()) * 64 * 4
    xs, as_ = torch.randn(2, 3, 64), torch.randn(2, 3, 300)  # several rows: the masked formula
    want = torch.where(as_.abs() >= 0.8, as_ * (xs @ w.t()), torch.zeros(()))
    torch.testing.assert_close(kernels.gated_rows_gemv(xs, w, as_, t), want)


def test_gated_rows_gemv_bad_input_names_the_value():
    w, x, a = torch.randn(30, 8), torch.randn(1, 8), torch.randn(1, 30)
    with pytest.raises(ValueError, match=r"`a` must have shape \(\.\.\., M\).*\(1, 29\)"):
        kernels.gated_rows_gemv(x, w, a[:, :29], torch.tensor([0.1]))
    with pytest.raises(ValueError, match="dtypes must match"):
        kernels.gated_rows_gemv(x, w.double(), a, torch.tensor([0.1]))
    with pytest.raises(ValueError, match="`tau` must be a 1-element float32"):
        kernels.gated_rows_gemv(x, w, a, torch.tensor([0.1, 0.2]))


# ---- the graphs ---------------------------------------------------------------------------------


def test_gate_criterion_lowers_every_mlp_and_the_gemv_pass_takes_them(tmp_path):
    model, graphs, path, _ = _profile("llama", tmp_path)
    n = graphs.n_layers
    ref = graphs.decode_for("reference", "gate")
    assert _count(ref.gm, torch.ops.clada.gate_sparse_mlp.default) == n
    assert _count(ref.gm, torch.ops.clada.sparse_mlp.default) == 0
    # the criterion does not change a dense graph (nothing is thresholded)
    assert graphs.decode_for("dense", "gate") is graphs.decode_for("dense")
    cm = CladaModel(model, graphs, CladaConfig(backend="eager", profile=path, mlp_criterion="gate"))
    assert cm.decode_rewrites["sparse_mlp_to_gemv"] == n
    assert _count(cm.decode_graph.gm, gemv_gate_mlp) == n
    assert [k for k in cm.compact[0]] == ["w_g_t", "w_up", "w_down_t"]


def test_gate_criterion_leaves_an_mlp_with_biases_to_the_masked_op(tmp_path):
    """Must-not-match: gemv_gate_mlp has no biases, so llama with mlp_bias keeps the op (which
    still computes CATS, masked)."""
    model, graphs, path, _ = _profile("llama_mlp_bias", tmp_path)
    cm = CladaModel(model, graphs, CladaConfig(backend="eager", profile=path, mlp_criterion="gate"))
    assert cm.decode_rewrites["sparse_mlp_to_gemv"] == 0
    assert _count(cm.decode_graph.gm, torch.ops.clada.gate_sparse_mlp.default) == graphs.n_layers


def test_gate_criterion_on_plain_mlps_is_an_error(tmp_path):
    _, graphs = graphs_for("gpt2")
    with pytest.raises(ValueError, match="'gate' \\(CATS\\) needs gated MLPs.*plain"):
        graphs.decode_for("reference", "gate")


# ---- numerics against HF with the CATS MLP --------------------------------------------------


def _cats_hf_step(model, ids, step, taus):
    """HF: dense prefill of ids, then one step of `step` whose MLPs are CATS (written out here)."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        saved = []
        for i, layer in enumerate(model.model.layers):
            mlp, tau = layer.mlp, float(taus[i])

            def cats(x, mlp=mlp, tau=tau):
                a = mlp.act_fn(mlp.gate_proj(x))
                h = torch.where(a.abs() >= tau, a * mlp.up_proj(x), torch.zeros(()))
                return mlp.down_proj(h)
            saved.append((mlp, mlp.forward))
            mlp.forward = cats
        try:
            return model(step, past_key_values=out.past_key_values, use_cache=True).logits
        finally:
            for mlp, fwd in saved:
                mlp.forward = fwd


@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_gate_criterion_decode_equals_hf_cats(kernel, tmp_path):
    model, graphs, path, prof = _profile("llama", tmp_path)
    cfg = CladaConfig(backend="eager", profile=path, kernel=kernel, mlp_criterion="gate")
    cm = CladaModel(model, graphs, cfg, impl="reference" if kernel == "reference" else None)
    apply_profile(cm, path)
    torch.testing.assert_close(cm.taus, torch.tensor([l["tau"] for l in prof["gate"]["layers"]]))
    assert (cm.taus > 0).all()
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    step = torch.tensor([[7]])
    _, past, _ = cm.prefill(ids, taus=torch.zeros(cm.n_layers))
    logits, _, kept = cm.decode(step, torch.ones(1, 13, dtype=torch.long), past, with_active=True)
    want = _cats_hf_step(model, ids, step, cm.taus)
    torch.testing.assert_close(logits, want, atol=2e-5, rtol=1e-4)
    assert (logits - _cats_hf_step(model, ids, step, torch.zeros(2))).abs().max() > 1e-3
    assert 0 < kept.sum() < sum(cm.k)
    if kernel == "auto":  # the dropped neurons' up and down rows were not read
        d_model = model.config.hidden_size
        before = kernels.weight_bytes_read()
        cm.decode(step, torch.ones(1, 13, dtype=torch.long), past)
        read = kernels.weight_bytes_read() - before
        cm.set_thresholds(torch.zeros(2))
        before = kernels.weight_bytes_read()
        cm.decode(step, torch.ones(1, 13, dtype=torch.long), past)
        dense = kernels.weight_bytes_read() - before
        assert dense - read == int(sum(cm.k) - kept.sum()) * 2 * d_model * 4


def test_gate_criterion_under_inductor_equals_eager(tmp_path):
    model, graphs, path, _ = _profile("llama", tmp_path)
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(5))
    steps = []
    for backend in ("eager", "inductor"):
        cm = CladaModel(model, graphs, CladaConfig(backend=backend, profile=path, mlp_criterion="gate"))
        apply_profile(cm, path)
        _, past, _ = cm.prefill(ids, taus=torch.zeros(cm.n_layers))
        logits = []
        for i, tok in enumerate((5, 9, 11)):
            out, past = cm.decode(torch.tensor([[tok]]), torch.ones(1, 11 + i, dtype=torch.long), past)
            logits.append(out)
        steps.append(torch.cat(logits))
    torch.testing.assert_close(steps[0], steps[1], atol=1e-4, rtol=1e-4)


# ---- calibration, config, sweep ---------------------------------------------------------------


def test_calibration_writes_gate_thresholds_for_gated_mlps_only(tmp_path):
    _, _, _, prof = _profile("llama", tmp_path)
    gate = prof["gate"]
    assert gate["target_active"] == 0.5 and len(gate["layers"]) == 2
    assert all(l["active_fraction"] == 0.5 and l["tau"] > 0 for l in gate["layers"])
    _, _, _, plain = _profile("gpt2", tmp_path)
    assert "gate" not in plain


def test_gate_thresholds_keep_their_target_on_the_calibration_text(tmp_path):
    """Independent of the profile code: the fraction of |act(gate)| >= tau on the text is ~50%."""
    model, graphs, path, prof = _profile("llama", tmp_path)
    ids = torch.randint(0, VOCAB, (512,), generator=torch.Generator().manual_seed(0))
    seen = []
    hooks = [layer.mlp.gate_proj.register_forward_hook(lambda m, a, out: seen.append(out))
             for layer in model.model.layers]
    with torch.no_grad():
        for i in range(0, 512, 64):
            model(ids[i:i + 64].view(1, -1))
    for h in hooks:
        h.remove()
    for i, layer in enumerate(prof["gate"]["layers"]):
        a = torch.cat([ACTIVATIONS["silu"](s[0]) for s in seen[i::2]])
        assert abs(float((a.abs() >= layer["tau"]).float().mean()) - 0.5) < 0.03


def test_gate_criterion_bad_input(tmp_path):
    with pytest.raises(ValueError, match="`mlp_criterion` must be one of 'h', 'gate', got 'up'"):
        CladaConfig(mlp_criterion="up")
    with pytest.raises(ValueError, match="'gate' \\(CATS\\) runs fp32/bf16"):
        CladaConfig(mlp_criterion="gate", precision="int8")
    _, _, path, prof = _profile("llama", tmp_path)
    del prof["gate"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(prof))
    with pytest.raises(ValueError, match="needs a profile with thresholds on act\\(gate\\).*recalibrate"):
        profile_taus(load_profile(old), 2, criterion="gate")


def test_sweep_cats_points_use_the_gate_criterion(tmp_path):
    _, _, path, _ = _profile("llama", tmp_path)
    pts = sweep_points(["cats"], [], [0.6, 0.4], "eager", profile=path)
    assert [(m, v) for m, _, v, _ in pts] == [("cats", 0.6), ("cats", 0.4)]
    assert all(c.mlp_criterion == "gate" and c.sparsify == ("mlp_down",) and c.target_active == v
               for _, _, v, c in pts)
    with pytest.raises(ValueError, match="'cats' needs a profile"):
        sweep_points(["cats"], [], [0.5], "eager")


def test_onnx_export_refuses_the_gate_criterion(tmp_path):
    """The ONNX decode graph thresholds h: a CATS config is refused before any tracing."""
    from clada_compile.exporters.onnx import export_onnx

    with pytest.raises(ValueError, match="the ONNX export thresholds h; `mlp_criterion` 'gate'"):
        export_onnx("smollm2", tmp_path / "out", config=CladaConfig(mlp_criterion="gate"))
    assert not (tmp_path / "out").exists()


def test_gate_criterion_with_bf16_weights_runs_the_kernels_and_tracks_fp32(tmp_path):
    """bf16 weights: the same rewrite, the bf16 kernels, logits within bf16 rounding of the fp32 engine."""
    from clada_compile import optimize
    from tiny import build

    model, graphs, path, _ = _profile("llama", tmp_path)
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    logits = []
    fp32 = CladaModel(model, graphs, CladaConfig(backend="eager", profile=path, mlp_criterion="gate"))
    apply_profile(fp32, path)
    bf16 = optimize(build("llama"), CladaConfig(backend="eager", profile=path, mlp_criterion="gate", precision="bf16"))
    for cm in (fp32, bf16):
        assert cm.decode_rewrites["sparse_mlp_to_gemv"] == graphs.n_layers
        _, past, _ = cm.prefill(ids, taus=torch.zeros(cm.n_layers))
        logits.append(cm.decode(torch.tensor([[7]]), torch.ones(1, 13, dtype=torch.long), past)[0].float())
    assert next(bf16.hf_model.parameters()).dtype == torch.bfloat16
    # measured 0.7% of the largest logit (bf16 weights and activations, fp32 accumulation)
    assert (logits[1] - logits[0]).abs().max() < 0.02 * logits[0].abs().max()
