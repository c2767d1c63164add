"""The clada ops in ONNX: the custom_translation_table torch.onnx.export uses to lower
clada::scored_mlp (prefill) and clada::sparse_mlp (decode) to standard ONNX ops (MatMul / Gemm,
Sigmoid*x, Relu, Erf- or Tanh-GELU, Abs, GreaterOrEqual, Where, ReduceSum, Sqrt), so any ONNX
runtime runs the export without a custom operator library.

The math is ops.py's reference math; exporters/validation.py holds the two to a tolerance on
every export.
"""

from __future__ import annotations

import torch


def _onnx_ops():
    from onnxscript import opset18 as op

    def c(value, like):
        return op.CastLike(op.Constant(value_float=float(value)), like)

    def act_fn(h, act):
        if act == "silu":
            return op.Mul(h, op.Sigmoid(h))
        if act == "relu":
            return op.Relu(h)
        if act == "gelu":  # 0.5 x (1 + erf(x / sqrt 2)); ORT fuses it into its Gelu kernel
            return op.Mul(op.Mul(h, c(0.5, h)), op.Add(c(1.0, h), op.Erf(op.Mul(h, c(0.7071067811865476, h)))))
        if act == "gelu_tanh":
            inner = op.Mul(c(0.7978845608028654, h), op.Add(h, op.Mul(c(0.044715, h), op.Mul(h, op.Mul(h, h)))))
            return op.Mul(op.Mul(h, c(0.5, h)), op.Add(c(1.0, h), op.Tanh(inner)))
        raise ValueError(f"clada ONNX export: unknown activation {act!r}")

    def masked(h, tau):
        keep = op.GreaterOrEqual(op.Abs(h), op.CastLike(tau, h))
        return keep, op.Where(keep, h, c(0.0, h))

    def scored_mlp(x, w_in, b_in, w_up, b_up, w_down, b_down, tau, token_mask, act):
        # full weights are initializers: MatMul with a transposed constant (folded at export),
        # the form the weight-only quantizer (MatMulNBits) recognizes
        h = op.MatMul(x, op.Transpose(w_in, perm=[1, 0]))
        if b_in is not None:
            h = op.Add(h, b_in)
        h = act_fn(h, act)
        if w_up is not None:
            u = op.MatMul(x, op.Transpose(w_up, perm=[1, 0]))
            if b_up is not None:
                u = op.Add(u, b_up)
            h = op.Mul(h, u)
        _, hm = masked(h, tau)
        out = op.MatMul(hm, op.Transpose(w_down, perm=[1, 0]))
        if b_down is not None:
            out = op.Add(out, b_down)
        # Griffin scores: rows h_t / ||h_t||, masked to the scored tokens, column L2 norm (float32)
        rows = op.Concat(op.Shape(token_mask), op.Constant(value_ints=[-1]), axis=0)
        hf = op.Cast(op.Reshape(h, rows), to=1)
        norm = op.Sqrt(op.ReduceSum(op.Mul(hf, hf), op.Constant(value_ints=[-1]), keepdims=1))
        hn = op.Div(hf, op.Max(norm, op.Constant(value_float=1e-6)))
        hn = op.Mul(hn, op.Unsqueeze(op.Cast(token_mask, to=1), op.Constant(value_ints=[-1])))
        scores = op.Sqrt(op.ReduceSum(op.Mul(hn, hn), op.Constant(value_ints=[1]), keepdims=0))
        return out, scores

    def sparse_mlp(x, w_in, b_in, w_up, b_up, w_down_t, b_down, tau, act, impl):
        # compacted weights are graph inputs (k, d): Gemm(transB) reads them in place, no transpose
        x2 = op.Reshape(x, op.Concat(op.Constant(value_ints=[-1]), op.Shape(x, start=-1), axis=0))
        h = act_fn(op.Gemm(x2, w_in, b_in, transB=1), act)
        if w_up is not None:
            h = op.Mul(h, op.Gemm(x2, w_up, b_up, transB=1))
        keep, hm = masked(h, tau)
        out = op.MatMul(h if impl == "dense" else hm, w_down_t)
        out = op.Reshape(out, op.Concat(op.Shape(x, end=-1), op.Shape(w_down_t, start=1), axis=0))
        if b_down is not None:
            out = op.Add(out, b_down)
        kept = op.ReduceSum(op.Cast(keep, to=1), keepdims=0)
        return out, kept

    return scored_mlp, sparse_mlp


def translation_table() -> dict:
    """custom_translation_table for torch.onnx.export: the clada ops -> standard ONNX ops."""
    from .. import ops  # noqa: F401  (registers torch.ops.clada)

    scored, sparse = _onnx_ops()
    return {torch.ops.clada.scored_mlp.default: scored, torch.ops.clada.sparse_mlp.default: sparse}
