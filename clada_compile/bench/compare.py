"""clada-bench --compare: decode tokens/s of llama.cpp, ONNX Runtime, Hugging Face and CLADA on one
model, in one process, interleaved.

    clada-bench --compare                                  # smollm2, every engine, 3 rounds
    clada-bench --compare --engines llama.cpp-f32,clada-dense-fp32,clada-fp32 --json compare.json

Method: every engine gets the same prompt token ids (the first --prompt_tokens tokens of --text,
tokenized with the model's Hugging Face tokenizer; llama.cpp is fed those ids, its GGUF carries the
same vocabulary) and generates --new_tokens tokens greedily, never stopping at EOS. Each round runs
every engine once, round-robin, so slow drifts of the machine hit all engines alike; one warm-up
round per engine (compilation, caches) is dropped; the figure is the median over --rounds rounds.
Decode tokens/s excludes the prefill: (new_tokens - 1) decode steps over their wall time, sampling
included, as GenerationOutput.decode_tokens_per_s counts it.

Engines (ENGINES):
    llama.cpp-f32, llama.cpp-bf16, llama.cpp-q8_0: the model's GGUF converted by llama.cpp's own
        llama_model_quantize (allow_requantize), cached under $CLADA_CACHE/llama_cpp/;
    llama.cpp-gguf: the model's GGUF as shipped (e.g. Q4_1 for smollm2);
    ort-fp32: our dense ONNX export (export_onnx(dense=True), cached under $CLADA_CACHE/onnx/) on
        ONNX Runtime, generate(baseline=True);
    hf-eager: transformers generate with a DynamicCache;
    hf-static-compile: transformers generate with cache_implementation="static" and its documented
        automatic torch.compile of the decode forward (a CompileConfig; transformers enables it only
        on accelerators unless the config's _compile_all_devices flag is set, which we set for CPU);
    clada-dense-fp32 / clada-fp32, clada-dense-bf16 / clada-bf16 and clada-dense-int8 / clada-int8:
        optimize() with the default CladaConfig(precision=...) and the model's shipped calibration
        profile; dense = engine.dense(). int8 (weight-only, per-output-channel scales) is compared
        with llama.cpp-q8_0.
Engines that cannot run (a missing package, no GGUF for an HF directory, an exception while
building or generating) are reported as skipped with the reason, never measured otherwise.

GB/s = weight bytes streamed per decode token x tok/s / 1e9, where the weight bytes per token are
    clada engines: measured, the bytes the GEMV kernel read per decode step (its counter
        kernels.weight_bytes_read(): rows of kept input channels x width x element size, every
        decode projection; the normalization vectors and biases are not in it); when the counter
        is unavailable (kernel="reference"), the formula below;
    torch / ONNX engines: the bytes of every parameter of the HF model (in the engine's dtype) except
        the input embedding table (a decode step reads one row of it), plus the lm_head even when it
        is tied to the embedding (the logits read all of it; learned position embeddings, as GPT-2's,
        are counted whole); for the CLADA engines minus the MLP
        weight bytes (gate/up/down and biases) the skipped neurons would have read:
        dense - gate_up * (1 - k / d_ff) - down * (1 - active_fraction), with the run's mean
        active fraction (kept neurons / d_ff: the down rows read) and the backbone k / d_ff;
    llama.cpp: the bytes of the GGUF file's tensors (as stored: f32, bf16, q8_0 blocks, ...) except
        token_embd, plus token_embd when the model has no separate output tensor (tied lm_head).
These are lower bounds on memory traffic (activations and the KV cache are not counted).

Roofline: after every measured round the machine's read bandwidth is probed (roofline.py: a
512 MiB read at the engines' thread count); the report's machine.read_gb_per_s is their median
(machine.read_gb_per_s_rounds each one), and each engine's read_fraction = its GB/s / that median,
the "% of read" column: on a shared VM the bound itself moves by tens of percent between days.

Ratios (each engine's vs_reference / vs_dense in the JSON, the table's columns): the ratio of the two
medians, and "paired", the median over rounds of the ratio of the two engines' tok/s in the same
round. Within a round the engines run back to back, so the paired figure cancels the drift between
rounds that the ratio of medians can pair badly (one engine's fast round against the other's slow one).

llama.cpp runs with its defaults otherwise (among them an f16 KV cache, where ours is fp32/bf16).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import inspect
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from clada_compile.io import atomic_write_json

from .roofline import read_bandwidth
from .timing import paired_ratio

ENGINES = ("llama.cpp-f32", "llama.cpp-bf16", "llama.cpp-q8_0", "llama.cpp-gguf", "ort-fp32", "hf-eager",
           "hf-static-compile", "clada-dense-fp32", "clada-fp32", "clada-dense-bf16", "clada-bf16",
           "clada-dense-int8", "clada-int8")
# the llama.cpp engine each precision is compared with; q8_0 and the GGUF's own type: with themselves
REFERENCE = {"fp32": "llama.cpp-f32", "f32": "llama.cpp-f32", "bf16": "llama.cpp-bf16", "int8": "llama.cpp-q8_0"}
LLAMA_FTYPES = {"llama.cpp-f32": ("f32", "LLAMA_FTYPE_ALL_F32"), "llama.cpp-bf16": ("bf16", "LLAMA_FTYPE_MOSTLY_BF16"),
                "llama.cpp-q8_0": ("q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0")}
INSTALL_HINT = "pip install 'clada_compile[compare]' (builds llama-cpp-python from source, ~10-13 min)"


def default_text() -> Path:
    """The WikiText-2 validation text the repository ships (data/README.md); pass --text otherwise."""
    return Path(__file__).resolve().parents[2] / "data" / "wikitext-2" / "valid.txt"


def parse_engines(text: str | None) -> list[str]:
    """'a,b,c' -> the engine names in that order (None or 'all': every engine); ValueError naming the
    valid ones for an unknown name."""
    if text is None or text.strip() == "all":
        return list(ENGINES)
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in ENGINES]
    if bad or not names:
        what = f"unknown engine{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}" if bad else "no engine given"
        raise ValueError(f"{what} in --engines; valid engines: {', '.join(ENGINES)}")
    return names


class Skip(Exception):
    """An engine that cannot run here; the message is the reason shown in the table."""


@dataclass
class Runner:
    name: str
    precision: str
    run: Callable[[], dict]  # one greedy generation -> dict(tok_s, prefill_s, decode_s, active_fraction)
    weight_bytes: Callable[[float | None], float]  # weight bytes per decode token, given the active fraction
    info: dict = field(default_factory=dict)


# ---- weight bytes ---------------------------------------------------------------------------------
def decode_weight_bytes(model, int8: bool = False) -> int:
    """Bytes of the parameters a decode step reads: all of them except the input embedding table,
    plus the lm_head even when it is tied to that table. int8: the 2-D projection weights count one
    byte per weight plus a float32 scale per output channel (precision="int8")."""
    def size(p):
        if int8 and p.dim() == 2:
            return p.numel() + 4 * p.shape[0]
        return p.numel() * p.element_size()

    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += size(p)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    total -= size(emb)
    if head is not None and head.weight is emb:
        total += size(emb)
    return total


def mlp_weight_bytes(engine) -> tuple[int, int]:
    """(gate/up bytes, down bytes) of every MLP's full weights and biases (a dense step reads both)."""
    def size(keys):
        int8 = getattr(engine, "quantized", False)  # int8 weights, float biases
        return sum(f[k].numel() * (1 if int8 and k.startswith("w_") else f[k].element_size())
                   for f in engine.full for k in keys if f.get(k) is not None)

    return size(("w_in", "b_in", "w_up", "b_up")), size(("w_down",))


def clada_bytes(engine, dense_bytes: int, active_fraction) -> float:
    """Weight bytes a CLADA decode step reads: gate/up of the backbone (k of d_ff neurons per layer)
    and the down-projection rows of the neurons the per-token threshold kept (active_fraction is
    kept / d_ff, as the generation records report it)."""
    gu, down = mlp_weight_bytes(engine)
    backbone = sum(k / d for k, d in zip(engine.k, engine.d_ff)) / len(engine.k)
    af = backbone if active_fraction is None else active_fraction
    return dense_bytes - gu * (1.0 - backbone) - down * (1.0 - af)


def gguf_decode_bytes(path) -> int:
    """Bytes of the GGUF's tensors as stored, except token_embd unless it doubles as the lm_head."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    total = sum(tensors.values())
    if "output.weight" in tensors:
        total -= tensors.get("token_embd.weight", 0)
    return total


def gguf_file_type(path) -> str:
    """'q4_1' for a MOSTLY_Q4_1 file; 'gguf' when the file does not say."""
    import gguf

    r = gguf.GGUFReader(str(path))
    f = r.fields.get("general.file_type")
    if f is None:
        return "gguf"
    try:
        name = gguf.LlamaFileType(int(f.parts[f.data[0]][0])).name
    except ValueError:
        return "gguf"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


# ---- caches ---------------------------------------------------------------------------------------
def _source_key(kind: str, path: Path) -> tuple[str, str]:
    """(readable stem, short hash) identifying the model's files (path, sizes, mtimes);
    (kind, path) as models.resolve_spec returns them."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    sig = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return (path.stem if kind == "gguf" else path.name), hashlib.sha1(sig.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _stderr_to(path: Path):
    """Send the C library's stderr (fd 2) to `path` meanwhile (llama.cpp logs a line per tensor)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def llama_cpp_gguf(src: Path, kind: str, cache: Path, threads: int) -> Path:
    """The GGUF `src` converted to `kind` (f32, bf16, q8_0) by llama_model_quantize, cached in `cache`
    (written to a temporary sibling and renamed: a killed conversion leaves no partial file)."""
    import llama_cpp

    st = src.stat()
    key = hashlib.sha1(f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    dst = cache / "llama_cpp" / f"{src.stem}-{key}-{kind}.gguf"
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    ftype = dict((k, f) for k, f in LLAMA_FTYPES.values())[kind]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.allow_requantize = True
    params.nthread = threads
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.tmp-", suffix=".gguf")
    os.close(fd)
    log = dst.with_suffix(".log")
    print(f"converting {src.name} to {kind} with llama_model_quantize (once; cached as {dst})", file=sys.stderr)
    try:
        with _stderr_to(log):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), tmp.encode(), ctypes.byref(params))
        if rc != 0:
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise RuntimeError(f"llama_model_quantize({src.name} -> {kind}) returned {rc}: {tail}")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


def ort_export_dir(spec: str, resolved: tuple[str, Path], cache: Path) -> Path:
    """Our dense fp32 ONNX export of `spec` (resolved: models.resolve_spec(spec)), exported once
    into `cache`/onnx/."""
    from clada_compile import CladaConfig
    from clada_compile.exporters.onnx import FORMAT_VERSION, MANIFEST, export_onnx

    stem, key = _source_key(*resolved)
    out = cache / "onnx" / f"{stem}-{key}-v{FORMAT_VERSION}-dense-fp32"
    if not (out / MANIFEST).is_file():
        print(f"exporting the dense fp32 ONNX graphs of {spec} (once; cached in {out})", file=sys.stderr)
        # dense=True: the decode MLPs are plain matmuls; enabled=False: the recorded runtime default
        # is the dense model too, so from_dir() needs no config
        export_onnx(spec, out, CladaConfig(enabled=False), dense=True, force=True)
    return out


# ---- engines --------------------------------------------------------------------------------------
class _Clock:
    """A transformers streamer recording when each new token comes out: the first put() is the
    prompt, the second the first new token (after the prefill), the last one the final token."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def _ours(engine, ids, new_tokens, baseline):
    from ..kernels import weight_bytes_read

    def run():
        before = weight_bytes_read()
        o = engine.generate(ids, max_new_tokens=new_tokens, baseline=baseline)
        after = weight_bytes_read()
        if o.new_tokens != new_tokens:
            raise RuntimeError(f"generated {o.new_tokens} tokens, expected {new_tokens}")
        # bytes the GEMV kernel actually read per decode step (input thresholds skip rows); the
        # prefill runs on GEMM, outside the kernel (a one-token prompt would count: not used here)
        measured = (after - before) / (new_tokens - 1) if before is not None and new_tokens > 1 else None
        return dict(tok_s=o.decode_tokens_per_s, prefill_s=o.prefill_s, decode_s=o.decode_s,
                    active_fraction=o.mean_active_fraction, measured_bytes=measured)
    return run


class Context:
    """What the engines share: the prompt, the settings, and models loaded once."""

    def __init__(self, model_path, ids, new_tokens, threads, backend, cache, base_model):
        self.model_path = model_path
        self.ids = ids
        self.new_tokens = new_tokens
        self.threads = threads
        self.backend = backend
        self.cache = cache
        self.base_model = base_model  # fp32, loaded for the tokenizer; reused by the clada fp32 engines
        self._clada = {}
        self._resolved = None

    def resolved(self) -> tuple[str, Path]:
        """models.resolve_spec(model_path), once (a chunked model re-hashes its GGUF each time)."""
        if self._resolved is None:
            from clada_compile.models import resolve_spec

            self._resolved = resolve_spec(self.model_path)
        return self._resolved

    def gguf(self) -> Path:
        kind, path = self.resolved()
        if kind != "gguf":
            raise Skip(f"no GGUF is known for {self.model_path} (a Hugging Face directory); llama.cpp needs "
                       f"--model_path FILE.gguf or an embedded model")
        return path

    def clada(self, precision: str):
        """optimize() of the model in `precision` with the default CladaConfig and shipped profile."""
        if precision not in self._clada:
            from clada_compile import CladaConfig, load_model, optimize, shipped_profile

            if precision == "fp32":
                model, tok = self.base_model
            else:  # int8 quantizes its model's weights in place: never the shared fp32 one
                model, tok = load_model(self.model_path, dtype="fp32" if precision == "int8" else precision)
            config = CladaConfig(profile=shipped_profile(self.model_path), precision=precision, backend=self.backend)
            try:
                engine = optimize(model, config, tokenizer=tok)
                self._clada[precision] = (engine, decode_weight_bytes(model, int8=precision == "int8"))
            except Exception as err:
                self._clada[precision] = err
        got = self._clada[precision]
        if isinstance(got, Exception):
            raise got
        return got


def _llama_cpp(ctx: Context, name: str) -> Runner:
    src = ctx.gguf()  # first: without a GGUF, installing llama-cpp-python would not help
    try:
        import llama_cpp
    except ImportError:
        raise Skip(f"llama-cpp-python is not installed ({INSTALL_HINT})") from None
    import numpy as np

    if name == "llama.cpp-gguf":
        path, precision = src, gguf_file_type(src)
    else:
        precision = LLAMA_FTYPES[name][0]
        path = llama_cpp_gguf(src, precision, ctx.cache, ctx.threads)
    ids = [int(i) for i in ctx.ids[0]]
    n_ctx = max(512, len(ids) + ctx.new_tokens + 8)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=ctx.threads,
                          n_threads_batch=ctx.threads, logits_all=False, verbose=False)
    n_vocab = llm.n_vocab()
    if max(ids) >= n_vocab:
        raise Skip(f"the HF tokenizer's ids reach {max(ids)}, beyond the GGUF's vocabulary of {n_vocab}")
    steps = ctx.new_tokens - 1

    def last_logits():
        # the logits of the last evaluated token (logits_all=False keeps only that row)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

    def run():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        prefill_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        tok = int(last_logits().argmax())
        for _ in range(steps):
            llm.eval([tok])
            tok = int(last_logits().argmax())
        decode_s = time.perf_counter() - t1
        return dict(tok_s=steps / decode_s, prefill_s=prefill_s, decode_s=decode_s, active_fraction=None)

    nbytes = gguf_decode_bytes(path)
    return Runner(name, precision, run, lambda af: nbytes,
                  info=dict(gguf=str(path), llama_cpp_python=getattr(llama_cpp, "__version__", None)))


def _ort(ctx: Context, name: str) -> Runner:
    from clada_compile.exporters.ort import OrtCladaModel

    engine = OrtCladaModel.from_dir(ort_export_dir(ctx.model_path, ctx.resolved(), ctx.cache), threads=ctx.threads)
    nbytes = decode_weight_bytes(ctx.base_model[0])
    return Runner(name, "fp32", _ours(engine, ctx.ids, ctx.new_tokens, baseline=True), lambda af: nbytes,
                  info=dict(onnx_dir=str(engine.path)))


def _hf(ctx: Context, name: str) -> Runner:
    from transformers import DynamicCache

    from clada_compile import load_model

    model, tok = load_model(ctx.model_path, dtype="fp32")
    ids, new = ctx.ids, ctx.new_tokens
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
              temperature=None, top_p=None, top_k=None,
              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    static = name == "hf-static-compile"
    # transformers 5.x renamed past_key_values to cache (the old name warns until its removal)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    if static:
        from transformers import CompileConfig

        cc = CompileConfig(dynamic=False, mode="default")  # "reduce-overhead" means CUDA graphs
        cc._compile_all_devices = True  # generate() compiles on CPU only with this flag set
        kw.update(cache_implementation="static", compile_config=cc)

    def run():
        clock = _Clock()
        extra = {} if static else {cache_kw: DynamicCache(config=model.config)}
        with torch.inference_mode():
            out = model.generate(ids, streamer=clock, **kw, **extra)
        got = out.shape[1] - ids.shape[1]
        if got != new or len(clock.times) != new + 1:
            raise RuntimeError(f"transformers generated {got} tokens ({len(clock.times)} streamed), expected {new}")
        if static and not hasattr(model, "_compiled_call"):
            raise RuntimeError("transformers did not compile the decode forward (no model._compiled_call)")
        decode_s = clock.times[-1] - clock.times[1]
        return dict(tok_s=(new - 1) / decode_s, prefill_s=clock.times[1] - clock.times[0], decode_s=decode_s,
                    active_fraction=None)

    nbytes = decode_weight_bytes(model)
    return Runner(name, "fp32", run, lambda af: nbytes)


def _clada(ctx: Context, name: str) -> Runner:
    precision = name.rsplit("-", 1)[1]
    dense = name.startswith("clada-dense-")
    engine, nbytes = ctx.clada(precision)
    if dense:
        return Runner(name, precision, _ours(engine, ctx.ids, ctx.new_tokens, baseline=True), lambda af: nbytes)
    info = dict(profile=engine.config.profile, target_active=engine.config.target_active,
                top_k_ratio=engine.config.top_k_ratio)
    return Runner(name, precision, _ours(engine, ctx.ids, ctx.new_tokens, baseline=False),
                  lambda af: clada_bytes(engine, nbytes, af), info=info)


BUILDERS = {"llama.cpp": _llama_cpp, "ort": _ort, "hf": _hf, "clada": _clada}


def _build(ctx: Context, name: str) -> Runner:
    return BUILDERS[name.split("-", 1)[0]](ctx, name)


def _reason(err: BaseException) -> str:
    if isinstance(err, Skip):
        return str(err)
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _precision_of(name: str) -> str | None:
    if name in LLAMA_FTYPES:
        return LLAMA_FTYPES[name][0]
    if name.endswith(("-fp32", "-bf16", "-int8")):
        return name.rsplit("-", 1)[1]
    return {"hf-eager": "fp32", "hf-static-compile": "fp32"}.get(name)


# ---- the comparison -------------------------------------------------------------------------------
def compare(model_path: str = "smollm2", engines=None, text=None, prompt_tokens: int = 256, new_tokens: int = 128,
            rounds: int = 3, threads: int = 2, backend: str = "inductor", cache=None, log=None) -> dict:
    """Run the engines round-robin; return the report (the --json schema)."""
    from clada_compile.cli.bench import machine
    from clada_compile.data import load_text_tokens
    from clada_compile.models import cache_dir, load_model

    names = parse_engines(engines) if engines is None or isinstance(engines, str) else parse_engines(",".join(engines))
    for flag, value, lo in (("--prompt_tokens", prompt_tokens, 1), ("--new_tokens", new_tokens, 2),
                            ("--rounds", rounds, 1), ("--threads", threads, 1)):
        if not isinstance(value, int) or value < lo:
            why = " (a decode speed needs at least one decode step)" if flag == "--new_tokens" else ""
            raise ValueError(f"{flag} must be an integer >= {lo}{why}, got {value!r}")
    say = log or (lambda msg: print(msg, file=sys.stderr))
    text = Path(text) if text else default_text()
    cache = Path(cache) if cache else cache_dir()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        base = load_model(model_path, dtype="fp32")
        ids = load_text_tokens(text, base[1], prompt_tokens).view(1, -1)
        if ids.shape[1] < prompt_tokens:
            raise ValueError(f"{text} has only {ids.shape[1]} tokens, fewer than --prompt_tokens {prompt_tokens}")
        ctx = Context(model_path, ids, new_tokens, threads, backend, cache, base)
        runners, skipped = {}, {}
        for name in names:
            say(f"building {name}")
            try:
                runners[name] = _build(ctx, name)
            except Exception as err:  # KeyboardInterrupt still stops the run
                skipped[name] = _reason(err)
                say(f"  skipped: {skipped[name]}")
        measured = {name: [] for name in runners}
        read_bw = []  # the machine's read bandwidth after each measured round (roofline.py)
        for r in range(rounds + 1):  # round 0: warm-up, not counted
            say("warm-up round" if r == 0 else f"round {r}/{rounds}")
            for name in list(runners):
                try:
                    m = runners[name].run()
                except Exception as err:
                    skipped[name] = f"failed in {'the warm-up round' if r == 0 else f'round {r}'}: {_reason(err)}"
                    say(f"  {name} skipped: {skipped[name]}")
                    runners.pop(name)
                    continue
                if r:
                    measured[name].append(m)
            if r:
                read_bw.append(read_bandwidth())
    finally:
        torch.set_num_threads(old_threads)

    results = {}
    roof = statistics.median(read_bw)
    for name in names:
        if name in skipped:
            results[name] = dict(precision=_precision_of(name), skipped=skipped[name])
            continue
        runner, runs = runners[name], measured[name]
        tok_s = statistics.median(m["tok_s"] for m in runs)
        fracs = [m["active_fraction"] for m in runs if m["active_fraction"] is not None]
        af = sum(fracs) / len(fracs) if fracs else None
        wbytes = runner.weight_bytes(af)
        kernel_bytes = [m["measured_bytes"] for m in runs if m.get("measured_bytes")]
        if kernel_bytes:  # clada engines: what the GEMV kernel read, not a formula
            wbytes = statistics.median(kernel_bytes)
        gb_per_s = wbytes * tok_s / 1e9
        results[name] = dict(tok_s=tok_s, rounds=[m["tok_s"] for m in runs], precision=runner.precision,
                             active_fraction=af, gb_per_s=gb_per_s, weight_bytes_per_token=int(wbytes),
                             read_fraction=gb_per_s / roof,
                             prefill_s=statistics.median(m["prefill_s"] for m in runs), **runner.info)
    add_ratios(results)
    info = machine()
    info["threads"] = threads
    info["read_gb_per_s"] = roof
    info["read_gb_per_s_rounds"] = read_bw
    return dict(model=model_path, machine=info, prompt_tokens=int(ids.shape[1]), new_tokens=new_tokens,
                rounds=rounds, threads=threads, text=str(text), clada_backend=backend, engines=results)


def reference_of(name: str, precision: str | None) -> str | None:
    """The llama.cpp engine a row is compared with (itself for q8_0 and the GGUF's own type)."""
    if name.startswith("llama.cpp-") and name not in ("llama.cpp-f32", "llama.cpp-bf16"):
        return name
    return REFERENCE.get(precision or "")


def dense_of(name: str) -> str | None:
    """The dense engine a CLADA engine is compared with: clada-bf16 -> clada-dense-bf16."""
    if name.startswith("clada-") and not name.startswith("clada-dense-"):
        return "clada-dense-" + name[len("clada-"):]
    return None


def add_ratios(engines: dict) -> None:
    """Each measured engine's ratios, in place: vs_reference (median tok/s over the reference's, the
    reference being llama.cpp at the same precision, reference_of) and vs_reference_paired, and for a
    CLADA engine vs_dense / vs_dense_paired against clada-dense at its precision. None where the
    other engine was not measured."""
    for name, r in engines.items():
        if "skipped" in r:
            continue
        for key, other in (("vs_reference", reference_of(name, r["precision"])), ("vs_dense", dense_of(name))):
            o = engines.get(other) if other else None
            ok = o is not None and "skipped" not in o
            r[key] = r["tok_s"] / o["tok_s"] if ok else None
            r[key + "_paired"] = paired_ratio(r.get("rounds"), o.get("rounds")) if ok else None


def format_table(report: dict) -> str:
    eng = {name: dict(r) for name, r in report["engines"].items()}
    add_ratios(eng)  # also for reports written before the ratios were stored
    lines = ["| engine | precision | tok/s | vs llama.cpp | paired | CLADA vs dense (paired) | GB/s | % of read "
             "| active frac. |", "|---|---|---|---|---|---|---|---|---|"]

    def x(v):
        return "-" if v is None else f"{v:.2f}x"
    for name, r in eng.items():
        if "skipped" in r:
            lines.append(f"| {name} | {r.get('precision') or '-'} | skipped: {r['skipped']} | | | | | | |")
            continue
        ref = reference_of(name, r["precision"])
        if r["vs_reference"] is not None:
            ratio = f"{r['vs_reference']:.2f}x ({ref})"
        else:
            ratio = f"n/a ({ref} not run)" if ref else "n/a"
        dense = "-" if r["vs_dense"] is None else f"{r['vs_dense']:.2f}x ({x(r['vs_dense_paired'])})"
        af = "-" if r["active_fraction"] is None else f"{r['active_fraction']:.3f}"
        frac = f"{100 * r['read_fraction']:.0f}%" if r.get("read_fraction") is not None else "-"
        lines.append(f"| {name} | {r['precision']} | {r['tok_s']:.2f} | {ratio} | {x(r['vs_reference_paired'])} | "
                     f"{dense} | {r['gb_per_s']:.2f} | {frac} | {af} |")
    roof = (report.get("machine") or {}).get("read_gb_per_s")  # absent in reports made before the probe
    read = f"; % of read = GB/s / the machine's read bandwidth, {roof:.1f} GB/s (median over rounds)" if roof else ""
    lines.append(f"(decode tok/s, prefill excluded: median of {report['rounds']} interleaved rounds after a warm-up "
                 f"round; {report['prompt_tokens']} prompt + {report['new_tokens']} new tokens, greedy; "
                 f"{report['threads']} threads; ratios: of the medians, paired = median over rounds of the ratio "
                 f"within a round; GB/s = weight bytes read per decode token x tok/s{read})")
    return "\n".join(lines)


def write_json(path, report: dict) -> None:
    """Write atomically: a temporary sibling renamed over `path`."""
    atomic_write_json(path, report)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clada-bench --compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="smollm2",
                   help="smollm2 | gemma3-270m | qwen2.5-coder-0.5b | file.gguf | HF directory")
    p.add_argument("--engines", default=None, help=f"comma-separated, default all: {','.join(ENGINES)}")
    p.add_argument("--text", default=None, help=f"text the prompt is cut from (default {default_text()})")
    p.add_argument("--prompt_tokens", type=int, default=256)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=2, help="threads of every engine")
    p.add_argument("--backend", default="inductor", choices=["inductor", "eager"],
                   help="torch backend of the clada-* engines (eager: no compilation, for quick checks)")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--plot", default=None, help="draw each engine's median and rounds to this PNG (needs matplotlib)")
    return p


def main_compare(argv) -> int:
    args = build_parser().parse_args(argv)
    from clada_compile.cli.checks import check_input_file, check_output_file

    if args.json:  # before the engines are built (minutes): a bad path is found now
        check_output_file(args.json, "--json")
    if args.plot:
        from .plots import require_matplotlib

        if Path(args.plot).suffix.lower() != ".png":
            raise ValueError(f"`--plot` must be a .png file, got {args.plot!r}")
        check_output_file(args.plot, "--plot")
        require_matplotlib("--plot")
    if args.text:
        check_input_file(args.text, "--text")
    report = compare(args.model_path, args.engines, args.text, args.prompt_tokens, args.new_tokens, args.rounds,
                     args.threads, args.backend)
    print(format_table(report))
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    if args.plot:
        from .plots import plot_compare

        roof = report["machine"].get("read_gb_per_s")
        plot_compare(report, args.plot, title=f"{report['model']}: decode tok/s, {report['threads']} threads, "
                     f"{report['prompt_tokens']} + {report['new_tokens']} tokens"
                     + (f", read probe {roof:.0f} GB/s" if roof else ""))
        print(f"wrote {args.plot}")
    return 0
