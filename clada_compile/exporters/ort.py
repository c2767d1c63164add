"""OrtCladaModel: the CLADA engine on ONNX Runtime, over a directory written by export_onnx.

It implements the engine contract (engine.Engine: prefill, decode and weight compaction; the
rest is shared with the torch engine compiled.CladaModel), so runtime.generate drives both.
Tensors at this interface are torch tensors. This module imports neither the exporter nor the FX
stack (tracing, passes, compiled): a deployment needs torch, onnxruntime and the export only.

Device residency (IOBinding):
- the compacted MLP weights (decode inputs `clada.L.*`) live in buffers this object owns and are
  bound once; set_active rewrites them in place (on CUDA: one host-to-device copy per layer), so
  a re-selection is a re-bind of the same buffers, never a re-export or a new session;
- the KV cache: ORT allocates the `present.*` outputs on the session's device and they are
  handed back as torch tensors sharing that memory (DLPack; no copy); fed back as `past`, they
  are bound by pointer. On CUDA without a CUDA build of torch, presents are returned as ORT
  OrtValues, which decode() accepts as `past` unchanged.
- logits, scores and kept counts always come back on the host.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import INPUT_GROUPS, CladaConfig
from ..engine import Engine, position_ids_from_mask
from .manifest import FILES, MANIFEST, read_manifest, reexport_hint

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bfloat16: None}
_TORCH = {"float32": torch.float32, "float16": torch.float16}


def _check_providers(providers):
    import onnxruntime as ort

    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    names = [p if isinstance(p, str) else p[0] for p in providers]
    available = ort.get_available_providers()
    for name in names:
        if name in available:
            continue
        if name == "CUDAExecutionProvider":
            raise RuntimeError(
                f"CUDAExecutionProvider was requested but onnxruntime reports only {available}; install "
                "onnxruntime-gpu (pip install clada_compile[gpu]; then uninstall the CPU-only onnxruntime, "
                "both provide the `onnxruntime` module)")
        raise RuntimeError(f"{name} was requested but onnxruntime reports only {available}")
    providers = list(providers)
    if "CPUExecutionProvider" not in names:
        providers.append("CPUExecutionProvider")
    return providers


def _session(file: Path, options, providers, manifest, directory):
    import onnxruntime as ort

    hint = reexport_hint(manifest, directory)
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: the export in {directory} is incomplete; {hint}")
    try:
        return ort.InferenceSession(str(file), options, providers=providers)
    except Exception as err:  # onnxruntime raises its own pybind exception types
        raise ValueError(f"cannot load {file}: it is truncated or corrupt, or not an ONNX model "
                         f"(onnxruntime: {str(err).strip()[:300]}); {hint}") from err


def _to_torch(value):
    """An ORT-allocated OrtValue -> a torch tensor on the same memory (DLPack), when torch can hold it."""
    try:
        return torch.from_dlpack(value._ortvalue.to_dlpack())
    except Exception:
        if value.device_name().lower() == "cpu":
            return torch.from_numpy(value.numpy())
        return value  # a CUDA OrtValue and a CPU-only torch: keep it as is


class _Shared:
    """What an engine and its dense() twin share: sessions, full weights, manifest."""

    def __init__(self, path, manifest, prefill, decode, full, dtype, device, tokenizer):
        self.path, self.manifest = path, manifest
        self.prefill, self.decode = prefill, decode
        self.full, self.dtype, self.device, self.tokenizer = full, dtype, device, tokenizer


class OrtCladaModel(Engine):
    """ONNX Runtime engine; build it with OrtCladaModel.from_dir(export_dir)."""

    def __init__(self, shared: _Shared, config: CladaConfig):
        m = shared.manifest
        self._shared = shared
        self.path = shared.path
        self.manifest = m
        self.tokenizer = shared.tokenizer
        self.n_layers = int(m["n_layers"])
        self._init_engine(config, m["d_ff"])
        self.d_model = int(m["d_model"])
        self.context_length = m.get("context_length")
        self.vocab_size = m.get("vocab_size")
        # layers whose attention inputs the exported decode graph thresholds
        self.attention_layers = list(m.get("attention_layers", []))
        self.head_thresholded = bool(m.get("head_thresholded", False))
        self.device = shared.device
        self.dtype = shared.dtype
        self.full = shared.full
        # like CladaModel: the per-token threshold only runs when config.uses_threshold (a profile
        # and target_active < 1); otherwise decode gets tau = 0, i.e. exactly the compacted backbone.
        # "reference": the thresholds applied as a numeric mask, ops.IMPLS' name for it
        self.impl = "dense" if not config.enabled or not config.uses_threshold else "reference"
        if self.impl == "reference" and config.mlp_criterion != "h":
            raise ValueError(f"the ONNX decode graph thresholds h; `mlp_criterion` {config.mlp_criterion!r} (CATS) is a "
                             f"torch-engine baseline: run it with clada_compile.optimize, or use mlp_criterion 'h'")
        if self.impl == "reference" and m.get("impl") == "dense":
            raise ValueError(f"{shared.path} was exported with dense=True (no threshold mask in decode.onnx), but the "
                             f"config thresholds with a profile (target_active={config.target_active}, sparsify={config.sparsify}); "
                             f"re-export without --dense")
        self._zero_taus = torch.zeros_like(self.taus)
        # clada.tau_in as fed, made once: a view of the rows this export has (exports before the
        # "lm_head" group have the first three) of input_taus (set in place) or of zeros
        rows = len(m.get("input_groups", INPUT_GROUPS))
        self._tau_in_feed = (self.input_taus if self.impl == "reference" else torch.zeros_like(self.input_taus))[:rows]
        self.prefill_inputs = list(m["prefill"]["inputs"])
        self.prefill_outputs = list(m["prefill"]["outputs"])
        self.decode_inputs = list(m["decode"]["inputs"])
        self.decode_outputs = list(m["decode"]["outputs"])
        self.compact = []
        for f, k, d_ff in zip(self.full, self.k, self.d_ff):
            if k == d_ff and all(t.dtype == self.dtype for t in f.values()):
                # the full backbone: the "compacted" weights are the full ones, no copy
                self.compact.append(dict(f))
                continue
            self.compact.append({key: torch.empty((k, *t.shape[1:]), dtype=self.dtype) for key, t in f.items()})
        self._device_buffers = None
        if self.device == "cuda":
            import onnxruntime as ort

            self._device_buffers = [
                {key: ort.OrtValue.ortvalue_from_shape_and_type(tuple(t.shape), _NP[self.dtype], "cuda", 0)
                 for key, t in buf.items()} for buf in self.compact]
        for layer in range(self.n_layers):
            self.set_active(layer, torch.arange(self.k[layer]))
        self._decode_io = shared.decode.io_binding()
        for name in self.decode_inputs:
            if name.startswith("clada.") and name.count(".") == 2:
                _, layer, key = name.split(".")
                self._bind(self._decode_io, name, self._weight(int(layer), key))

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path, providers=None, config: CladaConfig | None = None, threads: int | None = None,
                 session_options=None) -> "OrtCladaModel":
        """Load an export directory (clada-export --onnx).

        providers: ONNX Runtime execution providers, e.g. ["CUDAExecutionProvider"]; default CPU.
            A requested provider this onnxruntime build lacks raises RuntimeError naming the fix.
        config: CladaConfig for the runtime (top_k_ratio -> k, controller settings, profile);
            default: the one recorded at export, with the export's profile.json when it has one.
            A profile (config.profile) sets the base thresholds, as optimize() does; the per-token
            threshold runs when config.uses_threshold (a profile and target_active < 1).
        threads: intra-op threads of both sessions (default: onnxruntime's choice).
        session_options: an onnxruntime.SessionOptions to use as is (default: ORT's defaults with
            intra-op spinning off, so the host-side loop between steps keeps its cores).
        """
        import onnxruntime as ort
        from safetensors.torch import load_file

        path = Path(path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a directory; export one with "
                                    f"`clada-export --onnx --model_path MODEL --output {path}`")
        manifest = read_manifest(path)
        providers = _check_providers(providers)
        first = providers[0] if isinstance(providers[0], str) else providers[0][0]
        device = "cuda" if first == "CUDAExecutionProvider" else "cpu"
        opts = session_options
        if opts is None:
            opts = ort.SessionOptions()
            # the host loop (sampling, controller) runs torch ops between steps: ORT workers that
            # spin-wait after a run would steal those cores (measured: 1.6x slower decode on 2 cores)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            # shapes change every step (the KV cache grows): memory patterns never apply
            opts.enable_mem_pattern = False
        if threads:
            opts.intra_op_num_threads = int(threads)
        files = {**FILES, **manifest.get("files", {})}
        pre = _session(path / files["prefill"], opts, providers, manifest, path)
        dec = _session(path / files["decode"], opts, providers, manifest, path)
        hint = reexport_hint(manifest, path)
        for phase, sess in (("prefill", pre), ("decode", dec)):
            got_in = [i.name for i in sess.get_inputs()]
            got_out = [o.name for o in sess.get_outputs()]
            if got_in != manifest[phase]["inputs"] or got_out != manifest[phase]["outputs"]:
                raise ValueError(f"{path / files[phase]}: its inputs/outputs do not match {path / MANIFEST}; {hint}")
        wfile = path / files["mlp_weights"]
        if not wfile.is_file():
            raise FileNotFoundError(f"{wfile} not found: the export in {path} is incomplete; {hint}")
        try:
            tensors = load_file(str(wfile))
        except Exception as err:
            raise ValueError(f"cannot read {wfile}: {err}; {hint}") from err
        full = []
        for site in manifest["sites"]:
            layer = site["layer"]
            try:
                f = {"w_in": tensors.pop(f"{layer}.w_in")}
                if site["has_b_in"]:
                    f["b_in"] = tensors.pop(f"{layer}.b_in")
                if site["kind"] == "gated":
                    f["w_up"] = tensors.pop(f"{layer}.w_up")
                if site["has_b_up"]:
                    f["b_up"] = tensors.pop(f"{layer}.b_up")
                # row j of w_down_t holds neuron j's output weights: selection gathers rows
                f["w_down_t"] = tensors.pop(f"{layer}.w_down").t().contiguous()
            except KeyError as err:
                raise ValueError(f"{wfile} lacks tensor {err} of layer {layer}; {hint}") from None
            full.append(f)
        tokenizer = None
        if manifest.get("tokenizer"):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path))
        dtype = _TORCH[manifest.get("dtype", "float32")]
        shared = _Shared(path, manifest, pre, dec, full, dtype, device, tokenizer)
        if config is None:
            known = set(CladaConfig.__dataclass_fields__) - {"profile"}
            prof = files.get("profile")
            prof = str(path / prof) if prof and (path / prof).is_file() else None
            config = CladaConfig(profile=prof, **{k: v for k, v in manifest.get("config", {}).items() if k in known})
        engine = cls(shared, config)  # Engine checks that `config` is a CladaConfig
        engine._apply_profile()
        return engine

    def _apply_profile(self) -> None:
        if self.config.profile is not None:
            from ..calibrate import apply_profile

            apply_profile(self, self.config.profile)  # sets the base thresholds, like optimize()

    # ---- Engine: the dense twin and weight compaction ----------------------------------------
    def _make_dense(self) -> "OrtCladaModel":
        return OrtCladaModel(self._shared, self.config.replace(enabled=False))  # same sessions

    def _compact(self, layer: int, idx: torch.Tensor) -> None:
        f, buf = self.full[layer], self.compact[layer]
        for key, t in buf.items():
            if t is f[key]:
                continue  # full backbone, aliased
            if t.dtype == f[key].dtype:
                torch.index_select(f[key], 0, idx, out=t)
            else:
                t.copy_(torch.index_select(f[key], 0, idx))
        if self._device_buffers is not None:
            for key, t in buf.items():
                self._device_buffers[layer][key].update_inplace(t.numpy())

    # ---- binding ---------------------------------------------------------------------------
    def _weight(self, layer: int, key: str):
        if self._device_buffers is not None:
            return self._device_buffers[layer][key]
        return self.compact[layer][key]

    @staticmethod
    def _bind(io, name, value):
        if isinstance(value, torch.Tensor):
            if not value.is_contiguous():
                raise ValueError(f"{name}: internal error, a non-contiguous tensor cannot be bound")
            dev = "cuda" if value.is_cuda else "cpu"
            io.bind_input(name, dev, value.device.index or 0, _NP[value.dtype], tuple(value.shape), value.data_ptr())
        else:  # an OrtValue
            io.bind_ortvalue_input(name, value)

    def _host(self, t, dtype=torch.int64):
        t = torch.as_tensor(t)
        if t.dtype != dtype:
            t = t.to(dtype)
        return t.contiguous()

    def _run(self, sess, io, feeds: dict, outputs: list[str], keep_on_device: set[str]):
        alive = []
        for name, value in feeds.items():
            if isinstance(value, torch.Tensor) and self.device == "cuda" and not value.is_cuda:
                io.bind_cpu_input(name, value.contiguous().numpy())
            else:
                if isinstance(value, torch.Tensor) and not value.is_contiguous():
                    value = value.contiguous()
                self._bind(io, name, value)
            alive.append(value)
        io.clear_binding_outputs()
        for name in outputs:
            io.bind_output(name, self.device if name in keep_on_device else "cpu")
        sess.run_with_iobinding(io)
        res = [_to_torch(v) for v in io.get_outputs()]
        io.clear_binding_outputs()
        del alive
        return res

    # ---- graph calls -----------------------------------------------------------------------
    def prefill(self, input_ids, attention_mask=None, taus=None, score_mask=None):
        """Full-weight pass over a prompt -> (logits, presents, scores per layer)."""
        input_ids = self._host(input_ids)
        attention_mask = None if attention_mask is None else self._host(attention_mask)
        taus = None if taus is None else self._host(taus, torch.float32)
        score_mask = None if score_mask is None else self._host(score_mask)
        values = self._prefill_feeds(input_ids, attention_mask, taus, score_mask)
        feeds = {name: values[name] for name in self.prefill_inputs}
        presents = {n for n in self.prefill_outputs if n.startswith("present.")}
        sess = self._shared.prefill
        return self._split_outputs(self._run(sess, sess.io_binding(), feeds, self.prefill_outputs, presents))

    def decode(self, input_ids, attention_mask, past, with_active=False, taus=None, input_taus=None):
        """Compacted-weight step(s) on top of a KV cache -> (logits, presents[, kept per layer]).

        The exported decode graph takes one threshold per layer (per_token_thresholds is False):
        `taus`/`input_taus` must be None (the engine's current thresholds)."""
        if taus is not None or input_taus is not None:
            raise ValueError("the ONNX decode graph takes one threshold per layer, not per token: pass taus=None and "
                             "input_taus=None (set them with set_thresholds / set_input_thresholds), or score "
                             "with scorer='sequential'")
        self._check_past(past)
        self._check_with_active(with_active)
        input_ids = self._host(input_ids)
        attention_mask = self._host(attention_mask)
        pos = position_ids_from_mask(attention_mask, input_ids.shape[1]).contiguous()
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": pos}
        for i in range(self.n_layers):
            feeds[f"past_key_values.{i}.key"] = past[2 * i]
            feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
        feeds["clada.tau"] = self.taus if self.impl == "reference" else self._zero_taus
        if "clada.tau_in" in self.decode_inputs:  # exports before format 2 have no input thresholds
            feeds["clada.tau_in"] = self._tau_in_feed
        presents = {x for x in self.decode_outputs if x.startswith("present.")}
        out = self._run(self._shared.decode, self._decode_io, feeds, self.decode_outputs, presents)
        logits, new, kept = self._split_outputs(out)
        return self._with_active((logits, new), kept, with_active)

    def generate(self, input_ids, **kwargs):
        """runtime.generate on this engine. torch runs single-threaded meanwhile: its host-side ops
        are tiny, and idle OpenMP workers spin-waiting between steps would take the cores ORT's
        threads need (measured on 2 cores: 9.6 -> 16.5 decode tokens/s for smollm2)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return super().generate(input_ids, **kwargs)
        finally:
            torch.set_num_threads(threads)

    def rewrite_summary(self) -> str:
        m = self.manifest
        kinds = sorted({f"{s['kind']}/{s['act']}" for s in m["sites"]})
        prov = self._shared.decode.get_providers()[0]
        quant = m.get("low_memory")
        return (f"ONNX export {self.path} of {m['model']} ({m['architecture']}, {self.n_layers} layers, "
                f"{m['precision']}{', ' + str(quant['bits']) + '-bit weights' if quant else ''}); "
                f"MLPs: {', '.join(kinds)}; d_ff={self.d_ff[0]}, k={self.k[0]}, decode impl={self.impl}, "
                f"provider={prov}")

