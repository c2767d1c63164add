"""Probe: what would thresholding the MLP INPUT x (skipping gate/up weight columns) cost in quality?

Not part of the library: a measurement behind docs/BENCHMARKS.md ("What limits the speedup").
The library thresholds h (the down projection's input), which can skip at most a third of the
MLP's weight bytes. Skipping gate/up reads too needs |x_i| < tau_x -> drop input channel i of
x for the gate/up matmuls (DESIGN.md step 2, optional part). Before building that, this measures
its perplexity cost on the same teacher-forced windows as clada-eval, with HF eager modules
patched: prompt positions run dense, scored positions run with the thresholds (the decode path's
semantics with a full backbone and static thresholds).

Thresholds: per layer, the quantile of |x| (resp. |h|) over 4096 calibration tokens (the first
tokens of the text, disjoint from the scored windows) that keeps the given fraction.

    .venv/bin/python docs/experiments/input_sparsity_probe.py --windows 16
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clada_compile.data import load_text_tokens
from clada_compile.evaluate import windows
from clada_compile.metrics import bootstrap_ratio
from clada_compile.models import load_model

GRID = [(1.0, 0.65), (1.0, 0.5), (0.75, 1.0), (0.6, 1.0), (0.5, 1.0), (0.75, 0.65), (0.6, 0.65), (0.75, 0.5),
        (0.5, 0.5)]


def patch_mlps(model, state):
    mlps = [layer.mlp for layer in model.model.layers]
    for i, m in enumerate(mlps):
        def fwd(x, i=i, m=m):
            if state["collect"]:
                state["xs"][i].append(x.abs().flatten(0, -2)[::7])  # every 7th row is plenty
            scored = (torch.arange(x.shape[1]) >= state["prompt"])[None, :, None]
            if state["tx"] is not None:
                x = torch.where(scored & (x.abs() < state["tx"][i]), 0.0, x)
            h = m.act_fn(m.gate_proj(x)) * m.up_proj(x)
            if state["collect"]:
                state["hs"][i].append(h.abs().flatten(0, -2)[::7])
            if state["th"] is not None:
                h = torch.where(scored & (h.abs() < state["th"][i]), 0.0, h)
            return m.down_proj(h)
        m.forward = fwd
    return len(mlps)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="smollm2")
    p.add_argument("--text", default="data/wikitext-2/valid.txt")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--prompt_tokens", type=int, default=384)
    p.add_argument("--continuation_tokens", type=int, default=128)
    p.add_argument("--start_token", type=int, default=8192)
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(args.model_path)
    model.eval()
    ids = load_text_tokens(args.text, tok, 200_000)  # as clada-eval: the same windows
    P = args.prompt_tokens
    wins = [torch.cat([a, b]) for a, b in windows(ids[args.start_token:], args.windows, P, args.continuation_tokens)]
    state = dict(collect=True, prompt=10**9, tx=None, th=None)
    n = patch_mlps(model, state)
    state.update(xs=[[] for _ in range(n)], hs=[[] for _ in range(n)])
    with torch.no_grad():
        for s in range(0, 4096, 512):
            model(ids[None, s:s + 512])
    xs = [torch.cat(v).flatten().float() for v in state["xs"]]
    hs = [torch.cat(v).flatten().float() for v in state["hs"]]
    state.update(collect=False, prompt=P)

    def quantile_taus(vals, keep):
        return None if keep >= 1 else [torch.quantile(v[:2**24], 1 - keep).item() for v in vals]

    def nll(tx, th):
        state.update(tx=tx, th=th)
        out = []
        with torch.no_grad():
            for w in tqdm(wins, leave=False):
                logits = model(w[None]).logits[0, P - 1:-1].float()
                out.append(F.cross_entropy(logits, w[P:], reduction="none"))
        return torch.stack(out)

    dense = nll(None, None)
    print(f"{args.model_path}: dense PPL {math.exp(dense.mean()):.3f} over {dense.numel()} tokens "
          f"({len(wins)} windows x {args.continuation_tokens}, P = {P})")
    print("| x kept | h kept | MLP weight bytes read | PPL increase | 95% CI (bootstrap over windows) |\n|---|---|---|---|---|")
    for kx, kh in GRID:
        got = nll(quantile_taus(xs, kx), quantile_taus(hs, kh))
        inc, lo, hi = bootstrap_ratio(dense.tolist(), got.tolist())  # paired, resampling windows
        print(f"| {kx:.2f} | {kh:.2f} | {(2 * kx + kh) / 3:.3f} | {inc:+.2f}% | {lo:+.2f} .. {hi:+.2f}% |", flush=True)

if __name__ == "__main__":
    main()
