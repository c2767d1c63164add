"""clada-calibrate: per-layer thresholds (uniform or error-allocated) from a text -> profile JSON.

    clada-calibrate --text data/wikitext-2/valid.txt --target_active 0.5 --output smollm2.profile.json
    # also threshold the projection inputs (gate/up input, q/k/v input, o input, lm_head input):
    clada-calibrate --text data/wikitext-2/valid.txt --target_active 0.5 \
        --inputs mlp_in=0.8,attn_in=0.7,attn_out=0.7,lm_head=0.9 --output smollm2.profile.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clada_compile.cli.checks import check_input_file, check_model, check_output_file
from clada_compile.cli.common import parse_fractions, run_cli


def main_impl(argv=None):
    p = argparse.ArgumentParser(prog="clada-calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="smollm2")
    p.add_argument("--text", required=True, help="plain-text calibration file")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--target_active", type=float, default=0.5, help="mean fraction of neurons kept")
    p.add_argument("--allocation", choices=("uniform", "greedy"), default="uniform",
                   help="uniform: every layer keeps target_active; greedy: spread by per-layer output error")
    p.add_argument("--error_budget", type=float, default=0.25,
                   help="greedy only: max relative MLP output error per layer")
    p.add_argument("--inputs", default="",
                   help="input groups and their kept fractions, e.g. mlp_in=0.8,attn_in=0.7,attn_out=0.7,lm_head=0.9")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    inputs = parse_inputs(args.inputs)
    _check_before_loading(args)

    from clada_compile import CladaConfig, load_model, optimize
    from clada_compile.calibrate import calibrate, save_profile
    from clada_compile.data import load_text_tokens

    model, tok = load_model(args.model_path)
    ids = load_text_tokens(args.text, tok, args.tokens)
    cm = optimize(model, CladaConfig(top_k_ratio=1.0, backend="eager"), tokenizer=tok)
    prof = calibrate(cm, ids, args.target_active, args.error_budget, args.window, text_name=str(args.text),
                     model_name=args.model_path, allocation=args.allocation, input_targets=inputs)
    out = Path(args.output)
    save_profile(prof, out)
    print(f"{prof['tokens']} tokens; mean kept fraction {prof['achieved_active']:.3f} "
          f"(target {args.target_active}); per-layer relative MLP error "
          f"{min(layer['rel_error'] for layer in prof['layers']):.3f}..{max(layer['rel_error'] for layer in prof['layers']):.3f}")
    for group, part in prof["inputs"].items():
        print(f"{group}: keeps {part['target_active']:.2f} of its input channels in every layer")
    if "gate" in prof:
        print(f"gate: thresholds on |act(gate)| keeping {prof['gate']['target_active']:.2f} of the neurons in every "
              f"layer (the CATS baseline: --mlp_criterion gate)")
    print(f"wrote {out}")
    return 0


def _check_before_loading(args) -> None:
    """Every flag and path the run will use, checked before the model loads and calibrates."""
    for flag in ("tokens", "window"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 0 < args.target_active <= 1:
        raise ValueError(f"--target_active must be in (0, 1], got {args.target_active}")
    check_input_file(args.text, "--text")
    check_output_file(args.output, "--output")
    check_model(args.model_path)


def parse_inputs(text: str) -> dict:
    from clada_compile.calibrate import check_input_targets

    return check_input_targets(parse_fractions(text, "--inputs"))


def main(argv=None):
    sys.exit(run_cli(main_impl, argv))


if __name__ == "__main__":
    main()
