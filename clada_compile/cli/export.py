"""clada-export: the CLADA prefill/decode graphs as ONNX, validated against PyTorch.

    clada-export --onnx --model_path smollm2 --output smollm2-onnx --top_k_ratio 0.5
    clada-export --onnx --model_path smollm2 --output smollm2-onnx-int8 --low_memory_mode
    clada-export --onnx --model_path smollm2 --output smollm2-onnx --force   # overwrite

Writes prefill.onnx, decode.onnx, mlp_weights.safetensors, clada.json and the tokenizer into
--output (atomically), after checking ONNX Runtime against PyTorch on the same inputs; prints the
max abs difference per output. Load the result with
clada_compile.exporters.OrtCladaModel.from_dir(DIR) or `clada-generate --backend ort --onnx_dir DIR`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from clada_compile.cli.checks import check_model, check_output_dir, check_profile, check_threads
from clada_compile.cli.common import add_clada_flags, clada_kwargs, run_cli


def parser():
    p = argparse.ArgumentParser(prog="clada-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", action="store_true", help="export to ONNX (the only format so far; required)")
    p.add_argument("--model_path", default="smollm2", help="smollm2 | gemma3-270m | qwen2.5-coder-0.5b | file.gguf | HF directory")
    p.add_argument("--output", required=True, help="output directory (refused if it exists, unless --force)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--low_memory_mode", action="store_true",
                   help="weight-only quantized graphs (MatMulNBits/GatherBlockQuantized); compares size and "
                        "peak RSS with the full-precision export")
    p.add_argument("--low_memory_bits", type=int, default=8, choices=[8, 4])
    p.add_argument("--block_size", type=int, default=32, help="quantization block size (low-memory mode)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--dense", action="store_true", help="export the baseline: decode MLPs without the threshold mask")
    p.add_argument("--force", action="store_true", help="overwrite an existing --output directory")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for tracing and validation")
    add_clada_flags(p)
    return p


def _fmt(x):
    return "-" if x is None else f"{x:.2e}"


def _grouped(diffs: dict) -> dict:
    groups = {}
    for name, d in diffs.items():
        key = name
        for prefix in ("present.", "clada.scores.", "clada.active."):
            if name.startswith(prefix):
                key = prefix + "*"
        groups[key] = max(groups.get(key, 0.0), d)
    return groups


def _table(diffs: dict, title: str) -> str:
    pre, dec = _grouped(diffs["prefill"]), _grouped(diffs["decode"])
    names = list(dict.fromkeys(list(pre) + list(dec)))
    lines = [title, f"  {'output':<18}{'prefill':>12}{'decode':>12}"]
    lines += [f"  {n:<18}{_fmt(pre.get(n)):>12}{_fmt(dec.get(n)):>12}" for n in names]
    return "\n".join(lines)


def _mb(n):
    return f"{n / 2**20:9.1f} MiB"


def report(manifest: dict) -> str:
    v = manifest["validation"]
    out = [_table(v["max_abs_diff"], f"max abs diff, ONNX Runtime vs PyTorch ({v['precision']}, tolerance "
                                      f"{v['tolerance']:g}; clada.active.* must match exactly):")]
    if "low_memory" in v:
        lm = v["low_memory"]
        q = manifest["low_memory"]
        out.append(_table(lm["max_abs_diff"], f"max abs diff, {q['bits']}-bit weight-only ORT vs {v['precision']} "
                                                f"PyTorch (logits within {lm['rel_tolerance_logits']:g} x max|logit|):"))
        out.append("  greedy top-1 agreement: " + ", ".join(f"{k} {a:.1%}" for k, a in lm["top1_agreement"].items()))
    sizes = manifest["file_sizes"]
    fp = manifest.get("file_sizes_fp")
    if fp:
        out.append(f"files ({manifest['precision']} vs low-memory):")
        for name in sorted(set(fp) | set(sizes)):
            if name.endswith((".onnx", ".safetensors")):
                a, b = fp.get(name, 0), sizes.get(name, 0)
                out.append(f"  {name:<26}{_mb(a)} -> {_mb(b)}")
        ta = sum(v for k, v in fp.items() if k.endswith((".onnx", ".safetensors")))
        tb = sum(v for k, v in sizes.items() if k.endswith((".onnx", ".safetensors")))
        out.append(f"  {'total':<26}{_mb(ta)} -> {_mb(tb)}  ({tb / ta:.0%})")
    else:
        out.append("files:")
        out += [f"  {name:<26}{_mb(size)}" for name, size in sizes.items() if name.endswith((".onnx", ".safetensors"))]
    mem = manifest.get("memory")
    if mem:
        out.append("peak RSS of a fresh process (load + 128-token prefill + 16 decode steps):")
        out += [f"  {k:<26}{v['peak_rss_mib']:9.1f} MiB (after load {v['after_load_mib']:.1f} MiB)"
                for k, v in mem.items()]
    return "\n".join(out)


def main_impl(argv=None):
    args = parser().parse_args(argv)
    if not args.onnx:
        raise ValueError("choose the export format: --onnx (the only one so far)")
    import torch

    from clada_compile import CladaConfig
    from clada_compile.exporters.onnx import DEFAULT_OPSET, ExportValidationError, export_onnx

    check_threads(args.threads)
    if args.block_size < 1:
        raise ValueError(f"--block_size must be >= 1, got {args.block_size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    kw = clada_kwargs(args)  # every clada flag, recorded as the export's runtime default
    config = CladaConfig(precision=args.precision, **kw)
    t0 = time.perf_counter()
    try:
        # before the ~40 s of loading and tracing: the output, the model and the profile are usable
        check_output_dir(args.output, "--output", args.force)
        check_model(args.model_path)
        check_profile(config.profile)
        out = export_onnx(args.model_path, args.output, config=config, opset=args.opset or DEFAULT_OPSET,
                          precision=args.precision, low_memory=args.low_memory_mode, force=args.force,
                          low_memory_bits=args.low_memory_bits, block_size=args.block_size, dense=args.dense,
                          measure_memory=args.low_memory_mode, log=lambda m: print(f"[clada-export] {m}", flush=True))
    except (FileExistsError, ExportValidationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest = json.loads((out / "clada.json").read_text())
    print(report(manifest))
    print(f"exported {args.model_path} -> {out} in {time.perf_counter() - t0:.0f} s "
          f"(k={manifest['k'][0]} of d_ff={manifest['d_ff'][0]} by default; any top_k_ratio works at load time)")
    print(f"load it with: OrtCladaModel.from_dir({str(out)!r})  or  clada-generate --backend ort --onnx_dir {out}")
    return 0


def main(argv=None):
    sys.exit(run_cli(main_impl, argv))


if __name__ == "__main__":
    main()
