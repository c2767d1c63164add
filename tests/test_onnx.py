"""ONNX export (validated against PyTorch) and the ONNX Runtime engine (OrtCladaModel).

Two tiny exports serve the whole module (tiny Llama, and tiny GPT-2 in low-memory mode written
over an existing directory with force=True); each takes ~30-50 s on 2 cores.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort  # a hard dependency of clada_compile (pyproject)
import pytest
import torch

from clada_compile import CladaConfig
from clada_compile.compiled import CladaModel
from clada_compile.exporters.onnx import MANIFEST, TOLERANCE, export_onnx
from clada_compile.exporters.ort import OrtCladaModel
from conftest import graphs_for
from tiny import VOCAB, build

CONFIG = CladaConfig(top_k_ratio=0.5, backend="eager")


def _tiny_profile(path, taus=(0.05, 0.1)):
    """A calibration profile for the 2-layer tiny models (the format clada-calibrate writes)."""
    layers = [{"layer": i, "tau": t, "active_fraction": 0.5, "rel_error": 0.1,
               "curve": [{"active_fraction": 1.0, "tau": 0.0}, {"active_fraction": 0.5, "tau": t}]}
              for i, t in enumerate(taus)]
    path.write_text(json.dumps({"format": "clada-profile/1", "n_layers": len(taus), "target_active": 0.5,
                                "achieved_active": 0.5, "layers": layers}))
    return str(path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx")
    config = CONFIG.replace(profile=_tiny_profile(tmp / "profile.json"))
    return export_onnx(build("llama"), tmp / "llama", config)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "gpt2"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    return export_onnx(build("gpt2"), out, CONFIG, force=True, low_memory=True)


def _manifest(path):
    return json.loads((path / MANIFEST).read_text())


def _shape(v):
    return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]


# ---- export ---------------------------------------------------------------------------------


def test_llama_export_validated_and_manifest(llama_dir):
    m = _manifest(llama_dir)
    assert {"prefill.onnx", "decode.onnx", "mlp_weights.safetensors", MANIFEST} <= {p.name for p in llama_dir.iterdir()}
    assert m["format"] == "clada-onnx" and m["architecture"] == "llama"
    assert m["n_layers"] == 2 and m["d_ff"] == [80, 80] and m["k"] == [40, 40] and m["d_model"] == 48
    assert m["top_k_ratio"] == 0.5 and m["opset"] == 18 and m["precision"] == "fp32"
    assert m["versions"]["clada_compile"] and m["low_memory"] is None
    assert [layer["tau"] for layer in m["profile"]["layers"]] == [0.05, 0.1]
    assert m["files"]["profile"] == "profile.json" and (llama_dir / "profile.json").is_file()
    assert m["input_groups"] == ["mlp_in", "attn_in", "attn_out", "lm_head"] and m["attention_layers"] == [0, 1]
    assert m["head_thresholded"] is True
    # the same names as the rewritten graphs
    _, graphs = graphs_for("llama")
    assert m["prefill"] == {"inputs": graphs.prefill.input_names, "outputs": graphs.prefill.output_names}
    assert m["decode"] == {"inputs": graphs.decode.input_names, "outputs": graphs.decode.output_names}
    # validation ran inside the export: every output within the fp32 tolerance
    diffs = m["validation"]["max_abs_diff"]
    assert set(diffs["prefill"]) == set(graphs.prefill.output_names)
    assert set(diffs["decode"]) == set(graphs.decode.output_names)
    assert max(max(d.values()) for d in diffs.values()) <= TOLERANCE["fp32"]
    # the full MLP weights for re-selection: exactly the model's
    from safetensors.torch import load_file

    w = load_file(str(llama_dir / "mlp_weights.safetensors"))
    mlp = build("llama").model.layers[1].mlp
    torch.testing.assert_close(w["1.w_in"], mlp.gate_proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(w["1.w_up"], mlp.up_proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(w["1.w_down"], mlp.down_proj.weight, rtol=0, atol=0)


def test_io_names_and_dynamic_axes(llama_dir):
    import onnx

    pre = onnx.load(str(llama_dir / "prefill.onnx"), load_external_data=False).graph
    dec = onnx.load(str(llama_dir / "decode.onnx"), load_external_data=False).graph
    pre_in = {i.name: _shape(i) for i in pre.input}
    dec_in = {i.name: _shape(i) for i in dec.input}
    dec_out = {o.name: _shape(o) for o in dec.output}
    assert pre_in["input_ids"] == ["batch", "seq"] and pre_in["clada.tau"] == [2]
    assert [o.name for o in pre.output][:3] == ["logits", "present.0.key", "present.0.value"]
    assert "clada.scores.1" in {o.name for o in pre.output}
    for name in ("input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.1.value"):
        assert name in dec_in, name
    assert dec_in["attention_mask"] == ["batch", "total"]
    assert dec_in["past_key_values.0.key"] == ["batch", 2, "past", 12]
    assert dec_in["clada.0.w_in"] == ["k0", 48] and dec_in["clada.1.w_down_t"] == ["k1", 48]
    assert dec_out["present.1.value"] == ["batch", 2, "past + seq", 12]
    assert dec_out["clada.active.0"] == []
    assert dec_in["clada.tau_in"] == [4, 2]  # (input groups, layers)


def test_plain_onnxruntime_session_is_the_dense_model(llama_dir):
    """A plain InferenceSession, no clada_compile: full weights as the decode inputs (top_k_ratio=1),
    tau = 0, reproduces the Hugging Face model's logits (the recipe in docs/ONNX.md)."""
    from safetensors.numpy import load_file

    model = build("llama")
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    pre = ort.InferenceSession(str(llama_dir / "prefill.onnx"))
    dec = ort.InferenceSession(str(llama_dir / "decode.onnx"))
    w = load_file(str(llama_dir / "mlp_weights.safetensors"))
    n = 2
    p = ids[:, :8].numpy()
    ones = np.ones_like(p)
    out = pre.run(None, {"input_ids": p, "attention_mask": ones, "position_ids": np.arange(8)[None],
                         "clada.tau": np.zeros(n, np.float32), "clada.score_mask": ones})
    np.testing.assert_allclose(out[0], ref[:, :8], atol=1e-4, rtol=0)
    feed = {"input_ids": ids[:, 8:].numpy(), "attention_mask": np.ones((1, 9), np.int64),
            "position_ids": np.array([[8]]), "clada.tau": np.zeros(n, np.float32),
            "clada.tau_in": np.zeros((4, n), np.float32)}
    for i in range(n):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = out[1 + 2 * i], out[2 + 2 * i]
        feed[f"clada.{i}.w_in"] = w[f"{i}.w_in"]
        feed[f"clada.{i}.w_up"] = w[f"{i}.w_up"]
        feed[f"clada.{i}.w_down_t"] = np.ascontiguousarray(w[f"{i}.w_down"].T)
    step = dec.run(["logits"], feed)[0]
    np.testing.assert_allclose(step[:, 0], ref[:, 8], atol=1e-4, rtol=0)


def test_gpt2_low_memory_export_with_force(gpt2_dir):
    assert not (gpt2_dir / "stale.txt").exists(), "--force must replace the directory"
    m = _manifest(gpt2_dir)
    assert m["architecture"] == "gpt2" and m["low_memory"]["bits"] == 8
    # the full-precision graphs were validated before quantization
    assert max(max(d.values()) for d in m["validation"]["max_abs_diff"].values()) <= TOLERANCE["fp32"]
    lm = m["validation"]["low_memory"]
    assert lm["max_abs_diff"]["decode"]["logits"] < 0.5
    assert m["file_sizes"]["prefill.onnx"] < m["file_sizes_fp"]["prefill.onnx"]
    assert m["file_sizes"]["mlp_weights.safetensors"] < m["file_sizes_fp"]["mlp_weights.safetensors"]
    import onnx

    ops = {n.op_type for n in onnx.load(str(gpt2_dir / "prefill.onnx")).graph.node}
    assert "MatMulNBits" in ops
    # the compacted-weight decode inputs stay float: re-selection still works
    engine = OrtCladaModel.from_dir(gpt2_dir)
    model, graphs = graphs_for("gpt2")
    torch_engine = CladaModel(model, graphs, CONFIG)
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(5))
    ref = torch_engine(ids)
    got = engine(ids)
    assert (got - ref).abs().max() <= 0.15 * ref.abs().max()
    engine.set_active(0, torch.arange(engine.k[0]) * 2)
    assert engine.generate(ids, max_new_tokens=4).new_tokens == 4


def test_refuses_to_overwrite_without_force(llama_dir, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in llama_dir.iterdir()}
    with pytest.raises(FileExistsError, match="--force"):
        export_onnx(build("llama"), llama_dir, CONFIG)
    from clada_compile.cli.export import main_impl

    assert main_impl(["--onnx", "--model_path", "smollm2", "--output", str(llama_dir)]) == 2
    assert "--force" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in llama_dir.iterdir()} == before


def test_cli_needs_the_format_flag(tmp_path, capsys):
    from clada_compile.cli.common import run_cli
    from clada_compile.cli.export import main_impl

    assert run_cli(main_impl, ["--output", str(tmp_path / "x")]) == 2
    assert "--onnx" in capsys.readouterr().err


def test_cli_takes_every_clada_flag_it_lists(tmp_path, capsys):
    """--sparsify, --input_active and --mlp_criterion reach the config (they were once ignored):
    a bad or unexportable value is refused before anything is loaded or written."""
    from clada_compile.cli.common import run_cli
    from clada_compile.cli.export import main_impl

    out = tmp_path / "x"
    for flags, message in ((["--sparsify", "mlp_up"], "`sparsify` must be one of"),
                           (["--input_active", "mlp_in=1.5"], "`input_active['mlp_in']` must be in (0, 1]"),
                           (["--mlp_criterion", "gate"], "the ONNX export thresholds h")):
        assert run_cli(main_impl, ["--onnx", "--model_path", "smollm2", "--output", str(out), *flags]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


# ---- loading errors -------------------------------------------------------------------------


def test_truncated_onnx_and_missing_manifest_are_clear(llama_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(llama_dir, bad)
    data = (bad / "decode.onnx").read_bytes()
    (bad / "decode.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"decode\.onnx.*truncated or corrupt.*--force"):
        OrtCladaModel.from_dir(bad)
    (bad / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match=r"clada\.json not found.*--force"):
        OrtCladaModel.from_dir(bad)


def test_manifest_with_wrong_n_layers_blames_the_manifest(llama_dir, tmp_path):
    """n_layers disagreeing with the manifest's own per-layer lists is the export's fault: the error
    names clada.json and the re-export, not the (correct) calibration profile shipped with it."""
    for n in (1, 3):
        bad = tmp_path / f"n{n}"
        shutil.copytree(llama_dir, bad)
        m = _manifest(bad)
        m["n_layers"] = n
        (bad / MANIFEST).write_text(json.dumps(m))
        with pytest.raises(ValueError, match=rf"clada\.json is inconsistent: n_layers is {n}, but it lists 2 d_ff "
                                             r"entries.*--force") as err:
            OrtCladaModel.from_dir(bad)
        assert "profile" not in str(err.value)


def test_cuda_requested_but_missing(llama_dir):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(RuntimeError, match=r"CUDAExecutionProvider was requested but onnxruntime reports only "
                                           r"\[.*\]; install onnxruntime-gpu \(pip install clada_compile\[gpu\]"):
        OrtCladaModel.from_dir(llama_dir, providers=["CUDAExecutionProvider"])


# ---- the ORT engine against the torch engine ------------------------------------------------


def test_greedy_generation_matches_torch_engine(llama_dir):
    """16 greedy steps with selection and re-selection: same tokens, same re-selection events."""
    cfg = CONFIG.replace(reselect=True, update_window=4, surprisal_threshold=0.5, entropy_threshold=0.5)
    engine = OrtCladaModel.from_dir(llama_dir, config=cfg)
    model, graphs = graphs_for("llama")
    torch_engine = CladaModel(model, graphs, cfg)
    assert engine.k == torch_engine.k == [40, 40]
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    a = engine.generate(ids, max_new_tokens=16)
    b = torch_engine.generate(ids, max_new_tokens=16)
    assert a.sequences.tolist() == b.sequences.tolist()
    assert a.events == b.events and a.events > 0, "the test should exercise re-selection"
    assert [r["reselect"] for r in a.records] == [r["reselect"] for r in b.records]
    assert [r["active_fraction"] for r in a.records] == pytest.approx([r["active_fraction"] for r in b.records])
    assert all((x == y).all() for x, y in zip(engine.active, torch_engine.active))
    # batch of two, dense baseline through the same sessions
    ids2 = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    assert engine.generate(ids2, max_new_tokens=6).sequences.tolist() == \
        torch_engine.generate(ids2, max_new_tokens=6).sequences.tolist()
    dense = engine.generate(ids, max_new_tokens=8, baseline=True)
    assert dense.sequences.tolist() == torch_engine.generate(ids, max_new_tokens=8, baseline=True).sequences.tolist()
    assert engine.dense().k == [80, 80]


def _prefilled_pair(engine, seed):
    """(torch reference engine, ORT past, torch past, step, mask): both engines prefilled on the
    same 10 random tokens with their backbones selected, ready for one decode step."""
    model, graphs = graphs_for("llama")
    torch_engine = CladaModel(model, graphs, engine.config.replace(kernel="reference", backend="eager"))
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(seed))
    zero = torch.zeros(2)
    _, past, scores = engine.prefill(ids, taus=zero)
    _, tpast, tscores = torch_engine.prefill(ids, taus=zero)
    engine.select(scores)
    torch_engine.select(tscores)
    return torch_engine, past, tpast, ids[:, -1:], torch.ones(1, 11, dtype=torch.long), scores


def test_thresholds_and_kept_counts_match_torch(llama_dir):
    """The export's profile sets the base thresholds; the per-token threshold (a profile and
    target_active < 1) gives the same masked logits and kept counts as torch, no new session."""
    engine = OrtCladaModel.from_dir(llama_dir)  # the recorded config + the export's profile.json
    assert engine.config.uses_threshold and engine.taus.tolist() == pytest.approx([0.05, 0.1])
    torch_engine, past, tpast, step, mask, scores = _prefilled_pair(engine, 4)
    for taus in ([0.0, 0.0], [0.05, 0.1]):
        engine.set_thresholds(taus)
        torch_engine.set_thresholds(taus)
        logits, _, kept = engine.decode(step, mask, past, with_active=True)
        tlogits, _, tkept = torch_engine.decode(step, mask, tpast, with_active=True)
        torch.testing.assert_close(logits, tlogits, atol=1e-4, rtol=0)
        assert kept.tolist() == tkept.tolist()
        if taus[0] == 0:
            dense_logits = logits
            assert kept.tolist() == [40, 40]
    assert kept.max() < 40 and (logits - dense_logits).abs().max() > 1e-4
    # without a profile the threshold is off (as in CladaModel): decode runs the whole backbone
    plain = OrtCladaModel.from_dir(llama_dir, config=CONFIG)
    plain.select(scores)
    plain.set_thresholds([0.05, 0.1])
    torch.testing.assert_close(plain.decode(step, mask, past)[0], dense_logits, atol=1e-6, rtol=0)


def test_input_thresholds_match_torch(llama_dir):
    """The decode graph's clada.tau_in thresholds the MLP, attention and lm_head inputs as the torch
    reference engine does (same logits and kept counts), and changes the logits."""
    engine = OrtCladaModel.from_dir(llama_dir)
    torch_engine, past, tpast, step, mask, _ = _prefilled_pair(engine, 6)
    model, graphs = graphs_for("llama")
    outs = []
    for tau_in in (torch.zeros(4, 2), torch.tensor([[0.3, 0.4], [0.5, 0.5], [0.05, 0.1], [0.4, 0.4]])):
        for e in (engine, torch_engine):
            e.set_thresholds([0.05, 0.1])
            e.set_input_thresholds(tau_in)
        logits, _, kept = engine.decode(step, mask, past, with_active=True)
        tlogits, _, tkept = torch_engine.decode(step, mask, tpast, with_active=True)
        torch.testing.assert_close(logits, tlogits, atol=1e-4, rtol=0)
        assert kept.tolist() == tkept.tolist()
        outs.append(logits)
    assert (outs[0] - outs[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="input thresholds must have shape"):
        engine.set_input_thresholds(torch.zeros(2))
    # a format-2 profile sets them, as optimize() does
    from clada_compile.calibrate import calibrate

    ids = torch.randint(0, VOCAB, (256,), generator=torch.Generator().manual_seed(0))
    cal = CladaModel(model, graphs, CladaConfig(backend="eager"), impl="reference")
    prof = llama_dir.parent / "v2.json"
    prof.write_text(json.dumps(calibrate(cal, ids, 0.5, 10.0, 64, input_targets={"attn_in": 0.7, "mlp_in": 0.8})))
    v2 = OrtCladaModel.from_dir(llama_dir, config=CONFIG.replace(profile=str(prof)))
    assert v2.input_taus[0].all() and v2.input_taus[1].all() and not v2.input_taus[2:].any()
    # an export whose decode graph does not threshold the lm_head (made before the group) refuses it
    old = llama_dir.parent / "old_export"
    if not old.exists():
        shutil.copytree(llama_dir, old)
    m = json.loads((old / MANIFEST).read_text())
    m["head_thresholded"] = False
    (old / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"> 0 for \['lm_head'\].*re-export"):
        OrtCladaModel.from_dir(old).set_input_thresholds(torch.tensor([[0.0, 0.0]] * 3 + [[0.4, 0.4]]))


def test_set_active_validates(llama_dir):
    engine = OrtCladaModel.from_dir(llama_dir)
    with pytest.raises(ValueError, match="40 distinct neuron ids"):
        engine.set_active(0, torch.arange(39))
    with pytest.raises(ValueError, match="one value per layer"):
        engine.set_thresholds([0.1])


# No smollm2 test here: exporting it (tracing + torch.onnx.export of two 30-layer graphs) takes
# ~8 minutes on 2 cores, beyond this suite's budget. `clada-export --onnx --model_path smollm2` is
# the manual check (see docs/ONNX.md for the measured numbers).


def test_prompts_of_one_two_three_tokens(llama_dir):
    engine = OrtCladaModel.from_dir(llama_dir, config=CONFIG)
    model, graphs = graphs_for("llama")
    torch_engine = CladaModel(model, graphs, CONFIG)
    for length in (1, 2, 3):
        ids = torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
        a = engine.generate(ids, max_new_tokens=5)
        assert a.sequences.tolist() == torch_engine.generate(ids, max_new_tokens=5).sequences.tolist()
        dense = engine.generate(ids, max_new_tokens=5, baseline=True)
        ref = model.generate(ids, max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids))
        assert dense.sequences.tolist() == ref.tolist()


def test_stale_temporaries_of_a_killed_export_are_removed(tmp_path):
    """SIGKILL leaves .NAME.tmp-PID-* behind; the next export of NAME removes those whose PID is
    gone and keeps a live export's."""
    import os
    import subprocess

    from clada_compile.exporters.onnx import _remove_stale

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-abc"
    old = tmp_path / f".out.old-{dead.pid}-123"
    live = tmp_path / f".out.tmp-{os.getpid()}-xyz"
    other = tmp_path / f".outer.tmp-{dead.pid}-abc"  # another output's
    for p in (stale, old, live, other):
        (p / "sub").mkdir(parents=True)
    _remove_stale(tmp_path / "out")
    assert not stale.exists() and not old.exists()
    assert live.exists() and other.exists()


# ---- the runtime stands alone ---------------------------------------------------------------

# modules of this package (and beyond) that the ONNX Runtime engine must not load: the exporter and
# the FX tracing/pass stack. torch.export is not listed: a bare `import torch` imports it already.
FX_STACK = ("clada_compile.tracing", "clada_compile.passes", "clada_compile.compiled", "clada_compile.graphs",
            "clada_compile.models", "clada_compile.exporters.onnx", "torch.onnx", "torch._dynamo", "transformers")


def _loaded_after(code: str) -> list:
    """The FX_STACK modules in sys.modules after `code` runs in a fresh interpreter."""
    import subprocess
    import sys

    probe = f"import json, sys\n{code}\nprint(json.dumps([m for m in {FX_STACK!r} if m in sys.modules]))"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_importing_the_ort_engine_loads_no_exporter_or_fx_stack():
    import subprocess
    import sys

    bare = subprocess.run([sys.executable, "-c", "import sys, torch; print('torch.export' in sys.modules)"],
                          capture_output=True, text=True, timeout=300)
    assert bare.stdout.strip() == "True"  # why torch.export is not in FX_STACK
    assert _loaded_after("import clada_compile.exporters.ort") == []
    assert _loaded_after("from clada_compile.exporters import OrtCladaModel, MANIFEST") == []


def test_ort_engine_generates_without_the_fx_stack(llama_dir):
    """Loading an export (with its calibration profile) and generating stays off the FX stack too."""
    code = ("import torch\nfrom clada_compile.exporters.ort import OrtCladaModel\n"
            f"e = OrtCladaModel.from_dir({str(llama_dir)!r})\n"
            "assert e.profile is not None\n"
            "e.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3)")
    assert _loaded_after(code) == []


def test_memory_is_measured_in_a_fresh_process(llama_dir):
    from clada_compile.exporters.memory import measure_memory

    mem = measure_memory(llama_dir, prompt_tokens=4, new_tokens=2, threads=1)
    assert 0 < mem["after_load_mib"] <= mem["peak_rss_mib"]
    with pytest.raises(RuntimeError, match="memory measurement of .* failed"):
        measure_memory(llama_dir.parent / "missing")
