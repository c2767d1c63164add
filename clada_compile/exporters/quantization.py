"""Low-memory mode: weight-only quantization of an exported graph's constant weights.

onnxruntime's MatMulNBitsQuantizer turns every MatMul with a constant weight (attention, prefill
MLPs, lm_head) into MatMulNBits and, with 4 bits, the embedding Gather into GatherBlockQuantized;
symmetric, round-to-nearest. The decode graph's compacted MLP weights are graph inputs, so they
stay float and re-selection works unchanged.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

BITS = (8, 4)
# accuracy_level 4 (int8 activations in the kernel): ORT's CPU MatMulNBits is ~15x slower per
# decode step at levels 0/1 (measured on SmolLM2: 387 ms vs 24 ms; fp32 graph: 44 ms)
QUANT_ACCURACY_LEVEL = 4


def describe(bits: int, block_size: int) -> dict:
    """The manifest's "low_memory" entry."""
    return {"method": "MatMulNBits" + ("+GatherBlockQuantized" if bits == 4 else "")
            + " (weight-only, symmetric, round-to-nearest)", "bits": bits,
            "block_size": block_size, "accuracy_level": QUANT_ACCURACY_LEVEL, "mlp_weights_dtype": "fp16"}


def fold_weight_transposes(model) -> int:
    """Transpose(initializer) -> a transposed initializer. The exporter's optimizer leaves large ones
    (e.g. a tied lm_head) unfolded; folded, their MatMul has a constant B that ORT prepacks and
    the weight-only quantizer can quantize."""
    import onnx_ir as ir

    graph = model.graph
    count = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        if src is None or not src.is_initializer() or src.const_value is None:
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        perm = node.attributes.get("perm")
        arr = src.const_value.numpy()
        arr = np.ascontiguousarray(arr.transpose(perm.as_ints() if perm is not None else None))
        new = ir.Value(name=f"{src.name}.T", shape=ir.Shape(arr.shape), type=src.type,
                       const_value=ir.tensor(arr, name=f"{src.name}.T"))
        graph.register_initializer(new)
        out.replace_all_uses_with(new)
        graph.remove(node, safe=True)
        if not src.uses() and not src.is_graph_output():
            graph.initializers.pop(src.name)
        count += 1
    return count



def quantize(src: Path, dst: Path, bits: int, block_size: int, external: bool) -> None:
    """The graph in `src`, weight-only quantized to `bits` (blocks of `block_size`), -> `dst`."""
    import onnx_ir as ir
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = ir.load(str(src))
    # a tied lm_head is MatMul(x, Transpose(embedding)): fold it so the quantizer sees a constant
    fold_weight_transposes(model)
    proto = ir.to_proto(model)
    del model
    # GatherBlockQuantized (the embedding) exists for 4 bits only
    ops = ("MatMul", "Gather") if bits == 4 else ("MatMul",)
    quant = MatMulNBitsQuantizer(proto, bits=bits, block_size=block_size, is_symmetric=True,
                                 accuracy_level=QUANT_ACCURACY_LEVEL, op_types_to_quantize=ops)
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.ERROR)  # it logs every node at INFO
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant.process()
    finally:
        logger.setLevel(level)
    quant.model.save_model_to_file(str(dst), use_external_data_format=external)
