"""Flags and engine construction shared by the clada-* commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from clada_compile.bench.plots import MissingExtraError


def add_model_flags(p: argparse.ArgumentParser):
    p.add_argument("--model_path", default="smollm2",
                   help="smollm2 | gemma3-270m | qwen2.5-coder-0.5b | file.gguf | HF directory")
    p.add_argument("--backend", default="inductor", choices=["inductor", "eager", "ort"])
    p.add_argument("--wrapper", default=None, choices=["cpp", "python"],
                   help="--backend inductor: the decode graph's wrapper, cpp (default: faster steps) or python "
                        "(quicker to compile)")
    p.add_argument("--onnx_dir", default=None, help="clada-export --onnx output (for --backend ort)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "int8"],
                   help="weights of the decode projections; int8: weight-only, per output channel (torch backends)")
    p.add_argument("--low_memory_mode", action="store_true", help="bf16 weights (torch backends; for ORT use clada-export --low_memory_mode)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")


def add_clada_flags(p: argparse.ArgumentParser):
    p.add_argument("--top_k_ratio", type=float, default=None)
    p.add_argument("--min_active_neurons", type=int, default=None)
    p.add_argument("--surprisal_threshold", type=float, default=None)
    p.add_argument("--entropy_threshold", type=float, default=None)
    p.add_argument("--update_window", type=int, default=None)
    p.add_argument("--target_active", type=float, default=None, help="mean kept fraction of the per-token threshold")
    p.add_argument("--profile", default=None,
                   help="calibration profile JSON (clada-calibrate); default: the shipped one for smollm2; 'none' = off")
    p.add_argument("--schedule", default=None, choices=["static", "clada"])
    p.add_argument("--reselect", default=None, action=argparse.BooleanOptionalAction)
    p.add_argument("--kernel", default=None, choices=["auto", "reference"])
    p.add_argument("--sparsify", default=None,
                   help="comma-separated threshold groups of the profile to use (mlp_down,mlp_in,attn_in,attn_out,lm_head); "
                        "default: every group the profile has")
    p.add_argument("--input_active", default=None,
                   help="kept fraction per input group, re-targeted along the profile's curves, e.g. "
                        "mlp_in=0.8,attn_in=0.7 (default: the profile's calibrated targets)")
    p.add_argument("--mlp_criterion", default=None, choices=["h", "gate"],
                   help="what the MLP's threshold compares: h (default, CLADA) or gate: |act(gate)|, the CATS "
                        "baseline (up and down rows of dropped neurons skipped; torch backends, fp32/bf16)")
    p.add_argument("--seed", type=int, default=0)


def clada_kwargs(args) -> dict:
    """CladaConfig keyword arguments from add_clada_flags' flags (every one of them: none is
    ignored), the profile defaulting to the embedded model's shipped one."""
    fields = ("top_k_ratio", "min_active_neurons", "surprisal_threshold", "entropy_threshold", "update_window",
              "target_active", "profile", "schedule", "reselect", "kernel", "mlp_criterion", "seed")
    kw = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
    if getattr(args, "sparsify", None) is not None:
        kw["sparsify"] = tuple(x.strip() for x in args.sparsify.split(",") if x.strip())
    if getattr(args, "input_active", None) is not None:
        kw["input_active"] = parse_fractions(args.input_active, "--input_active")
    if kw.get("profile") == "none":
        kw["profile"] = None
    elif "profile" not in kw and getattr(args, "model_path", None):
        from clada_compile.calibrate import shipped_profile

        kw["profile"] = shipped_profile(args.model_path)  # the embedded model's own calibration
    return kw


def config_from_args(args, **extra):
    from clada_compile import CladaConfig

    kw = clada_kwargs(args)
    if getattr(args, "backend", "inductor") in ("inductor", "eager"):
        kw["backend"] = args.backend
    if getattr(args, "wrapper", None) is not None:
        if args.backend != "inductor":
            raise ValueError(f"--wrapper {args.wrapper} applies to --backend inductor (the compiled decode graph), "
                             f"got --backend {args.backend}; drop --wrapper")
        kw["wrapper"] = args.wrapper
    if args.low_memory_mode and args.backend == "ort":
        raise ValueError("--low_memory_mode does nothing at run time with --backend ort: the export decides the "
                         "weights' precision; export with `clada-export --onnx --low_memory_mode` instead")
    if getattr(args, "backend", None) == "ort" and args.precision != "fp32":
        raise ValueError(f"--precision {args.precision} does nothing at run time with --backend ort: the export "
                         "decides the weights' precision; export with `clada-export --onnx --precision ...` instead")
    if args.low_memory_mode and args.precision not in ("fp32", "bf16"):
        raise ValueError(f"--low_memory_mode means bf16 weights, which contradicts --precision {args.precision}; "
                         "pass one of them")
    kw["precision"] = "bf16" if args.low_memory_mode and args.precision == "fp32" else args.precision
    kw.update(extra)
    return CladaConfig(**kw)


def parse_fractions(text: str, flag: str) -> dict:
    """"mlp_in=0.8,attn_in=0.7" -> {"mlp_in": 0.8, "attn_in": 0.7}; names are checked by the caller."""
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{flag}: expected GROUP=FRACTION items like mlp_in=0.8, got {item!r}") from None
    return out


def build_engine(args, config):
    """(engine, tokenizer) for the chosen backend."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend == "ort":
        if not args.onnx_dir:
            raise SystemExit("error: --backend ort needs --onnx_dir DIR (make one with: clada-export --onnx --output DIR)")
        from clada_compile.exporters.ort import OrtCladaModel

        engine = OrtCladaModel.from_dir(args.onnx_dir, config=config)
        return engine, engine.tokenizer
    from clada_compile import load_model, optimize

    model, tok = load_model(args.model_path, dtype="fp32" if config.precision == "int8" else config.precision)
    engine = optimize(model, config, tokenizer=tok)
    print(engine.rewrite_summary(), file=sys.stderr)
    return engine, tok


def check_engine_inputs(args, config) -> None:
    """Before build_engine: the model (or the ORT export) and the profile exist and are usable."""
    from clada_compile.cli.checks import check_model, check_profile, check_threads

    check_threads(args.threads)
    if args.backend == "ort":
        if not args.onnx_dir:
            raise ValueError("--backend ort needs --onnx_dir DIR (make one with: clada-export --onnx --output DIR)")
        if not Path(args.onnx_dir).is_dir():
            raise FileNotFoundError(f"--onnx_dir {args.onnx_dir} is not a directory "
                                    f"(make one with: clada-export --onnx --output {args.onnx_dir})")
    else:
        check_model(args.model_path)
    check_profile(config.profile)


def run_cli(fn, argv=None):
    """Turn the errors users cause into one clear line instead of a traceback."""
    try:
        return fn(argv)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, MissingExtraError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's exit status for SIGINT
        print("interrupted", file=sys.stderr)
        return 130
