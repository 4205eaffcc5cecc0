"""Where the ``qdq`` pass puts Q/DQ: the placement plan, computed from the graph alone (nothing is rewritten).

TensorRT's rules (see REFERENCE.md "Q/DQ for TensorRT" and ``passes/qdq.py``): the activation input and the
weight of each selected Conv/ConvTranspose/Gemm/MatMul, the skip input of a residual Add fed by a quantized
layer (so TensorRT can fuse the Add), optionally each layer's output after its pointwise epilogue, and with
``activation-matmuls`` both inputs of MatMuls of two activations. Kept apart from the pass so that the pass
module is its options, the calibration call and the rewrite. The plan names nodes (by their first output) and
values, never proto objects: it is made on the model as given, and the opset upgrade (onnx's version converter,
which returns a new proto with new node objects) comes after it. ``QdqPlan.bind`` then finds the same nodes and
values, by those names, in the onnx-ir graph the pass rewrites (made from the converted proto; the converter
keeps value names), so the plan is computed once; only a plan that no longer binds is computed again.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Protocol

import onnx
import onnx_ir as ir
from onnx import GraphProto, NodeProto, TensorProto

from onnxsparse.ir.graph import GraphIndex
from onnxsparse.ir.index import model_layers
from onnxsparse.ir.layers import Layer, select_reason
from onnxsparse.ir.model_io import Model
from onnxsparse.ir.reasons import Skip, render

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


@dataclass(frozen=True)
class Slot:
    """One node input to rewire, by names: the node (its first output's name), the input index, and the value
    that input reads when planned (checked again when the plan is bound to a proto)."""

    node: str
    index: int
    reads: str


@dataclass(frozen=True)
class PlannedLayer:
    """A quantized layer by names: what the report needs, nothing that points into a proto."""

    name: str
    op_type: str
    #: the node's first output (what a residual Add or an output Q/DQ follows)
    output: str
    activation: str
    #: the weight's stored tensor (None for a MatMul of two activations)
    weight: str | None = None
    #: a MatMul of two activations: its second input
    activation_b: str | None = None


@dataclass
class WeightPlan:
    source: str
    readers: list[Slot] = field(default_factory=list)
    axes: set[int | None] = field(default_factory=set)
    layers: list[str] = field(default_factory=list)


@dataclass
class QdqPlan:
    """What gets Q/DQ, by value and node-output names only, so it survives the version converter replacing the
    proto: weights by stored tensor, activations by tensor name with the inputs to rewire."""

    layers: list[PlannedLayer] = field(default_factory=list)
    #: MatMuls whose two inputs are activations (with ``activation-matmuls``)
    bmm: list[PlannedLayer] = field(default_factory=list)
    weights: dict[str, WeightPlan] = field(default_factory=dict)
    #: tensor → inputs to rewire; None = every consumer in the main graph
    acts: dict[str, list[Slot] | None] = field(default_factory=dict)
    residual: list[dict[str, str]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    half: bool = False  # some weight is float16: scales in that type need opset 19

    def bind(self, graph: ir.Graph) -> Bound | None:
        """The plan's nodes and values in the onnx-ir main ``graph`` (made after any opset upgrade), or None
        when some name no longer means what it meant when planned: then the caller plans again."""
        values: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
        values.update(graph.initializers)
        values.update((v.name, v) for node in graph for v in node.outputs if v.name)
        bound = Bound(values)
        for wp in self.weights.values():
            source = values.get(wp.source)
            if source is None or ir.convenience.get_const_tensor(source) is None:
                return None
        if any(tensor not in values for tensor in self.acts):
            return None
        for slots in [wp.readers for wp in self.weights.values()] + [a for a in self.acts.values() if a]:
            for slot in slots:
                first = values.get(slot.node)
                node = first.producer() if first is not None else None
                if node is None or len(node.inputs) <= slot.index:
                    return None
                reads = node.inputs[slot.index]
                if reads is None or reads.name != slot.reads:
                    return None
                bound.nodes[slot.node] = node
        return bound


@dataclass
class Bound:
    """A plan's names resolved in one onnx-ir graph: main-graph values by name, reader nodes by ``Slot.node``."""

    values: dict[str, ir.Value]
    nodes: dict[str, ir.Node] = field(default_factory=dict)


def _slot(node: NodeProto, index: int) -> Slot:
    return Slot(node.output[0], index, node.input[index])


def _selected(layer: Layer, cfg: QdqOptions) -> Skip | None:
    """Why the include/exclude options leave this layer out (None = selected)."""
    return select_reason(layer, cfg.include, cfg.exclude)


def plan_qdq(model: Model, cfg: QdqOptions) -> QdqPlan:
    """Which weights, activations, residual skips and layer outputs get Q/DQ in the main graph, and what is skipped."""
    plan = QdqPlan()
    proto = model.proto
    graph = proto.graph
    index = GraphIndex(graph)
    constants = {t.name for t in graph.initializer} - {i.name for i in graph.input}
    constants |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
    acts: dict[str, list[Slot]] = defaultdict(list)
    for layer in model_layers(model):
        if _activation_matmul(layer, graph, constants, cfg):
            node = layer.node
            plan.bmm.append(
                PlannedLayer(layer.name, layer.op_type, node.output[0], node.input[0], activation_b=node.input[1])
            )
            for i in (0, 1):
                prod = index.producer(node.input[i])
                if prod is None or prod.op_type != "DequantizeLinear":
                    acts[node.input[i]].append(_slot(node, i))
            continue
        why = _layer_skip_reason(layer, graph, constants) or _selected(layer, cfg)
        if why:
            plan.skipped.append((layer.name, str(why)))
            continue
        assert layer.source is not None
        plan.layers.append(
            PlannedLayer(layer.name, layer.op_type, layer.node.output[0], layer.node.input[0], layer.source.name)
        )
        act = layer.node.input[0]
        prod = index.producer(act)
        if prod is None or prod.op_type != "DequantizeLinear":
            acts[act].append(_slot(layer.node, 0))
        reader = _slot(layer.chain[-1], 0) if layer.chain else _slot(layer.node, layer.weight_input)
        wp = plan.weights.setdefault(layer.source.name, WeightPlan(layer.source.name))
        if reader not in wp.readers:
            wp.readers.append(reader)
        wp.axes.add(layer.source_channel_axis if cfg.per_channel else None)
        wp.layers.append(layer.name)
        if layer.source.tensor.data_type == TensorProto.FLOAT16:
            plan.half = True
    plan.acts = dict(acts)
    if cfg.skip_residual and plan.layers:
        _plan_residual(graph, plan, index, constants, {p.output for p in plan.layers})
    if cfg.quantize_outputs:
        _plan_outputs(graph, plan, index, constants)
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


def _layer_skip_reason(layer: Layer, graph: GraphProto, constants: set[str]) -> str | None:
    if layer.graph is not graph:
        return f"inside subgraph {layer.graph_path} (Q/DQ covers the main graph only)"
    if layer.dequantized:
        return "weight already arrives through DequantizeLinear"
    if layer.source is None:
        return render(layer.reason, "weight is not a constant")
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
    graph: GraphProto, plan: QdqPlan, index: GraphIndex, constants: set[str], layer_outputs: set[str]
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
        from_layer = [_from_layer(i, index, constants, layer_outputs) for i in node.input]
        if not any(from_layer):
            continue
        if all(from_layer):
            skip_index = 0 if depth.get(node.input[0], 0) <= depth.get(node.input[1], 0) else 1
        else:
            skip_index = 0 if not from_layer[0] else 1
        skip = node.input[skip_index]
        prod = index.producer(skip)
        if prod is not None and prod.op_type == "DequantizeLinear":
            continue
        plan.acts.setdefault(skip, [])
        readers = plan.acts[skip]
        if readers is not None:
            readers.append(_slot(node, skip_index))
        plan.residual.append({"add": node.name or node.output[0], "skip_input": skip})


def _plan_outputs(graph: GraphProto, plan: QdqPlan, index: GraphIndex, constants: set[str]) -> None:
    """Q/DQ every consumer of each layer's output, after its single-consumer pointwise epilogue."""
    outputs = {o.name for o in graph.output}
    skips = {r["skip_input"] for r in plan.residual}
    for layer in plan.layers:
        t = layer.output
        while t not in outputs and len(index.uses(t)) == 1:
            nxt = index.uses(t)[0][0]
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


def _from_layer(name: str, index: GraphIndex, constants: set[str], layer_outputs: set[str]) -> bool:
    """Whether ``name`` is a quantized layer's output, possibly after its bias Add / BatchNormalization."""
    node = index.producer(name)
    for _ in range(8):
        if node is None:
            return False
        if node.output[0] in layer_outputs:
            return True
        if node.op_type in _BRANCH_OPS:
            node = index.producer(node.input[0])
            continue
        if node.op_type == "Add" and len(node.input) == 2:
            inner = [i for i in node.input if i not in constants]
            if len(inner) == 1:
                node = index.producer(inner[0])
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
