"""The export directory's layout and its manifest (clada.json): written by the exporter, read and
checked by the ONNX Runtime engine.

This module imports nothing heavy (no torch.fx, no onnx): the runtime reads exports without the
exporter's tracing stack.
"""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "clada.json"
PROFILE = "profile.json"
FORMAT = "clada-onnx"
FORMAT_VERSION = 1
# the default file names; a manifest's "files" entry may name others (and "profile")
FILES = {"prefill": "prefill.onnx", "decode": "decode.onnx", "mlp_weights": "mlp_weights.safetensors"}
REEXPORT = "re-export with `clada-export --onnx --model_path {model} --output {dir} --force`"
DYNAMIC_AXES = {"batch": "batch", "seq": "new tokens", "past": "cached tokens",
                "total": "past + seq (decode attention_mask)", "k<L>": "active neurons of layer L"}


def reexport_hint(manifest: dict, directory) -> str:
    return REEXPORT.format(model=manifest.get("model", "MODEL"), dir=directory)


def read_manifest(path) -> dict:
    """The checked manifest of an export directory.

    FileNotFoundError when clada.json is missing; ValueError when it is not JSON, not a clada
    manifest, or inconsistent (check_manifest); each names the file and the re-export command."""
    path = Path(path)
    file = path / MANIFEST
    hint = REEXPORT.format(model="MODEL", dir=path)
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {path} is not a clada ONNX export (or it is incomplete); {hint}")
    try:
        manifest = json.loads(file.read_text())
    except ValueError as err:
        raise ValueError(f"{file} is not valid JSON ({err}); {hint}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{file} is not a clada ONNX manifest (format={got!r}, expected {FORMAT!r}); {hint}")
    check_manifest(manifest, file)
    return manifest


def check_manifest(manifest: dict, file) -> None:
    """The per-layer facts of a manifest must agree with each other; otherwise the manifest (not a
    profile or the caller) is at fault: it was edited, or does not belong to these graphs."""
    hint = reexport_hint(manifest, Path(file).parent)
    for key in ("n_layers", "d_model", "d_ff", "sites", "prefill", "decode"):
        if key not in manifest:
            raise ValueError(f"{file} lacks {key!r}: the export is incomplete or from an older clada_compile; {hint}")
    n = manifest["n_layers"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{file}: `n_layers` must be a positive integer, got {n!r}; {hint}")
    presents = sum(1 for name in manifest["prefill"].get("outputs", ())
                   if str(name).startswith("present.") and str(name).endswith(".key"))
    counts = {"d_ff entries": len(manifest["d_ff"]), "sites": len(manifest["sites"]),
              "prefill present.*.key outputs": presents}
    wrong = {what: count for what, count in counts.items() if count != n}
    if wrong:
        listed = ", ".join(f"{count} {what}" for what, count in counts.items())
        raise ValueError(f"{file} is inconsistent: n_layers is {n}, but it lists {listed}; the manifest does not "
                         f"describe this export (edited by hand, or copied from another one); {hint}")
    layers = [site.get("layer") for site in manifest["sites"]]
    if layers != list(range(n)):
        raise ValueError(f"{file}: `sites` must describe layers 0..{n - 1} in order, got layers {layers}; {hint}")


def build_manifest(*, model_id: str, arch: str, graphs, d_model: int, d_ff, k, top_k_ratio: float,
                   text_config, config: dict, profile, opset: int, precision: str, dtype: str, quant,
                   external: bool, validation: dict, versions: dict) -> dict:
    """The manifest of one export (everything but the file sizes, written last).

    graphs: the exported CladaGraphs (I/O names, MLP sites, attention layers); text_config: the
    model's HF text config; config: the recorded CladaConfig as a dict, without its profile."""
    from ..config import INPUT_GROUPS
    from ..engine import context_length_of

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_id,
        "architecture": arch,
        "n_layers": graphs.n_layers,
        "d_model": d_model,
        "d_ff": list(d_ff),
        "k": list(k),
        "top_k_ratio": top_k_ratio,
        "vocab_size": int(text_config.vocab_size),
        "context_length": context_length_of(text_config),
        "eos_token_id": getattr(text_config, "eos_token_id", None),
        "impl": graphs.impl,
        "config": config,
        "profile": profile,
        "opset": opset,
        "precision": precision,
        "dtype": dtype,
        "low_memory": quant,
        "external_data": external,
        "files": dict(FILES),
        "tokenizer": False,
        "prefill": {"inputs": list(graphs.prefill.input_names), "outputs": list(graphs.prefill.output_names)},
        "decode": {"inputs": list(graphs.decode.input_names), "outputs": list(graphs.decode.output_names)},
        "sites": [dict(layer=s.layer, kind=s.kind, act=s.act, path=s.path, has_b_in=s.has_b_in,
                       has_b_up=s.has_b_up) for s in graphs.prefill.sites],
        # decode input clada.tau_in: (len(input_groups), n_layers) thresholds of these projection
        # inputs; the attention rows act on attention_layers only, the lm_head row (column 0) when
        # head_thresholded
        "input_groups": list(INPUT_GROUPS),
        "attention_layers": list(graphs.decode.attention_layers),
        "head_thresholded": bool(graphs.decode.head_thresholded),
        "dynamic_axes": dict(DYNAMIC_AXES),
        "validation": validation,
        "versions": versions,
    }


def dir_sizes(path: Path) -> dict:
    """File name -> size in bytes of the files directly in `path`."""
    return {p.name: p.stat().st_size for p in sorted(Path(path).iterdir()) if p.is_file()}


def write_support(path: Path, manifest: dict, full, store_dtype, tokenizer) -> None:
    """mlp_weights.safetensors, the tokenizer and the manifest of one export directory."""
    from safetensors.torch import save_file

    tensors = {}
    for layer, f in enumerate(full):
        for key, t in f.items():
            if t is not None:
                tensors[f"{layer}.{key}"] = t.detach().to(store_dtype).contiguous()
    save_file(tensors, str(path / FILES["mlp_weights"]), metadata={"format": "clada-mlp-weights"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    manifest = {**manifest, "tokenizer": tokenizer is not None, "file_sizes": dir_sizes(path)}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))
