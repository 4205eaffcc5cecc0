"""Weighted-layer discovery: the one place that knows where a layer's weight comes from and its axes.

Every pass (gemm-to-conv, prune, validate, qdq, to-fp16, bench) asks the same questions of a
Conv/ConvTranspose/Gemm/MatMul node: which stored tensor is its weight (initializer or Constant node,
possibly reached through DequantizeLinear / Transpose / Cast / Reshape / Identity, possibly in an enclosing
graph), which axis of that stored tensor is the reduction (K) axis — the axis 2:4 groups run along — and
which is the output-channel axis, and what GEMM it computes. ``find_layers`` answers them once; an axis bug
is fixed here and nowhere else.

Why on protobuf and not onnx-ir (whose subgraph captures would make the ``_Scope`` name lookups below
unneeded): the index is first of all read by ``prune`` and ``validate``, which stay on the protobuf fast path
(``ir/onnxir.py`` says why), and an index on onnx-ir would give them an ``onnx_ir.Model`` to build first.
``tools/bench_layer_index.py`` (``tools/results/bench_layer_index.json``) measured that floor: ``find_layers``
takes 0.4–1.9 ms on the YOLO-size CNN, MiniLM-L3 and the ddddocr models, one ``IrView.of`` of the same graphs
4–19 ms (4–12× the whole walk), and ``import onnx_ir`` 0.33–0.38 s per process, which the prune CLI does not
pay today. Held against Polygraphy in the same runs: prune pass 270× → ≤ 221× and 305× → ≤ 237× (goal ≥ 100×),
prune + check CLI 16.5× → ≤ 10.0× and 25.2× → ≤ 15.0× (goal ≥ 10×), before the walk itself is counted. The
cost buys prune nothing, so the one index stays here, keyed by names, for every pass (the onnx-ir passes
choose with it and rewrite on their view).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import GraphProto, NodeProto, TensorProto

from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.graph import GraphIndex, subgraph_key, subgraphs
from onnxsparse.ir.reasons import Reason, Skip
from onnxsparse.ir.shapes import Shape, concrete
from onnxsparse.ir.tensors import constant_value, external_info, to_array

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: Ops a weight may pass through on its way to the layer; each maps axes in a known way.
CHAIN_OPS = ("DequantizeLinear", "Transpose", "Cast", "Reshape", "Identity")


def attr(node: NodeProto, name: str, default: Any = None) -> Any:
    """An attribute's Python value, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


@dataclass
class Source:
    """The stored tensor a weight comes from."""

    name: str
    kind: str  # "initializer" | "constant"
    tensor: TensorProto
    graph: GraphProto | None  # graph holding the initializer or the Constant node
    node: NodeProto | None = None  # the Constant node, if any
    #: ``graph_key`` of the graph holding it (see ``Layer.graph_key``)
    graph_key: str = "main"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensor.dims)

    @property
    def key(self) -> tuple[str, str, str]:
        """Which stored tensor this is, by name: (graph key, kind, name). Two layers reading one tensor get
        equal keys, in this model state and in any copy of its proto (an ``id()`` would not survive a copy)."""
        return self.graph_key, self.kind, self.name


@dataclass
class Layer:
    """One weighted op and everything the passes need to know about its weight."""

    node: NodeProto
    graph: GraphProto
    graph_path: str
    weight_input: int = 1
    chain: list[NodeProto] = field(default_factory=list)  # consumer side first
    source: Source | None = None
    #: axes in the weight *as the layer sees it*
    weight_shape: tuple[int, ...] | None = None
    reduction_axis: int | None = None
    channel_axis: int | None = None
    #: the same axes mapped onto the stored tensor (None where the chain loses them)
    source_reduction_axis: int | None = None
    source_channel_axis: int | None = None
    #: why this layer's weight cannot be made n:m sparse at all (None = eligible); match ``reason.code``
    reason: Skip | None = None
    shared_with: list[str] = field(default_factory=list)
    #: name lookups of the node's graph and its enclosing graphs (innermost first)
    scopes: list[_Scope] = field(default_factory=list, repr=False)
    #: the node's graph as a unique, stable key for maps: ``main``, or the owning graph's key, the owning node's
    #: position in it and the attribute (``main/4.then_branch``). ``graph_path`` is the readable form for
    #: reports, and two unnamed If nodes of one graph give equal paths.
    graph_key: str = "main"

    def constant(self, name: str) -> Source | None:
        """``name`` as an initializer or Constant output visible from this layer's graph (e.g. a bias)."""
        return _lookup_const(name, self.scopes)

    @property
    def name(self) -> str:
        return self.node.name or f"{self.node.op_type}({self.node.output[0]})"

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def key(self) -> str:
        """The layer's first output name: unique in the model (ONNX values are assigned once, subgraphs
        included) and the same in a copy of the proto, so maps of layers key on it (``name`` can repeat)."""
        return self.node.output[0]

    @property
    def weight_name(self) -> str | None:
        return self.source.name if self.source else None

    @property
    def group(self) -> int:
        return int(attr(self.node, "group", 1))

    @property
    def reduction_size(self) -> int | None:
        """Length of the reduction axis in the weight (C_in/group for Conv, K for Gemm/MatMul)."""
        if self.weight_shape is None or self.reduction_axis is None:
            return None
        return self.weight_shape[self.reduction_axis]

    @property
    def dequantized(self) -> bool:
        return any(n.op_type == "DequantizeLinear" for n in self.chain)

    def check_pattern(self, m: int) -> Skip | None:
        """Why groups of ``m`` along the reduction axis are impossible for this layer (None if possible)."""
        if self.reason:
            return self.reason
        size = self.reduction_size
        if size is None:
            return Reason.REDUCTION_SIZE_UNKNOWN.skip()
        if size % m:
            what = "C_in/group" if self.op_type == "Conv" else ("C_in" if self.op_type == "ConvTranspose" else "K")
            return Reason.NOT_DIVISIBLE.skip(what=what, size=size, m=m)
        return None

    def gemm_shape(self, shapes: dict[str, Shape]) -> GemmShape | None:
        """The GEMM (M, N, K) this layer computes, from inferred shapes (None if a dim is unknown)."""
        w = self.weight_shape
        if w is None:
            return None
        x = concrete(shapes.get(self.node.input[0]))
        y = concrete(shapes.get(self.node.output[0]))
        op, g = self.op_type, self.group
        if op == "Conv":
            if y is None or len(y) < 2:
                return None
            m = y[0] * int(np.prod(y[2:], dtype=np.int64))
            return GemmShape(m=m, n=w[0], k=w[1] * int(np.prod(w[2:], dtype=np.int64)), groups=g)
        if op == "ConvTranspose":
            if x is None or len(x) < 2:
                return None
            m = x[0] * int(np.prod(x[2:], dtype=np.int64))
            return GemmShape(m=m, n=w[1] * int(np.prod(w[2:], dtype=np.int64)), k=w[0] // g, groups=g)
        if x is None or len(x) < 1 or self.reduction_axis is None or self.channel_axis is None:
            return None
        trans_a = op == "Gemm" and bool(attr(self.node, "transA", 0))
        m = x[1] if trans_a else int(np.prod(x[:-1], dtype=np.int64))
        if op == "MatMul" and len(w) > 2:
            m *= int(np.prod(w[:-2], dtype=np.int64)) if len(x) <= 2 else 1
        return GemmShape(m=m, n=w[self.channel_axis], k=w[self.reduction_axis])


@dataclass(frozen=True)
class GemmShape:
    """A layer as a GEMM: ``groups`` independent products of [m, k] x [k, n/groups]."""

    m: int
    n: int
    k: int
    groups: int = 1

    @property
    def flops(self) -> int:
        """Multiply-adds × 2. For a grouped Conv ``n`` is all output channels and ``k`` is per group."""
        return 2 * self.m * self.n * self.k


def select_reason(layer: Layer, include: str | None, exclude: str | None) -> Skip | None:
    """Why the ``include``/``exclude`` name regexes (searched in the node and weight names) leave a layer out.

    Every pass with include/exclude options uses this, so the same option selects the same layers everywhere.
    """
    names = [n for n in (layer.name, layer.weight_name) if n]
    if include and not any(re.search(include, n) for n in names):
        return Reason.NOT_INCLUDED.skip(pattern=include)
    if exclude and any(re.search(exclude, n) for n in names):
        return Reason.EXCLUDED.skip(pattern=exclude)
    return None


def check_regex(pass_name: str, option_name: str, value: str | None) -> None:
    """Reject a bad regex option when the config is built, with a one-line error."""
    if value:
        try:
            re.compile(value)
        except re.error as e:
            raise OnnxSparseError(f"{pass_name}: bad {option_name} regex '{value}': {e}") from None


def _axes_for(node: NodeProto, wshape: tuple[int, ...]) -> tuple[int | None, int | None, Skip | None]:
    """(reduction axis, output-channel axis, reason) of the weight as the op consumes it."""
    op, rank = node.op_type, len(wshape)
    if op in ("Conv", "ConvTranspose"):
        if rank < 3:
            return None, None, Reason.WEIGHT_RANK.skip(op=op, rank=rank)
        return (1, 0, None) if op == "Conv" else (0, 1, None)
    if op == "Gemm":
        if rank != 2:
            return None, None, Reason.WEIGHT_RANK.skip(op=op, rank=rank)
        return (1, 0, None) if attr(node, "transB", 0) else (0, 1, None)
    if op == "MatMul":
        if rank < 2:
            return None, None, Reason.WEIGHT_RANK.skip(op=op, rank=rank)
        return rank - 2, rank - 1, None
    return None, None, Reason.NOT_WEIGHTED_OP.skip(op=op)


def _map_axis_back(
    chain_node: NodeProto, axis: int, out_shape: tuple[int, ...] | None, in_shape: tuple[int, ...] | None
) -> int | None:
    """The axis of the chain node's input that ``axis`` of its output comes from (None if lost)."""
    op = chain_node.op_type
    if op in ("DequantizeLinear", "Cast", "Identity"):
        return axis
    if op == "Transpose":
        perm = attr(chain_node, "perm")
        if perm is None:
            rank = len(out_shape) if out_shape is not None else None
            if rank is None:
                return None
            perm = list(range(rank))[::-1]
        return int(perm[axis])
    if op == "Reshape":
        if out_shape is None or in_shape is None:
            return None
        prefix = int(np.prod(out_shape[:axis], dtype=np.int64))
        acc = 1
        for b, d in enumerate(in_shape):
            if acc == prefix and d == out_shape[axis]:
                return b
            acc *= d
            if acc > prefix:
                break
        return None
    return None


def _chain_out_shape(
    node: NodeProto, in_shape: tuple[int, ...], scopes: list[_Scope], shapes: dict[str, Shape] | None
) -> tuple[int, ...] | None:
    op = node.op_type
    if op in ("DequantizeLinear", "Cast", "Identity"):
        return in_shape
    if op == "Transpose":
        perm = attr(node, "perm") or list(range(len(in_shape)))[::-1]
        return tuple(in_shape[int(p)] for p in perm)
    if op == "Reshape":
        target = _lookup_const(node.input[1], scopes) if len(node.input) > 1 else None
        # find_layers sees the proto, not the model's folder: a shape stored as external data (a model saved with
        # a zero size threshold, or a spilled one) is not read from any file; inferred shapes answer instead.
        if target is not None and external_info(target.tensor) is None:
            dims = [int(d) for d in np.asarray(to_array(target.tensor)).reshape(-1)]
            allow_zero = bool(attr(node, "allowzero", 0))
            dims = [in_shape[i] if (d == 0 and not allow_zero and i < len(in_shape)) else d for i, d in enumerate(dims)]
            if dims.count(-1) == 1:
                known = int(np.prod([d for d in dims if d != -1], dtype=np.int64))
                total = int(np.prod(in_shape, dtype=np.int64))
                if known == 0 or total % known:
                    return None
                dims[dims.index(-1)] = total // known
            return tuple(dims)
        if shapes is not None:
            return concrete(shapes.get(node.output[0]))
    return None


class _Scope:
    """Name lookups for one graph, built once (a linear scan per lookup would be quadratic)."""

    def __init__(self, graph: GraphProto, key: str) -> None:
        self.graph = graph
        self.key = key
        self.inits = {t.name: t for t in graph.initializer}
        self.inputs = {i.name for i in graph.input}
        self.index = GraphIndex(graph)


def _lookup_const(name: str, scopes: list[_Scope]) -> Source | None:
    """Find ``name`` as an initializer or Constant output, innermost scope first."""
    for s in scopes:
        t = s.inits.get(name)
        if t is not None:
            return Source(name=name, kind="initializer", tensor=t, graph=s.graph, graph_key=s.key)
        node = s.index.producer(name)
        if node is not None:
            if node.op_type == "Constant":
                value = constant_value(node)
                if value is not None:
                    return Source(name=name, kind="constant", tensor=value, graph=s.graph, node=node, graph_key=s.key)
            return None
    return None


def _producer(name: str, scopes: list[_Scope]) -> NodeProto | None:
    for s in scopes:
        if name in s.index:
            return s.index.producer(name)
        if name in s.inits or name in s.inputs:
            return None
    return None


def _graph_inputs(scopes: list[_Scope]) -> set[str]:
    return {i for s in scopes for i in s.inputs}


def find_layers(model: onnx.ModelProto, shapes: dict[str, Shape] | None = None) -> list[Layer]:
    """All Conv/ConvTranspose/Gemm/MatMul nodes of the model (subgraphs included), in graph order."""
    layers: list[Layer] = []
    _walk(model.graph, "main", "main", [], layers, shapes)
    _mark_shared(layers)
    return layers


def _walk(
    graph: GraphProto, path: str, key: str, outer: list[_Scope], out: list[Layer], shapes: dict[str, Shape] | None
) -> None:
    scopes = [_Scope(graph, key), *outer]
    for i, node in enumerate(graph.node):
        if node.op_type in WEIGHTED_OPS and node.domain in ("", "ai.onnx") and len(node.input) > 1:
            out.append(_describe(node, graph, path, scopes, shapes))
        for attr_name, sub in subgraphs(node):
            sub_path = f"{path}/{node.name or node.op_type}.{attr_name}"
            _walk(sub, sub_path, subgraph_key(key, i, attr_name), scopes, out, shapes)


def _describe(
    node: NodeProto, graph: GraphProto, path: str, scopes: list[_Scope], shapes: dict[str, Shape] | None
) -> Layer:
    layer = Layer(node=node, graph=graph, graph_path=path, scopes=scopes, graph_key=scopes[0].key)
    name = node.input[1]
    inputs = _graph_inputs(scopes)
    chain: list[NodeProto] = []
    source: Source | None = None
    while True:
        if name in inputs and _lookup_const(name, scopes) is not None:
            layer.reason = Reason.WEIGHT_INPUT_OVERRIDABLE.skip(name=name)
            return layer
        if name in inputs:
            layer.reason = Reason.WEIGHT_INPUT.skip(name=name)
            return layer
        source = _lookup_const(name, scopes)
        if source is not None:
            break
        prod = _producer(name, scopes)
        if prod is None:
            layer.reason = Reason.NO_PRODUCER.skip(name=name)
            return layer
        if prod.op_type not in CHAIN_OPS or not prod.input:
            layer.reason = Reason.WEIGHT_COMPUTED.skip(op=prod.op_type, node=prod.name or prod.output[0])
            return layer
        chain.append(prod)
        name = prod.input[0]
    layer.chain = chain
    layer.source = source
    # Walk forward from the stored tensor to the layer, recording shapes at each step.
    shape_seq: list[tuple[int, ...] | None] = [source.shape]
    for cn in reversed(chain):
        prev = shape_seq[-1]
        shape_seq.append(None if prev is None else _chain_out_shape(cn, prev, scopes, shapes))
    wshape = shape_seq[-1]
    if wshape is None:
        layer.reason = Reason.RESHAPE_SHAPE_UNKNOWN.skip()
        return layer
    layer.weight_shape = wshape
    red, ch, why = _axes_for(node, wshape)
    layer.reduction_axis, layer.channel_axis = red, ch
    if why:
        layer.reason = why
        return layer
    # Map the axes back through the chain (consumer side first).
    src_red, src_ch = red, ch
    for i, cn in enumerate(chain):
        out_shape = shape_seq[len(chain) - i]
        in_shape = shape_seq[len(chain) - i - 1]
        if src_red is not None:
            src_red = _map_axis_back(cn, src_red, out_shape, in_shape)
        if src_ch is not None:
            src_ch = _map_axis_back(cn, src_ch, out_shape, in_shape)
    layer.source_reduction_axis, layer.source_channel_axis = src_red, src_ch
    if src_red is None:
        layer.reason = Reason.AXIS_LOST_IN_RESHAPE.skip()
    return layer


def _mark_shared(layers: list[Layer]) -> None:
    """A stored tensor used by several layers can be pruned only if they agree on its reduction axis."""
    by_source: dict[tuple[str, str, str], list[Layer]] = defaultdict(list)
    for layer in layers:
        if layer.source is not None:
            by_source[layer.source.key].append(layer)
    for group in by_source.values():
        if len(group) < 2:
            continue
        axes = {layer.source_reduction_axis for layer in group}
        for layer in group:
            layer.shared_with = [other.name for other in group if other is not layer]
            if len(axes) > 1 and layer.reason is None:
                layer.reason = Reason.SHARED_AXIS_CONFLICT.skip(
                    name=layer.weight_name, others=", ".join(layer.shared_with)
                )
