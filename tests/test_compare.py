"""clada-bench --compare (clada_compile.bench.compare) on a tiny model: engine names, skipped engines,
the JSON report, the weight-bytes formulas and the ratio column."""

import json

import numpy as np
import pytest

from clada_compile.bench import compare as cmp
from tiny import save_hf_dir

WORDS = ("the city was first new after he had also one their or two its has but not been film time other all "
         "into war during most only while who more she year").split()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_hf_dir(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture()
def text(tmp_path, monkeypatch):
    monkeypatch.setenv("CLADA_CACHE", str(tmp_path / "cache"))  # nothing lands in the user's cache
    path = tmp_path / "text.txt"
    path.write_text(" ".join(WORDS * 4))  # words of the tiny tokenizer's vocabulary: one token each
    return path


def test_unknown_engine_name_exits_2_listing_the_valid_engines_before_loading_anything(capsys):
    from clada_compile.cli.bench import main

    with pytest.raises(SystemExit) as e:
        # a model path that does not exist: the engine check must come first
        main(["--compare", "--model_path", "/nonexistent/model", "--engines", "clada-fp32,llama.cpp-q4"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown engine 'llama.cpp-q4' in --engines; valid engines: ")
    assert all(name in err for name in cmp.ENGINES)


def test_plot_that_is_not_a_png_is_refused_before_loading_anything():
    from clada_compile.cli.bench import main_impl

    with pytest.raises(ValueError, match="`--plot` must be a .png file, got 'r.jpg'"):
        main_impl(["--compare", "--model_path", "/nonexistent/model", "--plot", "r.jpg"])


def test_parse_engines_keeps_order_drops_duplicates_and_defaults_to_all():
    assert cmp.parse_engines("hf-eager, clada-fp32,hf-eager") == ["hf-eager", "clada-fp32"]
    assert cmp.parse_engines(None) == list(cmp.ENGINES)
    with pytest.raises(ValueError, match="no engine given"):
        cmp.parse_engines(" , ")


def test_llama_cpp_on_an_hf_directory_is_skipped_with_the_reason_in_table_and_json(tiny_dir, text, tmp_path, capsys):
    from clada_compile.cli.bench import main_impl

    out = tmp_path / "r.json"
    assert main_impl(["--compare", "--model_path", str(tiny_dir), "--text", str(text), "--prompt_tokens", "16",
                      "--new_tokens", "4", "--rounds", "1", "--engines", "llama.cpp-q8_0,llama.cpp-gguf",
                      "--json", str(out)]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| llama.cpp-")]
    assert len(rows) == 2 and all("skipped: no GGUF is known for" in r for r in rows)
    engines = json.loads(out.read_text())["engines"]
    for name in ("llama.cpp-q8_0", "llama.cpp-gguf"):
        assert engines[name]["skipped"].startswith("no GGUF is known for") and "tok_s" not in engines[name]


def test_json_report_of_one_round_holds_the_measured_engines_in_the_documented_schema(tiny_dir, text, tmp_path,
                                                                                      capsys):
    from clada_compile import load_model
    from clada_compile.cli.bench import main_impl

    out = tmp_path / "sub" / "r.json"
    assert main_impl(["--compare", "--model_path", str(tiny_dir), "--text", str(text), "--prompt_tokens", "16",
                      "--new_tokens", "8", "--rounds", "1", "--backend", "eager",
                      "--engines", "clada-dense-fp32,hf-eager", "--json", str(out), "--plot", str(out.parent / "r.png")]) == 0
    r = json.loads(out.read_text())
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.json", "r.png"]  # the atomic writes left no temporary
    assert (out.parent / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r["model"] == str(tiny_dir) and r["prompt_tokens"] == 16 and r["new_tokens"] == 8
    assert {"cpu", "torch", "transformers"} <= set(r["machine"])
    assert len(r["machine"]["read_gb_per_s_rounds"]) == 1 and r["machine"]["read_gb_per_s"] > 0
    assert list(r["engines"]) == ["clada-dense-fp32", "hf-eager"]
    model, _ = load_model(str(tiny_dir))
    emb = model.get_input_embeddings().weight
    dense_bytes = sum(p.numel() * 4 for p in model.parameters()) - emb.numel() * 4  # untied lm_head
    # what the GEMV kernel reads per decode step: every projection matrix (the norms' vectors are
    # read by inductor's kernels, not the GEMV), counted by the kernel itself
    matrix_bytes = sum(p.numel() * 4 for p in model.parameters() if p.dim() == 2) - emb.numel() * 4
    expected = {"clada-dense-fp32": matrix_bytes, "hf-eager": dense_bytes}
    for name, e in r["engines"].items():
        assert "skipped" not in e, e
        assert len(e["rounds"]) == 1 and e["tok_s"] == e["rounds"][0] > 0
        assert e["precision"] == "fp32"
        assert e["weight_bytes_per_token"] == expected[name]
        assert e["read_fraction"] == pytest.approx(e["gb_per_s"] / r["machine"]["read_gb_per_s"])
    assert r["engines"]["clada-dense-fp32"]["vs_dense"] is None  # no llama.cpp, no sparse engine measured
    assert r["engines"]["hf-eager"]["vs_reference"] is None and r["engines"]["hf-eager"]["vs_reference_paired"] is None
    assert r["engines"]["clada-dense-fp32"]["active_fraction"] == 1.0
    assert r["engines"]["hf-eager"]["active_fraction"] is None
    table = capsys.readouterr().out
    assert "| hf-eager | fp32 |" in table and "n/a (llama.cpp-f32 not run)" in table


def test_gb_per_s_is_bytes_per_token_times_median_tokens_per_s(tiny_dir, text, monkeypatch):
    """GB/s against numbers worked out by hand, not the code's own formula: 2.5e8 weight bytes per
    token at a median 4 tok/s is 1.0 GB/s (1e9 bytes, not GiB); a clada engine's measured kernel
    bytes (median of its rounds) replace its formula's bytes."""
    # one run per engine per round, hf-eager first: a warm-up round (dropped), then three rounds
    runs = iter([3.0, 9.0, 4.0, 10.0, 3.0, 4.0, 5.0, 9.0])
    measured = iter([None, 1e8, None, 3e8, None, 2e8, None, 5e8])  # the clada kernel's byte counter

    def fake(ctx, name):
        def run():
            return dict(tok_s=next(runs), prefill_s=0.01, decode_s=1.0, active_fraction=None,
                        measured_bytes=next(measured))

        return cmp.Runner(name, "fp32", run, lambda af: 2.5e8 if name == "hf-eager" else 9e9)

    monkeypatch.setitem(cmp.BUILDERS, "hf", fake)
    monkeypatch.setitem(cmp.BUILDERS, "clada", fake)
    probes = iter([20.0, 5.0, 10.0])  # the read bandwidth after each measured round, GB/s
    monkeypatch.setattr(cmp, "read_bandwidth", lambda: next(probes))
    r = cmp.compare(str(tiny_dir), "hf-eager,clada-dense-fp32", text, prompt_tokens=8, new_tokens=4, rounds=3)
    hf, clada = r["engines"]["hf-eager"], r["engines"]["clada-dense-fp32"]
    assert hf["rounds"] == [4.0, 3.0, 5.0] and hf["tok_s"] == 4.0
    assert hf["gb_per_s"] == pytest.approx(1.0)  # 2.5e8 B x 4 tok/s
    assert clada["rounds"] == [10.0, 4.0, 9.0] and clada["tok_s"] == 9.0
    assert clada["weight_bytes_per_token"] == 3e8  # median of the measured 3e8, 2e8, 5e8, not the 9e9 formula
    assert clada["gb_per_s"] == pytest.approx(2.7)  # 3e8 B x 9 tok/s
    assert r["machine"]["read_gb_per_s_rounds"] == [20.0, 5.0, 10.0] and r["machine"]["read_gb_per_s"] == 10.0
    assert hf["read_fraction"] == pytest.approx(0.1) and clada["read_fraction"] == pytest.approx(0.27)
    assert "| 27% |" in cmp.format_table(r) and "10.0 GB/s (median over rounds)" in cmp.format_table(r)


def test_too_short_text_for_the_prompt_is_an_error(tiny_dir, text):
    with pytest.raises(ValueError, match="fewer than --prompt_tokens 500"):
        cmp.compare(str(tiny_dir), "hf-eager", text, prompt_tokens=500, new_tokens=4, rounds=1)


def test_decode_weight_bytes_counts_a_tied_lm_head_once_and_never_the_embedding_table():
    from tiny import build

    tied = build("gpt2")  # ties lm_head to wte
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    unique = {id(p): p for p in tied.parameters()}.values()
    assert cmp.decode_weight_bytes(tied) == sum(p.numel() * 4 for p in unique)  # wte counted as the lm_head
    untied = build("llama")
    emb = untied.get_input_embeddings().weight
    assert cmp.decode_weight_bytes(untied) == sum(p.numel() * 4 for p in untied.parameters()) - emb.numel() * 4


@pytest.mark.parametrize("with_output", [False, True])
def test_gguf_decode_bytes_drops_token_embd_only_when_a_separate_output_tensor_exists(tmp_path, with_output):
    import gguf

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    tensors = {"token_embd.weight": np.ones((8, 4), np.float32), "blk.0.ffn_up.weight": np.ones((6, 4), np.float32)}
    if with_output:
        tensors["output.weight"] = np.ones((8, 4), np.float32)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    expected = (6 * 4 + 8 * 4) * 4  # ffn_up plus the lm_head: output.weight, or token_embd when tied
    assert cmp.gguf_decode_bytes(path) == expected


def test_table_ratios_compare_each_precision_with_its_llama_cpp_engine():
    def row(tok_s, precision):
        return dict(tok_s=tok_s, precision=precision, active_fraction=None, gb_per_s=1.0)

    report = dict(rounds=3, prompt_tokens=256, new_tokens=128, threads=2, engines={
        "llama.cpp-f32": row(20.0, "f32"), "llama.cpp-bf16": row(40.0, "bf16"), "llama.cpp-q8_0": row(50.0, "q8_0"),
        "clada-fp32": row(30.0, "fp32"), "clada-bf16": row(10.0, "bf16"),
        "llama.cpp-gguf": dict(precision="q4_1", skipped="because"),
    })
    lines = {line.split(" | ")[0][2:]: line for line in cmp.format_table(report).splitlines() if line.startswith("| ")}
    assert "| 1.50x (llama.cpp-f32) |" in lines["clada-fp32"]
    assert "| 0.25x (llama.cpp-bf16) |" in lines["clada-bf16"]
    assert "| 1.00x (llama.cpp-q8_0) |" in lines["llama.cpp-q8_0"]
    assert "skipped: because" in lines["llama.cpp-gguf"]


def test_read_bandwidth_is_bytes_over_the_median_pass_time(monkeypatch):
    """A fake clock: passes of 0.5, 2.0 and 1.0 s over 4 MiB -> 4 MiB / 1.0 s (the median), in 1e9 B/s."""
    from clada_compile.bench import roofline

    ticks = iter([0.0, 0.5, 10.0, 12.0, 20.0, 21.0])
    monkeypatch.setattr(roofline.time, "perf_counter", lambda: next(ticks))
    assert roofline.read_bandwidth(4 << 20, repeats=3) == pytest.approx((4 << 20) / 1.0 / 1e9)


@pytest.mark.parametrize("kw, msg", [(dict(nbytes=2), "`nbytes` must be an integer >= 4, got 2"),
                                     (dict(repeats=0), "`repeats` must be an integer >= 1, got 0")])
def test_read_bandwidth_rejects_a_probe_that_reads_nothing(kw, msg):
    from clada_compile.bench import roofline

    with pytest.raises(ValueError, match=msg):
        roofline.read_bandwidth(**kw)


def test_paired_ratios_pair_rounds_and_clada_engines_with_their_dense_engine():
    """Worked by hand: rounds (10, 20, 40) against llama.cpp's (10, 10, 50): round ratios 1.0, 2.0,
    0.8 -> paired 1.0, while the medians give 20 / 10 = 2.0x; clada-bf16 against clada-dense-bf16
    (20, 20, 30) -> round ratios 0.5, 1.0, 1.33 -> paired 1.0, medians 20 / 20."""
    def row(rounds, precision):
        return dict(tok_s=sorted(rounds)[1], rounds=rounds, precision=precision, active_fraction=None, gb_per_s=1.0)

    engines = {"llama.cpp-bf16": row([10.0, 10.0, 50.0], "bf16"), "clada-bf16": row([10.0, 20.0, 40.0], "bf16"),
               "clada-dense-bf16": row([20.0, 20.0, 30.0], "bf16"), "clada-fp32": row([1.0, 2.0, 3.0], "fp32"),
               "clada-dense-fp32": dict(precision="fp32", skipped="because")}
    cmp.add_ratios(engines)
    c = engines["clada-bf16"]
    assert c["vs_reference"] == pytest.approx(2.0) and c["vs_reference_paired"] == pytest.approx(1.0)
    assert c["vs_dense"] == pytest.approx(1.0) and c["vs_dense_paired"] == pytest.approx(1.0)
    assert engines["clada-dense-bf16"]["vs_dense"] is None  # a dense engine has no dense engine to compare with
    assert engines["clada-fp32"]["vs_reference"] is None and engines["clada-fp32"]["vs_dense"] is None  # not measured
    report = dict(rounds=3, prompt_tokens=256, new_tokens=128, threads=2, engines=engines)
    lines = {line.split(" | ")[0][2:]: line for line in cmp.format_table(report).splitlines() if line.startswith("| ")}
    assert "| 2.00x (llama.cpp-bf16) | 1.00x | 1.00x (1.00x) |" in lines["clada-bf16"]
    assert "| n/a (llama.cpp-f32 not run) | - | - |" in lines["clada-fp32"]
    assert cmp.paired_ratio([1.0, 2.0], [1.0]) is None  # rounds that do not pair are not paired
