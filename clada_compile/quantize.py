"""Weight-only int8 for the decode projections (CladaConfig(precision="int8")).

Scheme: symmetric, one float32 scale per OUTPUT channel, q = round(w / s) in [-127, 127],
s = max|w| / 127 over the channel's weights. Why per output channel rather than per group of
input channels (llama.cpp's Q8_0 uses groups of 32): the GEMV kernel streams W^T row by row
(one row = one input channel, skipped when the input is below its threshold), so a per-output
scale is one multiply per output at the end of the sum, free, while a per-group scale would
cost a multiply per weight or a partial sum per group in the inner loop. Per-output-channel
int8 is what torchao's int8 weight-only uses; its quality is measured in docs/BENCHMARKS.md.

The whole model runs the quantized numerics, not only the decode GEMVs: optimize() replaces
every linear weight by its dequantized value q * s in place (`round_trip_`), before tracing.
Prefill then runs those weights on torch's GEMM (a GEMM over a prompt is compute-bound, int8
would save no time there), and the decode passes quantize the same weights again, which gives
back exactly q and s (the channel's largest weight is 127 * s), now stored as int8 and read by
the kernel at a quarter of the fp32 bytes. So prefill, decode, the reference kernel and the
teacher-forced scorer all compute with the same weights.
"""

from __future__ import annotations

import torch
from torch import nn

QMAX = 127


@torch.no_grad()
def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weights, one output channel per row -> (int8 (N, K), float32 scales (N,))."""
    w = w.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


@torch.no_grad()
def quantize_columns(wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, N) W^T, one output channel per column -> (int8 (K, N) row-major, float32 scales (N,))."""
    q, scale = quantize_rows(wt.t())
    return q.t().contiguous(), scale


def _linear_weights(model: nn.Module):
    """(weight, output-channel dim) of every projection: nn.Linear and GPT-2's Conv1D (weight
    stored (in, out))."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            yield module.weight, 0
        elif type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
            yield module.weight, 1


@torch.no_grad()
def round_trip_(model: nn.Module) -> int:
    """Replace every projection weight by its int8 round trip q * s, in place; returns how many
    distinct weights changed (tied weights, e.g. lm_head and the embedding, count once: the
    embedding then holds the same int8-exact rows)."""
    seen = set()
    for w, dim in _linear_weights(model):
        if w.data_ptr() in seen:
            continue
        seen.add(w.data_ptr())
        if w.dtype != torch.float32:
            raise ValueError(f"precision='int8' quantizes float32 weights, got {w.dtype}; load the model in fp32")
        rows = w if dim == 0 else w.t()
        q, scale = quantize_rows(rows)
        rows.copy_(q.float() * scale[:, None])
    return len(seen)

