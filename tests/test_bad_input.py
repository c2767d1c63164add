"""Bad input to the commands: one `error:` line naming the value and the fix, exit status 2, and,
where the value is a path, model or profile, found before the model is loaded (issue 16).

"Before loading" is checked by making load_model fail loudly: a test that reached it would see
an AssertionError instead of the expected exit status."""

import json

import numpy as np
import pytest
import torch

from conftest import DATA, graphs_for
from tiny import save_hf_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_hf_dir(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: the error must come from the checks that run before it."""
    import clada_compile
    import clada_compile.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    # the package first: its lazy attribute must resolve to (and be restored as) the real function
    monkeypatch.setattr(clada_compile, "load_model", refuse)
    monkeypatch.setattr(clada_compile.models, "load_model", refuse)


def _fails(main, argv, capsys, *messages):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    for m in messages:
        assert m in err, err
    return err


def _generate(tiny_dir, out, *extra):
    return ["--model_path", str(tiny_dir), "--backend", "eager", "--prompt", "the city of", "--max_new_tokens", "3",
            "--top_k_ratio", "0.5", "--output_dir", str(out), *extra]


# ---- clada-generate --output_dir ------------------------------------------------------------------
def test_generate_refuses_a_non_empty_output_dir_without_force(tiny_dir, tmp_path, capsys, no_loading):
    from clada_compile.cli.generate import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "tokens_7_clada.jsonl").write_text("{}\n")
    _fails(main, _generate(tiny_dir, out), capsys, f"--output_dir {out} already exists and is not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["tokens_7_clada.jsonl"]  # untouched


def test_generate_force_replaces_the_old_run_and_leaves_no_temporary(tiny_dir, tmp_path, capsys):
    from clada_compile.cli.generate import main_impl

    out = tmp_path / "run"
    out.mkdir()
    (out / "tokens_7_clada.jsonl").write_text("{}\n")  # an older run with more prompts
    (out / "trace_7.png").write_bytes(b"old")
    stale = tmp_path / ".run.tmp-999999999-x"  # a killed run's staging directory (no such pid)
    stale.mkdir()
    assert main_impl(_generate(tiny_dir, out, "--force")) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names[0] == "summary.json" and "tokens_7_clada.jsonl" not in names and "trace_7.png" not in names
    assert json.loads((out / "summary.json").read_text())["prompts"][0]["clada"]["new_tokens"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging directory left, the stale one gone


def test_generate_crash_leaves_no_output_dir(tiny_dir, tmp_path, monkeypatch):
    from clada_compile.cli import generate

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(generate, "plot_trace", crash)  # after tokens_0_clada.jsonl was written
    monkeypatch.setattr(generate, "have_matplotlib", lambda: True)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed mid-run"):
        generate.main_impl(_generate(tiny_dir, out))
    assert list(tmp_path.iterdir()) == []  # neither a half run nor its staging directory


def test_generate_output_dir_under_a_file(tiny_dir, tmp_path, capsys, no_loading):
    from clada_compile.cli.generate import main

    (tmp_path / "afile").write_text("x")
    _fails(main, _generate(tiny_dir, tmp_path / "afile" / "out"), capsys, "afile is a file, not a directory",
           "choose another --output_dir")
    _fails(main, _generate(tiny_dir, tmp_path / "afile"), capsys, "exists and is a file", "choose another --output_dir")


@pytest.mark.parametrize("flag,value,message", [
    ("--num_prompts", "0", "--num_prompts must be >= 1, got 0"),
    ("--num_prompts", "-1", "--num_prompts must be >= 1, got -1"),
    ("--max_new_tokens", "0", "--max_new_tokens must be >= 1, got 0"),
    ("--top_p", "0", "--top_p must be in (0, 1], got 0.0"),
    ("--threads", "-2", "--threads must be >= 1, got -2"),
])
def test_generate_bad_numbers(tiny_dir, tmp_path, capsys, no_loading, flag, value, message):
    from clada_compile.cli.generate import main

    argv = _generate(tiny_dir, tmp_path / "out", flag, value)
    if flag == "--num_prompts":  # --num_prompts applies to --data_path
        argv = [a for a in argv if a not in ("--prompt", "the city of")] + ["--data_path", str(DATA / "prompts.jsonl")]
    _fails(main, argv, capsys, message)


def test_wrapper_outside_inductor_is_an_error(tiny_dir, tmp_path, capsys, no_loading):
    from clada_compile.cli.generate import main

    _fails(main, _generate(tiny_dir, tmp_path / "out", "--wrapper", "python"), capsys,
           "--wrapper python applies to --backend inductor", "got --backend eager")


def test_prompt_line_that_is_not_an_object(tiny_dir, tmp_path, capsys, no_loading):
    from clada_compile.cli.generate import main

    bad = tmp_path / "p.jsonl"
    bad.write_text('{"article": "fine"}\n[1, 2]\n')
    argv = [a for a in _generate(tiny_dir, tmp_path / "out") if a not in ("--prompt", "the city of")]
    argv += ["--data_path", str(bad)]
    _fails(main, argv, capsys, f"{bad}:2 holds a JSON list, not an object")


# ---- models -----------------------------------------------------------------------------------
def test_config_json_that_is_not_json(tiny_dir, tmp_path, capsys, no_loading):
    import shutil

    from clada_compile.cli.generate import main

    bad = tmp_path / "model"
    shutil.copytree(tiny_dir, bad)
    (bad / "config.json").write_text("{not json")
    _fails(main, _generate(bad, tmp_path / "out"), capsys, f"{bad / 'config.json'} is not valid JSON",
           "the model directory is damaged")
    (bad / "config.json").write_text("[1]")
    _fails(main, _generate(bad, tmp_path / "out"), capsys, "holds a JSON list, not an object")


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path, capsys, no_loading):
    from clada_compile.cli.generate import main

    model = tmp_path / "t5"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    err = _fails(main, _generate(model, tmp_path / "out"), capsys, "architecture 't5' is not supported",
                 "Llama (llama)", "GPT-NeoX (gpt_neox)")
    assert len(err) < 400 and "AutoModel" not in err  # the short list, not transformers' every config class


def _tiny_gguf(path):
    """A small, well-formed GGUF (one f32 tensor) written by gguf's own writer."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.arange(96 * 48, dtype=np.float32).reshape(96, 48))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_truncated_gguf_is_named_as_damaged(tmp_path, monkeypatch):
    from clada_compile import load_model

    monkeypatch.setenv("CLADA_CACHE", str(tmp_path / "cache"))
    good = _tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    bad = tmp_path / "model.gguf"
    bad.write_bytes(good[: len(good) - 4000])  # the tensor data cut short, as an interrupted copy leaves it
    with pytest.raises(ValueError, match=rf"the GGUF file {bad} is damaged or truncated .*download or copy it again"):
        load_model(str(bad))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # no half cache entry


# ---- profiles ------------------------------------------------------------------------------------
@pytest.mark.parametrize("content,message", [
    ("[1, 2]", "is not a clada calibration profile (format 'list'"),
    ('"text"', "is not a clada calibration profile (format 'str'"),
    ("{bad", "is not valid JSON"),
])
def test_profile_that_is_not_a_profile_is_found_before_loading(tiny_dir, tmp_path, capsys, no_loading, content,
                                                               message):
    from clada_compile.cli.generate import main

    prof = tmp_path / "p.json"
    prof.write_text(content)
    _fails(main, _generate(tiny_dir, tmp_path / "out", "--profile", str(prof)), capsys, str(prof), message)


# ---- clada-export ----------------------------------------------------------------------------------
def test_export_output_under_a_file_is_found_before_loading(tiny_dir, tmp_path, capsys, no_loading):
    from clada_compile.cli.export import main

    (tmp_path / "afile").write_text("x")
    _fails(main, ["--onnx", "--model_path", str(tiny_dir), "--output", str(tmp_path / "afile" / "out")], capsys,
           "afile is a file, not a directory", "choose another --output")
    _fails(main, ["--onnx", "--model_path", str(tiny_dir), "--output", str(tmp_path / "out"), "--threads", "-1"],
           capsys, "--threads must be >= 1, got -1")


# ---- clada-bench / clada-eval / clada-calibrate -------------------------------------------------------
def test_bench_json_under_a_file_and_missing_text(tiny_dir, tmp_path, capsys, no_loading):
    from clada_compile.cli.bench import main

    (tmp_path / "afile").write_text("x")
    base = ["--model_path", str(tiny_dir), "--backend", "eager"]
    _fails(main, base + ["--json", str(tmp_path / "afile" / "r.json")], capsys, "--json", "afile is a file")
    _fails(main, base + ["--text", str(tmp_path / "none.txt")], capsys, "--text", "does not exist")
    _fails(main, base + ["--repeats", "0"], capsys, "--repeats must be >= 1, got 0")


def test_eval_bad_paths_and_ablation_targets(tiny_dir, tmp_path, capsys, no_loading):
    from clada_compile.cli.eval import main

    (tmp_path / "afile").write_text("x")
    text = str(DATA / "wikitext-2" / "valid.txt")
    base = ["--model_path", str(tiny_dir), "--text", text]
    _fails(main, base + ["--json", str(tmp_path / "afile" / "e.json")], capsys, "--json", "afile is a file")
    _fails(main, ["--model_path", str(tiny_dir), "--text", str(tmp_path)], capsys, "--text", "is a directory")
    prof = tmp_path / "p.json"
    prof.write_text("[]")
    _fails(main, base + ["--ablation", "--profile", str(prof)], capsys, "not a clada calibration profile")


def test_calibrate_output_and_text_are_checked_before_loading(tiny_dir, tmp_path, capsys, no_loading):
    from clada_compile.cli.calibrate import main

    text = str(DATA / "wikitext-2" / "valid.txt")
    _fails(main, ["--model_path", str(tiny_dir), "--text", text, "--output", str(tmp_path)], capsys,
           f"--output {tmp_path} is a directory")
    _fails(main, ["--model_path", str(tiny_dir), "--text", str(tmp_path / "no.txt"), "--output", "p.json"], capsys,
           "--text", "does not exist")
    _fails(main, ["--model_path", str(tiny_dir), "--text", text, "--output", "p.json", "--target_active", "0"],
           capsys, "--target_active must be in (0, 1], got 0.0")


# ---- plots without matplotlib -----------------------------------------------------------------------
def test_a_plot_without_matplotlib_names_the_extra(tiny_dir, tmp_path, capsys, monkeypatch, no_loading):
    from clada_compile.bench import plots
    from clada_compile.cli.bench import main

    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    _fails(main, ["--model_path", str(tiny_dir), "--backend", "eager", "--sweep", "--text",
                  str(DATA / "wikitext-2" / "valid.txt"), "--json", str(tmp_path / "s.json")], capsys,
           "clada-bench --sweep draws a PNG and needs matplotlib", "pip install 'clada_compile[bench]'")


def test_generate_without_matplotlib_writes_everything_but_the_traces(tiny_dir, tmp_path, capsys, monkeypatch):
    from clada_compile.cli import generate

    monkeypatch.setattr(generate, "have_matplotlib", lambda: False)
    out = tmp_path / "run"
    assert generate.main_impl(_generate(tiny_dir, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "tokens_0_clada.jsonl"]
    assert "pip install 'clada_compile[bench]'" in capsys.readouterr().err


# ---- the engine API ------------------------------------------------------------------------------------
def test_set_active_names_the_layer_and_the_range():
    from clada_compile import CladaConfig
    from clada_compile.compiled import CladaModel

    model, graphs = graphs_for("llama")
    cm = CladaModel(model, graphs, CladaConfig(backend="eager"), impl="reference")
    for layer in (99, -1):  # -1 would silently compact the last layer
        with pytest.raises(ValueError, match=rf"`layer` must be a layer index in \[0, 2\), got {layer}"):
            cm.set_active(layer, torch.arange(cm.k[0]))
