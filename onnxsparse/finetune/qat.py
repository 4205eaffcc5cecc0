"""Sparse quantization-aware fine-tuning: training a Q/DQ model through fake quantization with fixed masks.

ORT training cannot differentiate QuantizeLinear/DequantizeLinear, but its ``com.microsoft.FakeQuant`` op
(quantize + dequantize in one, gradient = straight-through estimator inside the clip range) has a gradient
kernel (``FakeQuantGrad``) in the CPU training build. The training copy of a Q/DQ model therefore:

- replaces each int8 weight ``q`` and its DequantizeLinear by a float *master* weight (initialised to the
  dequantized values) followed by ``Mul(mask) → Div(scale) → FakeQuant(scale 1, zero point) → Mul(scale)`` —
  per-channel fake quantization written with a per-tensor FakeQuant, since FakeQuant takes scalar scales;
- replaces each activation QuantizeLinear → DequantizeLinear pair by ``FakeQuant(x, scale, zero point)``.

Scales and zero points stay fixed (they come from calibration; learning them is out of scope). After training
the masters are quantized again with the same scales, ``q = clip(rint(W ⊙ M / s) + zp)``, and written into
the int8 initializers of a copy of the input: the exported model keeps every Q/DQ node, scale and name, and
masked entries are exactly the zero point (so they dequantize to exactly 0 and the weights stay n:m).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import NodeProto, TensorProto, helper

from onnxsparse.ir.graph import GraphIndex
from onnxsparse.ir.index import model_layers
from onnxsparse.ir.layers import attr
from onnxsparse.ir.model_io import Model
from onnxsparse.ir.tensors import TensorHome, to_array

MASTER_SUFFIX = "__onnxsparse_master"
_RANGES = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255)}


@dataclass
class QWeight:
    """An int8/uint8 weight initializer read by a DequantizeLinear, as a trainable float master."""

    name: str
    dq_output: str
    scale: np.ndarray  # float32, broadcastable onto the stored tensor
    zero_point: int
    qmin: int
    qmax: int
    dtype: np.dtype
    mask: np.ndarray
    master: np.ndarray  # float32: the dequantized values

    @property
    def master_name(self) -> str:
        return self.name + MASTER_SUFFIX

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """Stored integers for float ``values`` with the fixed scale; masked entries become the zero point."""
        v = np.where(self.mask, np.asarray(values, np.float32).reshape(self.mask.shape), np.float32(0))
        q = np.rint(v / self.scale) + self.zero_point
        return np.clip(q, self.qmin, self.qmax).astype(self.dtype)


def has_qdq(proto: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)


def quantized_weights(model: Model, masks: Mapping[str, np.ndarray]) -> tuple[dict[str, QWeight], dict[str, str]]:
    """The weighted layers' quantized weights that QAT can train, and why the others cannot.

    A weight's mask is ``masks[name]`` when given, else its current non-zeros (``q != zero point``): a
    pruned-then-quantized model carries its masks in its zeros.
    """
    inits = {t.name: t for t in model.proto.graph.initializer}
    found: dict[str, QWeight] = {}
    skipped: dict[str, str] = {}
    for layer in model_layers(model):
        if layer.graph is not model.proto.graph or layer.source is None or not layer.dequantized:
            continue
        name = layer.source.name
        if name in found or name in skipped:
            continue
        dq = layer.chain[-1]
        if dq.op_type != "DequantizeLinear" or dq.input[0] != name or name not in inits:
            skipped[name] = f"weight '{name}' does not feed its DequantizeLinear directly"
            continue
        why = _why_not(dq, inits, model)
        if why:
            skipped[name] = why
            continue
        t = inits[name]
        q = np.asarray(to_array(t, model))
        scale = np.asarray(to_array(inits[dq.input[1]], model), np.float32)
        zp = (
            int(np.asarray(to_array(inits[dq.input[2]], model)).reshape(-1)[0])
            if len(dq.input) > 2 and dq.input[2]
            else 0
        )
        if scale.size > 1:
            axis = int(attr(dq, "axis", 1)) % q.ndim  # type: ignore[call-overload]
            shape = [1] * q.ndim
            shape[axis] = scale.size
            scale = scale.reshape(shape)
        else:
            scale = scale.reshape(())
        mask = np.asarray(masks[name]).astype(bool) if name in masks else q != zp
        if mask.shape != q.shape:
            skipped[name] = f"mask '{name}' has shape {mask.shape}, the weight has {q.shape}"
            continue
        qmin, qmax = _RANGES[t.data_type]
        master = ((q.astype(np.float32) - zp) * scale).astype(np.float32)
        found[name] = QWeight(name, dq.output[0], scale.astype(np.float32), zp, qmin, qmax, q.dtype, mask, master)
    return found, skipped


def _why_not(dq: NodeProto, inits: Mapping[str, TensorProto], home: TensorHome | None) -> str | None:
    name = dq.input[0]
    t = inits[name]
    if t.data_type not in _RANGES:
        return f"weight '{name}' is {TensorProto.DataType.Name(t.data_type)}: QAT handles int8/uint8"
    if len(dq.input) < 2 or dq.input[1] not in inits or inits[dq.input[1]].data_type != TensorProto.FLOAT:
        return f"weight '{name}': its DequantizeLinear needs a float32 constant scale for QAT"
    if attr(dq, "block_size", 0):
        return f"weight '{name}': blocked quantization is not supported by QAT"
    if len(dq.input) > 2 and dq.input[2]:
        zp = inits.get(dq.input[2])
        if zp is None:
            return f"weight '{name}': non-constant zero point"
        values = np.asarray(to_array(zp, home))  # per-channel zero points of a large layer may be external
        if values.size > 1 and np.unique(values).size > 1:
            return f"weight '{name}': per-channel zero points are not supported by QAT (TensorRT uses 0)"
    return None


def apply_qat(proto: onnx.ModelProto, qweights: Mapping[str, QWeight], home: TensorHome | None = None) -> int:
    """Rewrite a training copy in place for QAT (see the module docstring). Returns activation pairs replaced.

    ``home``: the model ``proto`` was copied from (its external tensors, zero points included, are read there).
    """
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    new_inits: list[TensorProto] = []
    new_nodes: list[NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        if name not in inits:
            t = onnx.numpy_helper.from_array(np.asarray(value), name)
            inits[name] = t
            new_inits.append(t)
        return name

    one = const("onnxsparse_qat_one", np.array(1.0, np.float32))
    drop_dq = {qw.dq_output for qw in qweights.values()}
    for qw in qweights.values():
        base = qw.name
        master = const(qw.master_name, qw.master)
        mask = const(base + "__onnxsparse_mask", qw.mask.astype(np.float32))
        scale = const(base + "__onnxsparse_qat_scale", qw.scale)
        zp = const(base + "__onnxsparse_qat_zp", np.array(float(qw.zero_point), np.float32))
        new_nodes += [
            helper.make_node("Mul", [master, mask], [base + "__qat_masked"], name=base + "__qat_mask"),
            helper.make_node("Div", [base + "__qat_masked", scale], [base + "__qat_scaled"], name=base + "__qat_div"),
            helper.make_node(
                "FakeQuant",
                [base + "__qat_scaled", one, zp],
                [base + "__qat_fq", base + "__qat_fqm"],
                name=base + "__qat_fq",
                domain="com.microsoft",
                quant_min=qw.qmin,
                quant_max=qw.qmax,
            ),
            helper.make_node("Mul", [base + "__qat_fq", scale], [qw.dq_output], name=base + "__qat_rescale"),
        ]
    index = GraphIndex(graph)
    kept: list[NodeProto] = []
    pairs = 0
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in drop_dq:
            continue
        q = index.producer(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear" and _per_tensor(q, inits) and _per_tensor(node, inits):
            zp_name = q.input[2] if len(q.input) > 2 and q.input[2] else ""
            zp_t = inits.get(zp_name) if zp_name else None
            zp_dtype = zp_t.data_type if zp_t is not None else TensorProto.UINT8
            if (
                zp_dtype in _RANGES
                and inits.get(q.input[1]) is not None
                and inits[q.input[1]].data_type == TensorProto.FLOAT
            ):
                zp_val = float(np.asarray(to_array(zp_t, home)).reshape(-1)[0]) if zp_t is not None else 0.0
                zp_f = const(f"{node.output[0]}__onnxsparse_qat_zp", np.array(zp_val, np.float32))
                lo, hi = _RANGES[zp_dtype]
                kept.append(
                    helper.make_node(
                        "FakeQuant",
                        [q.input[0], q.input[1], zp_f],
                        [node.output[0], node.output[0] + "__qat_fqm"],
                        name=(node.name or node.output[0]) + "__qat_fq",
                        domain="com.microsoft",
                        quant_min=lo,
                        quant_max=hi,
                    )
                )
                pairs += 1
                continue
        kept.append(node)
    # QuantizeLinear nodes whose outputs nobody reads any more go too (they would only cost time).
    read = {i for n in [*new_nodes, *kept] for i in n.input} | {o.name for o in graph.output}
    kept = [n for n in kept if n.op_type != "QuantizeLinear" or any(o in read for o in n.output)]
    del graph.node[:]
    graph.node.extend(new_nodes + kept)
    graph.initializer.extend(new_inits)
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name not in read]
    for t in unused:
        graph.initializer.remove(t)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return pairs


def _per_tensor(node: NodeProto, inits: Mapping[str, TensorProto]) -> bool:
    scale = inits.get(node.input[1]) if len(node.input) > 1 else None
    return scale is not None and int(np.prod(scale.dims, dtype=np.int64)) == 1
