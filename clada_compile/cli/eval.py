"""clada-eval: the quality cost on real text (teacher-forced perplexity through the decode path).

    clada-eval --text data/wikitext-2/valid.txt --windows 8 --prompt_tokens 384 \
        --continuation_tokens 128 --methods griffin,calibrated --profile smollm2.profile.json --json eval.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clada_compile.cli.checks import (check_fractions, check_input_file, check_model, check_output_file,
                                     check_profile, check_threads)
from clada_compile.cli.common import add_clada_flags, add_model_flags, config_from_args, run_cli
from clada_compile.io import atomic_write_json, atomic_write_text

METHODS = ("dense", "griffin", "paper", "calibrated", "clada")


def method_configs(args, base):
    """method name -> CladaConfig. `clada` is whatever the CLADA flags say."""
    from clada_compile import CladaConfig

    top_k = args.top_k_ratio or 0.5
    out = {}
    for m in args.methods.split(","):
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        if m == "griffin":
            out[m] = CladaConfig.preset("griffin", top_k_ratio=top_k, backend=base.backend, precision=base.precision)
        elif m == "paper":
            out[m] = CladaConfig.preset("paper", top_k_ratio=top_k, backend=base.backend, precision=base.precision)
        elif m == "calibrated":
            # --profile, else the model's shipped one (config_from_args resolved it into base)
            if base.profile is None:
                raise ValueError(f"method 'calibrated' needs a profile: --profile FILE (make one with clada-calibrate); "
                                 f"{args.model_path!r} ships none" + (" and --profile none turned it off"
                                                                      if args.profile == "none" else ""))
            out[m] = CladaConfig.preset("calibrated", profile=base.profile, backend=base.backend, precision=base.precision,
                                        target_active=base.target_active, kernel=base.kernel,
                                        sparsify=base.sparsify, input_active=base.input_active)
        elif m == "clada":
            out[m] = base
    return out


def main_impl(argv=None):
    p = argparse.ArgumentParser(prog="clada-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    add_clada_flags(p)
    p.set_defaults(backend="eager")
    p.add_argument("--text", required=True)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--prompt_tokens", type=int, default=384)
    p.add_argument("--continuation_tokens", type=int, default=128)
    p.add_argument("--agreement_tokens", type=int, default=32, help="greedy tokens for agreement (0: skip)")
    p.add_argument("--methods", default="griffin,clada")
    p.add_argument("--start_token", type=int, default=8192,
                   help="windows start after this many tokens (clada-calibrate uses the first 4096 by default)")
    p.add_argument("--json", default=None)
    p.add_argument("--scorer", default="auto", choices=("auto", "parallel", "sequential"),
                   help="teacher-forced scoring: one decode call per controller round (parallel, exact, the "
                        "default where it applies: no re-selection) or one step per token (sequential)")
    p.add_argument("--ablation", action="store_true",
                   help="controller ablation at matched sparsity (needs --profile); writes --json and a PNG")
    p.add_argument("--ablation_targets", default="0.4,0.5,0.6")
    p.add_argument("--ablation_variants", default=None, help="comma-separated subset of ablation.VARIANTS")
    args = p.parse_args(argv)

    from clada_compile import load_model, optimize
    from clada_compile.data import load_text_tokens
    from clada_compile.evaluate import evaluate, windows

    base = config_from_args(args)
    configs = {} if args.ablation else method_configs(args, base)
    if args.ablation and not args.profile:
        raise ValueError("--ablation needs --profile (make one with clada-calibrate)")
    variants = _check_before_loading(args, base, configs)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model_path, dtype="fp32" if base.precision == "int8" else base.precision)
    need = args.windows * (args.prompt_tokens + args.continuation_tokens) * 4
    ids = load_text_tokens(args.text, tok, max(need, 200_000))
    if ids.numel() - args.start_token < args.prompt_tokens + args.continuation_tokens:
        args.start_token = 0  # short texts (tests): no held-out region to skip
    wins = windows(ids[args.start_token:], args.windows, args.prompt_tokens, args.continuation_tokens)
    cm = optimize(model, base.replace(profile=None, target_active=1.0), tokenizer=tok)
    if args.ablation:
        return _ablation(args, cm, base, wins, variants)
    results, dense, cache = [], None, {}
    runs = [(name, cm.with_config(cfg), cfg) for name, cfg in configs.items() if name != "dense"]
    if base.precision == "int8":
        # int8 is judged against the fp32 dense model: the figures include quantization and sparsity,
        # and the int8 dense model (quantization alone) is a row of its own
        dense = _fp32_dense_scores(args, base, wins)
        runs.insert(0, ("dense-int8", cm.dense(), cm.dense().config))
    for name, engine, cfg in runs:
        res, dense = evaluate(engine, wins, dense, args.agreement_tokens, name, scorer=args.scorer,
                              cache=None if name == "dense-int8" else cache)
        res["config"] = {k: v for k, v in cfg.__dict__.items()}
        results.append(res)
        print(f"{name:>11}: ppl {res['ppl']:.3f} vs {'fp32 ' if base.precision == 'int8' else ''}dense {res['dense_ppl']:.3f} "
              f"({res['ppl_increase_pct']:+.2f}%, 95% CI {res['ppl_increase_ci95'][0]:+.2f}..{res['ppl_increase_ci95'][1]:+.2f}), "
              f"active {res['active_fraction']:.3f}, reselections {res['reselections']}")
    report = dict(model=args.model_path, text=args.text, start_token=args.start_token, windows=len(wins), prompt_tokens=args.prompt_tokens,
                  continuation_tokens=args.continuation_tokens, backend=base.backend, precision=base.precision,
                  baseline="fp32 dense" if base.precision == "int8" else f"{base.precision} dense", results=results)
    if args.json:
        atomic_write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


def _fp32_dense_scores(args, base, wins):
    """Window scores of the fp32 dense model (another copy: int8 rewrites its model's weights)."""
    from clada_compile import load_model, optimize
    from clada_compile.evaluate import score

    model, tok = load_model(args.model_path, dtype="fp32")
    ref = optimize(model, base.replace(precision="fp32", profile=None, target_active=1.0, enabled=False), tokenizer=tok)
    return score(ref, wins, baseline=True, desc="fp32 dense", scorer=args.scorer)


def _check_before_loading(args, base, configs) -> dict | None:
    """Every flag and path the run will use, checked before the model loads; returns the ablation's
    variants (None without --ablation)."""
    for flag in ("windows", "prompt_tokens", "continuation_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.agreement_tokens < 0:
        raise ValueError(f"--agreement_tokens must be >= 0 (0: skip), got {args.agreement_tokens}")
    check_threads(args.threads)
    check_input_file(args.text, "--text")
    check_model(args.model_path)  # clada-eval always loads the model (no ORT export)
    for cfg in (base, *configs.values()):
        check_profile(cfg.profile)
    if not args.ablation:
        if args.json:
            check_output_file(args.json, "--json")
        return None
    from clada_compile.bench.ablation import VARIANTS
    from clada_compile.bench.plots import require_matplotlib

    check_output_file(args.json or "ablation.json", "--json")
    require_matplotlib("clada-eval --ablation")
    check_fractions(args.ablation_targets, "--ablation_targets")
    if not args.ablation_variants:
        return VARIANTS
    names = [v.strip() for v in args.ablation_variants.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown ablation variants {unknown}; known: {list(VARIANTS)}")
    return {n: VARIANTS[n] for n in names}


def _ablation(args, cm, base, wins, variants):
    from clada_compile.bench.ablation import ablation_table, plot_ablation, run_ablation

    targets = check_fractions(args.ablation_targets, "--ablation_targets")
    base = base.replace(top_k_ratio=1.0, profile=args.profile)
    results = run_ablation(cm, base, wins, targets, variants)
    report = dict(model=args.model_path, text=args.text, start_token=args.start_token, windows=len(wins),
                  prompt_tokens=args.prompt_tokens, continuation_tokens=args.continuation_tokens,
                  scored_tokens=len(wins) * args.continuation_tokens, backend=base.backend, profile=args.profile,
                  results=results)
    out = Path(args.json or "ablation.json")
    atomic_write_json(out, report)
    plot_ablation(results, out.with_suffix(".png"),
                  title=f"{args.model_path}: {len(wins)} windows x {args.continuation_tokens} scored tokens")
    table = ablation_table(results)
    atomic_write_text(out.with_suffix(".md"), table + "\n")
    print(table)
    print(f"wrote {out}, {out.with_suffix('.png')} and {out.with_suffix('.md')}")
    return 0


def main(argv=None):
    sys.exit(run_cli(main_impl, argv))


if __name__ == "__main__":
    main()
