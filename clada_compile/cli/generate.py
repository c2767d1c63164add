"""clada-generate: CLADA generation on prompts, with the dense baseline side by side.

    clada-generate --data_path data/prompts.jsonl --num_prompts 3 --compare_with_baseline
    clada-generate --prompt "The history of" --max_new_tokens 64 --verbose

Writes summary.json, tokens_<prompt>_<mode>.jsonl and trace_<prompt>.png (with matplotlib:
pip install 'clada_compile[bench]') into --output_dir, atomically: a run appears whole or not at
all. An existing, non-empty --output_dir is refused unless --force replaces it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from clada_compile.bench.plots import INSTALL_HINT, have_matplotlib, plot_trace
from clada_compile.cli.checks import check_output_dir
from clada_compile.cli.common import (add_clada_flags, add_model_flags, build_engine, check_engine_inputs,
                                      config_from_args, run_cli)
from clada_compile.exporters.publish import staged
from clada_compile.io import atomic_write_json


def parser():
    p = argparse.ArgumentParser(prog="clada-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    add_clada_flags(p)
    p.add_argument("--data_path", default=None, help="JSONL prompts")
    p.add_argument("--prompt_field", default="article")
    p.add_argument("--num_prompts", type=int, default=5)
    p.add_argument("--prompt", default=None, help="a single prompt string (instead of --data_path)")
    p.add_argument("--max_prompt_tokens", type=int, default=384, help="longer prompts keep their last N tokens")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--baseline_run", action="store_true", help="run only the dense model")
    p.add_argument("--compare_with_baseline", action="store_true", help="run dense and CLADA, print a table")
    p.add_argument("--output_dir", default="clada_output",
                   help="written atomically; refused if it exists and is not empty, unless --force")
    p.add_argument("--force", action="store_true", help="replace an existing, non-empty --output_dir")
    p.add_argument("--verbose", action="store_true")
    return p


def agreement(a: list[int], b: list[int]):
    """(tokens to first divergence, fraction of equal positions over the shorter length)."""
    n = min(len(a), len(b))
    first = next((i for i in range(n) if a[i] != b[i]), n)
    same = sum(x == y for x, y in zip(a, b)) / n if n else float("nan")
    return first, same


def _prompts(args):
    from clada_compile.data import load_prompts

    if args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty; pass some text")
        return [args.prompt]
    if not args.data_path:
        raise ValueError("pass --prompt TEXT or --data_path FILE.jsonl")
    if args.num_prompts < 1:
        raise ValueError(f"--num_prompts must be >= 1, got {args.num_prompts}")
    return load_prompts(args.data_path, args.prompt_field, args.num_prompts)


def _check_numbers(args) -> None:
    """The generation flags, checked before the model loads (generate() would say so only after)."""
    for flag, value in (("--max_new_tokens", args.max_new_tokens), ("--max_prompt_tokens", args.max_prompt_tokens)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {args.top_p}")


def main_impl(argv=None):
    args = parser().parse_args(argv)
    config = config_from_args(args)
    prompts = _prompts(args)
    _check_numbers(args)
    out_dir = check_output_dir(args.output_dir, "--output_dir", args.force)
    check_engine_inputs(args, config)
    engine, tok = build_engine(args, config)
    # the run is written into a hidden sibling and renamed at the end (stale siblings of killed runs
    # are removed): --output_dir never mixes two runs' files, and a crash leaves no directory
    # without its summary.json
    with staged(out_dir.absolute(), args.force) as tmp:
        rows, modes, plots = _run(args, config, engine, tok, prompts, tmp)
    print(table(rows, modes))
    print(f"\nwrote {out_dir}/summary.json, tokens_*.jsonl" + (", trace_*.png" if plots else ""))
    return 0


def _run(args, config, engine, tok, prompts, out_dir: Path):
    """Generate every prompt in every mode; write tokens_*, trace_* and summary.json into out_dir.
    Returns (rows, modes, whether trace PNGs were drawn)."""
    gen_kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                  temperature=args.temperature or 1.0, top_p=args.top_p, eos_token_id=tok.eos_token_id)
    modes = ["dense"] if args.baseline_run else (["dense", "clada"] if args.compare_with_baseline else ["clada"])
    plots = "clada" in modes and have_matplotlib()
    if "clada" in modes and not plots:  # the traces are a by-product: skip them, keep the run
        print(f"note: no trace_*.png: matplotlib is not installed ({INSTALL_HINT})", file=sys.stderr)
    encoded = [tok(p, return_tensors="pt", add_special_tokens=False).input_ids[:, -args.max_prompt_tokens:] for p in prompts]
    # warm-up (compilation) on the first prompt, excluded from every figure
    for mode in modes:
        engine.generate(encoded[0], max_new_tokens=min(4, args.max_new_tokens), baseline=mode == "dense",
                        eos_token_id=None)
    rows = []
    for i, ids in enumerate(tqdm(encoded, desc="prompts")):
        res = {}
        for mode in modes:  # interleaved: dense then CLADA on the same prompt
            o = engine.generate(ids, baseline=mode == "dense", seed=args.seed, **gen_kw)
            res[mode] = o
        row = dict(prompt=i, prompt_tokens=int(ids.shape[1]))
        for mode, o in res.items():
            new = o.sequences[0, ids.shape[1]:].tolist()
            tok_s = o.decode_tokens_per_s
            row[mode] = dict(tokens_per_s=tok_s if math.isfinite(tok_s) else None, prefill_s=o.prefill_s, new_tokens=o.new_tokens,
                             mean_active_fraction=o.mean_active_fraction, reselections=o.events,
                             text=tok.decode(new, skip_special_tokens=True))
            with open(out_dir / f"tokens_{i}_{mode}.jsonl", "w") as f:
                for r in o.records:
                    f.write(json.dumps(r) + "\n")
            if mode == "clada" and plots:
                plot_trace(o.records, out_dir / f"trace_{i}.png", title=f"prompt {i}: {prompts[i][:80]}")
            if args.verbose:
                print(f"\n[{mode} #{i}] {row[mode]['text']}")
        if len(res) == 2:
            a = res["dense"].sequences[0, ids.shape[1]:].tolist()
            b = res["clada"].sequences[0, ids.shape[1]:].tolist()
            row["first_divergence"], row["token_agreement"] = agreement(a, b)
            # a run with fewer than two new tokens ran no decode step: its speed is not measurable
            d, c = row["dense"]["tokens_per_s"], row["clada"]["tokens_per_s"]
            row["speedup"] = c / d if c is not None and d else None
        rows.append(row)
    summary = dict(model=args.model_path, backend=args.backend, config=config.__dict__, modes=modes,
                   threads=torch.get_num_threads(), prompts=rows)
    if len(modes) == 2:
        summary["median_speedup"] = _median_speedup(rows)
        summary["mean_token_agreement"] = statistics.mean(r["token_agreement"] for r in rows)
    if "clada" in modes:
        summary["mean_active_fraction"] = statistics.mean(r["clada"]["mean_active_fraction"] for r in rows)
    atomic_write_json(out_dir / "summary.json", summary)
    return rows, modes, plots


def _median_speedup(rows):
    """Median over the prompts whose speed could be measured; None when none could."""
    vals = [r["speedup"] for r in rows if r["speedup"] is not None]
    return statistics.median(vals) if vals else None


def _f(tok_s) -> str:
    return "n/a (<2 tokens)" if tok_s is None else f"{tok_s:.1f}"


def _x(speedup) -> str:
    return "n/a" if speedup is None else f"{speedup:.2f}x"


def table(rows, modes) -> str:
    if len(modes) == 2:
        head = "| prompt | dense tok/s | CLADA tok/s | speedup | active frac. | agreement | 1st diverge | reselect |"
        lines = [head, "|" + "---|" * 8]
        for r in rows:
            lines.append(f"| {r['prompt']} | {_f(r['dense']['tokens_per_s'])} | {_f(r['clada']['tokens_per_s'])} | "
                         f"{_x(r['speedup'])} | {r['clada']['mean_active_fraction']:.2f} | "
                         f"{r['token_agreement']:.2f} | {r['first_divergence']} | {r['clada']['reselections']} |")
        sp = _median_speedup(rows)
        ag = statistics.mean(r["token_agreement"] for r in rows)
        lines.append(f"| median/mean | | | {_x(sp)} | | {ag:.2f} | | |")
        return "\n".join(lines)
    mode = modes[0]
    lines = [f"| prompt | {mode} tok/s | active frac. | new tokens |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['prompt']} | {_f(r[mode]['tokens_per_s'])} | {r[mode]['mean_active_fraction']:.2f} | "
                     f"{r[mode]['new_tokens']} |")
    return "\n".join(lines)


def main(argv=None):
    sys.exit(run_cli(main_impl, argv))


if __name__ == "__main__":
    main()
