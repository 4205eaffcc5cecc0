"""Which element type every value of a model has, and which it gets in the float16 conversion.

Types come from ONNX shape inference (large weights stripped first), then, where inference gave up, from
Cast's ``to`` and the op schemas' type constraints. ``formals`` maps each input and output of a node to its
formal parameter, type string and allowed types at the model's opset. ``TypePlan`` classifies every node
(converts, or stays float32 and why), gives every float32 value its native type and every node input the
type it reads; ``onnxsparse.fp16`` rewrites the graph to that plan. The rules are in its docstring.

Inference runs on the protobuf (``onnx.shape_inference``; its answers are keyed by value name); the plan is
made on the model's onnx-ir view (``onnxsparse.ir.onnxir.IrView``), where each value and node is one object.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import onnx
import onnx_ir as ir
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, TypeProto, helper, numpy_helper

from onnxsparse.ir.graph import iter_graphs
from onnxsparse.ir.model_io import Model
from onnxsparse.ir.shapes import weightless_copy

if TYPE_CHECKING:
    from onnxsparse.ir.onnxir import IrView

log = logging.getLogger("onnxsparse.fp16_types")

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
_T16 = "tensor(float16)"


class Fp16Options(Protocol):
    """What the conversion reads of ``to-fp16``'s options (its config dataclass)."""

    @property
    def keep_io_types(self) -> bool: ...
    @property
    def block_ops(self) -> tuple[str, ...]: ...
    @property
    def block_nodes(self) -> str: ...
    @property
    def max_finite(self) -> float: ...
    @property
    def min_positive(self) -> float: ...


def infer_types(proto: ModelProto) -> dict[str, TypeProto]:
    """Name → TypeProto for every value of every graph that onnx can type (weights stripped first).

    The copy that inference reads never holds the main graph's weights (``shapes.weightless_copy``)."""
    copy, _ = weightless_copy(proto, _small_inline)
    try:
        inferred = onnx.shape_inference.infer_shapes(copy, check_type=False, strict_mode=False)
    except Exception as e:  # onnx raises several unrelated types here
        log.info("shape inference failed (%s); using declared types only", str(e).splitlines()[0][:200])
        inferred = copy
    types: dict[str, TypeProto] = {}
    for g in iter_graphs(inferred.graph):
        for t in g.initializer:
            types[t.name] = helper.make_tensor_type_proto(t.data_type, list(t.dims))
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.WhichOneof("value") is not None:
                types.setdefault(vi.name, vi.type)
        for node in g.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                t = constant_tensor(node)
                if t is not None:
                    types.setdefault(node.output[0], helper.make_tensor_type_proto(t.data_type, list(t.dims)))
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    _propagate(inferred.graph, types, int(opset))
    return types


def _small_inline(t: TensorProto) -> bool:
    """Shapes, scales, axes: inference reads their values, so the copy keeps them."""
    return t.data_location != TensorProto.EXTERNAL and int(np.prod(tuple(t.dims), dtype=np.int64)) <= 64


def _elem_of_type_str(type_str: str) -> int | None:
    """``tensor(float16)`` → TensorProto.FLOAT16 (None for anything else)."""
    m = re.fullmatch(r"tensor\((\w+)\)", type_str)
    if not m:
        return None
    return _TYPE_NAMES.get(m.group(1))


_TYPE_NAMES = {name.lower(): int(value) for name, value in TensorProto.DataType.items()} | {
    "float": TensorProto.FLOAT,
    "double": TensorProto.DOUBLE,
    "float16": TensorProto.FLOAT16,
}


def _propagate(graph: GraphProto, types: dict[str, TypeProto], opset: int) -> None:
    """Type node outputs that shape inference left untyped, from Cast's ``to`` and the op schemas.

    Inference drops a node's outputs when it cannot compute their shape (e.g. Resize whose scales it cannot
    read); their element type still follows from the schema's type constraints.
    """
    for g in iter_graphs(graph):
        for node in g.node:
            missing = [k for k, o in enumerate(node.output) if o and o not in types]
            if not missing or node.domain not in ("", "ai.onnx"):
                continue
            elem: dict[int, int | None] = {}
            if node.op_type == "Cast":
                elem = {0: next((int(a.i) for a in node.attribute if a.name == "to"), None)}
            else:
                try:
                    schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
                except onnx.defs.SchemaError:
                    continue
                f = formals(schema, len(node.input), len(node.output))
                bound: dict[str, int] = {}
                for i, name in enumerate(node.input):
                    e = tensor_elem(types.get(name)) if name else None
                    if e is not None and e > 0:
                        bound.setdefault(f.inputs[i][1], e)
                for k in missing:
                    _, ts, allowed = f.outputs[k]
                    if ts in bound:
                        elem[k] = bound[ts]
                    elif len(allowed) == 1:
                        elem[k] = _elem_of_type_str(next(iter(allowed)))
            for k, e in elem.items():
                if e:
                    types[node.output[k]] = helper.make_tensor_type_proto(e, None)


def tensor_elem(tp: TypeProto | None) -> int | None:
    """Element type of a tensor type; None for unknown; -1 for a non-tensor type (sequence, map, optional)."""
    if tp is None or tp.WhichOneof("value") is None:
        return None
    if tp.WhichOneof("value") != "tensor_type":
        return -1
    return int(tp.tensor_type.elem_type) or None


def constant_tensor(node: NodeProto) -> TensorProto | None:
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return a.t
        if a.name == "value_float":
            return numpy_helper.from_array(np.array(a.f, dtype=np.float32))
        if a.name == "value_floats":
            return numpy_helper.from_array(np.array(list(a.floats), dtype=np.float32))
    return None


@dataclass
class Formals:
    """Per actual input/output position: the formal's name, its type string, and its allowed types.

    One is shared by every node of the same op and arity (read only)."""

    inputs: list[tuple[str, str, set[str]]]
    outputs: list[tuple[str, str, set[str]]]

    @cached_property
    def output_params(self) -> set[str]:
        return {ts for _, ts, _ in self.outputs}


def formals(schema: onnx.defs.OpSchema, n_inputs: int, n_outputs: int) -> Formals:
    """The formal parameter of each of a node's ``n_inputs`` inputs and ``n_outputs`` outputs."""
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}

    def expand(params: list[Any], n: int) -> list[tuple[str, str, set[str]]]:
        out: list[tuple[str, str, set[str]]] = []
        for i in range(n):
            p = params[min(i, len(params) - 1)] if params else None
            if p is None or (i >= len(params) and p.option != onnx.defs.OpSchema.FormalParameterOption.Variadic):
                out.append(("?", "?", set()))
                continue
            out.append((p.name, p.type_str, allowed.get(p.type_str, {p.type_str})))
        return out

    return Formals(expand(list(schema.inputs), n_inputs), expand(list(schema.outputs), n_outputs))


@dataclass
class NodeInfo:
    node: ir.Node
    converted: bool
    reason: str | None = None
    formals: Formals | None = None
    #: per input index: FLOAT / FLOAT16 / "flex" (takes whatever its producer writes) for float32 inputs
    wants: dict[int, Any] = field(default_factory=dict)
    kept32: list[str] = field(default_factory=list)


class TypePlan:
    """Which element type each float32 value and each node input gets; ``onnxsparse.fp16`` rewrites to it.

    ``native``: the type a value's producer writes; ``NodeInfo.wants``: the type each float32 input reads.
    The plan is over the onnx-ir graph of ``view``: a value's producer, readers and defining graph are
    ``Value.producer()``, ``Value.uses()`` and ``Value.graph``; the maps below are keyed by the ``ir.Value``
    and ``ir.Node`` objects themselves, which stay the same while the converter rewrites around them.
    ``types`` (inferred on the proto, by name) is looked up by each value's name once, here.
    """

    def __init__(self, model: Model, view: IrView, types: dict[str, TypeProto], config: Fp16Options) -> None:
        self.model = model
        self.view = view
        self.cfg = config
        self.opset = model.opset
        self.block_ops = set(config.block_ops)
        self.block_re = re.compile(config.block_nodes) if config.block_nodes else None
        #: every graph, parents first, with the node that holds it (None for the main graph)
        self.parent: dict[ir.Graph, ir.Node | None] = {}
        self.types: dict[ir.Value, TypeProto] = {}
        #: element type of each typed value (``tensor_elem`` of its type), asked often enough to keep
        self.elem: dict[ir.Value, int | None] = {}
        self.infos: dict[ir.Node, NodeInfo] = {}
        self.native: dict[ir.Value, int] = {}
        self.demands: dict[ir.Value, list[int]] = defaultdict(list)
        self._schemas: dict[tuple[str, str], onnx.defs.OpSchema | None] = {}
        self._formals: dict[tuple[str, str, int, int], Formals] = {}
        self._index(view.ir.graph, None, types)

    # -- discovery ---------------------------------------------------------------------------------------

    def _index(self, graph: ir.Graph, parent_node: ir.Node | None, types: dict[str, TypeProto]) -> None:
        self.parent[graph] = parent_node
        for v in list(graph.inputs) + list(graph.initializers.values()):
            self._type(v, types)
        for node in graph:
            for v in node.outputs:
                self._type(v, types)
            for sub in ir_subgraphs(node):
                self._index(sub, node, types)

    def _type(self, v: ir.Value, types: dict[str, TypeProto]) -> None:
        tp = types.get(v.name) if v.name else None
        if tp is not None:
            self.types[v] = tp
            self.elem[v] = tensor_elem(tp)

    def graphs(self) -> Iterator[ir.Graph]:
        """Every graph of the model, parents first (``iter_graphs``' order)."""
        return iter(self.parent)

    def _is_float(self, v: ir.Value | None) -> bool:
        return v is not None and self.elem.get(v) == FLOAT

    def _schema(self, node: ir.Node) -> onnx.defs.OpSchema | None:
        key = (node.domain, node.op_type)
        if key not in self._schemas:
            try:
                self._schemas[key] = onnx.defs.get_schema(node.op_type, self.opset, node.domain)
            except onnx.defs.SchemaError:
                self._schemas[key] = None
        return self._schemas[key]

    def _classify(self, node: ir.Node) -> NodeInfo:
        schema = self._schema(node) if node.domain in ("", "ai.onnx") else None
        info = NodeInfo(node, converted=False)
        if node.domain not in ("", "ai.onnx"):
            info.reason = f"custom domain '{node.domain}': its float16 support is unknown"
        elif schema is None:
            info.reason = f"no schema for {node.op_type} at opset {self.opset}"
        elif node.op_type in self.block_ops:
            info.reason = f"{node.op_type} is in block-ops (overflow-prone in float16)"
        elif self.block_re is not None and self.block_re.fullmatch(node.name or ""):
            info.reason = "node name matches block-nodes"
        else:
            unknown = [v.name for v in _values(node) if self.elem.get(v) in (None, -1)]
            if unknown:
                info.reason = f"type of '{unknown[0]}' is unknown or not a tensor"
            else:
                info.converted = True
                key = (node.domain, node.op_type, len(node.inputs), len(node.outputs))
                if key not in self._formals:
                    self._formals[key] = formals(schema, key[2], key[3])
                info.formals = self._formals[key]
        return info

    def _touches_float(self, node: ir.Node) -> bool:
        return any(self._is_float(v) for v in _values(node))

    # -- decisions ---------------------------------------------------------------------------------------

    def _graph_io_type(self, graph: ir.Graph) -> int:
        """What float32 formal inputs/outputs of ``graph`` become: per keep-io for the model, else the parent's."""
        parent_node = self.parent[graph]
        if parent_node is None:
            return FLOAT if self.cfg.keep_io_types else FLOAT16
        info = self.infos.get(parent_node)
        return FLOAT16 if info is not None and info.converted else FLOAT

    def _decide(self) -> None:
        pending: dict[ir.Value, None] = {}  # natives decided by demand: Cast outputs and constants
        for g in self.graphs():
            for v in g.inputs:
                if self._is_float(v):
                    self.native[v] = self._graph_io_type(g)
            for v in g.initializers.values():
                if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT and v not in self.native:
                    pending[v] = None
            for node in g:
                info = self.infos[node]
                for k, o in enumerate(node.outputs):
                    if not self._is_float(o):
                        continue
                    if not info.converted:
                        self.native[o] = FLOAT
                    elif node.op_type in ("Cast", "Constant"):
                        pending[o] = None
                    else:
                        assert info.formals is not None
                        name, _, allowed = info.formals.outputs[k]
                        self.native[o] = FLOAT16 if _T16 in allowed else FLOAT
                        if _T16 not in allowed:
                            info.kept32.append(name)
        self._demand()
        for v in pending:
            wants = set(self.demands.get(v, []))
            prod = v.producer()
            if prod is not None and prod.op_type == "Cast":
                self.native[v] = FLOAT if wants == {FLOAT} else FLOAT16
            else:  # constants: in place only when everyone wants float16
                blocked = prod is not None and not self.infos[prod].converted
                self.native[v] = FLOAT16 if wants == {FLOAT16} and not blocked else FLOAT
        # flexible inputs take their producer's type when all inputs of that type parameter agree
        for info in self.infos.values():
            if not info.converted or info.formals is None:
                continue
            groups: dict[str, list[int]] = defaultdict(list)
            for i, want in info.wants.items():
                if want == "flex":
                    groups[info.formals.inputs[i][1]].append(i)
            for idxs in groups.values():
                natives = {self.native.get(_input(info.node, i), FLOAT) for i in idxs}
                allowed = info.formals.inputs[idxs[0]][2]
                choice = natives.pop() if len(natives) == 1 else (FLOAT16 if _T16 in allowed else FLOAT)
                for i in idxs:
                    info.wants[i] = choice

    def _demand(self) -> None:
        """The non-flexible demands: what each node input and each graph output wants to read."""
        for g in self.graphs():
            for node in g:
                info = self.infos[node]
                for i, v in enumerate(node.inputs):
                    if v is None or not self._is_float(v):
                        continue
                    if not info.converted:
                        want: Any = FLOAT
                    else:
                        assert info.formals is not None
                        fname, ts, allowed = info.formals.inputs[i]
                        if ts not in info.formals.output_params and len(allowed) > 1 and _T16 in allowed:
                            want = "flex"  # (an input whose type set lacks float16 — QuantizeLinear's x
                            # before opset 19: float or int32 — must get float32, whatever its producer writes)
                        elif _T16 in allowed:
                            want = FLOAT16
                        else:
                            want = FLOAT
                            info.kept32.append(fname)
                    info.wants[i] = want
                    if want != "flex":
                        self.demands[v].append(want)
                    elif self._is_constant(v):
                        self.demands[v].append(FLOAT16)  # a converting node's constants cost nothing to convert
            io = self._graph_io_type(g)
            for v in g.outputs:
                if self._is_float(v):
                    self.demands[v].append(io)

    def _is_constant(self, v: ir.Value) -> bool:
        prod = v.producer()
        if prod is not None:
            return prod.op_type == "Constant"
        return v.is_initializer() and not v.is_graph_input()


def ir_subgraphs(node: ir.Node) -> Iterator[ir.Graph]:
    """The graphs a node holds (If branches, Loop/Scan bodies), in attribute order."""
    for a in node.attributes.values():
        if a.type == ir.AttributeType.GRAPH:
            yield a.value
        elif a.type == ir.AttributeType.GRAPHS:
            yield from a.value


def _values(node: ir.Node) -> Iterator[ir.Value]:
    """A node's named inputs and outputs (an omitted optional one is None or has no name)."""
    for v in list(node.inputs) + list(node.outputs):
        if v is not None and v.name:
            yield v


def _input(node: ir.Node, i: int) -> ir.Value:
    v = node.inputs[i]
    assert v is not None  # only float inputs have wants
    return v
