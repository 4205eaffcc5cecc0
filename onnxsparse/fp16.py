"""float32 → float16 conversion of a model, the machinery of the ``to-fp16`` pass (``passes/to_fp16.py``).

It is driven by the ONNX op schemas rather than by a list of ops (``onnxsparse.fp16_types`` decides the
types, this module rewrites the graph to them):

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

Weights keep their zeros (fp16 0 is 0), so a 2:4 mask survives.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
from onnx import GraphProto, helper, numpy_helper

from onnxsparse.fp16_types import FLOAT, FLOAT16, Fp16Options, NodeInfo, TypePlan, constant_tensor, tensor_elem
from onnxsparse.ir.graph import NameGen, iter_graphs, toposort
from onnxsparse.ir.model_io import Model
from onnxsparse.ir.tensors import set_array, to_array
from onnxsparse.pipeline import PassReport

log = logging.getLogger("onnxsparse.fp16")

#: ops with a ``dtype`` attribute naming their output type.
_DTYPE_OPS = frozenset(
    {"EyeLike", "RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Bernoulli"}
)
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def convert(model: Model, options: Fp16Options, report: PassReport) -> bool:
    """Convert ``model`` in place; fills ``report``; returns whether anything changed."""
    return _Converter(model, options, report).run()


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


class _Converter(TypePlan):
    """One conversion of one model; see the module docstring for the rules."""

    def __init__(self, model: Model, config: Fp16Options, report: PassReport) -> None:
        super().__init__(model, config, report)
        self.names = NameGen(self.proto.graph)
        self.versions: dict[tuple[str, int], str] = {}
        self.new_types: dict[str, int] = {}
        self.casts = 0
        self.stats = {"clamped_high": 0, "kept_from_underflow": 0, "initializers": 0, "constants": 0}

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
            arr = to_array(tensor, self.model)
            data = self._fp16(arr) if t == FLOAT16 else np.asarray(arr, dtype=np.float32)
            g.initializer.append(numpy_helper.from_array(data, new))
            self.stats["initializers"] += 1
        elif prod is not None and prod[0].op_type == "Constant":
            ctensor = constant_tensor(prod[0])
            assert ctensor is not None
            arr = to_array(ctensor, self.model)  # a Constant's tensor is inline unless saved otherwise
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
                set_array(tensor, self._fp16(to_array(tensor, self.model)), self.model)
                if not self._is_graph_input(name):
                    self.stats["initializers"] += 1
            elif name in self.producer and self.producer[name][0].op_type == "Constant":
                node = self.producer[name][0]
                ctensor = constant_tensor(node)
                assert ctensor is not None
                data = self._fp16(to_array(ctensor, self.model))
                del node.attribute[:]
                node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(data)))
                self.stats["constants"] += 1

    def _fix_attributes(self, info: NodeInfo) -> None:
        node = info.node
        out16 = any(self.native.get(o) == FLOAT16 for o in node.output if o)
        if not out16:
            return
        if node.op_type == "Cast":
            src = node.input[0]
            if self.native.get(src, tensor_elem(self.types.get(src))) == FLOAT16:
                node.op_type = "Identity"  # float16 → float16 is no cast at all
                del node.attribute[:]
                return
            for a in node.attribute:
                if a.name == "to":
                    a.i = FLOAT16
        elif node.op_type == "ConstantOfShape":
            value = next((a for a in node.attribute if a.name == "value"), None)
            arr = to_array(value.t, self.model) if value is not None else np.zeros(1, dtype=np.float32)
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
