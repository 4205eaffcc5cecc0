"""to-fp16: weights and activations to float16, for TensorRT 11's strongly typed builds.

TensorRT 11 removed the FP16 builder flag: a network runs in the precision its ONNX file says. This pass
writes that precision into the model. It is driven by the ONNX op schemas rather than by a list of ops:

* A node *converts* unless its op type is in ``block-ops``, its name matches ``block-nodes``, it is outside
  the default domain, or one of its values has a type shape inference could not tell. A converting node's
  float32 values become float16 wherever the schema's type constraint admits float16; a value whose formal
  parameter admits only float32 (Resize ``scales``, DequantizeLinear before opset 19) stays float32.
* Every float32 value gets one *native* type (what its producer writes). A consumer that wants the other
  type reads a converted *version*: a Cast, inserted once per value, in the graph that defines the value.
  Initializers and Constant nodes are converted in place when every consumer wants float16 and copied when
  consumers disagree, so weights are never cast at run time.
* Cast nodes that made a float32 value write float16 instead; where consumers need float32 as well, a
  sibling Cast from the same input makes it, so no Cast ever feeds another Cast.
* Subgraphs (If/Loop/Scan) convert like the main graph; their formal inputs and outputs follow their parent
  node, whose outputs turn float16.

Weights keep their zeros (fp16 0 is 0): a 2:4 mask survives. Values beyond ±``max-finite`` are clamped
instead of becoming inf, and non-zero values below ``min-positive`` are kept at ±``min-positive`` rather
than flushed to 0 (both are counted in the report).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, TypeProto, helper, numpy_helper

from onnxsparse.graph import NameGen, iter_graphs, subgraphs, toposort
from onnxsparse.model_io import Model
from onnxsparse.pipeline import Pass, PassConfig, PassContext, PassReport, PassResult, option
from onnxsparse.render import grouped_reasons
from onnxsparse.tensors import set_array, to_array

log = logging.getLogger("onnxsparse.passes.to_fp16")

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
_T16 = "tensor(float16)"

#: Kept float32 by default. Exp and Pow overflow fp16's 65504 for modest inputs (exp(x) for x > 11.1, x² for
#: |x| > 256, e.g. the variance step of a decomposed LayerNorm); sums, products and log-sum-exp reductions
#: accumulate past it; CumSum and Range carry indices and positions that lose integer precision above 2048.
#: Softmax and LayerNormalization are not blocked: runtimes compute them stably (max-subtracted, fp32 stash).
DEFAULT_BLOCK_OPS: tuple[str, ...] = (
    "Exp",
    "Pow",
    "CumSum",
    "Range",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceProd",
)
#: ops with a ``dtype`` attribute naming their output type.
_DTYPE_OPS = frozenset(
    {"EyeLike", "RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Bernoulli"}
)
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
FP16_MAX = 65504.0
FP16_MIN_SUBNORMAL = 5.96e-08


@dataclass(frozen=True)
class ToFp16Config(PassConfig):
    """Options of ``to-fp16``."""

    keep_io_types: bool = option(True, "keep the model's inputs and outputs float32 (Casts at the edges)")
    block_ops: tuple[str, ...] = option(
        DEFAULT_BLOCK_OPS, "op types kept float32, with Casts around them (replaces the default list)"
    )
    block_nodes: str = option("", "regex on node names kept float32 (e.g. 'head.*|.*norm.*')")
    max_finite: float = option(FP16_MAX, "float32 constants beyond ±this are clamped to it instead of becoming inf")
    min_positive: float = option(
        FP16_MIN_SUBNORMAL, "non-zero constants smaller than this become ±this instead of 0 (zeros stay 0)"
    )

    def __post_init__(self) -> None:
        if not 0 < self.max_finite <= FP16_MAX:
            raise ValueError(f"max-finite must be in (0, {FP16_MAX}]")
        if not 0 <= self.min_positive < self.max_finite:
            raise ValueError("min-positive must be >= 0 and below max-finite")
        try:
            re.compile(self.block_nodes)
        except re.error as e:
            raise ValueError(f"block-nodes is not a valid regex: {e}") from e


class ToFp16Pass(Pass[ToFp16Config]):
    """Convert float32 weights and activations to float16 (TensorRT 11 strong typing; smaller models)."""

    name = "to-fp16"
    config_cls = ToFp16Config
    summary = "float32 weights and activations to float16; I/O kept float32 by Casts; overflow-prone ops blocked"

    def reads_calibration(self) -> bool:
        return False  # works on the weights alone

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        report = PassReport()
        modified = _Converter(model, self.config, report).run()
        return PassResult(model, modified, report)

    def render(self, result: PassResult) -> str | None:
        """One summary line, clamping if any, then what stayed float32 grouped by reason."""
        d = result.report.details
        if not d:
            return None
        lines = [
            f"  {d.get('nodes_converted', 0)} node(s) compute in float16, {d.get('nodes_kept_float32', 0)} kept "
            f"float32; {d.get('initializers_converted', 0)} initializer(s) and {d.get('constants_converted', 0)} "
            f"constant(s) converted; {d.get('casts_inserted', 0)} Cast(s) inserted"
            + ("; model inputs/outputs stay float32" if d.get("keep_io_types") else "")
        ]
        if d.get("clamped_high"):
            lines.append(f"  {d['clamped_high']} weight value(s) beyond ±{self.config.max_finite:g} clamped")
        lines.extend(grouped_reasons(result.report.skipped, verb="float32"))
        return "\n".join(lines)


def fp16_array(arr: np.ndarray, min_positive: float, max_finite: float) -> tuple[np.ndarray, int, int]:
    """``arr`` as float16 with clamping; returns (array, how many clamped high, how many kept from underflow)."""
    a = np.asarray(arr, dtype=np.float32)
    mag = np.abs(a)
    high = mag > max_finite  # also catches inf
    low = (mag < min_positive) & (a != 0)
    out = a
    if high.any() or low.any():
        out = a.copy()
        out[high] = np.sign(a[high]) * max_finite
        out[low] = np.sign(a[low]) * min_positive
    return out.astype(np.float16), int(high.sum()), int(low.sum())


# ---------------------------------------------------------------------------------------------- types


def _infer_types(proto: ModelProto) -> dict[str, TypeProto]:
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
                t = _constant_tensor(node)
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
                f = _formals(schema, node)
                bound: dict[str, int] = {}
                for i, name in enumerate(node.input):
                    e = _elem(types.get(name)) if name else None
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


def _elem(tp: TypeProto | None) -> int | None:
    """Element type of a tensor type; None for unknown; -1 for a non-tensor type (sequence, map, optional)."""
    if tp is None or tp.WhichOneof("value") is None:
        return None
    if tp.WhichOneof("value") != "tensor_type":
        return -1
    return int(tp.tensor_type.elem_type) or None


def _constant_tensor(node: NodeProto) -> TensorProto | None:
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return a.t
        if a.name == "value_float":
            return numpy_helper.from_array(np.array(a.f, dtype=np.float32))
        if a.name == "value_floats":
            return numpy_helper.from_array(np.array(list(a.floats), dtype=np.float32))
    return None


@dataclass
class _Formals:
    """Per actual input/output position: the formal's name, its type string, and its allowed types."""

    inputs: list[tuple[str, str, set[str]]]
    outputs: list[tuple[str, str, set[str]]]

    @property
    def output_params(self) -> set[str]:
        return {ts for _, ts, _ in self.outputs}


def _formals(schema: onnx.defs.OpSchema, node: NodeProto) -> _Formals:
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

    return _Formals(expand(list(schema.inputs), len(node.input)), expand(list(schema.outputs), len(node.output)))


# ---------------------------------------------------------------------------------------------- converter


@dataclass
class _NodeInfo:
    node: NodeProto
    graph: GraphProto
    converted: bool
    reason: str | None = None
    formals: _Formals | None = None
    #: per input index: FLOAT / FLOAT16 / "flex" (takes whatever its producer writes) for float32 inputs
    wants: dict[int, Any] = field(default_factory=dict)
    kept32: list[str] = field(default_factory=list)


class _Converter:
    """One conversion of one model; see the module docstring for the rules."""

    def __init__(self, model: Model, config: ToFp16Config, report: PassReport) -> None:
        self.model = model
        self.proto = model.proto
        self.cfg = config
        self.report = report
        self.opset = model.opset
        self.block_ops = set(config.block_ops)
        self.block_re = re.compile(config.block_nodes) if config.block_nodes else None
        self.types = _infer_types(self.proto)
        self.names = NameGen(self.proto.graph)
        self.owner: dict[str, GraphProto] = {}
        self.producer: dict[str, tuple[NodeProto, int]] = {}
        self.graph_of_node: dict[int, GraphProto] = {}
        self.parent: dict[int, tuple[NodeProto | None, GraphProto | None]] = {}
        self.initializers: dict[str, tuple[GraphProto, TensorProto]] = {}
        self.infos: dict[int, _NodeInfo] = {}
        self.native: dict[str, int] = {}
        self.versions: dict[tuple[str, int], str] = {}
        self.demands: dict[str, list[int]] = defaultdict(list)
        self.new_types: dict[str, int] = {}
        self.casts = 0
        self.stats = {"clamped_high": 0, "kept_from_underflow": 0, "initializers": 0, "constants": 0}
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
        return bool(name) and _elem(self.types.get(name)) == FLOAT

    def _schema(self, node: NodeProto) -> onnx.defs.OpSchema | None:
        key = (node.domain, node.op_type)
        if key not in self._schemas:
            try:
                self._schemas[key] = onnx.defs.get_schema(node.op_type, self.opset, node.domain)
            except onnx.defs.SchemaError:
                self._schemas[key] = None
        return self._schemas[key]

    def _classify(self, node: NodeProto, graph: GraphProto) -> _NodeInfo:
        schema = self._schema(node) if node.domain in ("", "ai.onnx") else None
        info = _NodeInfo(node, graph, converted=False)
        if node.domain not in ("", "ai.onnx"):
            info.reason = f"custom domain '{node.domain}': its float16 support is unknown"
        elif schema is None:
            info.reason = f"no schema for {node.op_type} at opset {self.opset}"
        elif node.op_type in self.block_ops:
            info.reason = f"{node.op_type} is in block-ops (overflow-prone in float16)"
        elif self.block_re is not None and self.block_re.fullmatch(node.name or ""):
            info.reason = "node name matches block-nodes"
        else:
            unknown = [n for n in list(node.input) + list(node.output) if n and _elem(self.types.get(n)) in (None, -1)]
            if unknown:
                info.reason = f"type of '{unknown[0]}' is unknown or not a tensor"
            else:
                info.converted = True
                info.formals = _formals(schema, node)
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

    # -- rewriting ---------------------------------------------------------------------------------------

    def _type_name(self, t: int) -> str:
        return "fp16" if t == FLOAT16 else "fp32"

    def _version(self, name: str, t: int, out_name: str | None = None) -> str:
        """The name holding ``name``'s value as element type ``t``; made on first request."""
        key = (name, t)
        if key in self.versions:
            return self.versions[key]
        graph = self.owner[name]
        new = out_name or self.names(f"{name}_{self._type_name(t)}")
        prod = self.producer.get(name)
        if name in self.initializers and not self._is_graph_input(name):
            g, tensor = self.initializers[name]
            arr = to_array(tensor, self.model.base_dir)
            data = self._fp16(arr) if t == FLOAT16 else np.asarray(arr, dtype=np.float32)
            g.initializer.append(numpy_helper.from_array(data, new))
            self.stats["initializers"] += 1
        elif prod is not None and prod[0].op_type == "Constant":
            ctensor = _constant_tensor(prod[0])
            assert ctensor is not None
            arr = to_array(ctensor, self.model.base_dir)  # a Constant's tensor is inline unless saved otherwise
            data = self._fp16(arr) if t == FLOAT16 else np.asarray(arr, dtype=np.float32)
            graph.node.append(
                helper.make_node(
                    "Constant",
                    [],
                    [new],
                    name=self.names(f"{name}_{self._type_name(t)}"),
                    value=numpy_helper.from_array(data),
                )
            )
            self.stats["constants"] += 1
        elif prod is not None and prod[0].op_type == "Cast" and len(prod[0].input) == 1:
            src = prod[0]  # a sibling Cast from the same input: no Cast feeds a Cast
            graph.node.append(
                helper.make_node(
                    "Cast", [src.input[0]], [new], to=t, name=self.names(f"{src.name or 'Cast'}_{self._type_name(t)}")
                )
            )
            self.casts += 1
        else:
            native = self.native.get(name, FLOAT)
            src_name = self.versions.get((name, native), name)
            graph.node.append(
                helper.make_node("Cast", [src_name], [new], to=t, name=self.names(f"{name}_to_{self._type_name(t)}"))
            )
            self.casts += 1
        self.versions[key] = new
        self.new_types[new] = t
        self._add_value_info(graph, name, new, t)
        return new

    def _is_constant(self, name: str) -> bool:
        prod = self.producer.get(name)
        if prod is not None:
            return prod[0].op_type == "Constant"
        return name in self.initializers and not self._is_graph_input(name)

    def _is_graph_input(self, name: str) -> bool:
        g = self.owner[name]
        return any(vi.name == name for vi in g.input)

    def _fp16(self, arr: np.ndarray) -> np.ndarray:
        out, high, low = fp16_array(arr, self.cfg.min_positive, self.cfg.max_finite)
        self.stats["clamped_high"] += high
        self.stats["kept_from_underflow"] += low
        return out

    def _add_value_info(self, graph: GraphProto, like: str, name: str, t: int) -> None:
        tp = self.types.get(like)
        vi = onnx.ValueInfoProto()
        vi.name = name
        if tp is not None and tp.HasField("tensor_type"):
            vi.type.CopyFrom(tp)
        vi.type.tensor_type.elem_type = t
        graph.value_info.append(vi)

    def _convert_constants_in_place(self) -> None:
        for name, t in self.native.items():
            if t != FLOAT16:
                continue
            if name in self.initializers:  # also an input's default (keep-io off): it follows the input
                _, tensor = self.initializers[name]
                # set_array keeps the core's policy: an external weight goes to a scratch file, not into memory
                set_array(tensor, self._fp16(to_array(tensor, self.model.base_dir)))
                if not self._is_graph_input(name):
                    self.stats["initializers"] += 1
            elif name in self.producer and self.producer[name][0].op_type == "Constant":
                node = self.producer[name][0]
                ctensor = _constant_tensor(node)
                assert ctensor is not None
                data = self._fp16(to_array(ctensor, self.model.base_dir))
                del node.attribute[:]
                node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(data)))
                self.stats["constants"] += 1

    def _fix_attributes(self, info: _NodeInfo) -> None:
        node = info.node
        out16 = any(self.native.get(o) == FLOAT16 for o in node.output if o)
        if not out16:
            return
        if node.op_type == "Cast":
            src = node.input[0]
            if self.native.get(src, _elem(self.types.get(src))) == FLOAT16:
                node.op_type = "Identity"  # float16 → float16 is no cast at all
                del node.attribute[:]
                return
            for a in node.attribute:
                if a.name == "to":
                    a.i = FLOAT16
        elif node.op_type == "ConstantOfShape":
            value = next((a for a in node.attribute if a.name == "value"), None)
            arr = to_array(value.t, self.model.base_dir) if value is not None else np.zeros(1, dtype=np.float32)
            if value is not None:
                node.attribute.remove(value)
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(self._fp16(arr))))
        elif node.op_type in _DTYPE_OPS:
            dtype = next((a for a in node.attribute if a.name == "dtype"), None)
            if dtype is None:
                node.attribute.append(helper.make_attribute("dtype", FLOAT16))
            else:
                dtype.i = FLOAT16

    def run(self) -> bool:
        self._index(self.proto.graph, None, None)
        for g in iter_graphs(self.proto.graph):
            for node in g.node:
                self.infos[id(node)] = self._classify(node, g)
        floats = [n for n in self.types if self._is_float(n)]
        if not floats:
            self.report.details.update(self._details(0, 0))
            return False
        self._decide()

        main = self.proto.graph
        # main-graph outputs keep their names: a producer writing the other type is renamed, and a Cast
        # (or sibling Cast / constant copy) makes the output under its own name.
        io = self._graph_io_type(main)
        renamed: list[tuple[str, str]] = []
        for vi in main.output:
            name = vi.name
            if self._is_float(name) and self.native.get(name) != io and name in self.producer:
                node, k = self.producer[name]
                fresh = self.names(f"{name}_{self._type_name(self.native[name])}")
                node.output[k] = fresh
                self.producer[fresh] = (node, k)
                self.owner[fresh] = self.owner[name]
                self.types[fresh] = self.types[name]
                self.native[fresh] = self.native[name]
                renamed.append((name, fresh))
        for name, fresh in renamed:
            self.versions[(name, self.native[name])] = fresh
            self.new_types[fresh] = self.native[name]
            self._add_value_info(self.owner[name], name, fresh, self.native[name])
        for name, t in self.native.items():
            self.versions.setdefault((name, t), name)
        for name, _ in renamed:
            node, _k = self.producer[name]
            del self.producer[name]  # its value now comes from the version made below
            if node.op_type == "Cast":
                self.producer[name] = (node, _k)  # a sibling Cast writes the output
            self._version(name, io, out_name=name)

        self._convert_constants_in_place()
        converted = blocked = 0
        for info in list(self.infos.values()):
            node = info.node
            if not self._touches_float(node):
                continue
            if info.converted:
                if any(self.native.get(o) == FLOAT16 for o in node.output) or FLOAT16 in info.wants.values():
                    converted += 1
                self._fix_attributes(info)
                if info.kept32:
                    qdq = " (float16 Q/DQ scales need opset >= 19)" if node.op_type in _QDQ_OPS else ""
                    self.report.skip(
                        node.name or node.op_type,
                        f"{node.op_type} at opset {self.opset} admits only float32 for "
                        f"{', '.join(sorted(set(info.kept32)))}; kept float32{qdq}",
                        op=node.op_type,
                    )
            else:
                blocked += 1
                self.report.skip(node.name or node.op_type, info.reason or "blocked", op=node.op_type)
            for i, want in info.wants.items():
                name = node.input[i]
                node.input[i] = self._version(name, want)
        for g in iter_graphs(main):
            io_g = self._graph_io_type(g)
            for vi in g.input:
                if self._is_float(vi.name):
                    vi.type.tensor_type.elem_type = io_g
            if g is main:
                continue
            for vi in g.output:
                if self._is_float(vi.name):
                    original = vi.name
                    vi.name = self._version(original, io_g)
                    vi.type.tensor_type.elem_type = io_g
        for name, t in self.native.items():
            if t == FLOAT16:
                self.new_types.setdefault(self.versions[(name, t)], t)
        self._patch_value_info()
        toposort(main)
        for name, _ in renamed:
            self.report.change(name, kind="output", detail="kept float32 via a Cast")
        self.report.details.update(self._details(converted, blocked))
        if converted:
            self.report.change("nodes", count=converted, detail="compute in float16")
        if self.stats["clamped_high"]:
            log.warning(
                "to-fp16: %d weight values beyond ±%g were clamped", self.stats["clamped_high"], self.cfg.max_finite
            )
        return bool(self.new_types)

    def _patch_value_info(self) -> None:
        for g in iter_graphs(self.proto.graph):
            for vi in list(g.value_info) + list(g.output):
                t = self.new_types.get(vi.name)
                if t is not None and vi.type.HasField("tensor_type"):
                    vi.type.tensor_type.elem_type = t

    def _details(self, converted: int, blocked: int) -> dict[str, Any]:
        return {
            "nodes_converted": converted,
            "nodes_kept_float32": blocked,
            "casts_inserted": self.casts,
            "initializers_converted": self.stats["initializers"],
            "constants_converted": self.stats["constants"],
            "clamped_high": self.stats["clamped_high"],
            "kept_from_underflow": self.stats["kept_from_underflow"],
            "keep_io_types": self.cfg.keep_io_types,
            "opset": self.opset,
        }


def convert_to_fp16(model: Model, **options: Any) -> PassReport:
    """Library shorthand: convert ``model`` in place and return the report."""
    result = ToFp16Pass(**options).run(model, PassContext())
    return result.report


__all__ = ["DEFAULT_BLOCK_OPS", "ToFp16Config", "ToFp16Pass", "convert_to_fp16", "fp16_array"]
