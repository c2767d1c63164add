"""optimize(): config validation, host-set thresholds without recompiling, clear errors."""

import pytest
import torch
from torch import nn

import clada_compile
from clada_compile import CladaConfig, UnmatchedMLPError, optimize
from clada_compile.compiled import CladaModel
from conftest import graphs_for
from tiny import build


@pytest.mark.parametrize("field,value,message", [
    ("top_k_ratio", 1.5, "`top_k_ratio` must be in (0, 1], got 1.5"),
    ("top_k_ratio", 0.0, "`top_k_ratio` must be in (0, 1], got 0.0"),
    ("surprisal_threshold", -0.1, "`surprisal_threshold` must be in [0, 1], got -0.1"),
    ("entropy_threshold", float("nan"), "`entropy_threshold` must be in [0, 1], got nan"),
    ("update_window", 1, "`update_window` must be an integer >= 2, got 1"),
    ("min_active_neurons", 0, "`min_active_neurons` must be an integer >= 1, got 0"),
    ("backend", "tvm", "`backend` must be one of 'inductor', 'eager', got 'tvm'"),
    ("kernel", "cuda", "`kernel` must be one of 'auto', 'reference', got 'cuda'"),
    ("kernel", "cpp", "`kernel` 'cpp' is now called 'auto'"),  # one name per behaviour
    ("precision", "int4", "`precision` must be one of 'fp32', 'bf16', 'fp16', 'int8', got 'int4'"),
    ("wrapper", "c++", "`wrapper` must be one of 'cpp', 'python', got 'c++'"),
])
def test_config_validation(field, value, message):
    with pytest.raises(ValueError) as err:
        CladaConfig(**{field: value})
    assert message in str(err.value)


def test_wrapper_is_an_error_outside_inductor():
    with pytest.raises(ValueError, match="`wrapper` applies to backend='inductor'.*got backend='eager'"):
        CladaConfig(backend="eager", wrapper="python")
    assert CladaConfig(wrapper="python").wrapper == "python"


def test_config_is_frozen_and_presets():
    cfg = CladaConfig()
    with pytest.raises(AttributeError):
        cfg.top_k_ratio = 0.3
    assert CladaConfig.preset("griffin").top_k_ratio == 0.5
    assert not CladaConfig.preset("dense").enabled
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        CladaConfig.preset("fast")


def test_threshold_changes_logits_without_recompiling():
    model, graphs = graphs_for("llama")
    cm = CladaModel(model, graphs, CladaConfig(top_k_ratio=1.0, backend="inductor"), impl="reference")
    ids = torch.randint(3, 90, (1, 6))
    _, past, _ = cm.prefill(ids[:, :5])
    mask = torch.ones(1, 6, dtype=torch.long)
    step = lambda: cm.decode(ids[:, 5:], mask, past)[0]  # noqa: E731
    dense = step()
    assert cm._decode_fn.compiles == 1
    cm.set_thresholds([0.3, 0.3])
    sparse = step()
    assert (sparse - dense).abs().max() > 1e-3
    cm.set_thresholds([0.0, 0.0])
    torch.testing.assert_close(step(), dense, atol=1e-5, rtol=0)
    # re-selection copies new rows into the same compacted-weight inputs
    cm.set_active(0, torch.arange(cm.k[0]).flip(0))
    step()
    assert cm._decode_fn.compiles == 1, "a new threshold or active set recompiled the graph"


def test_set_thresholds_rejects_bad_values():
    model, graphs = graphs_for("llama")
    cm = CladaModel(model, graphs, CladaConfig(backend="eager"))
    with pytest.raises(ValueError, match="one value per layer"):
        cm.set_thresholds([0.1])
    with pytest.raises(ValueError, match="finite and >= 0"):
        cm.set_thresholds([float("nan"), 0.1])


def test_unsupported_mlp_names_the_layer():
    model = build("llama")
    model.model.layers[1].mlp.act_fn = nn.Sigmoid()  # not a CLADA-supported activation
    with pytest.raises(UnmatchedMLPError, match=r"layers without a matched MLP: \[1\]"):
        optimize(model, CladaConfig(backend="eager"))


def test_unknown_architecture():
    import transformers as tf

    model = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="unknown architecture 'bloom'"):
        optimize(model, CladaConfig(backend="eager"))


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        clada_compile.load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="not an embedded model"):
        clada_compile.load_model(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        clada_compile.load_model(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        clada_compile.load_model("smollm2", dtype="int3")


@pytest.mark.slow
def test_smollm2_all_mlps_rewritten_and_greedy_matches(smollm2):
    model, tok = smollm2
    cm = optimize(model, CladaConfig(top_k_ratio=1.0, backend="eager"), tokenizer=tok)
    assert len(cm.graphs.prefill.sites) == 30 and cm.graphs.rewrites["fuse_gated_mlp"] == 30
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
    out = cm(ids)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=0)
