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

The rewrite runs on the model's onnx-ir view (``onnxsparse.ir.onnxir.IrView``): a value's producer and
readers are ``Value.producer()`` / ``Value.uses()``, a Cast is inserted right after what it reads (so the
graph stays in topological order without a sort), new weights are ``IrView.new_tensor``s and ``commit()``
writes the result back into ``model.proto`` — kept weights are not copied.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx import TypeProto

from onnxsparse.fp16_types import FLOAT, FLOAT16, Fp16Options, NodeInfo, TypePlan, infer_types, tensor_elem
from onnxsparse.ir.graph import NameGen
from onnxsparse.ir.model_io import Model
from onnxsparse.ir.onnxir import IrView, ModelTensor, insert_after_definition
from onnxsparse.pass_base import PassReport

log = logging.getLogger("onnxsparse.fp16")

#: ops with a ``dtype`` attribute naming their output type.
_DTYPE_OPS = frozenset(
    {"EyeLike", "RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Bernoulli"}
)
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
#: what the conversion counts for the report
_STATS = ("clamped_high", "kept_from_underflow", "initializers", "constants")


def convert(model: Model, options: Fp16Options, report: PassReport) -> bool:
    """Convert ``model`` in place; fills ``report``; returns whether anything changed.

    Types are inferred and fresh names reserved on the proto before the view is made (both by name); the
    view is committed, and the weighted-layer index dropped, only when the conversion changed something.
    """
    types = infer_types(model.proto)
    if not any(tensor_elem(tp) == FLOAT for tp in types.values()):  # nothing float32: no view to make
        report.details.update(_details(options, model.opset, 0, 0, 0, dict.fromkeys(_STATS, 0)))
        return False
    names = NameGen(model.proto.graph)
    view = IrView.of(model)
    modified = _Converter(model, view, types, names, options, report).run()
    if modified:
        view.commit()
        model.layer_cache.invalidate()
    return modified


def fp16_array(arr: np.ndarray, min_positive: float, max_finite: float) -> tuple[np.ndarray, int, int]:
    """``arr`` as float16 with clamping; returns (array, how many clamped high, how many kept from underflow)."""
    a = np.asarray(arr, dtype=np.float32)
    mag = np.abs(a)
    # counts first; the copy and the masked writes only where something is clamped (most weights: nothing)
    n_high = int(np.count_nonzero(mag > max_finite))
    n_low = int(np.count_nonzero(mag < min_positive) - np.count_nonzero(mag == 0)) if min_positive > 0 else 0
    if not (n_high or n_low):
        return a.astype(np.float16), 0, 0
    out = a.copy()
    high = mag > max_finite  # also catches inf
    low = (mag < min_positive) & (a != 0)
    out[high] = np.sign(a[high]) * max_finite
    out[low] = np.sign(a[low]) * min_positive
    return out.astype(np.float16), n_high, n_low


def constant_array(node: ir.Node) -> np.ndarray | None:
    """The values of a Constant node (``value``, ``value_float`` or ``value_floats``), read through the model."""
    a = node.attributes.get("value")
    if a is not None and a.type == ir.AttributeType.TENSOR:
        return np.asarray(a.value.numpy())
    for key in ("value_float", "value_floats"):
        a = node.attributes.get(key)
        if a is not None:
            return np.array(a.value, dtype=np.float32)
    return None


def _type_name(t: int) -> str:
    return "fp16" if t == FLOAT16 else "fp32"


class _Converter(TypePlan):
    """One conversion of one model; see the module docstring for the rules."""

    def __init__(
        self,
        model: Model,
        view: IrView,
        types: dict[str, TypeProto],
        names: NameGen,
        config: Fp16Options,
        report: PassReport,
    ) -> None:
        super().__init__(model, view, types, config)
        self.report = report
        self.names = names
        #: (value, element type) → the value holding it as that type (the value itself for its native type)
        self.versions: dict[tuple[ir.Value, int], ir.Value] = {}
        self.made = 0  # versions this conversion made
        self.casts = 0
        self.stats = dict.fromkeys(_STATS, 0)

    # -- rewriting ---------------------------------------------------------------------------------------

    def _version(self, v: ir.Value, t: int, out_name: str | None = None, copy_constant: bool = True) -> ir.Value:
        """The value holding ``v`` as element type ``t``; made on first request, in the graph defining ``v``.

        ``copy_constant=False``: a Constant's value is cast rather than copied (a renamed graph output).
        """
        key = (v, t)
        if key in self.versions:
            return self.versions[key]
        graph = v.graph
        assert graph is not None
        new = ir.Value(name=out_name or self.names(f"{v.name}_{_type_name(t)}"))
        tp = self.types.get(v)
        new.type = ir.TensorType(ir.DataType(t))
        new.shape = ir.serde.deserialize_type_proto_for_shape(tp) if tp is not None else None
        prod = v.producer()
        if v.is_initializer() and not v.is_graph_input():
            assert v.const_value is not None and new.name is not None
            new.const_value = self._tensor(v.const_value, t, new.name)
            graph.initializers[new.name] = new
            self.stats["initializers"] += 1
        elif prod is not None and prod.op_type == "Constant" and copy_constant:
            arr = constant_array(prod)
            assert arr is not None
            data = self._fp16(arr) if t == FLOAT16 else np.asarray(arr, dtype=np.float32)
            node = ir.Node(
                "",
                "Constant",
                [],
                [ir.AttrTensor("value", ir.Tensor(data))],
                outputs=[new],
                name=self.names(f"{v.name}_{_type_name(t)}"),
            )
            graph.insert_after(prod, node)
            self.stats["constants"] += 1
        elif prod is not None and prod.op_type == "Cast" and len(prod.inputs) == 1:
            # a sibling Cast from the same input: no Cast feeds a Cast
            name = self.names(f"{prod.name or 'Cast'}_{_type_name(t)}")
            node = ir.Node("", "Cast", [prod.inputs[0]], [ir.AttrInt64("to", t)], outputs=[new], name=name)
            graph.insert_after(prod, node)
            self.casts += 1
        else:
            src = self.versions.get((v, self.native.get(v, FLOAT)), v)
            name = self.names(f"{v.name}_to_{_type_name(t)}")
            node = ir.Node("", "Cast", [src], [ir.AttrInt64("to", t)], outputs=[new], name=name)
            insert_after_definition(graph, src, [node])
            self.casts += 1
        self.versions[key] = new
        self.made += 1
        return new

    def _fp16(self, arr: np.ndarray) -> np.ndarray:
        out, high, low = fp16_array(arr, self.cfg.min_positive, self.cfg.max_finite)
        self.stats["clamped_high"] += high
        self.stats["kept_from_underflow"] += low
        return out

    def _tensor(self, old: ir.TensorProtocol, t: int, name: str) -> ModelTensor:
        """A weight holding ``old``'s values as ``t``, stored like the model's own (``IrView.new_tensor``)."""
        arr = old.numpy()
        data = self._fp16(arr) if t == FLOAT16 else np.asarray(arr, dtype=np.float32)
        new = self.view.new_tensor(data, name)
        if isinstance(old, ModelTensor) and old.proto.doc_string:
            new.proto.doc_string = old.proto.doc_string
        return new

    def _convert_constants_in_place(self) -> None:
        for v, t in self.native.items():
            if t != FLOAT16:
                continue
            prod = v.producer()
            if v.is_initializer():  # also an input's default (keep-io off): it follows the input
                assert v.const_value is not None and v.name is not None
                v.const_value = self._tensor(v.const_value, FLOAT16, v.name)
                v.dtype = ir.DataType.FLOAT16
                if not v.is_graph_input():
                    self.stats["initializers"] += 1
            elif prod is not None and prod.op_type == "Constant":
                arr = constant_array(prod)
                assert arr is not None
                prod.attributes.clear()
                prod.attributes["value"] = ir.AttrTensor("value", ir.Tensor(self._fp16(arr)))
                self.stats["constants"] += 1

    def _fix_attributes(self, info: NodeInfo) -> None:
        node = info.node
        if not any(self.native.get(o) == FLOAT16 for o in node.outputs):
            return
        if node.op_type == "Cast":
            src = node.inputs[0]
            assert src is not None
            if self.native.get(src, self.elem.get(src)) == FLOAT16:
                node.op_type = "Identity"  # float16 → float16 is no cast at all
                node.attributes.clear()
                return
            node.attributes["to"] = ir.AttrInt64("to", FLOAT16)
        elif node.op_type == "ConstantOfShape":
            value = node.attributes.get("value")
            arr = np.asarray(value.value.numpy()) if value is not None else np.zeros(1, dtype=np.float32)
            node.attributes["value"] = ir.AttrTensor("value", ir.Tensor(self._fp16(arr)))
        elif node.op_type in _DTYPE_OPS:
            node.attributes["dtype"] = ir.AttrInt64("dtype", FLOAT16)

    def _rename_main_outputs(self) -> list[tuple[str, ir.Value]]:
        """Main-graph outputs keep their names: a producer writing the other type gets a fresh name for its
        value, and a Cast (or a sibling Cast) makes the output under the old name. Returns (name, value)."""
        main = self.view.ir.graph
        io = self._graph_io_type(main)
        renamed: list[tuple[str, ir.Value]] = []
        for v in dict.fromkeys(main.outputs):
            if self._is_float(v) and self.native.get(v) != io and v.producer() is not None:
                name = v.name
                assert name is not None
                v.name = self.names(f"{name}_{_type_name(self.native[v])}")
                renamed.append((name, v))
        return renamed

    def run(self) -> bool:
        for g in self.graphs():
            for node in g:
                self.infos[node] = self._classify(node)
        if not any(self._is_float(v) for v in self.types):
            self.report.details.update(_details(self.cfg, self.opset, 0, 0, self.casts, self.stats))
            return False
        self._decide()
        main = self.view.ir.graph
        io = self._graph_io_type(main)
        renamed = self._rename_main_outputs()
        for v, t in self.native.items():
            self.versions.setdefault((v, t), v)
        for name, v in renamed:
            out = self._version(v, io, out_name=name, copy_constant=False)
            for i, o in enumerate(main.outputs):
                if o is v:
                    main.outputs[i] = out
        self._convert_constants_in_place()
        converted = blocked = 0
        for info in list(self.infos.values()):
            node = info.node
            if not self._touches_float(node):
                continue
            if info.converted:
                if any(self.native.get(o) == FLOAT16 for o in node.outputs) or FLOAT16 in info.wants.values():
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
                src = node.inputs[i]
                assert src is not None
                new = self._version(src, want)
                if new is not src:
                    node.replace_input_with(i, new)
        self._fix_graph_io()
        for name, _ in renamed:
            self.report.change(name, kind="output", detail="kept float32 via a Cast")
        self.report.details.update(_details(self.cfg, self.opset, converted, blocked, self.casts, self.stats))
        if converted:
            self.report.change("nodes", count=converted, detail="compute in float16")
        if self.stats["clamped_high"]:
            log.warning(
                "to-fp16: %d weight values beyond ±%g were clamped", self.stats["clamped_high"], self.cfg.max_finite
            )
        return bool(self.made) or FLOAT16 in self.native.values()

    def _fix_graph_io(self) -> None:
        """Formal inputs and outputs get their graph's I/O type; values that became float16 say so."""
        main = self.view.ir.graph
        for g in self.graphs():
            io_g = ir.DataType(self._graph_io_type(g))
            for v in g.inputs:
                if self._is_float(v):
                    v.dtype = io_g
            if g is main:
                continue
            for i, v in enumerate(list(g.outputs)):
                if self._is_float(v):
                    new = self._version(v, io_g)
                    if new is not v:
                        g.outputs[i] = new
                    new.dtype = io_g
        for v, t in self.native.items():
            if t == FLOAT16 and isinstance(v.type, ir.TensorType):
                v.dtype = ir.DataType.FLOAT16


def _details(
    cfg: Fp16Options, opset: int, converted: int, blocked: int, casts: int, stats: dict[str, int]
) -> dict[str, Any]:
    """The report's details (what ``ToFp16Pass.render`` prints)."""
    return {
        "nodes_converted": converted,
        "nodes_kept_float32": blocked,
        "casts_inserted": casts,
        "initializers_converted": stats["initializers"],
        "constants_converted": stats["constants"],
        "clamped_high": stats["clamped_high"],
        "kept_from_underflow": stats["kept_from_underflow"],
        "keep_io_types": cfg.keep_io_types,
        "opset": opset,
    }
