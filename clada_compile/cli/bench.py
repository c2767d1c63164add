"""clada-bench: decode throughput of dense vs CLADA on one model and backend, interleaved.

    clada-bench --backend inductor --prompt_len 256 --new_tokens 128 --profile p.json --json bench.json
    clada-bench kernels                       # sparse GEMV kernel vs dense F.linear
    clada-bench --sweep --text data/wikitext-2/valid.txt --json sweep.json   # frontier + PNG
    clada-bench --compare --engines llama.cpp-f32,clada-dense-fp32,clada-fp32 --json compare.json
        # llama.cpp / ORT / HF / CLADA side by side (clada_compile.bench.compare; clada-bench --compare --help)
"""

from __future__ import annotations

import argparse
import platform
import re
import resource
import sys
from pathlib import Path

import torch

from clada_compile.cli.checks import check_input_file, check_output_file, check_threads
from clada_compile.cli.common import (add_clada_flags, add_model_flags, build_engine, check_engine_inputs,
                                      config_from_args, run_cli)
from clada_compile.bench.plots import require_matplotlib
from clada_compile.io import atomic_write_json


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = dict(cpu=cpu, threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
                device="cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    import transformers

    info["transformers"] = transformers.__version__
    return info


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_decode(engine, prompt_ids, new_tokens: int, repeats: int):
    """Interleaved dense/CLADA greedy generation; decode tokens/s (prefill excluded) per run."""
    from clada_compile.bench.timing import time_engines

    t = time_engines({"dense": (engine, True), "clada": (engine, False)}, prompt_ids, new_tokens, repeats)
    return dict(
        dense_tokens_per_s=t["dense"]["median"], clada_tokens_per_s=t["clada"]["median"],
        speedup=t["clada"]["median"] / t["dense"]["median"], clada_active_fraction=t["clada"]["active_fraction"],
        runs={name: t[name]["runs"] for name in t},
    )


def bench_kernel_ab(engine, prompt_ids, new_tokens: int, repeats: int):
    """The end-to-end effect of the sparse GEMV kernel: dense, CLADA with the masked dense matmul
    (kernel=reference) and CLADA with the kernel (kernel=auto), same thresholds, interleaved."""
    from clada_compile.bench.timing import time_engines

    cfg = engine.config
    engines = {"dense": (engine, True), "kernel_off": (engine.with_config(cfg.replace(kernel="reference")), False),
               "kernel_on": (engine.with_config(cfg.replace(kernel="auto")), False)}
    t = time_engines(engines, prompt_ids, new_tokens, repeats)
    d = t["dense"]["median"]
    return {name: dict(tokens_per_s=v["median"], speedup=v["median"] / d, active_fraction=v["active_fraction"],
                       raw_tokens_per_s=v["raw"]) for name, v in t.items()}


def main_kernels(argv):
    from clada_compile.bench.kernels import DEFAULT_SHAPES

    p = argparse.ArgumentParser(prog="clada-bench kernels")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in DEFAULT_SHAPES),
                   help="W^T shapes KxN, comma-separated (K input channels = rows, N outputs = row length)")
    p.add_argument("--fractions", default="1,0.5,0.3", help="kept fractions of the rows; 1 = every row (tau = 0)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    check_threads(args.threads)
    shapes = []
    for item in args.shapes.split(","):
        m = re.fullmatch(r"\s*([1-9]\d*)[xX]([1-9]\d*)\s*", item)
        if m is None:
            raise ValueError(f"`--shapes` entries must be KxN with positive integers, e.g. 576x1536, got {item!r}")
        shapes.append((int(m[1]), int(m[2])))
    fractions = _floats(args.fractions, "--fractions")
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"`--fractions` entries must be in (0, 1], got {f}")
    if args.json:
        check_output_file(args.json, "--json")
    from clada_compile.bench.kernels import format_table, run_kernel_bench

    rows = run_kernel_bench(shapes=tuple(shapes), fractions=tuple(fractions), threads=args.threads,
                            dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    print(format_table(rows))
    if args.json:
        atomic_write_json(args.json, dict(machine=machine(), rows=rows))
    return 0


def main_impl(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["kernels"]:
        return main_kernels(argv[1:])
    if "--compare" in argv:  # its own flags and defaults (--prompt_tokens 256, --threads 2, --rounds 3)
        from clada_compile.bench.compare import main_compare

        return main_compare([a for a in argv if a != "--compare"])
    p = argparse.ArgumentParser(prog="clada-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    add_clada_flags(p)
    p.add_argument("--prompt_len", type=int, default=256)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--text", default=None, help="text the prompt is cut from (default: a fixed English paragraph)")
    p.add_argument("--json", default=None)
    p.add_argument("--kernel_ab", action="store_true",
                   help="dense vs CLADA with the sparse GEMV kernel off (reference) and on (cpp), interleaved")
    p.add_argument("--compare", action="store_true",
                   help="llama.cpp, ONNX Runtime, HF and CLADA engines side by side, interleaved "
                        "(own flags: clada-bench --compare --help)")
    p.add_argument("--profile_decode", action="store_true",
                   help="where a decode step's time goes (torch.profiler): MLP, its down projection, attention "
                        "projections, attention, lm_head, rest, and the weights' GB/s")
    g = p.add_argument_group("sweep (speed-vs-quality frontier; needs --text)")
    g.add_argument("--sweep", action="store_true")
    g.add_argument("--sweep_methods", default="griffin,paper,calibrated")
    g.add_argument("--sweep_top_k", default="0.9,0.75,0.6,0.5", help="top_k_ratio values (griffin, paper)")
    g.add_argument("--sweep_targets", default="0.8,0.65,0.5,0.35", help="target_active values (calibrated, inputs)")
    g.add_argument("--sweep_inputs", default="0.9,0.8,0.7",
                   help="kept fractions of every input group (method inputs; needs a profile made with --inputs)")
    g.add_argument("--windows", type=int, default=8)
    g.add_argument("--prompt_tokens", type=int, default=384)
    g.add_argument("--continuation_tokens", type=int, default=128)
    g.add_argument("--start_token", type=int, default=8192)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    config = config_from_args(args)
    if args.profile_decode and args.backend != "eager" and config.kernel != "auto":
        # with the reference kernel inductor fuses the inlined MLP body into its own kernels:
        # nothing left to attribute by op name (the GEMV engine's projections stay clada ops)
        raise ValueError(f"--profile_decode with --backend {args.backend} needs --kernel auto, got --kernel "
                         f"{config.kernel} (compiled graphs fuse the reference MLP block); use --backend eager")
    if args.sweep and args.backend == "ort":
        raise ValueError("--sweep runs on the torch backends (inductor, eager); measure ORT points with --backend ort")
    if args.sweep and not args.text:
        raise ValueError("--sweep needs --text FILE to score perplexity on (e.g. data/wikitext-2/valid.txt)")
    _check_before_loading(args, config)
    points = _sweep_points(args, config) if args.sweep else None
    engine, tok = build_engine(args, config)
    if args.text:
        from clada_compile.data import load_text_tokens

        ids = load_text_tokens(args.text, tok, args.prompt_len).view(1, -1)
    else:
        text = ("The city was founded in the early years of the century and grew quickly as a port. " * 64)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[:, : args.prompt_len]
    if ids.shape[1] < args.prompt_len:
        raise ValueError(f"the prompt text has only {ids.shape[1]} tokens, fewer than --prompt_len {args.prompt_len}")
    if args.sweep:
        return _sweep(args, engine, tok, ids, points)
    if args.kernel_ab:
        return _kernel_ab(args, config, engine, ids)
    if args.profile_decode:
        return _profile_decode(args, engine, ids)
    res = bench_decode(engine, ids, args.new_tokens, args.repeats)
    report = dict(machine=machine(), model=args.model_path, backend=args.backend, prompt_len=args.prompt_len,
                  new_tokens=args.new_tokens, repeats=args.repeats, config=config.__dict__,
                  peak_rss_mb=peak_rss_mb(), **res)
    print(f"| backend | dense tok/s | CLADA tok/s | speedup | CLADA active frac. |\n|---|---|---|---|---|\n"
          f"| {args.backend} | {res['dense_tokens_per_s']:.2f} | {res['clada_tokens_per_s']:.2f} | "
          f"{res['speedup']:.3f}x | {res['clada_active_fraction']:.3f} |")
    print(f"(median of {args.repeats} interleaved runs, {args.prompt_len} prompt + {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads; process peak RSS {report['peak_rss_mb']:.0f} MB)")
    if args.json:
        atomic_write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


def _check_before_loading(args, config) -> None:
    """Every flag and path the run will use, checked before the model loads (~40 s)."""
    for flag in ("prompt_len", "new_tokens", "repeats"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.text:
        check_input_file(args.text, "--text")
    if args.json:
        check_output_file(args.json, "--json")
    if args.sweep:
        check_output_file(args.json or "sweep.json", "--json")
        require_matplotlib("clada-bench --sweep")
    if args.kernel_ab and not config.uses_threshold:
        raise ValueError("--kernel_ab compares the per-token threshold kernel: give a profile and --target_active < 1")
    check_engine_inputs(args, config)


def _kernel_ab(args, config, engine, ids):
    res = bench_kernel_ab(engine, ids, args.new_tokens, args.repeats)
    print("| decode | tok/s | vs dense | active frac. |\n|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['tokens_per_s']:.2f} | {r['speedup']:.3f}x | {r['active_fraction']:.3f} |")
    print(f"(median of {args.repeats} interleaved runs, {args.prompt_len} prompt + {args.new_tokens} new tokens, "
          f"{args.backend}, {torch.get_num_threads()} threads)")
    if args.json:
        atomic_write_json(args.json, dict(machine=machine(), model=args.model_path, backend=args.backend,
                                          prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                          repeats=args.repeats, config=config.__dict__, results=res))
        print(f"wrote {args.json}")
    return 0


def _profile_decode(args, engine, ids):
    from clada_compile.bench.timing import decode_profile

    rows = {"dense": decode_profile(engine, ids, args.new_tokens, baseline=True),
            "clada": decode_profile(engine, ids, args.new_tokens)}
    print("| decode | ms/token | MLP blocks | of which down proj. | attention proj. | attention | lm_head | rest "
          "(norms, rotary, host) | weights GB/s |\n|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        t = r["ms_per_token"]

        def cell(key):
            return f"{r[key]:.2f} ({100 * r[key] / t:.0f}%)" if key in r else "-"
        print(f"| {name} | {t:.2f} | {cell('mlp_ms')} | {cell('mlp_down_ms')} | {cell('attn_proj_ms')} | "
              f"{cell('attention_ms')} | {cell('lm_head_ms')} | {cell('other_ms')} | "
              f"{r.get('weight_gb_per_s', float('nan')):.1f} |")
    print(f"({args.backend}, {args.prompt_len} prompt tokens, {args.new_tokens} profiled steps, "
          f"{torch.get_num_threads()} threads; profiler overhead included)")
    if args.json:
        atomic_write_json(args.json, dict(machine=machine(), model=args.model_path, backend=args.backend,
                                          prompt_len=args.prompt_len, results=rows))
    return 0


def _floats(text: str, flag: str):
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"`{flag}` must be comma-separated numbers, got {text!r}") from None


def _sweep_points(args, config):
    """The sweep's grid, built (and so checked: methods, numbers, profile) before the model loads."""
    from clada_compile.bench.sweep import sweep_points

    return sweep_points(args.sweep_methods.split(","), _floats(args.sweep_top_k, "--sweep_top_k"),
                        _floats(args.sweep_targets, "--sweep_targets"), args.backend, config.kernel, config.profile,
                        _floats(args.sweep_inputs, "--sweep_inputs"))


def _sweep(args, engine, tok, ids, points):
    from clada_compile.bench.sweep import frontier_table, plot_sweep, run_sweep
    from clada_compile.data import load_text_tokens
    from clada_compile.evaluate import windows

    span = args.prompt_tokens + args.continuation_tokens
    text_ids = load_text_tokens(args.text, tok, max(args.windows * span * 4, 200_000))
    start = args.start_token if text_ids.numel() - args.start_token >= span else 0
    wins = windows(text_ids[start:], args.windows, args.prompt_tokens, args.continuation_tokens)
    res = run_sweep(engine, points, wins, ids, args.new_tokens, args.repeats)
    print(frontier_table(res))
    print(f"(quality: {len(wins)} windows x {args.continuation_tokens} scored tokens after {args.prompt_tokens}; "
          f"speed: median of {args.repeats} round-robin runs, {args.prompt_len} prompt + {args.new_tokens} new tokens, "
          f"{args.backend}, {torch.get_num_threads()} threads)")
    out = Path(args.json or "sweep.json")
    report = dict(machine=machine(), model=args.model_path, backend=args.backend, text=args.text, windows=len(wins),
                  prompt_tokens=args.prompt_tokens, continuation_tokens=args.continuation_tokens,
                  prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats, **res)
    atomic_write_json(out, report)
    plot_sweep(res, out.with_suffix(".png"), title=f"{args.model_path}, {args.backend}: speedup vs perplexity, bars = slowest..fastest run "
               f"({len(wins)}x{args.continuation_tokens} tokens)")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def main(argv=None):
    sys.exit(run_cli(main_impl, argv))


if __name__ == "__main__":
    main()
