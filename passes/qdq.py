"""Pass ``qdq``: explicit int8 quantization (QuantizeLinear/DequantizeLinear) placed the way TensorRT wants it.

Why not ORT's ``quantize_static``: it quantizes every op, uses uint8 asymmetric activations and int32 biases,
none of which TensorRT fuses well. TensorRT's rules (see REFERENCE.md "Q/DQ for TensorRT"):

- Q/DQ on the *inputs* of Conv/ConvTranspose/Gemm/MatMul: the activation per-tensor (int8, symmetric, zero
  point 0, scale = amax/127 from calibration) and the weight per output channel (int8 initializer +
  DequantizeLinear on the op's output-channel axis as found by ``find_layers``). No Q/DQ on biases.
- A residual Add gets Q/DQ on its skip input, so TensorRT can fuse the Add into the producing layer.
- ``quantize-outputs`` also quantizes each layer's output (after its pointwise epilogue) for an int8 epilogue.

Weights are stored as int8 next to a DequantizeLinear, so ``find_layers`` still reaches the stored tensor (the
DequantizeLinear is part of a layer's weight chain) and pruned zeros stay exactly 0 (round(0/s) = 0).
Per-axis Q/DQ needs opset 13 (float16 scales 19): the model is upgraded with onnx's version converter.
Layers inside subgraphs (If/Loop/Scan bodies) are out of scope and reported as skipped.

Where Q/DQ goes (the placement plan) is computed in ``onnxsparse.qdq_plan``; this module calibrates and rewrites.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from onnxsparse.calibration import histogram as calibration
from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.graph import NameGen, toposort
from onnxsparse.ir.layers import check_regex
from onnxsparse.ir.model_io import Model
from onnxsparse.ir.tensors import external_info, set_array, to_array
from onnxsparse.pipeline import Pass, PassConfig, PassContext, PassReport, PassResult, option
from onnxsparse.qdq_plan import Bound, QdqPlan, plan_qdq

log = logging.getLogger("onnxsparse.passes.qdq")

_FLOAT_TYPES: dict[int, Any] = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.DOUBLE: np.float64,
}


@dataclass(frozen=True)
class QdqConfig(PassConfig):
    """Options of the ``qdq`` pass."""

    percentile: float = option(99.99, "percentile of |x| used as the activation range (method=percentile)")
    method: str = option("percentile", "activation range: 'percentile' of |x| or 'max' |x|")
    per_channel: bool = option(True, "weights per output channel (false: one scale per weight tensor)")
    quantize_outputs: bool = option(False, "also Q/DQ each layer's output after its epilogue (int8 epilogue)")
    skip_residual: bool = option(True, "Q/DQ on the skip input of a residual Add fed by a quantized layer")
    activation_matmuls: bool = option(
        False,
        "also Q/DQ both inputs of MatMuls of two activations (attention QK^T and PV, for TensorRT's int8 attention)",
    )
    include: str | None = option(None, "only layers whose node or weight name matches this regex")
    exclude: str | None = option(None, "leave layers whose node or weight name matches this regex")
    batch_size: int | None = option(None, "calibration batch size (default: the model's fixed batch, or as stored)")

    def __post_init__(self) -> None:
        if self.method not in calibration.METHODS:
            raise OnnxSparseError(f"qdq: method must be {' or '.join(calibration.METHODS)}, got '{self.method}'")
        if not 0.0 < self.percentile <= 100.0:
            raise OnnxSparseError(f"qdq: percentile must be in (0, 100], got {self.percentile}")
        check_regex("qdq", "include", self.include)
        check_regex("qdq", "exclude", self.exclude)


class QdqPass(Pass[QdqConfig]):
    """Insert TensorRT-style int8 Q/DQ with streaming percentile calibration."""

    name = "qdq"
    config_cls = QdqConfig
    in_place = True
    summary = "int8 Q/DQ for TensorRT: per-channel weights, calibrated per-tensor activations, residual inputs"

    def reads_calibration(self) -> bool:
        return True  # calibrates activations on it

    def requires(self, model: Model, ctx: PassContext) -> None:
        if ctx.calibration is None:
            raise OnnxSparseError("qdq needs calibration data: pass --calib DATA (.npz or a folder of .npy/.npz)")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        report = PassReport()
        opset_before = model.opset
        plan = plan_qdq(model, cfg)
        if not plan.layers and not plan.bmm:
            for what, why in plan.skipped:
                report.skip(what, why)
            report.details["note"] = "no layer to quantize"
            return PassResult(model, False, report)
        _upgrade(model, 19 if plan.half else 13, "float16 Q/DQ" if plan.half else "per-axis Q/DQ")
        data = calibration.open_calibration(ctx.calibration, model, ctx.calib_samples, cfg.batch_size)
        result = calibration.collect(model, list(plan.acts), data, cfg.method, cfg.percentile, ctx.progress)
        if any(d != np.float32 for d in result.dtypes.values()) and model.opset < 19:
            _upgrade(model, 19, "float16 Q/DQ")
        bound = plan.bind(model.proto)  # the plan names nodes and values: it survives the converter's new proto
        if bound is None:  # the converter renamed or rewired something the plan names: plan on what it made
            log.info("qdq: the plan does not bind to the converted model; planning again")
            plan = plan_qdq(model, cfg)
            bound = plan.bind(model.proto)
            assert bound is not None, "a fresh plan binds to the proto it was made from"
        rewritten = self._apply(model, plan, bound, result, report)
        modified = rewritten > 0 or model.opset != opset_before
        if modified:
            model.layer_cache.invalidate()  # Q/DQ in the weight chains (and maybe a converted proto)
        for what, why in plan.skipped:
            report.skip(what, why)
        report.details.update(
            {
                "opset": {"before": opset_before, "after": model.opset},
                "calibration": result.to_dict(),
                "residual_inputs": plan.residual,
                "output_tensors": plan.outputs,
                "scope": "main graph only: layers and tensors inside If/Loop/Scan bodies are not quantized",
            }
        )
        return PassResult(model, modified, report)

    def render(self, result: PassResult) -> str | None:
        """Per-layer table (weight axis, activation scale), residual inputs, and grouped skip reasons."""
        from onnxsparse.render import grouped_reasons, table

        rep = result.report
        lines = []
        if rep.changed:
            rows = [
                (
                    c["name"],
                    c["op"],
                    "-" if c["weight"] is None else ("tensor" if c["weight_axis"] is None else c["weight_axis"]),
                    c["activation"],
                    "-" if c["activation_scale"] is None else f"{c['activation_scale']:.4g}",
                )
                for c in rep.changed
            ]
            lines.append(table(rows, ["layer", "op", "weight axis", "activation", "act scale"]))
        residual = rep.details.get("residual_inputs") or []
        if residual:
            lines.append(f"residual Adds with Q/DQ on the skip input: {len(residual)}")
        lines.extend(grouped_reasons(rep.skipped))
        return "\n".join(lines) or None

    # ------------------------------------------------------------------------------------------ rewriting

    def _apply(
        self, model: Model, plan: QdqPlan, bound: Bound, result: calibration.CalibrationResult, report: PassReport
    ) -> int:
        """Rewrite the model as ``plan`` says; returns how many weights and activations got Q/DQ."""
        graph = model.proto.graph
        names = NameGen(graph)
        new_nodes: list[NodeProto] = []
        weight_info: dict[str, dict[str, Any]] = {}
        for src_name, wp in plan.weights.items():
            axis = next(iter(wp.axes)) if len(wp.axes) == 1 else None
            note = None
            if len(wp.axes) > 1:
                note = f"shared by {', '.join(wp.layers)} on different channel axes: one scale for the tensor"
            elif axis is None and self.config.per_channel:
                note = "the output-channel axis does not survive the weight's chain: one scale for the tensor"
            if note:
                log.info("weight '%s': %s", src_name, note)
            source = bound.tensors[src_name]
            w = to_array(source, model)
            q, scale = quantize_weight(w, axis, _np_type(source.data_type))
            del w
            q_name, s_name, z_name = (
                names(f"{src_name}_quantized"),
                names(f"{src_name}_scale"),
                names(f"{src_name}_zero_point"),
            )
            graph.initializer.extend(
                [
                    _stored_like(source, q, q_name, model),
                    numpy_helper.from_array(np.asarray(scale), s_name),
                    numpy_helper.from_array(np.zeros(scale.shape, dtype=np.int8), z_name),
                ]
            )
            out = names(f"{src_name}_dequantized")
            dq = helper.make_node(
                "DequantizeLinear", [q_name, s_name, z_name], [out], name=names(f"{src_name}_DequantizeLinear")
            )
            if axis is not None:
                dq.attribute.append(helper.make_attribute("axis", axis))
            new_nodes.append(dq)
            for slot in wp.readers:
                bound.nodes[slot.node].input[slot.index] = out
            weight_info[src_name] = {"axis": axis, "int8": q_name, "note": note}
        act_scale: dict[str, float] = {}
        for tensor, rewire in plan.acts.items():
            if tensor not in result.amax:
                report.skip(tensor, "no calibration statistics for this tensor")
                continue
            amax = result.amax[tensor]
            dtype = result.dtypes.get(tensor, np.dtype(np.float32))
            if dtype not in (np.float32, np.float16):
                report.skip(tensor, f"{dtype} activation: QuantizeLinear takes float32 or float16")
                continue
            act_value = activation_scale(amax, dtype)
            s_name, z_name = names(f"{tensor}_scale"), names(f"{tensor}_zero_point")
            graph.initializer.extend(
                [
                    numpy_helper.from_array(np.asarray(act_value, dtype=dtype), s_name),
                    numpy_helper.from_array(np.asarray(0, dtype=np.int8), z_name),
                ]
            )
            q_out, dq_out = names(f"{tensor}_quantized"), names(f"{tensor}_dequantized")
            new_nodes.append(
                helper.make_node(
                    "QuantizeLinear", [tensor, s_name, z_name], [q_out], name=names(f"{tensor}_QuantizeLinear")
                )
            )
            new_nodes.append(
                helper.make_node(
                    "DequantizeLinear", [q_out, s_name, z_name], [dq_out], name=names(f"{tensor}_DequantizeLinear")
                )
            )
            targets = (
                [(bound.nodes[slot.node], slot.index) for slot in rewire]
                if rewire is not None
                else [(n, i) for n in graph.node for i, name in enumerate(n.input) if name == tensor]
            )
            for node, index in targets:
                node.input[index] = dq_out
            act_scale[tensor] = act_value
        graph.node.extend(new_nodes)
        toposort(model.proto.graph)  # the result is valid on its own, not only after the pipeline's final sort
        for layer in plan.layers:
            assert layer.weight is not None
            act = layer.activation
            report.change(
                layer.name,
                op=layer.op_type,
                weight=layer.weight,
                weight_axis=weight_info[layer.weight]["axis"],
                weight_note=weight_info[layer.weight]["note"],
                activation=act,
                activation_scale=act_scale.get(act),
            )
        for layer in plan.bmm:
            a, b = layer.activation, layer.activation_b
            assert b is not None
            report.change(
                layer.name,
                op=layer.op_type,
                weight=None,
                weight_axis=None,
                weight_note="both inputs are activations",
                activation=f"{a}, {b}",
                activation_scale=act_scale.get(a),
                activation_scale_b=act_scale.get(b),
            )
        return len(weight_info) + len(act_scale)


def quantize_weight(w: np.ndarray, axis: int | None, scale_dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """int8 symmetric quantization: (q, scale) with scale = amax/127 per ``axis`` slice (all of w if None).

    The scale is rounded to ``scale_dtype`` (what DequantizeLinear will hold) before q is computed from it. A
    slice of zeros gets scale 1 so DequantizeLinear never sees a zero scale; zeros map to exactly 0.
    """
    a = np.abs(np.asarray(w, dtype=np.float32))
    if axis is None:
        amax = np.asarray(a.max() if a.size else 0.0, dtype=np.float32)
    else:
        others = tuple(i for i in range(a.ndim) if i != axis)
        amax = a.max(axis=others) if others else a
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(scale_dtype)
    if np.dtype(scale_dtype) == np.float16:
        scale = np.maximum(scale, np.float16(np.finfo(np.float16).tiny))
    step = _expand(scale.astype(np.float32), axis, a.ndim)
    q = np.clip(np.rint(np.asarray(w, dtype=np.float32) / step), -127, 127).astype(np.int8)
    return q, scale


def _stored_like(source: TensorProto, array: np.ndarray, name: str, model: Model) -> TensorProto:
    """A new initializer ``name`` holding ``array``, stored where ``source`` (the weight it replaces) was.

    An external float weight means a large model: its int8 replacement goes to a scratch file as ``set_array``
    does for edited external tensors (the saver streams it into the output's data file), so the proto does not
    grow by a quarter of the model's weights — which could push it past protobuf's 2 GB limit. An inline
    weight gives an inline int8 tensor.
    """
    tensor = TensorProto(name=name)
    if external_info(source) is not None:
        tensor.data_location = TensorProto.EXTERNAL  # set_array's policy: an external tensor stays out of the proto
    set_array(tensor, array, model)
    return tensor


def activation_scale(amax: float, dtype: np.dtype[Any]) -> float:
    """amax/127 as a positive value representable in ``dtype`` (an all-zero tensor gets scale 1)."""
    if not np.isfinite(amax) or amax <= 0:
        return 1.0
    scale = amax / 127.0
    return float(max(scale, float(np.finfo(dtype).tiny))) if np.issubdtype(dtype, np.floating) else scale


def _expand(scale: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    if axis is None:
        return scale
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def _np_type(data_type: int) -> Any:
    if data_type in _FLOAT_TYPES:
        return _FLOAT_TYPES[data_type]
    return np.float32


def _upgrade(model: Model, target: int, why: str) -> None:
    """Raise the default-domain opset to ``target`` with onnx's version converter, or say why not."""
    current = model.opset
    if current >= target:
        return
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model.proto, target)
    except Exception as e:  # the converter raises RuntimeError, ValueError or its own C++ errors
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        first = first.split("failed: ", 1)[-1]  # drop the converter's source location and assertion text
        raise OnnxSparseError(
            f"qdq needs opset >= {target} for {why}; onnx's version converter cannot upgrade this model from "
            f"opset {current}: {first[:200]}"
        ) from e
    log.info("upgraded opset %d -> %d for %s", current, target, why)
    model.proto = converted
