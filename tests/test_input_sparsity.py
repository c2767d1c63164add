"""Input thresholds on every decode projection (issue 13): gate/up input, q/k/v input, o input, lm_head input.

Oracles independent of the passes: the Hugging Face model itself, with forward pre-hooks that zero
the input channels below each threshold (tests below say which module gets which threshold).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import fx

from clada_compile import CladaConfig
from clada_compile.calibrate import apply_profile, calibrate, load_profile, profile_groups
from clada_compile.compiled import CladaModel
from clada_compile.config import INPUT_GROUPS
from clada_compile.ops import gemv_in, gemv_mlp, threshold_input
from clada_compile.passes.projections import attention_projections, threshold_attention_inputs
from conftest import DATA, graphs_for
from tiny import BUILDERS, VOCAB

ARCHITECTURES = list(BUILDERS)


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _profile(name, tmp_path, targets=None):
    """A tiny model calibrated on random tokens: h at 50%, the input groups at `targets`."""
    model, graphs = graphs_for(name)
    ids = torch.randint(0, VOCAB, (512,), generator=torch.Generator().manual_seed(0))
    cal = CladaModel(model, graphs, CladaConfig(backend="eager"), impl="reference")
    targets = {"mlp_in": 0.6, "attn_in": 0.7, "attn_out": 0.7, "lm_head": 0.8} if targets is None else targets
    prof = calibrate(cal, ids, 0.5, 10.0, 64, input_targets=targets)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(prof))
    return model, graphs, str(path), prof


# ---- the pass ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_layer_gets_its_attention_and_mlp_input_thresholds(name, tmp_path):
    """Reference decode graph: one mask per layer for mlp_in, attn_in, attn_out and one on the lm_head
    input (exact counts); the dense graph has none; the GEMV graph folds every one of them into the
    kernel's threshold."""
    model, graphs, path, _ = _profile(name, tmp_path)
    n = graphs.n_layers
    ref = graphs.decode_for("reference")
    assert ref.attention_layers == list(range(n))
    assert _count(ref.gm, threshold_input) == 3 * n + 1
    assert ref.head_thresholded and not graphs.decode_for("dense").head_thresholded
    assert "clada.tau_in" in ref.input_names
    assert _count(graphs.decode_for("dense").gm, threshold_input) == 0
    assert CladaModel(model, graphs, CladaConfig(backend="eager")).impl == "dense"  # no profile: no masks
    cm = CladaModel(model, graphs, CladaConfig(backend="eager", profile=path))
    assert cm.gemv and cm.attention_layers == list(range(n))
    gm = cm.decode_graph.gm
    assert _count(gm, threshold_input) == 0
    assert _count(gm, gemv_in) == 2 * n + 1  # attn_in (q/k/v fused) and attn_out per layer, the lm_head
    assert _count(gm, gemv_mlp) == n


def test_attention_must_not_match_a_layer_with_a_third_input_group():
    """A layer whose non-MLP linears have three distinct inputs is not 'q/k/v then o': left alone."""
    _, graphs = graphs_for("llama")
    src = graphs.fused_decode.gm
    gm = fx.GraphModule(src, copy.deepcopy(src.graph))
    o_proj = next(n for n in gm.graph.nodes if "layers.0.self_attn.o_proj" in str(n.meta.get("nn_module_stack")))
    x, w = o_proj.args[:2]
    with gm.graph.inserting_after(o_proj):
        neg = gm.graph.call_function(torch.ops.aten.neg.default, (x,))
    with gm.graph.inserting_after(neg):
        extra = gm.graph.call_function(torch.ops.aten.linear.default, (neg, w))
    neg.meta.update(x.meta)
    extra.meta.update(o_proj.meta)
    add = next(iter(o_proj.users))
    add.replace_input_with(o_proj, extra)
    gm.graph.lint()
    assert sorted(attention_projections(gm.graph)) == [1]
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default]
    inputs = {n: n.args[0] for n in linears}
    tau_in = next(n for n in gm.graph.nodes if n.op == "placeholder")
    _, count = threshold_attention_inputs(gm, tau_in)
    assert count == 1
    layer = {n: ".layers.0." in str(n.meta.get("nn_module_stack")) for n in linears}
    for n in linears:
        if layer[n] or n.meta.get("nn_module_stack") is None or ".layers." not in str(n.meta["nn_module_stack"]):
            assert n.args[0] is inputs[n]  # layer 0 (and lm_head) untouched
        else:
            assert n.args[0].target is threshold_input and n.args[0].args[0] is inputs[n]


def test_head_must_not_match_when_two_linears_sit_outside_the_layers():
    """The lm_head pattern is 'the one linear outside the decoder layers': a second one (e.g. a
    projection after the final norm) makes it ambiguous, and nothing is rewritten (count 0)."""
    from clada_compile.passes.projections import head_projection, threshold_head_input

    _, graphs = graphs_for("llama")
    src = graphs.fused_decode.gm
    gm = fx.GraphModule(src, copy.deepcopy(src.graph))
    head = head_projection(gm.graph)
    assert head is not None and "lm_head" in str(head.meta.get("nn_module_stack"))
    x = head.args[0]
    with gm.graph.inserting_before(head):
        extra = gm.graph.call_function(torch.ops.aten.linear.default, (x, head.args[1]))
    extra.meta.update(head.meta)  # a second linear outside the layers, also a graph output
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (tuple(out.args[0]) + (extra,),)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    assert head_projection(gm.graph) is None
    tau_in = next(n for n in gm.graph.nodes if n.op == "placeholder")
    before = len(gm.graph.nodes)
    _, count = threshold_head_input(gm, tau_in)
    assert count == 0 and len(gm.graph.nodes) == before


# ---- numerics against Hugging Face with masking hooks ------------------------------------------


def _mask_hook(tau):
    def hook(module, args):
        x = args[0]
        return (torch.where(x.abs() >= tau, x, torch.zeros((), dtype=x.dtype)),) + tuple(args[1:])
    return hook


def _hooked_hf_step(model, ids, step, tau_h, tau_in):
    """HF: dense prefill of ids, then one decode step of `step` with every projection input masked."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        handles = []
        for i, layer in enumerate(model.model.layers):
            att, mlp = layer.self_attn, layer.mlp
            for mod in (att.q_proj, att.k_proj, att.v_proj):
                handles.append(mod.register_forward_pre_hook(_mask_hook(float(tau_in[1, i]))))
            handles.append(att.o_proj.register_forward_pre_hook(_mask_hook(float(tau_in[2, i]))))
            for mod in (mlp.gate_proj, mlp.up_proj):
                handles.append(mod.register_forward_pre_hook(_mask_hook(float(tau_in[0, i]))))
            handles.append(mlp.down_proj.register_forward_pre_hook(_mask_hook(float(tau_h[i]))))
        handles.append(model.lm_head.register_forward_pre_hook(_mask_hook(float(tau_in[3, 0]))))
        try:
            return model(step, past_key_values=out.past_key_values, use_cache=True).logits
        finally:
            for h in handles:
                h.remove()


@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_decode_equals_hf_with_masked_projection_inputs(kernel, tmp_path):
    """Full backbone, the profile's thresholds on h and on every input group: one decode step
    equals HF with the same channels zeroed by hooks (fp32 tolerance); it differs from dense."""
    model, graphs, path, _ = _profile("llama", tmp_path)
    cfg = CladaConfig(backend="eager", profile=path, kernel=kernel)
    cm = CladaModel(model, graphs, cfg, impl="reference" if kernel == "reference" else None)
    apply_profile(cm, path)
    assert cm.gemv == (kernel == "auto")
    assert (cm.input_taus > 0).all() and (cm.taus > 0).all()
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    step = torch.tensor([[7]])
    _, past, _ = cm.prefill(ids, taus=torch.zeros(cm.n_layers))
    logits, _ = cm.decode(step, torch.ones(1, 13, dtype=torch.long), past)
    want = _hooked_hf_step(model, ids, step, cm.taus, cm.input_taus)
    torch.testing.assert_close(logits, want, atol=2e-5, rtol=1e-4)
    if kernel == "auto":  # the dropped channels' weight rows were not read (the kernel's own counter)
        from clada_compile.kernels import weight_bytes_read

        matrices = sum(p.numel() * 4 for p in model.parameters() if p.dim() == 2)
        matrices -= model.get_input_embeddings().weight.numel() * 4
        read = []
        for taus, tau_in in ((torch.zeros(2), torch.zeros(4, 2)), (cm.taus.clone(), cm.input_taus.clone())):
            cm.set_thresholds(taus)
            cm.set_input_thresholds(tau_in)
            before = weight_bytes_read()
            cm.decode(step, torch.ones(1, 13, dtype=torch.long), past)
            read.append(weight_bytes_read() - before)
        assert read[0] == matrices  # dense: every projection matrix once (lm_head untied)
        assert read[1] < 0.85 * matrices
    dense = _hooked_hf_step(model, ids, step, torch.zeros(2), torch.zeros(4, 2))
    assert (logits - dense).abs().max() > 1e-3


def test_calibrated_input_thresholds_keep_their_target_fraction(tmp_path):
    """On the calibration text, the q/k/v input and the lm_head input keep ~their target fractions
    of channels (measured by hooks on HF's q_proj and lm_head, independent of the calibrator)."""
    model, graphs, path, prof = _profile("llama", tmp_path, {"attn_in": 0.6, "lm_head": 0.75})
    assert profile_groups(prof) == ("mlp_down", "attn_in", "lm_head")
    seen = {"q": [], "head": []}
    hooks = [model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen["q"].append(a[0])),
             model.lm_head.register_forward_pre_hook(lambda m, a: seen["head"].append(a[0]))]
    ids = torch.randint(0, VOCAB, (512,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in range(0, 512, 64):
            model(ids[i:i + 64].view(1, -1))
    for h in hooks:
        h.remove()
    for key, group, layer, want in (("q", "attn_in", 1, 0.6), ("head", "lm_head", 0, 0.75)):
        x = torch.cat(seen[key]).reshape(-1, seen[key][0].shape[-1])
        tau = prof["inputs"][group]["layers"][layer]["tau"]
        kept = (x.abs() >= tau).float().mean().item()
        assert kept == pytest.approx(want, abs=0.03), group


def test_parallel_scorer_equals_generation_with_a_scaling_schedule(tmp_path):
    """The controller scales the input thresholds like h's: teacher-forced scoring in one call per
    round (evaluate.score_parallel) equals step-by-step generation under the clada schedule."""
    from clada_compile.evaluate import score

    model, graphs, path, _ = _profile("llama", tmp_path)
    cfg = CladaConfig(backend="eager", profile=path, schedule="clada", high_load_scale=0.25, low_load_scale=2.0,
                      update_window=4)
    cm = CladaModel(model, graphs, cfg)
    apply_profile(cm, path)
    ids = torch.randint(3, VOCAB, (120,), generator=torch.Generator().manual_seed(5))
    wins = [(ids[i:i + 16], ids[i + 16:i + 40]) for i in (0, 50)]
    par = score(cm, wins, scorer="parallel")
    seq = score(cm, wins, scorer="sequential")
    for a, b in zip(par, seq):
        assert a["nll"] == pytest.approx(b["nll"], abs=1e-4)
        assert a["active"] == pytest.approx(b["active"], abs=1e-6)
    # the input thresholds matter here: without them the NLLs change
    off = cm.with_config(cfg.replace(sparsify=("mlp_down",)))
    assert score(off, wins[:1], scorer="parallel")[0]["nll"] != pytest.approx(par[0]["nll"], abs=1e-4)


def test_input_active_retargets_along_the_curve(tmp_path):
    model, graphs, path, prof = _profile("llama", tmp_path)
    base = CladaModel(model, graphs, CladaConfig(backend="eager", profile=path))
    apply_profile(base, path)
    denser = CladaModel(model, graphs, CladaConfig(backend="eager", profile=path, input_active={"attn_in": 0.9}))
    apply_profile(denser, path)
    assert (denser.input_taus[1] < base.input_taus[1]).all()  # keeping more channels: lower thresholds
    torch.testing.assert_close(denser.input_taus[[0, 2, 3]], base.input_taus[[0, 2, 3]])
    # the lm_head row: one threshold (the profile has one entry), the same in every column
    assert len(prof["inputs"]["lm_head"]["layers"]) == 1 and (base.input_taus[3] == base.input_taus[3, 0]).all()
    head = CladaModel(model, graphs, CladaConfig(backend="eager", profile=path, input_active={"lm_head": 0.95}))
    apply_profile(head, path)
    assert (head.input_taus[3] < base.input_taus[3]).all() and (head.input_taus[3] == head.input_taus[3, 0]).all()
    only_h = CladaModel(model, graphs, CladaConfig(backend="eager", profile=path, sparsify=("mlp_down",)))
    apply_profile(only_h, path)
    assert not only_h.input_taus.any() and only_h.taus.any()


# ---- profiles and bad input ----------------------------------------------------------------------


def test_format_1_profiles_still_load_as_h_only(tmp_path):
    from clada_compile.calibrate import shipped_profile

    prof = load_profile(shipped_profile("smollm2"))
    groups = profile_groups(prof)
    assert groups[0] == "mlp_down" and set(groups) <= {"mlp_down", *INPUT_GROUPS}
    v1 = {k: v for k, v in prof.items() if k != "inputs"}
    v1["format"] = "clada-profile/1"
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    assert profile_groups(load_profile(tmp_path / "v1.json")) == ("mlp_down",)


def test_bad_thresholds_and_groups_are_clear_errors(tmp_path):
    model, graphs, path, _ = _profile("llama", tmp_path, {"mlp_in": 0.7})
    cm = CladaModel(model, graphs, CladaConfig(backend="eager", profile=path))
    with pytest.raises(ValueError, match=r"input thresholds must have shape \(4, 2\)"):
        cm.set_input_thresholds(torch.zeros(2))
    with pytest.raises(ValueError, match="finite and >= 0"):
        cm.set_input_thresholds(torch.full((4, 2), -1.0))
    with pytest.raises(ValueError, match="finite and >= 0"):
        cm.set_input_thresholds(torch.full((4, 2), float("nan")))
    per_layer_head = torch.zeros(4, 2)
    per_layer_head[3] = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match=r"'lm_head' row .* one value in every column.*\[0.1"):
        cm.set_input_thresholds(per_layer_head)
    dense_engine = CladaModel(model, graphs, CladaConfig(backend="eager"))  # no profile: the dense graph
    with pytest.raises(ValueError, match=r"> 0 for \['attn_in', 'lm_head'\].*a dense engine"):
        dense_engine.set_input_thresholds(torch.full((4, 2), 0.1) * torch.tensor([[0.0], [1.0], [0.0], [1.0]]))
    with pytest.raises(ValueError, match=r"`sparsify` names \['attn_in'\].*recalibrate"):
        apply_profile(CladaModel(model, graphs, CladaConfig(backend="eager", profile=path,
                                                            sparsify=("mlp_down", "attn_in"))), path)
    with pytest.raises(ValueError, match=r"`input_active` sets \['attn_out'\]"):
        apply_profile(CladaModel(model, graphs, CladaConfig(backend="eager", profile=path,
                                                            input_active={"attn_out": 0.5})), path)
    wrong = json.loads(open(path).read())
    wrong["n_layers"] = 3
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match="the profile is for 3 layers, the model has 2"):
        apply_profile(cm, tmp_path / "wrong.json")
    no_attn = CladaModel(model, graphs, CladaConfig(backend="eager", profile=path))
    no_attn.attention_layers = [1]  # as for a model whose layer 0 attention did not match
    _, _, path2, _ = _profile("llama", tmp_path, {"attn_in": 0.7})
    with pytest.raises(ValueError, match=r"layers \[0\] of this llama model have no matched attention"):
        apply_profile(no_attn, path2)
    with pytest.raises(ValueError, match="per-token `input_taus` must have shape"):
        ids = torch.ones(1, 3, dtype=torch.long)
        _, past, _ = cm.prefill(ids)
        cm.decode(ids[:, :1], torch.ones(1, 4, dtype=torch.long), past, input_taus=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="unknown input group 'mlp_down'"):
        calibrate(cm, torch.zeros(128, dtype=torch.long), window=64, input_targets={"mlp_down": 0.5})
    for bad, msg in [(dict(sparsify="mlp_in"), "must be a tuple"), (dict(sparsify=("mlp",)), "must be one of"),
                     (dict(input_active={"mlp_in": 0.0}), r"must be in \(0, 1\]"),
                     (dict(sparsify=("mlp_down",), input_active={"attn_in": 0.5}), "leaves off")]:
        with pytest.raises(ValueError, match=msg):
            CladaConfig(**bad)


def test_clada_calibrate_cli_writes_input_groups(tmp_path, capsys, smollm2):
    """The CLI on the real model (few tokens): a format-2 profile with the requested groups."""
    from clada_compile.cli.calibrate import main_impl

    out = tmp_path / "p.json"
    assert main_impl(["--text", str(DATA / "wikitext-2" / "valid.txt"), "--tokens", "256", "--window", "128",
                      "--inputs", "mlp_in=0.8,attn_in=0.7,lm_head=0.9", "--output", str(out)]) == 0
    prof = load_profile(out)
    assert prof["format"] == "clada-profile/2"
    assert profile_groups(prof) == ("mlp_down", "mlp_in", "attn_in", "lm_head")
    assert [layer["active_fraction"] for layer in prof["inputs"]["attn_in"]["layers"]] == [0.7] * 30
    assert [layer["active_fraction"] for layer in prof["inputs"]["lm_head"]["layers"]] == [0.9]  # one lm_head
    assert "mlp_in: keeps 0.80" in capsys.readouterr().out
    assert out.stat().st_mode & 0o044 == 0o044  # an ordinary readable file (mkstemp would make it 0600)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    for bad, msg in (("mlp_in=0.8,attn", "expected GROUP=FRACTION"), ("mlp_down=0.5", "unknown input group"),
                     ("attn_out=1.5", r"must be in \(0, 1\]")):
        with pytest.raises(ValueError, match=msg):
            main_impl(["--text", "x.txt", "--inputs", bad, "--output", str(out)])


def test_cli_flags_reach_the_config():
    import argparse

    from clada_compile.cli.common import add_clada_flags, add_model_flags, config_from_args

    p = argparse.ArgumentParser()
    add_model_flags(p)
    add_clada_flags(p)
    args = p.parse_args(["--profile", "p.json", "--sparsify", "attn_in, mlp_down", "--input_active", "attn_in=0.75"])
    cfg = config_from_args(args)
    assert cfg.sparsify == ("mlp_down", "attn_in") and cfg.input_active == (("attn_in", 0.75),)
    assert cfg.target_active is None  # the profile's own target
    with pytest.raises(ValueError, match="expected GROUP=FRACTION"):
        config_from_args(p.parse_args(["--input_active", "attn_in"]))
    with pytest.raises(ValueError, match="leaves off"):
        config_from_args(p.parse_args(["--sparsify", "mlp_down", "--input_active", "mlp_in=0.8"]))
