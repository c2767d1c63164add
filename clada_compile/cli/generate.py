"""clada-generate: CLADA generation on prompts, with the dense baseline side by side.

    clada-generate --data_path data/prompts.jsonl --num_prompts 3 --compare_with_baseline
    clada-generate --prompt "The history of" --max_new_tokens 64 --verbose
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

from clada_compile.cli.common import add_clada_flags, add_model_flags, build_engine, config_from_args, run_cli


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
    p.add_argument("--output_dir", default="clada_output")
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


def main_impl(argv=None):
    args = parser().parse_args(argv)
    config = config_from_args(args)
    prompts = _prompts(args)
    engine, tok = build_engine(args, config)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen_kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                  temperature=args.temperature or 1.0, top_p=args.top_p, eos_token_id=tok.eos_token_id)
    modes = ["dense"] if args.baseline_run else (["dense", "clada"] if args.compare_with_baseline else ["clada"])
    encoded = [tok(p, return_tensors="pt", add_special_tokens=False).input_ids[:, -args.max_prompt_tokens:] for p in prompts]
    # warm-up (compilation) on the first prompt, excluded from every figure
    for mode in modes:
        engine.generate(encoded[0], max_new_tokens=min(4, args.max_new_tokens), baseline=mode == "dense",
                        eos_token_id=None)
    rows = []
    from clada_compile.plots import plot_trace

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
            if mode == "clada":
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
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(table(rows, modes))
    print(f"\nwrote {out_dir}/summary.json, tokens_*.jsonl" + (", trace_*.png" if "clada" in modes else ""))
    return 0


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
