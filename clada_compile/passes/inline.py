"""inline_sparse_mlp: clada::sparse_mlp -> its body (ops.sparse_mlp_math) as a plain call.

Only for decode graphs handed to inductor. The custom op is the contract every backend sees
(ONNX translates it, eager runs it), but to inductor it is opaque: its gate/up matmuls,
activation, threshold compare and kept count run as separate eager ops behind a Python
dispatch, every layer, every step. Calling the body instead lets dynamo trace through it, so
inductor fuses the elementwise work and keeps only the matmuls (and the sparse-GEMV kernel op,
itself opaque) as extern calls. The dense baseline gets the same treatment, so the comparison
stays like for like.

Pattern:      call_function clada.sparse_mlp.default(x, w_in, b_in, w_up, b_up, w_down_t, b_down, tau, act, impl)
              (or clada.gate_sparse_mlp.default, same args)
Replacement:  call_function ops.sparse_mlp_math (ops.gate_sparse_mlp_math)(same args) -> the same
              (out, kept) tuple
Guard:        none needed: same function, same arguments, same outputs.
"""

from __future__ import annotations

import torch
from torch import fx

from ..ops import gate_sparse_mlp_math, sparse_mlp_math


def inline_sparse_mlp(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    bodies = {torch.ops.clada.sparse_mlp.default: sparse_mlp_math,
              torch.ops.clada.gate_sparse_mlp.default: gate_sparse_mlp_math}
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in bodies:
            node.target = bodies[node.target]
            count += 1
    return gm, count
