"""Validation of an export: the ORT sessions and the same GraphModules run eagerly in PyTorch on
the same inputs, before anything is renamed into place.

Inputs (example_feeds): prefill on random ids, batch 2; decode one token per sequence on the
PyTorch prefill's KV cache, with the active set selected from its scores (k = d_ff / 2).
Tolerances, max abs difference per output:

    fp32                    1e-3 on logits, KV cache and scores (observed: ~1e-5 or less)
    fp16                    5e-2 (both sides compute in half precision, in different orders)
    low_memory (int8/4-bit) weight-only quantized ORT vs fp32 PyTorch: checked on logits only,
                            max abs diff <= 0.15 * max |logit| (int8) / 0.35 (4-bit); the
                            report states the observed diffs and the greedy top-1 agreement

``clada.active.L`` (neurons kept) must match exactly (validation runs at tau = 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import INPUT_GROUPS
from ..engine import position_ids_from_mask

TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}
LOW_MEMORY_REL_TOLERANCE = {8: 0.15, 4: 0.35}
PHASES = ("prefill", "decode")


class ExportValidationError(RuntimeError):
    """ORT and PyTorch disagree beyond the stated tolerance (the message lists every output)."""


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def ort_run(path: Path, feed: dict, providers=None) -> dict:
    """Output name -> array of a plain ORT session on `path`, fed the inputs it declares."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, min(4, torch.get_num_threads()))
    sess = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    res = sess.run(None, {k: _to_numpy(v) for k, v in feed.items() if k in wanted})
    return dict(zip([o.name for o in sess.get_outputs()], res))


def diffs(ref: dict, got: dict) -> dict:
    """Output name -> max abs difference of ORT's output from PyTorch's."""
    out = {}
    for name, r in ref.items():
        g = got[name]
        r = _to_numpy(r).astype(np.float64)
        g = np.asarray(g).astype(np.float64)
        if r.shape != g.shape:
            raise ExportValidationError(f"output {name}: ORT shape {g.shape} != PyTorch shape {r.shape}")
        out[name] = float(np.abs(r - g).max()) if r.size else 0.0
    return out


def _run(traced, feeds: dict, phase: str) -> dict:
    """The traced graph's outputs by name on feeds named like its inputs."""
    unknown = [x for x in traced.input_names if x not in feeds]
    if unknown:
        raise RuntimeError(f"the {phase} graph has inputs the exporter does not know: {unknown}")
    with torch.no_grad():
        out = traced.gm(*[feeds[x] for x in traced.input_names])
    return dict(zip(traced.output_names, out))


def example_feeds(engine, vocab: int, seed: int) -> dict:
    """Example and validation inputs of both graphs: phase -> (input name -> tensor, output name ->
    PyTorch output). `engine` (a CladaModel on the exported graphs) selects its active set from
    the prefill's scores, so decode runs on a real selection."""
    g = torch.Generator().manual_seed(seed)
    batch, seq, new = 2, 7, 2
    ids = torch.randint(0, vocab, (batch, seq + new), generator=g)
    mask = torch.ones_like(ids)
    n = engine.n_layers
    pre = {"input_ids": ids[:, :seq], "attention_mask": mask[:, :seq],
           "position_ids": position_ids_from_mask(mask[:, :seq], seq),
           "clada.tau": torch.zeros(n), "clada.score_mask": mask[:, :seq]}
    pre_ref = _run(engine.graphs.prefill, pre, "prefill")
    engine.select([pre_ref[f"clada.scores.{i}"] for i in range(n)])
    dec = {"input_ids": ids[:, seq:], "attention_mask": mask,
           "position_ids": position_ids_from_mask(mask, new), "clada.tau": torch.zeros(n),
           "clada.tau_in": torch.zeros(len(INPUT_GROUPS), n)}
    for i in range(n):
        for kind in ("key", "value"):
            dec[f"past_key_values.{i}.{kind}"] = pre_ref[f"present.{i}.{kind}"]
    for layer, buf in enumerate(engine.compact):
        for key, t in buf.items():
            dec[f"clada.{layer}.{key}"] = t
    dec_ref = _run(engine.graphs.decode, dec, "decode")
    return {"prefill": (pre, pre_ref), "decode": (dec, dec_ref)}


def _over(found: dict, tol: float, phase: str) -> list[str]:
    bad = []
    for name, d in found.items():
        limit = 0.5 if name.startswith("clada.active.") else tol  # counts: must match exactly
        if not d <= limit:  # NaN fails too
            bad.append(f"  {phase} {name}: max abs diff {d:.3g} > {limit:g}")
    return bad


def validate(files: dict, feeds: dict, precision: str) -> dict:
    """Every output of the exported graphs (files: phase -> path) within the `precision` tolerance
    of PyTorch's (feeds: example_feeds()); the validation report, or ExportValidationError."""
    tol = TOLERANCE[precision]
    found = {phase: diffs(feeds[phase][1], ort_run(files[phase], feeds[phase][0])) for phase in PHASES}
    bad = [line for phase in PHASES for line in _over(found[phase], tol, phase)]
    if bad:
        raise ExportValidationError(
            f"ONNX Runtime disagrees with PyTorch beyond the {precision} tolerance ({tol:g} abs):\n" + "\n".join(bad))
    return {"tolerance": tol, "max_abs_diff": found, "precision": precision}


def validate_quantized(files: dict, feeds: dict, bits: int) -> dict:
    """The weight-only quantized graphs' logits within LOW_MEMORY_REL_TOLERANCE[bits] * max |logit|
    of PyTorch's (full precision); the report (diffs, greedy top-1 agreement), or ExportValidationError."""
    rel = LOW_MEMORY_REL_TOLERANCE[bits]
    found, agree, bad = {}, {}, []
    for phase in PHASES:
        feed, ref = feeds[phase]
        got = ort_run(files[phase], feed)
        found[phase] = diffs(ref, got)
        scale = float(ref["logits"].abs().max())
        agree[phase] = float((ref["logits"].argmax(-1).numpy() == got["logits"].argmax(-1)).mean())
        if not found[phase]["logits"] <= rel * scale:
            bad.append(f"  {phase} logits: max abs diff {found[phase]['logits']:.3g} > "
                       f"{rel:g} * max|logit| = {rel * scale:.3g}")
    if bad:
        raise ExportValidationError(
            f"the {bits}-bit weight-only quantized graphs drift too far from PyTorch:\n" + "\n".join(bad))
    return {"max_abs_diff": found, "rel_tolerance_logits": rel, "top1_agreement": agree}
