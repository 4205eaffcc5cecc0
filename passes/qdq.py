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
Per-axis Q/DQ needs opset 13 (float16 scales 19): the model is upgraded with onnx's version converter (onnx-ir
1.1 has none, and onnxscript's is not a dependency of ours). Layers inside subgraphs (If/Loop/Scan bodies) are out
of scope and reported as skipped.

Where Q/DQ goes (the placement plan, by names) is computed once in ``onnxsparse.qdq_plan``, on the model as given;
this module upgrades the opset, calibrates, and only then views the model as onnx-ir (``IrView``, so the IR sees
the final opset and the converter's new proto), binds the plan to it and rewrites it there: new nodes go right
after the producer (activations) or before the first reader (weights), so a sorted graph stays sorted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxsparse.calibration import histogram as calibration
from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.graph import NameGen
from onnxsparse.ir.layers import check_regex
from onnxsparse.ir.model_io import Model
from onnxsparse.ir.onnxir import IrView, add_initializer, drop_if_unread, insert_after_definition
from onnxsparse.pass_base import Pass, PassConfig, PassContext, PassReport, PassResult, option
from onnxsparse.qdq_plan import Bound, QdqPlan, Slot, WeightPlan, plan_qdq

log = logging.getLogger("onnxsparse.passes.qdq")


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
        view = IrView.of(model)  # after every opset upgrade: the IR is made from the proto that gets rewritten
        bound = plan.bind(view.ir.graph)  # the plan names nodes and values: they survive the converter
        if bound is None:  # the converter renamed or rewired something the plan names: plan on what it made
            log.info("qdq: the plan does not bind to the converted model; planning again")
            plan = plan_qdq(model, cfg)
            bound = plan.bind(view.ir.graph)
            assert bound is not None, "a fresh plan binds to the graph made from the proto it was planned on"
        rewritten = self._rewrite(view, plan, bound, result, report)
        if rewritten:
            view.commit()
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

    def _rewrite(
        self, view: IrView, plan: QdqPlan, bound: Bound, result: calibration.CalibrationResult, report: PassReport
    ) -> int:
        """Rewrite ``view.ir`` as ``plan`` says; returns how many weights and activations got Q/DQ."""
        names = NameGen(view.model.proto.graph)  # the IR was made from this proto: the same names
        order = {node: i for i, node in enumerate(view.ir.graph)}  # where each node was, to put a weight's DQ first
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
            int8 = _dequantized_weight(view, bound, wp, axis, names, order)
            weight_info[src_name] = {"axis": axis, "int8": int8, "note": note}
        act_scale: dict[str, float] = {}
        for tensor, rewire in plan.acts.items():
            if tensor not in result.amax:
                report.skip(tensor, "no calibration statistics for this tensor")
                continue
            dtype = result.dtypes.get(tensor, np.dtype(np.float32))
            if dtype not in (np.float32, np.float16):
                report.skip(tensor, f"{dtype} activation: QuantizeLinear takes float32 or float16")
                continue
            act_scale[tensor] = activation_scale(result.amax[tensor], dtype)
            scale = np.asarray(act_scale[tensor], dtype=dtype)
            _quantized_activation(view.ir.graph, bound, tensor, rewire, scale, names)
        self._report(plan, weight_info, act_scale, report)
        return len(weight_info) + len(act_scale)

    @staticmethod
    def _report(
        plan: QdqPlan, weight_info: dict[str, dict[str, Any]], act_scale: dict[str, float], report: PassReport
    ) -> None:
        """One change entry per quantized layer: its weight's axis (or why one scale) and activation scale."""
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


def _dequantized_weight(
    view: IrView, bound: Bound, wp: WeightPlan, axis: int | None, names: NameGen, order: dict[ir.Node, int]
) -> str:
    """Replace the float weight ``wp.source`` with int8 + scale + zero point read by a DequantizeLinear, put right
    before the weight's first reader; returns the int8 initializer's name.

    The int8 tensor is made by ``IrView.new_tensor``: stored like the model's own weights, so on a model whose
    weights are external it goes to the spill store and the proto does not grow by a quarter of the weights
    (which could push it past protobuf's 2 GB limit)."""
    graph = view.ir.graph
    source = bound.values[wp.source]
    tensor = ir.convenience.get_const_tensor(source)
    assert tensor is not None, "QdqPlan.bind checked that every planned weight is a constant"
    w = np.asarray(tensor.numpy())
    q, scale = quantize_weight(w, axis, np.float16 if w.dtype == np.float16 else np.float32)
    del w
    q_name, s_name, z_name = (names(f"{wp.source}_{what}") for what in ("quantized", "scale", "zero_point"))
    inputs = [
        add_initializer(graph, view.new_tensor(q, q_name)),
        _constant(graph, scale, s_name),
        _constant(graph, np.zeros(scale.shape, dtype=np.int8), z_name),
    ]
    dq = ir.node(
        "DequantizeLinear",
        inputs,
        {"axis": axis} if axis is not None else None,
        outputs=[ir.Value(name=names(f"{wp.source}_dequantized"))],
        name=names(f"{wp.source}_DequantizeLinear"),
    )
    readers = [(bound.nodes[slot.node], slot.index) for slot in wp.readers]
    graph.insert_before(min((node for node, _ in readers), key=order.__getitem__), dq)
    for node, index in readers:
        node.replace_input_with(index, dq.outputs[0])
    drop_if_unread(source)
    return q_name


def _quantized_activation(
    graph: ir.Graph, bound: Bound, tensor: str, rewire: list[Slot] | None, scale: np.ndarray, names: NameGen
) -> None:
    """QuantizeLinear → DequantizeLinear on ``tensor`` right after its producer (first in the graph for a graph
    input), read by the planned inputs (``rewire``) or by every main-graph reader (None; graph outputs stay)."""
    value = bound.values[tensor]
    targets = (  # taken before the QuantizeLinear below becomes a reader too
        [(bound.nodes[slot.node], slot.index) for slot in rewire]
        if rewire is not None
        else [(node, index) for node, index in value.uses() if node.graph is graph]
    )
    s_name, z_name = names(f"{tensor}_scale"), names(f"{tensor}_zero_point")
    s_value, z_value = _constant(graph, scale, s_name), _constant(graph, np.asarray(0, dtype=np.int8), z_name)
    q_out, dq_out = names(f"{tensor}_quantized"), names(f"{tensor}_dequantized")
    q = ir.node(
        "QuantizeLinear",
        [value, s_value, z_value],
        outputs=[ir.Value(name=q_out)],
        name=names(f"{tensor}_QuantizeLinear"),
    )
    dq = ir.node(
        "DequantizeLinear",
        [q.outputs[0], s_value, z_value],
        outputs=[ir.Value(name=dq_out)],
        name=names(f"{tensor}_DequantizeLinear"),
    )
    insert_after_definition(graph, value, [q, dq])
    for node, index in targets:
        node.replace_input_with(index, dq.outputs[0])


def _constant(graph: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
    """A small new initializer (a scale or zero point), stored inline. ``ir.Tensor``, not ``ir.tensor``: the
    latter's protocol checks cost 10x the tensor (36 vs 4 µs), and a model gets four of these per layer."""
    return add_initializer(graph, ir.Tensor(array, name=name))


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
