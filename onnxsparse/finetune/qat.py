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
import onnx_ir as ir
from onnx import NodeProto, TensorProto

from onnxsparse.ir.index import model_layers
from onnxsparse.ir.layers import attr
from onnxsparse.ir.model_io import Model
from onnxsparse.ir.onnxir import IrView, add_initializer, insert_after_definition
from onnxsparse.ir.tensors import TensorHome, to_array

MASTER_SUFFIX = "__onnxsparse_master"
MASK_SUFFIX = "__onnxsparse_mask"
_RANGES: dict[int, tuple[int, int]] = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255)}


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


def add_weight_tensors(proto: onnx.ModelProto, qweights: Mapping[str, QWeight]) -> None:
    """Append each weight's float master and mask to a training copy's initializers, before its view is built
    (``graph.training_copy`` says why: the view then keeps them where they are instead of copying them)."""
    names = {t.name for t in proto.graph.initializer}
    for qw in qweights.values():
        for name, value in ((qw.master_name, qw.master), (qw.name + MASK_SUFFIX, qw.mask.astype(np.float32))):
            if name not in names:
                proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(value), name))
                names.add(name)


def apply_qat(view: IrView, qweights: Mapping[str, QWeight]) -> int:
    """Rewrite a training copy's onnx-ir view for QAT (see the module docstring). Returns activation pairs
    replaced. A DequantizeLinear's weight is ``Value.producer()`` of nothing but an initializer, an activation
    pair is found through ``producer()``, and what nobody reads any more is what has no ``uses()`` (readers in
    subgraphs included); values of the copy's external tensors are read through its store."""
    graph = view.ir.graph

    def const(name: str, value: np.ndarray) -> ir.Value:
        found = graph.initializers.get(name)
        if found is not None:
            return found
        return add_initializer(graph, ir.Tensor(np.ascontiguousarray(np.asarray(value)), name=name))

    def node(op: str, inputs: list[ir.Value], out: str, name: str, n_out: int = 1, **attrs: int) -> ir.Node:
        outputs = [ir.Value(name=out if i == 0 else out + "m") for i in range(n_out)]
        domain = "com.microsoft" if op == "FakeQuant" else ""
        return ir.node(op, inputs, attrs or None, domain=domain, outputs=outputs, name=name)

    one = const("onnxsparse_qat_one", np.array(1.0, np.float32))
    new_nodes: list[ir.Node] = []
    for qw in qweights.values():
        base = qw.name
        dq = next(u.node for u in graph.initializers[base].uses() if u.node.outputs[0].name == qw.dq_output)
        master = const(qw.master_name, qw.master)
        mask = const(base + MASK_SUFFIX, qw.mask.astype(np.float32))
        scale = const(base + "__onnxsparse_qat_scale", qw.scale)
        zp = const(base + "__onnxsparse_qat_zp", np.array(float(qw.zero_point), np.float32))
        chain = [node("Mul", [master, mask], base + "__qat_masked", base + "__qat_mask")]
        chain.append(node("Div", [chain[-1].outputs[0], scale], base + "__qat_scaled", base + "__qat_div"))
        fq_in = [chain[-1].outputs[0], one, zp]
        chain.append(
            node("FakeQuant", fq_in, base + "__qat_fq", base + "__qat_fq", 2, quant_min=qw.qmin, quant_max=qw.qmax)
        )
        chain.append(node("Mul", [chain[-1].outputs[0], scale], qw.dq_output, base + "__qat_rescale"))
        ir.convenience.replace_all_uses_with(dq.outputs[0], chain[-1].outputs[0])
        _take_graph_output(graph, dq.outputs[0], chain[-1].outputs[0])
        graph.remove(dq, safe=True)
        new_nodes += chain
    if new_nodes:  # they read initializers only: first in the graph
        insert_after_definition(graph, one, new_nodes)
    pairs = 0
    for dq in [n for n in graph if n.op_type == "DequantizeLinear"]:
        q = dq.inputs[0].producer() if dq.inputs[0] is not None else None
        if q is None or q.op_type != "QuantizeLinear" or not (_per_tensor(graph, q) and _per_tensor(graph, dq)):
            continue
        zp_v = q.inputs[2] if len(q.inputs) > 2 else None
        zp_init = graph.initializers.get(zp_v.name or "") if zp_v is not None else None
        zp_t = zp_init.const_value if zp_init is not None else None
        zp_dtype: int = int(zp_t.dtype) if zp_t is not None else int(TensorProto.UINT8)
        q_scale = q.inputs[1]
        assert q_scale is not None and q_scale.const_value is not None  # _per_tensor
        if zp_dtype not in _RANGES or q_scale.const_value.dtype != ir.DataType.FLOAT:
            continue
        zp_val = float(np.asarray(zp_t.numpy()).reshape(-1)[0]) if zp_t is not None else 0.0
        out = dq.outputs[0].name or ""
        zp_f = const(f"{out}__onnxsparse_qat_zp", np.array(zp_val, np.float32))
        lo, hi = _RANGES[zp_dtype]
        x = q.inputs[0]
        assert x is not None
        fq = node("FakeQuant", [x, q_scale, zp_f], out, (dq.name or out) + "__qat_fq", 2, quant_min=lo, quant_max=hi)
        fq.outputs[1].name = out + "__qat_fqm"
        ir.convenience.replace_nodes_and_values(graph, dq, [dq], [fq], [dq.outputs[0]], [fq.outputs[0]])
        pairs += 1
    # QuantizeLinear nodes whose outputs nobody reads any more go too (they would only cost time), then the
    # initializers nobody reads.
    for q in [n for n in graph if n.op_type == "QuantizeLinear"]:
        if not any(o.uses() or o.is_graph_output() for o in q.outputs):
            graph.remove(q, safe=True)
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            graph.initializers.pop(name)
    if "com.microsoft" not in view.ir.opset_imports:
        view.ir.opset_imports["com.microsoft"] = 1
    return pairs


def _take_graph_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """``new`` in ``old``'s place among the graph outputs (``convenience.replace_all_uses_with`` of onnx-ir
    0.1 does not replace graph outputs)."""
    for i, v in enumerate(graph.outputs):
        if v is old:
            graph.outputs[i] = new


def _per_tensor(graph: ir.Graph, node: ir.Node) -> bool:
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    t = graph.initializers.get(scale.name) if scale is not None and scale.name else None
    return t is scale and t is not None and t.const_value is not None and t.const_value.size == 1
