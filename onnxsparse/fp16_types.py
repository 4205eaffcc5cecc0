"""Which element type every value of a model has, and which it gets in the float16 conversion.

Types come from ONNX shape inference (large weights stripped first), then, where inference gave up, from
Cast's ``to`` and the op schemas' type constraints. ``formals`` maps each input and output of a node to its
formal parameter, type string and allowed types at the model's opset. ``TypePlan`` classifies every node
(converts, or stays float32 and why), gives every float32 value its native type and every node input the
type it reads; ``onnxsparse.fp16`` rewrites the graph to that plan. The rules are in its docstring.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, TypeProto, helper, numpy_helper

from onnxsparse.ir.graph import iter_graphs, subgraphs
from onnxsparse.ir.model_io import Model
from onnxsparse.pipeline import PassReport

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
    """Name → TypeProto for every value of every graph that onnx can type (weights stripped first)."""
    copy = ModelProto()
    copy.CopyFrom(proto)
    for g in iter_graphs(copy.graph):
        for t in g.initializer:
            if t.data_location != TensorProto.EXTERNAL and int(np.prod(tuple(t.dims), dtype=np.int64)) <= 64:
                continue  # small tensors (shapes, scales, axes) keep their data: inference reads them
            for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                t.ClearField(f)  # type: ignore[arg-type]
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
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
                f = formals(schema, node)
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
    """Per actual input/output position: the formal's name, its type string, and its allowed types."""

    inputs: list[tuple[str, str, set[str]]]
    outputs: list[tuple[str, str, set[str]]]

    @property
    def output_params(self) -> set[str]:
        return {ts for _, ts, _ in self.outputs}


def formals(schema: onnx.defs.OpSchema, node: NodeProto) -> Formals:
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

    return Formals(expand(list(schema.inputs), len(node.input)), expand(list(schema.outputs), len(node.output)))


@dataclass
class NodeInfo:
    node: NodeProto
    graph: GraphProto
    converted: bool
    reason: str | None = None
    formals: Formals | None = None
    #: per input index: FLOAT / FLOAT16 / "flex" (takes whatever its producer writes) for float32 inputs
    wants: dict[int, Any] = field(default_factory=dict)
    kept32: list[str] = field(default_factory=list)


class TypePlan:
    """Which element type each float32 value and each node input gets; ``onnxsparse.fp16`` rewrites to it.

    ``native``: the type a value's producer writes; ``NodeInfo.wants``: the type each float32 input reads.
    """

    def __init__(self, model: Model, config: Fp16Options, report: PassReport) -> None:
        self.model = model
        self.proto = model.proto
        self.cfg = config
        self.report = report
        self.opset = model.opset
        self.block_ops = set(config.block_ops)
        self.block_re = re.compile(config.block_nodes) if config.block_nodes else None
        self.types = infer_types(self.proto)
        self.owner: dict[str, GraphProto] = {}
        self.producer: dict[str, tuple[NodeProto, int]] = {}
        self.graph_of_node: dict[int, GraphProto] = {}
        self.parent: dict[int, tuple[NodeProto | None, GraphProto | None]] = {}
        self.initializers: dict[str, tuple[GraphProto, TensorProto]] = {}
        self.infos: dict[int, NodeInfo] = {}
        self.native: dict[str, int] = {}
        self.demands: dict[str, list[int]] = defaultdict(list)
        self._schemas: dict[tuple[str, str], onnx.defs.OpSchema | None] = {}

    # -- discovery ---------------------------------------------------------------------------------------

    def _index(self, graph: GraphProto, parent_node: NodeProto | None, parent_graph: GraphProto | None) -> None:
        self.parent[id(graph)] = (parent_node, parent_graph)
        for vi in graph.input:
            self.owner[vi.name] = graph
        for t in graph.initializer:
            self.owner.setdefault(t.name, graph)
            self.initializers[t.name] = (graph, t)
        for node in graph.node:
            self.graph_of_node[id(node)] = graph
            for k, o in enumerate(node.output):
                if o:
                    self.owner[o] = graph
                    self.producer[o] = (node, k)
            for _, sub in subgraphs(node):
                self._index(sub, node, graph)

    def _is_float(self, name: str) -> bool:
        return bool(name) and tensor_elem(self.types.get(name)) == FLOAT

    def _schema(self, node: NodeProto) -> onnx.defs.OpSchema | None:
        key = (node.domain, node.op_type)
        if key not in self._schemas:
            try:
                self._schemas[key] = onnx.defs.get_schema(node.op_type, self.opset, node.domain)
            except onnx.defs.SchemaError:
                self._schemas[key] = None
        return self._schemas[key]

    def _classify(self, node: NodeProto, graph: GraphProto) -> NodeInfo:
        schema = self._schema(node) if node.domain in ("", "ai.onnx") else None
        info = NodeInfo(node, graph, converted=False)
        if node.domain not in ("", "ai.onnx"):
            info.reason = f"custom domain '{node.domain}': its float16 support is unknown"
        elif schema is None:
            info.reason = f"no schema for {node.op_type} at opset {self.opset}"
        elif node.op_type in self.block_ops:
            info.reason = f"{node.op_type} is in block-ops (overflow-prone in float16)"
        elif self.block_re is not None and self.block_re.fullmatch(node.name or ""):
            info.reason = "node name matches block-nodes"
        else:
            unknown = [
                n for n in list(node.input) + list(node.output) if n and tensor_elem(self.types.get(n)) in (None, -1)
            ]
            if unknown:
                info.reason = f"type of '{unknown[0]}' is unknown or not a tensor"
            else:
                info.converted = True
                info.formals = formals(schema, node)
        return info

    def _touches_float(self, node: NodeProto) -> bool:
        return any(self._is_float(n) for n in list(node.input) + list(node.output))

    # -- decisions ---------------------------------------------------------------------------------------

    def _graph_io_type(self, graph: GraphProto) -> int:
        """What float32 formal inputs/outputs of ``graph`` become: per keep-io for the model, else the parent's."""
        parent_node, _ = self.parent[id(graph)]
        if parent_node is None:
            return FLOAT if self.cfg.keep_io_types else FLOAT16
        info = self.infos.get(id(parent_node))
        return FLOAT16 if info is not None and info.converted else FLOAT

    def _decide(self) -> None:
        pending: set[str] = set()  # natives decided by demand: Cast outputs and constants
        for g in iter_graphs(self.proto.graph):
            for vi in g.input:
                if self._is_float(vi.name):
                    self.native[vi.name] = self._graph_io_type(g)
            for t in g.initializer:
                if t.data_type == FLOAT and t.name not in self.native:
                    pending.add(t.name)
            for node in g.node:
                info = self.infos[id(node)]
                for k, o in enumerate(node.output):
                    if not self._is_float(o):
                        continue
                    if not info.converted:
                        self.native[o] = FLOAT
                    elif node.op_type in ("Cast", "Constant"):
                        pending.add(o)
                    else:
                        assert info.formals is not None
                        name, _, allowed = info.formals.outputs[k]
                        self.native[o] = FLOAT16 if _T16 in allowed else FLOAT
                        if _T16 not in allowed:
                            info.kept32.append(name)
        # non-flexible demands
        for g in iter_graphs(self.proto.graph):
            for node in g.node:
                info = self.infos[id(node)]
                for i, name in enumerate(node.input):
                    if not self._is_float(name):
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
                        self.demands[name].append(want)
                    elif self._is_constant(name):
                        self.demands[name].append(FLOAT16)  # a converting node's constants cost nothing to convert
            io = self._graph_io_type(g)
            for vi in g.output:
                if self._is_float(vi.name):
                    self.demands[vi.name].append(io)
        for name in pending:
            wants = set(self.demands.get(name, []))
            prod = self.producer.get(name)
            if prod is not None and prod[0].op_type == "Cast":
                self.native[name] = FLOAT if wants == {FLOAT} else FLOAT16
            else:  # constants: in place only when everyone wants float16
                blocked = prod is not None and not self.infos[id(prod[0])].converted
                self.native[name] = FLOAT16 if wants == {FLOAT16} and not blocked else FLOAT
        # flexible inputs take their producer's type when all inputs of that type parameter agree
        for info in self.infos.values():
            if not info.converted or info.formals is None:
                continue
            groups: dict[str, list[int]] = defaultdict(list)
            for i, want in info.wants.items():
                if want == "flex":
                    groups[info.formals.inputs[i][1]].append(i)
            for idxs in groups.values():
                natives = {self.native.get(info.node.input[i], FLOAT) for i in idxs}
                allowed = info.formals.inputs[idxs[0]][2]
                choice = natives.pop() if len(natives) == 1 else (FLOAT16 if _T16 in allowed else FLOAT)
                for i in idxs:
                    info.wants[i] = choice

    def _is_constant(self, name: str) -> bool:
        prod = self.producer.get(name)
        if prod is not None:
            return prod[0].op_type == "Constant"
        return name in self.initializers and not self._is_graph_input(name)

    def _is_graph_input(self, name: str) -> bool:
        g = self.owner[name]
        return any(vi.name == name for vi in g.input)
