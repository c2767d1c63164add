"""The engine contract (clada_compile/engine.py) and the manifest checks, without any export."""

import json

import pytest
import torch

from clada_compile import CladaConfig
from clada_compile.compiled import CladaModel
from clada_compile.engine import Engine, backbone_ratio, backbone_sizes, position_ids_from_mask
from clada_compile.evaluate import parallel_ok
from clada_compile.exporters.manifest import MANIFEST, read_manifest
from conftest import graphs_for


def test_k_from_top_k_ratio():
    assert backbone_sizes([80, 80], 0.5, 4) == [40, 40]
    assert backbone_sizes([80, 10], 0.1, 4) == [8, 4]  # the floor
    assert backbone_sizes([3], 0.5, 4) == [3]  # never more than d_ff
    assert backbone_ratio(CladaConfig(top_k_ratio=0.3)) == 0.3
    assert backbone_ratio(CladaConfig(top_k_ratio=0.3, enabled=False)) == 1.0


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool, torch.float32])
def test_position_ids_from_mask_counts_real_tokens(dtype):
    # oracle: a row's position of token j = number of real tokens before it (left padding
    # does not advance it; a padding token before any real one sits at 0)
    masks = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0], [1, 0, 1, 1, 0]])
    want = [[max(sum(row[:j + 1]) - 1, 0) for j in range(len(row))] for row in masks.tolist()]
    for length in (1, 2, 5):  # 1: the decode step's two-op path; more: prefill / multi-token
        got = position_ids_from_mask(masks.to(dtype), length)
        assert got.dtype == torch.long and got.is_contiguous()
        assert got.tolist() == [row[-length:] for row in want]


def test_torch_engine_implements_the_contract():
    model, graphs = graphs_for("llama")
    cm = CladaModel(model, graphs, CladaConfig(backend="eager", top_k_ratio=0.5), impl="reference")
    assert isinstance(cm, Engine) and cm.per_token_thresholds
    assert cm.k == backbone_sizes(cm.d_ff, 0.5, cm.config.min_active_neurons)
    ids = torch.randint(3, 90, (1, 5))
    assert torch.equal(cm(ids), cm.prefill(ids)[0])  # nn.Module's __call__ reaches Engine.forward
    dense = cm.dense()
    assert dense is cm.dense() and not dense.config.enabled and dense.k == dense.d_ff
    _, past, _ = cm.prefill(ids)
    with pytest.raises(ValueError, match=r"`past` must hold 4 tensors .* got 3"):
        cm.decode(ids[:, -1:], torch.ones(1, 6, dtype=torch.long), past[:3])


def test_parallel_scoring_follows_the_capability():
    class Sequential(Engine):  # an engine whose decode takes one threshold per layer only
        config = CladaConfig()

    class PerToken(Sequential):
        per_token_thresholds = True

    assert not parallel_ok(Sequential()) and parallel_ok(PerToken())
    with pytest.raises(NotImplementedError, match="must implement prefill"):
        Sequential().prefill(None)


def _write(tmp_path, **over):
    m = {"format": "clada-onnx", "model": "tiny", "n_layers": 2, "d_model": 8, "d_ff": [16, 16],
         "sites": [{"layer": 0}, {"layer": 1}],
         "prefill": {"inputs": [], "outputs": ["logits"] + [f"present.{i}.{kv}" for i in range(2)
                                                            for kv in ("key", "value")]},
         "decode": {"inputs": [], "outputs": []}}
    m.update(over)
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    return tmp_path


def test_manifest_checks(tmp_path):
    assert read_manifest(_write(tmp_path))["n_layers"] == 2
    with pytest.raises(ValueError, match=r"n_layers is 3, but it lists 2 d_ff entries, 2 sites, 2 prefill "
                                         r"present.*--model_path tiny .*--force"):
        read_manifest(_write(tmp_path, n_layers=3))
    with pytest.raises(ValueError, match=r"`n_layers` must be a positive integer, got '2'"):
        read_manifest(_write(tmp_path, n_layers="2"))
    with pytest.raises(ValueError, match=r"`sites` must describe layers 0..1 in order, got layers \[1, 0\]"):
        read_manifest(_write(tmp_path, sites=[{"layer": 1}, {"layer": 0}]))
    with pytest.raises(ValueError, match=r"is not a clada ONNX manifest \(format='other'"):
        read_manifest(_write(tmp_path, format="other"))
    m = json.loads((_write(tmp_path) / MANIFEST).read_text())
    del m["sites"]
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"lacks 'sites'.*--force"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        read_manifest(tmp_path)
