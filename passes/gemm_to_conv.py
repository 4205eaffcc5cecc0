"""Pass ``gemm-to-conv``: Gemm/MatMul with a constant weight → 1×1 Conv, the TensorRT 8 sparse path.

TensorRT 8.0–8.2 picks sparse tactics only for Convolution/FullyConnected layers, so a model's GEMMs must be
expressed as 1×1 convolutions. The rewrite is numerically the same product:

    A[..., K] --Reshape[-1, K, 1, 1]--> Conv(W[N, K, 1, 1] = alpha·op(B)ᵀ, bias = beta·C) --Reshape[*A.shape[:-1], N]-->

The output shape is computed in-graph (Shape → Slice → Concat), so dynamic batch and sequence dims keep
working; nothing is baked from the example shapes. Rewrites happen inside If/Loop/Scan bodies too, with the
new constants placed in the graph that holds the node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import GraphProto, NodeProto, helper, numpy_helper

from onnxsparse.ir.graph import NameGen, use_counts
from onnxsparse.ir.index import model_layers
from onnxsparse.ir.layers import Layer, attr, check_regex, select_reason
from onnxsparse.ir.model_io import Model
from onnxsparse.ir.reasons import Skip, code_key
from onnxsparse.ir.shapes import infer_shapes
from onnxsparse.ir.tensors import to_array
from onnxsparse.pipeline import Pass, PassConfig, PassContext, PassReport, PassResult, option


@dataclass(frozen=True)
class GemmToConvConfig(PassConfig):
    """Options of ``gemm-to-conv``."""

    include: str | None = option(None, "Regex: only rewrite nodes whose name or weight name matches.")
    exclude: str | None = option(None, "Regex: never rewrite nodes whose name or weight name matches.")

    def __post_init__(self) -> None:
        check_regex("gemm-to-conv", "include", self.include)
        check_regex("gemm-to-conv", "exclude", self.exclude)


class GemmToConvPass(Pass[GemmToConvConfig]):
    """Rewrite Gemm/MatMul with constant weights into 1×1 Conv (numerically equal)."""

    name = "gemm-to-conv"
    config_cls = GemmToConvConfig
    in_place = True
    summary = "Gemm/MatMul with a constant weight -> 1x1 Conv (TensorRT 8 sparse path), numerically equal."

    def reads_calibration(self) -> bool:
        return False  # works on the weights alone

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        report = PassReport()
        proto = model.proto
        shapes = infer_shapes(proto)
        counts = use_counts(proto.graph)
        names = NameGen(proto.graph)
        rewritten = 0
        plans: dict[int, tuple[GraphProto, dict[str, list[NodeProto]]]] = {}
        depth: dict[int, int] = {}
        for layer in model_layers(model, shapes):
            if layer.op_type not in ("Gemm", "MatMul"):
                continue
            label = layer.name
            why: Skip | str | None = select_reason(layer, self.config.include, self.config.exclude)
            why = why or _why_not(layer, shapes, counts)
            bias, bias_why = (None, None) if why else _bias(layer, model)  # no bias read for a skipped layer
            why = why or bias_why
            if why:
                report.skip(label, str(why), op=layer.op_type, **code_key(why))
                continue
            graph_plan = plans.setdefault(id(layer.graph), (layer.graph, {}))[1]
            depth[id(layer.graph)] = layer.graph_path.count("/")
            graph_plan[layer.node.output[0]] = _rewrite(layer, model, names, bias)
            rewritten += 1
            report.change(label, op=layer.op_type, weight=layer.weight_name)
        # Innermost graphs first: splicing a graph copies its nodes, and with them the subgraphs they hold.
        for _, (graph, replacements) in sorted(plans.items(), key=lambda kv: -depth[kv[0]]):
            _splice(graph, replacements)
        if rewritten:
            model.layer_cache.invalidate()  # nodes replaced: the index is rebuilt on the next question
        report.details["rewritten"] = rewritten
        return PassResult(model, modified=rewritten > 0, report=report)


def _why_not(layer: Layer, shapes: dict, counts: dict[str, int]) -> Skip | str | None:
    """The reason a Gemm/MatMul cannot be rewritten, or None."""
    node = layer.node
    if layer.source is None:
        return layer.reason or "weight is not constant"
    if layer.chain:
        ops = "/".join(n.op_type for n in layer.chain)
        return f"weight reaches the op through {ops}; run gemm-to-conv before qdq (direct constants only)"
    if counts.get(node.input[1], 0) > 1 or layer.shared_with:
        return f"weight '{layer.weight_name}' is shared with another consumer"
    w = layer.weight_shape
    if w is None or len(w) != 2:
        return f"weight has rank {len(w) if w else '?'} (need 2)"
    if node.op_type == "Gemm":
        if attr(node, "transA", 0):
            return "transA=1 is not supported"
        if len(node.input) > 2 and node.input[2]:
            c = shapes.get(node.input[2])
            n = w[0] if attr(node, "transB", 0) else w[1]
            if c is None or tuple(c) not in ((n,), (1, n)):
                return f"bias C has shape {tuple(c) if c is not None else 'unknown'}, need [{n}] or [1,{n}]"
    # The rewrite flattens A to [-1, K] and restores Shape(A)[:-1] + [N]: right for any rank of A
    # (rank 1 included), so an activation whose shape inference could not resolve is fine too.
    return None


def _const(graph: GraphProto, names: NameGen, base: str, value: np.ndarray) -> str:
    name = names(base)
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _bias(layer: Layer, model: Model) -> tuple[np.ndarray | None, str | None]:
    """beta·C for a Gemm with a constant bias; a reason where C is computed at run time."""
    node = layer.node
    if node.op_type != "Gemm" or len(node.input) < 3 or not node.input[2]:
        return None, None
    c = _constant_array(node.input[2], layer, model)
    if c is None:
        return None, "bias C is computed at run time"
    beta = float(attr(node, "beta", 1.0))  # type: ignore[arg-type]
    return c.reshape(-1) * np.asarray(beta, dtype=c.dtype), None


def _rewrite(layer: Layer, model: Model, names: NameGen, bias: np.ndarray | None) -> list[NodeProto]:
    """The Reshape → Conv → Reshape nodes replacing the layer's node (new constants go into its graph)."""
    node, graph = layer.node, layer.graph
    assert layer.source is not None
    w = np.asarray(to_array(layer.source.tensor, model))
    if node.op_type == "Gemm":
        alpha = float(attr(node, "alpha", 1.0))  # type: ignore[arg-type]
        wt = w if attr(node, "transB", 0) else w.T  # → [N, K]
        wt = wt * np.asarray(alpha, dtype=w.dtype) if alpha != 1.0 else wt
    else:
        wt = w.T
    n_out, k = wt.shape
    base = node.name or node.output[0]
    wname = _const(graph, names, f"{base}_conv_W", np.ascontiguousarray(wt.reshape(n_out, k, 1, 1)))
    conv_inputs = [names(f"{base}_conv_in"), wname]
    if bias is not None:
        conv_inputs.append(_const(graph, names, f"{base}_conv_B", np.ascontiguousarray(bias.astype(wt.dtype))))
    a = node.input[0]
    new: list[NodeProto] = []
    new.append(
        helper.make_node(
            "Reshape",
            [a, _const(graph, names, f"{base}_to4d", np.array([-1, k, 1, 1], np.int64))],
            [conv_inputs[0]],
            name=names(f"{base}_reshape_in"),
        )
    )
    conv_out = names(f"{base}_conv_out")
    conv = helper.make_node("Conv", conv_inputs, [conv_out], name=names(f"{base}_conv"), kernel_shape=[1, 1])
    new.append(conv)
    shape_a = names(f"{base}_shape")
    new.append(helper.make_node("Shape", [a], [shape_a], name=names(f"{base}_shape_op")))
    lead = names(f"{base}_lead_dims")
    new.append(
        helper.make_node(
            "Slice",
            [
                shape_a,
                _const(graph, names, f"{base}_zero", np.array([0], np.int64)),
                _const(graph, names, f"{base}_minus1", np.array([-1], np.int64)),
            ],
            [lead],
            name=names(f"{base}_slice"),
        )
    )
    out_shape = names(f"{base}_out_shape")
    new.append(
        helper.make_node(
            "Concat",
            [lead, _const(graph, names, f"{base}_n", np.array([n_out], np.int64))],
            [out_shape],
            name=names(f"{base}_concat"),
            axis=0,
        )
    )
    new.append(helper.make_node("Reshape", [conv_out, out_shape], [node.output[0]], name=names(f"{base}_reshape_out")))
    origin = f"onnxsparse gemm-to-conv: from {node.op_type} '{node.name}'"
    for n in new:
        n.doc_string = origin
    return new


def _splice(graph: GraphProto, replacements: dict[str, list[NodeProto]]) -> None:
    """Rebuild the graph's node list once, each replaced node's new nodes at its position."""
    out: list[NodeProto] = []
    for n in graph.node:
        new = replacements.get(n.output[0]) if n.output else None
        out.extend(new if new is not None else [n])
    copies = []
    for n in out:
        c = NodeProto()
        c.CopyFrom(n)
        copies.append(c)
    del graph.node[:]
    graph.node.extend(copies)


def _constant_array(name: str, layer: Layer, model: Model) -> np.ndarray | None:
    """The value of a constant input of the layer's node (bias), or None where it is computed at run time."""
    src = layer.constant(name)
    return None if src is None else np.asarray(to_array(src.tensor, model))
