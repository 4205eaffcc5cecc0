"""Where the ``qdq`` pass puts Q/DQ: the placement plan, computed from the graph alone (nothing is rewritten).

TensorRT's rules (see REFERENCE.md "Q/DQ for TensorRT" and ``passes/qdq.py``): the activation input and the
weight of each selected Conv/ConvTranspose/Gemm/MatMul, the skip input of a residual Add fed by a quantized
layer (so TensorRT can fuse the Add), optionally each layer's output after its pointwise epilogue, and with
``activation-matmuls`` both inputs of MatMuls of two activations. Kept apart from the pass so that the pass
module is its options, the calibration call and the rewrite; the plan is recomputed after an opset upgrade.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Protocol

import onnx
from onnx import GraphProto, NodeProto, TensorProto

from onnxsparse.ir.layers import Layer, Source, find_layers, select_reason

#: ops a layer's output passes through before TensorRT's epilogue ends (a single consumer each)
_EPILOGUE_OPS = (
    "Relu",
    "Clip",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "HardSigmoid",
    "HardSwish",
    "BatchNormalization",
    "Identity",
)
#: ops between a layer and a residual Add that still leave the Add fusable into the layer
_BRANCH_OPS = ("BatchNormalization", "Identity")


class QdqOptions(Protocol):
    """The ``qdq`` pass options the plan reads (``passes.qdq.QdqConfig``; a Protocol so this module needs no pass)."""

    @property
    def per_channel(self) -> bool: ...
    @property
    def quantize_outputs(self) -> bool: ...
    @property
    def skip_residual(self) -> bool: ...
    @property
    def activation_matmuls(self) -> bool: ...
    @property
    def include(self) -> str | None: ...
    @property
    def exclude(self) -> str | None: ...


@dataclass
class WeightPlan:
    source: Source
    readers: list[tuple[NodeProto, int]] = field(default_factory=list)
    axes: set[int | None] = field(default_factory=set)
    layers: list[str] = field(default_factory=list)


@dataclass
class QdqPlan:
    """What gets Q/DQ: weights by stored tensor, activations by tensor name with the inputs to rewire."""

    layers: list[Layer] = field(default_factory=list)
    #: MatMuls whose two inputs are activations (with ``activation-matmuls``)
    bmm: list[Layer] = field(default_factory=list)
    weights: dict[str, WeightPlan] = field(default_factory=dict)
    #: tensor → (node, input index) pairs to rewire; None = every consumer in the main graph
    acts: dict[str, list[tuple[NodeProto, int]] | None] = field(default_factory=dict)
    residual: list[dict[str, str]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    half: bool = False  # some weight is float16: scales in that type need opset 19


def _selected(layer: Layer, cfg: QdqOptions) -> str | None:
    """Why the include/exclude options leave this layer out (None = selected)."""
    return select_reason(layer, cfg.include, cfg.exclude)


def plan_qdq(proto: onnx.ModelProto, cfg: QdqOptions) -> QdqPlan:
    """Which weights, activations, residual skips and layer outputs get Q/DQ in the main graph, and what is skipped."""
    plan = QdqPlan()
    graph = proto.graph
    producers = {o: n for n in graph.node for o in n.output if o}
    constants = {t.name for t in graph.initializer} - {i.name for i in graph.input}
    constants |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
    acts: dict[str, list[tuple[NodeProto, int]]] = defaultdict(list)
    for layer in find_layers(proto):
        if _activation_matmul(layer, graph, constants, cfg):
            plan.bmm.append(layer)
            for index in (0, 1):
                prod = producers.get(layer.node.input[index])
                if prod is None or prod.op_type != "DequantizeLinear":
                    acts[layer.node.input[index]].append((layer.node, index))
            continue
        why = _layer_skip_reason(layer, graph, producers, constants) or _selected(layer, cfg)
        if why:
            plan.skipped.append((layer.name, why))
            continue
        assert layer.source is not None
        plan.layers.append(layer)
        act = layer.node.input[0]
        prod = producers.get(act)
        if prod is None or prod.op_type != "DequantizeLinear":
            acts[act].append((layer.node, 0))
        reader, index = (layer.chain[-1], 0) if layer.chain else (layer.node, layer.weight_input)
        wp = plan.weights.setdefault(layer.source.name, WeightPlan(layer.source))
        if (reader, index) not in wp.readers:
            wp.readers.append((reader, index))
        wp.axes.add(layer.source_channel_axis if cfg.per_channel else None)
        wp.layers.append(layer.name)
        if layer.source.tensor.data_type == TensorProto.FLOAT16:
            plan.half = True
    plan.acts = dict(acts)
    layer_nodes = {id(layer.node) for layer in plan.layers}
    if cfg.skip_residual and plan.layers:
        _plan_residual(graph, plan, producers, constants, layer_nodes)
    if cfg.quantize_outputs:
        _plan_outputs(graph, plan, producers, constants)
    return plan


def _activation_matmul(layer: Layer, graph: GraphProto, constants: set[str], cfg: QdqOptions) -> bool:
    """A main-graph MatMul of two activations, selected, and ``activation-matmuls`` is on."""
    return (
        cfg.activation_matmuls
        and layer.op_type == "MatMul"
        and layer.graph is graph
        and layer.source is None
        and not any(i in constants for i in layer.node.input[:2])
        and _selected(layer, cfg) is None
    )


def _layer_skip_reason(
    layer: Layer, graph: GraphProto, producers: dict[str, NodeProto], constants: set[str]
) -> str | None:
    if layer.graph is not graph:
        return f"inside subgraph {layer.graph_path} (Q/DQ covers the main graph only)"
    if layer.dequantized:
        return "weight already arrives through DequantizeLinear"
    if layer.source is None:
        return layer.reason or "weight is not a constant"
    dtype = layer.source.tensor.data_type
    if dtype not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        name = onnx.helper.tensor_dtype_to_string(dtype).removeprefix("TensorProto.").lower()
        return f"weight '{layer.source.name}' is {name}: Q/DQ here handles float32 and float16 weights"
    if layer.node.input[0] in constants:
        return "activation input is a constant"
    if layer.source.graph is not None and layer.source.graph is not graph:
        return "weight lives in another graph"
    return None


def _plan_residual(
    graph: GraphProto,
    plan: QdqPlan,
    producers: dict[str, NodeProto],
    constants: set[str],
    layer_nodes: set[int],
) -> None:
    """For each Add fed by a quantized layer's output, Q/DQ its other (skip) input.

    When both inputs come from quantized layers (a downsampling shortcut), the skip is the shallower one:
    the input with fewer ops since the graph inputs, i.e. the shortcut, as NVIDIA's quantized ResNet does.
    """
    depth = _depths(graph)
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2 or node.input[0] == node.input[1]:
            continue
        if any(i in constants for i in node.input):
            continue
        from_layer = [_from_layer(i, producers, constants, layer_nodes) for i in node.input]
        if not any(from_layer):
            continue
        if all(from_layer):
            skip_index = 0 if depth.get(node.input[0], 0) <= depth.get(node.input[1], 0) else 1
        else:
            skip_index = 0 if not from_layer[0] else 1
        skip = node.input[skip_index]
        prod = producers.get(skip)
        if prod is not None and prod.op_type == "DequantizeLinear":
            continue
        plan.acts.setdefault(skip, [])
        readers = plan.acts[skip]
        if readers is not None:
            readers.append((node, skip_index))
        plan.residual.append({"add": node.name or node.output[0], "skip_input": skip})


def _plan_outputs(graph: GraphProto, plan: QdqPlan, producers: dict[str, NodeProto], constants: set[str]) -> None:
    """Q/DQ every consumer of each layer's output, after its single-consumer pointwise epilogue."""
    readers: dict[str, list[NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            readers[i].append(n)
    outputs = {o.name for o in graph.output}
    skips = {r["skip_input"] for r in plan.residual}
    for layer in plan.layers:
        t = layer.node.output[0]
        while t not in outputs and len(readers[t]) == 1:
            nxt = readers[t][0]
            others = [i for i in nxt.input if i != t]
            bias = nxt.op_type in ("Add", "Sub", "Mul", "Div") and all(o in constants for o in others)
            residual = nxt.op_type == "Add" and len(others) == 1 and others[0] in skips
            if nxt.op_type in _EPILOGUE_OPS or bias or residual:
                t = nxt.output[0]
                continue
            break
        if t in plan.acts and plan.acts[t] is None:
            continue
        plan.acts[t] = None
        plan.outputs.append(t)


def _from_layer(name: str, producers: dict[str, NodeProto], constants: set[str], layer_nodes: set[int]) -> bool:
    """Whether ``name`` is a quantized layer's output, possibly after its bias Add / BatchNormalization."""
    node = producers.get(name)
    for _ in range(8):
        if node is None:
            return False
        if id(node) in layer_nodes:
            return True
        if node.op_type in _BRANCH_OPS:
            node = producers.get(node.input[0])
            continue
        if node.op_type == "Add" and len(node.input) == 2:
            inner = [i for i in node.input if i not in constants]
            if len(inner) == 1:
                node = producers.get(inner[0])
                continue
        return False
    return False


def _depths(graph: GraphProto) -> dict[str, int]:
    """Longest path (in nodes) from any graph input to each tensor; the graph is assumed topologically sorted."""
    depth: dict[str, int] = {}
    for node in graph.node:
        d = 1 + max((depth.get(i, 0) for i in node.input if i), default=0)
        for o in node.output:
            depth[o] = d
    return depth
