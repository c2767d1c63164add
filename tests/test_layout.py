"""The library core imports none of the benchmark and study tools (clada_compile.bench) and not
matplotlib, an optional extra: checked in a fresh interpreter, where nothing was imported yet."""

import subprocess
import sys

_CHILD = """
import sys
import clada_compile
from clada_compile import optimize, load_model, CladaModel
import clada_compile.calibrate, clada_compile.evaluate, clada_compile.runtime, clada_compile.compiled
import clada_compile.exporters.onnx, clada_compile.exporters.ort
bad = sorted(m for m in sys.modules if m.startswith(("clada_compile.bench", "matplotlib")))
print(",".join(bad))
"""


def test_core_imports_no_bench_tool_and_no_matplotlib():
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"the library core imported {out.stdout.strip()}"


def test_moved_tools_live_under_bench():
    import importlib.util

    for name in ("ablation", "sweep", "timing", "plots"):
        assert importlib.util.find_spec(f"clada_compile.{name}") is None
        assert importlib.util.find_spec(f"clada_compile.bench.{name}") is not None
    assert importlib.util.find_spec("clada_compile.kernels.bench") is None
    assert importlib.util.find_spec("clada_compile.bench.kernels") is not None
