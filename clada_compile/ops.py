"""The clada sparse-MLP custom ops and their reference math.

Two ops, one per phase of generation (see DESIGN.md, "The sparse MLP block"), and a variant:

  clada::scored_mlp  prefill. Full weights. Returns the MLP output and, per sequence, the Griffin
                     score of every neuron: rows h_t / ||h_t||, then the L2 norm of each column
                     over the (unpadded) prompt tokens.
  clada::sparse_mlp  decode. Compacted weights of the active set (k neurons). w_down arrives
                     TRANSPOSED (k, d_model), so each neuron's output weights are one contiguous
                     row: that is the layout the input-sparse GEMV kernel streams.
  clada::gate_sparse_mlp  decode, CladaConfig(mlp_criterion="gate"): the CATS baseline (arXiv
                     2404.08763). Same inputs as sparse_mlp, but neuron j is dropped when
                     |act(gate_j)| < tau, so up (and down) need not be computed for it.

Both take `tau`, a 1-element tensor that is a graph input: neurons with |h_j| < tau are dropped
(tau = 0 keeps them all). Teacher-forced scoring may pass one threshold per token instead
((B, S, 1); only through the masked path, the GEMV kernel serves single rows). `impl` picks how the down projection runs:
  "dense"      plain matmul, no mask (the baseline through the same graph),
  "reference"  masked dense matmul,
  "auto"      the sparse GEMV kernel when there is exactly one token row (decode, batch 1),
               the masked matmul otherwise (a GEMM over many rows is compute-bound: skipping
               rows there saves nothing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
}
IMPLS = ("dense", "reference", "auto")
from .config import GROUPS, INPUT_GROUPS  # noqa: F401  (the threshold groups; see config.py)


def _hidden(x, w_in, b_in, w_up, b_up, act: str):
    h = ACTIVATIONS[act](F.linear(x, w_in, b_in))
    if w_up is not None:
        h = h * F.linear(x, w_up, b_up)
    return h


def griffin_scores(h: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """(B, S, d_ff) activations -> (B, d_ff) scores over the tokens where token_mask is 1."""
    hn = h.float() / h.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    hn = hn * token_mask.to(hn.dtype).unsqueeze(-1)
    return hn.pow(2).sum(dim=1).sqrt()


def _per_row(tau: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    # one threshold per token (teacher-forced scoring): (B, S, 1), or (B*S, 1) where the model
    # flattened its tokens before the MLP (OPT)
    return tau if tau.numel() == 1 else tau.reshape(*h.shape[:-1], 1)


def threshold_mask(h: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    tau = _per_row(tau, h)
    return torch.where(h.abs() >= tau.to(h.dtype), h, torch.zeros((), dtype=h.dtype, device=h.device))


@torch.library.custom_op("clada::scored_mlp", mutates_args=())
def scored_mlp(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_up: torch.Tensor | None,
    b_up: torch.Tensor | None,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    tau: torch.Tensor,
    token_mask: torch.Tensor,
    act: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    h = _hidden(x, w_in, b_in, w_up, b_up, act)
    # OPT flattens tokens to (B*S, d) before its MLP: token_mask carries the (B, S) layout
    scores = griffin_scores(h.reshape(*token_mask.shape, h.shape[-1]), token_mask)
    return F.linear(threshold_mask(h, tau), w_down, b_down), scores


@scored_mlp.register_fake
def _(x, w_in, b_in, w_up, b_up, w_down, b_down, tau, token_mask, act):
    out = x.new_empty((*x.shape[:-1], w_down.shape[0]))
    return out, x.new_empty((token_mask.shape[0], w_in.shape[0]), dtype=torch.float32)


@torch.library.custom_op("clada::sparse_mlp", mutates_args=())
def sparse_mlp(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_up: torch.Tensor | None,
    b_up: torch.Tensor | None,
    w_down_t: torch.Tensor,
    b_down: torch.Tensor | None,
    tau: torch.Tensor,
    act: str,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return sparse_mlp_math(x, w_in, b_in, w_up, b_up, w_down_t, b_down, tau, act, impl)


def _decode_mlp_fake(x, w_in, b_in, w_up, b_up, w_down_t, b_down, tau, act, impl):
    """Output shapes of the decode MLP ops (sparse_mlp, gate_sparse_mlp): (out, kept count)."""
    return x.new_empty((*x.shape[:-1], w_down_t.shape[1])), x.new_empty((), dtype=torch.float32)


sparse_mlp.register_fake(_decode_mlp_fake)


def sparse_mlp_math(x, w_in, b_in, w_up, b_up, w_down_t, b_down, tau, act: str, impl: str):
    """The body of clada::sparse_mlp in plain torch. The op runs it; passes.inline_sparse_mlp
    puts it straight into decode graphs bound for inductor, which then fuses the activation,
    gate*up, threshold compare and kept count into its own kernels around the matmuls (the opaque
    op would cost one Python-level dispatch per inner op, every layer, every step)."""
    h = _hidden(x, w_in, b_in, w_up, b_up, act)
    keep = h.abs() >= _per_row(tau, h).to(h.dtype)
    if impl == "dense":
        out = h @ w_down_t
    elif impl != "reference" and tau.numel() == 1:
        from clada_compile import kernels

        # the kernel op serves single rows (decode, batch 1) and masks densely otherwise
        out = kernels.sparse_gemv_t(h, w_down_t, tau.reshape(1).float())
    else:
        out = torch.where(keep, h, torch.zeros((), dtype=h.dtype, device=h.device)) @ w_down_t
    # neurons actually kept, summed over the step's tokens: the controller reports real sparsity
    kept = keep.sum().to(torch.float32)
    return (out if b_down is None else out + b_down), kept


@torch.library.custom_op("clada::gate_sparse_mlp", mutates_args=())
def gate_sparse_mlp(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    w_down_t: torch.Tensor,
    b_down: torch.Tensor | None,
    tau: torch.Tensor,
    act: str,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return gate_sparse_mlp_math(x, w_in, b_in, w_up, b_up, w_down_t, b_down, tau, act, impl)


gate_sparse_mlp.register_fake(_decode_mlp_fake)


def gate_sparse_mlp_math(x, w_in, b_in, w_up, b_up, w_down_t, b_down, tau, act: str, impl: str):
    """The body of clada::gate_sparse_mlp (CATS): keep neuron j when |act(x @ w_in_j)| >= tau.
    The masked form; the GEMV form (gemv_gate_mlp) skips the dropped neurons' up and down rows."""
    a = ACTIVATIONS[act](F.linear(x, w_in, b_in))
    keep = a.abs() >= _per_row(tau, a).to(a.dtype)
    h = a * F.linear(x, w_up, b_up)
    if impl != "dense":
        h = torch.where(keep, h, torch.zeros((), dtype=h.dtype, device=h.device))
    out = h @ w_down_t
    return (out if b_down is None else out + b_down), keep.sum().to(torch.float32)


def gemv_gate_mlp(x, w_g_t, w_up, w_down_t, b_down, tau, tau_in, act: str):
    """gate_sparse_mlp on the kernels (passes.sparse_mlp_to_gemv): the gate as one GEMV over
    w_g_t (d_model, k), then only the kept neurons' rows of the neuron-major w_up (k, d_model)
    (kernels.gated_rows_gemv) and of w_down_t: h is exactly 0 for a dropped neuron, and the down
    GEMV's smallest positive threshold skips those rows. tau_in: the mlp_in threshold of x."""
    from clada_compile import kernels

    a = ACTIVATIONS[act](gemv_in(x, w_g_t, tau_in))
    keep = a.abs() >= _per_row(tau, a).to(a.dtype)
    if tau.numel() == 1 and tau_in.numel() == 1:
        h = kernels.gated_rows_gemv(threshold_mask(x, tau_in), w_up, a, tau.reshape(1).float())
        # the smallest positive threshold: the down GEMV skips exactly the rows where h is 0
        out = kernels.sparse_gemv_t(h, w_down_t, torch.full((1,), torch.finfo(torch.float32).tiny))
    else:  # per-token thresholds (teacher-forced scoring): the masked form
        h = torch.where(keep, a * (threshold_mask(x, tau_in) @ w_up.t()), torch.zeros((), dtype=a.dtype))
        out = h @ w_down_t
    return (out if b_down is None else out + b_down), keep.sum().to(torch.float32)


def threshold_input(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """x with the channels |x_i| < tau zeroed: the input threshold of a projection (one tau, or one
    per token). A plain function in the graph: passes.gemv folds it into the GEMV kernel, whose
    threshold skips the dropped channels' weight rows; elsewhere it is this mask."""
    return threshold_mask(x, tau)


def gemv_in(x: torch.Tensor, wt: torch.Tensor, tau: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x @ wt over the channels |x_i| >= tau: the GEMV kernel for one threshold, the mask and a
    matmul for per-token thresholds (teacher-forced scoring feeds many rows). With `scale`, wt is
    int8 and the product is scaled per output column (quantize.py)."""
    from clada_compile import kernels

    if scale is not None:
        if tau.numel() == 1:
            return kernels.sparse_gemv_t_q8(x, wt, scale, tau.reshape(1).float())
        return (threshold_mask(x, tau) @ wt.to(x.dtype)) * scale
    if tau.numel() == 1:
        return kernels.sparse_gemv_t(x, wt, tau.reshape(1).float())
    return threshold_mask(x, tau) @ wt


def gemv_mlp(x, w_gu_t, b_gu, w_down_t, b_down, tau, tau_in, act: str, gated: bool, impl: str,
             s_gu=None, s_down=None):
    """The decode MLP on the GEMV kernel (passes.sparse_mlp_to_gemv), same outputs as sparse_mlp.

    w_gu_t (d_model, 2k) = [gate^T | up^T] (gated) or w_in^T (d_model, k): one stream over both
    projections; tau_in: the threshold of the MLP's input x (the mlp_in group; a float32 zero for
    a dense gate/up). The kernel op serves single rows and runs a plain matmul on more
    (teacher-forced scoring), where per-token thresholds (tau of shape (B, S, 1)) take the
    masked path. s_gu / s_down: the per-column scales when w_gu_t / w_down_t are int8."""
    g = gemv_in(x, w_gu_t, tau_in, s_gu)
    if b_gu is not None:
        g = g + b_gu
    if gated:
        a, u = g.chunk(2, -1)
        h = ACTIVATIONS[act](a) * u
    else:
        h = ACTIVATIONS[act](g)
    keep = h.abs() >= _per_row(tau, h).to(h.dtype)
    out = gemv_in(h, w_down_t, torch.zeros(1) if impl == "dense" else tau, s_down)
    kept = keep.sum().to(torch.float32)
    return (out if b_down is None else out + b_down), kept


def reference_mlp(x, w_in, b_in, w_up, b_up, w_down, b_down, act, tau=None):
    """The original MLP (tau None) or its masked variant, in plain torch: what tests compare with."""
    h = _hidden(x, w_in, b_in, w_up, b_up, act)
    if tau is not None:
        h = threshold_mask(h, tau)
    return F.linear(h, w_down, b_down)
