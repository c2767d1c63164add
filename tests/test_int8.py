"""precision="int8": the int8 GEMV kernel, the quantizer and the engine on the GEMV graph.

Oracles independent of the code under test: a float64 product with the dequantized weights for
the kernel, HF's own forward on the int8 round-tripped model for the engine (optimize() puts the
round trip in the model; decoding through int8 buffers and the int8 kernel must reproduce it)."""

from __future__ import annotations

import pytest
import torch

from clada_compile import CladaConfig, kernels, optimize
from clada_compile.quantize import quantize_columns, quantize_rows, round_trip_
from conftest import toy_profile
from tiny import VOCAB, build


def _quantized(K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(K, N, generator=g) * torch.rand(N, generator=g)  # columns of different ranges
    scale = w.abs().amax(0) / 127
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return q, scale, torch.randn(K, generator=g)


@pytest.mark.parametrize("K,N", [(1, 1), (3, 5), (100, 77), (64, 48), (129, 8200), (576, 1536), (33, 2 * 32768 + 5000 + 7)])
@pytest.mark.parametrize("tau", [0.0, 0.7, 1e9])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_equals_float64_dequantized_product(K, N, tau, threads):
    q, scale, x = _quantized(K, N)
    kept = torch.where(x.abs() >= tau, x, 0).double()
    ref = (kept @ q.double()) * scale.double()
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = kernels.sparse_gemv_t_q8(x.view(1, 1, K), q, scale, torch.tensor([tau]))
    finally:
        torch.set_num_threads(prev)
    assert y.shape == (1, 1, N) and y.dtype == torch.float32
    # fp32 sums of K products in another order: |error| <= K * eps * sum |x_i q_in| * s_n
    bound = K * 2.0 ** -23 * (kept.abs() @ q.double().abs()) * scale.double() + 1e-30
    assert ((y.view(N).double() - ref).abs() <= bound).all()


def test_kernel_skips_the_rows_of_dropped_inputs_and_counts_int8_bytes():
    q, scale, x = _quantized(256, 1024)
    x[::2] = 0.01  # half the channels below the threshold
    before = kernels.weight_bytes_read()
    kernels.sparse_gemv_t_q8(x, q, scale, torch.tensor([0.05]))
    kept = int((x.abs() >= 0.05).sum())
    assert kernels.weight_bytes_read() - before == kept * 1024 + 4 * 1024  # int8 rows + the scales


def test_many_rows_take_the_dequantized_reference():
    q, scale, _ = _quantized(40, 24)
    x = torch.randn(3, 5, 40)
    y = kernels.sparse_gemv_t_q8(x, q, scale, torch.tensor([0.5]))
    ref = (torch.where(x.abs() >= 0.5, x, 0).double() @ q.double()) * scale.double()
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(wq=torch.zeros(4, 3)), "`wq` must be a 2-D int8 tensor"),
    (dict(scale=torch.ones(4)), r"`scale` must be float32 of shape \(N,\) = \(3,\)"),
    (dict(x=torch.zeros(4, dtype=torch.bfloat16)), "`x` must be float32 for int8 weights"),
    (dict(x=torch.zeros(5)), "`x` last dim must equal `wq` rows"),
    (dict(tau=torch.zeros(2)), "`tau` must be a 1-element float32 tensor"),
])
def test_kernel_bad_input_names_the_argument(bad, match):
    args = dict(x=torch.zeros(4), wq=torch.zeros(4, 3, dtype=torch.int8), scale=torch.ones(3), tau=torch.zeros(1))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        kernels.sparse_gemv_t_q8(**args)


def test_quantizer_range_error_and_idempotence():
    w = torch.randn(33, 70) * torch.linspace(0.01, 3, 70)
    w[5] = 0  # an all-zero channel keeps a usable scale
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and s.shape == (33,)
    nonzero = w.abs().amax(1) > 0
    assert (q[nonzero].abs().amax(1) == 127).all()  # each channel's largest weight maps to +-127
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 * (1 + 1e-5)).all()
    back = q.float() * s[:, None]
    q2, s2 = quantize_rows(back)  # quantizing the round trip gives the same int8 weights back
    assert torch.equal(q2, q) and torch.allclose(s2, s, rtol=1e-6, atol=0)
    qc, sc = quantize_columns(w.t())
    assert torch.equal(qc, q.t()) and torch.equal(sc, s) and qc.is_contiguous()


def test_round_trip_counts_tied_weights_once():
    model = build("llama")
    model.lm_head.weight = model.model.embed_tokens.weight  # tie
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())  # lm_head included
    assert round_trip_(model) == linears
    q, s = quantize_rows(model.model.embed_tokens.weight)
    assert torch.equal(q.float() * s[:, None], model.model.embed_tokens.weight)


def _int8(name, **kw):
    model = build(name)
    cm = optimize(model, CladaConfig(backend="eager", precision="int8", **kw))
    return model, cm


@pytest.mark.parametrize("name", ["llama", "gpt2", "phi3", "opt", "llama_mlp_bias"])
def test_int8_decode_equals_hf_on_the_round_tripped_model(name):
    model, cm = _int8(name, enabled=False)
    q8 = [n for n in cm.decode_graph.gm.graph.nodes if n.target is torch.ops.clada.sparse_gemv_t_q8.default]
    f32 = [n for n in cm.decode_graph.gm.graph.nodes if n.target is torch.ops.clada.sparse_gemv_t.default]
    assert cm.decode_rewrites["sparse_mlp_to_gemv"] == cm.n_layers and len(q8) >= 1 and not f32
    assert all(cm.compact[0][k].dtype == torch.int8 for k in cm.compact[0] if k.startswith("w_"))
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits  # HF on the model optimize() round-tripped in place
    _, past, _ = cm.prefill(ids[:, :6])
    steps = []
    for t in range(6, 9):
        logits, past = cm.decode(ids[:, t:t + 1], torch.ones(1, t + 1, dtype=torch.long), past)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), ref[:, 6:], atol=2e-4, rtol=1e-4)


def test_int8_sparse_engine_equals_the_reference_kernel_on_the_same_weights(tmp_path):
    """Top-k backbone, thresholds on h and every input group: the int8 buffers + kernel against the
    reference engine (kernel="reference": torch matmuls on the round-tripped float weights)."""
    profile = toy_profile("llama", torch.randint(3, VOCAB, (256,), generator=torch.Generator().manual_seed(4)),
                          tmp_path / "p.json")[2]  # a profile: decode graphs that threshold (then overridden below)
    model, cm = _int8("llama", top_k_ratio=0.5, profile=profile)
    ref = optimize(model, CladaConfig(backend="eager", precision="int8", top_k_ratio=0.5, kernel="reference",
                                      profile=profile))
    assert not ref.quantized and cm.quantized and cm.impl != "dense" and ref.impl != "dense"
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    outs = []
    for e in (cm, ref):
        e.set_thresholds(torch.full((e.n_layers,), 0.05))
        e.set_input_thresholds(torch.full((4, e.n_layers), 0.05))
        _, past, scores = e.prefill(ids[:, :7])
        e.select(scores)
        outs.append(e.decode(ids[:, 7:], torch.ones(1, 8, dtype=torch.long), past, with_active=True))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(outs[0][2], outs[1][2])  # the same neurons kept


def test_int8_reads_a_quarter_of_the_fp32_bytes():
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    read = {}
    for prec in ("fp32", "int8"):
        cm = optimize(build("llama"), CladaConfig(backend="eager", precision=prec, enabled=False))
        _, past, _ = cm.prefill(ids[:, :5])
        before = kernels.weight_bytes_read()
        cm.decode(ids[:, 5:], torch.ones(1, 6, dtype=torch.long), past)
        read[prec] = kernels.weight_bytes_read() - before
    assert 0.25 <= read["int8"] / read["fp32"] <= 0.3  # + 4 bytes of scale per output column


def test_int8_bad_combinations_are_clear_errors():
    with pytest.raises(ValueError, match="'int8' quantizes a float32 model"):
        optimize(build("llama").to(torch.bfloat16), CladaConfig(backend="eager", precision="int8"))
    _, cm = _int8("llama")
    with pytest.raises(ValueError, match=r"cannot change `precision` \('int8' -> 'fp32'\)"):
        cm.with_config(CladaConfig(backend="eager"))
    with pytest.raises(ValueError, match="`precision` must be one of"):
        CladaConfig(precision="int4")


def test_clada_eval_int8_reports_against_the_fp32_dense_model(tmp_path, capsys):
    """A tiny HF directory: the int8 rows' baseline is the fp32 dense model's perplexity, and the
    int8 dense model is a row of its own (quantization alone)."""
    import json

    from clada_compile.cli.eval import main_impl
    from conftest import DATA
    from tiny import save_hf_dir

    model_dir = save_hf_dir(tmp_path / "llama")
    out = tmp_path / "eval.json"
    assert main_impl(["--model_path", str(model_dir), "--backend", "eager", "--precision", "int8", "--methods", "griffin",
                      "--text", str(DATA / "wikitext-2" / "valid.txt"), "--windows", "2", "--prompt_tokens", "16",
                      "--continuation_tokens", "8", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["baseline"] == "fp32 dense" and report["precision"] == "int8"
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"dense-int8", "griffin"}
    assert rows["dense-int8"]["dense_ppl"] == rows["griffin"]["dense_ppl"]  # one fp32 baseline
    assert rows["dense-int8"]["ppl"] != rows["dense-int8"]["dense_ppl"]  # int8 changes the model
    assert "vs fp32 dense" in capsys.readouterr().out


@pytest.mark.parametrize("extra,message", [
    (["--backend", "ort", "--onnx_dir", "x"], "--precision int8 does nothing at run time with --backend ort"),
    (["--low_memory_mode"], "--low_memory_mode means bf16 weights, which contradicts --precision int8"),
])
def test_int8_flag_conflicts_are_one_line_errors(extra, message, capsys):
    from clada_compile.cli.generate import main

    with pytest.raises(SystemExit) as e:
        main(["--prompt", "hi", "--precision", "int8", *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err, err
