"""Shape inference through onnx's own inference, with trtexec-style overrides for symbolic input dims.

Reports (FLOPs, GEMM extraction) need concrete shapes; a model with ``batch``/``seq`` dims gets them from
``--shapes input:1x3x640x640``. Values are collected from every (sub)graph into one name → shape map.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable

import onnx
from onnx import ModelProto, TensorProto, TypeProto

from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.graph import copy_fields, iter_graphs

Dim = int | str | None
Shape = tuple[Dim, ...]

_SHAPE_ITEM = re.compile(r"^(?P<name>.+):(?P<dims>\d+(x\d+)*|scalar)$")


def parse_shapes(text: str | None) -> dict[str, tuple[int, ...]]:
    """Parse ``name:1x3x224x224,other:1x128`` (trtexec syntax) into a dict."""
    if not text:
        return {}
    out: dict[str, tuple[int, ...]] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        m = _SHAPE_ITEM.match(item)
        if not m:
            raise OnnxSparseError(f"bad shape '{item}': expected NAME:DxDxD, e.g. input:1x3x224x224")
        dims = m["dims"]
        out[m["name"]] = () if dims == "scalar" else tuple(int(d) for d in dims.split("x"))
    return out


def _dims(t: TypeProto) -> Shape | None:
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    dims: list[Dim] = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def weightless_copy(proto: ModelProto, keep: Callable[[TensorProto], bool]) -> tuple[ModelProto, set[str]]:
    """A copy of ``proto`` for onnx's inference: a tensor ``keep`` refuses has its name, dtype and dims but
    no data. The main graph's weights are never copied (they are made as empty tensors; ``CopyFrom`` and
    clearing would copy an eager model's bytes once for nothing); subgraph tensors are cleared in the copy.
    Returns the copy and the names of the main-graph tensors left without data."""
    copy = ModelProto()
    copy_fields(copy, proto, skip=("graph",))
    copy_fields(copy.graph, proto.graph, skip=("initializer",))
    stripped: set[str] = set()
    for t in proto.graph.initializer:
        if keep(t):
            copy.graph.initializer.add().CopyFrom(t)
        else:
            copy.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
            stripped.add(t.name)
    for g in itertools.islice(iter_graphs(copy.graph), 1, None):  # the subgraphs
        for t in g.initializer:
            if keep(t):
                continue
            for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                t.ClearField(f)  # type: ignore[arg-type]
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
    return copy, stripped


def _set_input_shapes(model: ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    """Give ``model``'s inputs the concrete ``shapes`` (``--shapes``), checked against what they declare."""
    inputs = {i.name: i for i in model.graph.input}
    for name, dims in shapes.items():
        if name not in inputs:
            known = ", ".join(i.name for i in model.graph.input) or "none"
            raise OnnxSparseError(f"--shapes names '{name}', which is not a model input (inputs: {known})")
        shape = inputs[name].type.tensor_type.shape
        old = list(shape.dim)
        if old and len(old) != len(dims):
            raise OnnxSparseError(f"--shapes {name}: rank {len(dims)} given, the model input has rank {len(old)}")
        for i, d in enumerate(old):
            if d.HasField("dim_value") and d.dim_value != dims[i]:
                raise OnnxSparseError(f"--shapes {name}: dim {i} is fixed to {d.dim_value} in the model, got {dims[i]}")
        shape.ClearField("dim")
        for d in dims:
            shape.dim.add().dim_value = d


def _shape_like(t: TensorProto) -> bool:
    """Small int64 vectors (Reshape targets, axes): inference reads their values, so the copy keeps them."""
    return t.data_type == TensorProto.INT64 and len(t.dims) <= 1 and (not t.dims or t.dims[0] <= 16)


def infer_shapes(proto: ModelProto, overrides: dict[str, tuple[int, ...]] | None = None) -> dict[str, Shape]:
    """Name → shape for every value onnx can infer (graph inputs, initializers, intermediates, subgraphs).

    Where onnx's inference leaves a weighted layer's dims unknown although the graph inputs are concrete
    (BERT's position ids: a Slice of a buffer by ``Shape(input_ids)[1]`` defeats onnx's data propagation, and
    the broadcasting Add after it loses the sequence length for the whole encoder), ONNX Runtime's symbolic
    shape inference is tried as well and its concrete dims fill the gaps (``_symbolic_fill``).
    """
    # Without weight bytes, so inference of a huge model stays small; dims stay on the TensorProtos. Small
    # (shape-like) tensors keep their data: Reshape targets need it for inference.
    model, stripped = weightless_copy(proto, _shape_like)
    _set_input_shapes(model, overrides or {})
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:  # onnx raises several unrelated types here
        raise OnnxSparseError(f"shape inference failed: {str(e).splitlines()[0][:200]}") from e
    shapes = _collect(inferred)
    if _layers_need_dims(inferred, shapes):
        _symbolic_fill(model, stripped, shapes)
    return shapes


def _collect(model: ModelProto) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {}
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            shapes[t.name] = tuple(int(d) for d in t.dims)
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            dims = _dims(vi.type)
            if dims is not None:
                shapes.setdefault(vi.name, dims)
        for node in g.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        shapes[node.output[0]] = tuple(int(d) for d in attr.t.dims)
    return shapes


#: ops whose input/output dims the reports need (layers.WEIGHTED_OPS; not imported: layers imports this module)
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _layers_need_dims(model: ModelProto, shapes: dict[str, Shape]) -> bool:
    """True when every graph input is concrete but some weighted op's data input or output is not.

    With symbolic graph inputs (no ``--shapes``) a second inference could not make them concrete either, so
    it is not worth its time.
    """
    inits = {t.name for t in model.graph.initializer}
    if any(concrete(shapes.get(i.name)) is None for i in model.graph.input if i.name not in inits):
        return False
    for g in iter_graphs(model.graph):
        for node in g.node:
            if node.op_type in _WEIGHTED_OPS and node.domain in ("", "ai.onnx"):
                names = [n for n in (*node.input[:2], *node.output[:1]) if n]
                if any(concrete(shapes.get(n)) is None for n in names):
                    return True
    return False


def _symbolic_fill(model: ModelProto, stripped: set[str], shapes: dict[str, Shape]) -> None:
    """Fill unknown dims of ``shapes`` in place from ONNX Runtime's symbolic shape inference (best effort).

    ``model`` has concrete inputs and weight tensors without bytes. The stripped main-graph weights become graph
    inputs of the same type and shape, so the symbolic inference never tries to read their (absent) values;
    the small int64 tensors it needs for Reshape/Slice/... stay initializers. Only concrete dims are taken, and
    onnx's own concrete dims always win. Any failure (an op it does not know, an old opset, no onnxruntime)
    leaves onnx's result as it was.
    """
    log = logging.getLogger("onnxsparse.ir.shapes")
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except Exception as e:  # onnxruntime is a dependency, but a broken install must not break reports
        log.debug("symbolic shape inference unavailable: %s", e)
        return
    copy = ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    inputs = {i.name for i in graph.input}
    kept = [t for t in graph.initializer if t.name not in stripped]
    moved = [t for t in graph.initializer if t.name in stripped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in moved if t.name not in inputs
    )
    # Its warnings ("unsupported broadcast", "potential unsafe merge") are about a best-effort guess the report
    # can do without: they go to our debug log only.
    sym_log = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level = sym_log.level
    sym_log.setLevel(logging.ERROR)
    try:
        # The library's ``infer_shapes`` saves its partial model into the working directory when inference is
        # incomplete and then raises; the same steps here keep the partial result and write nothing.
        sym = SymbolicShapeInference(2**31 - 1, True, False, 0)
        sym._preprocess(copy)
        while sym.run_:
            sym._infer_impl()
        sym._update_output_from_vi()
        found = _collect(sym.out_mp_)
        for name, vi in sym.known_vi_.items():
            dims = _dims(vi.type)
            if dims is not None:
                found.setdefault(name, dims)
    except Exception as e:  # the symbolic inference raises anything from AssertionError to sympy errors
        log.debug("symbolic shape inference failed, keeping onnx's shapes: %s", e)
        return
    finally:
        sym_log.setLevel(level)
    filled = 0
    for name, dims in found.items():
        old = shapes.get(name)
        if concrete(old) is not None:
            continue
        new: Shape | None
        if old is None or len(old) != len(dims):
            new = concrete(dims)
            if new is None:
                continue
        else:  # dim by dim: only a concrete dim replaces an unknown or symbolic one
            new = tuple(
                d if isinstance(d, int) and not isinstance(o, int) else o for o, d in zip(old, dims, strict=True)
            )
        if new != old:
            shapes[name] = new
            filled += 1
    log.debug("symbolic shape inference filled %d shapes", filled)


def concrete(shape: Shape | None) -> tuple[int, ...] | None:
    """The shape if every dim is a known integer, else None."""
    if shape is None or any(not isinstance(d, int) for d in shape):
        return None
    return tuple(int(d) for d in shape)  # type: ignore[arg-type]


def symbolic_dims(proto: ModelProto) -> dict[str, list[tuple[str, int]]]:
    """The graph inputs' dims that are not fixed: dim name → the (input, axis) places it appears.

    An unnamed dim is its own name, ``input[axis]``. Inputs that are initializers (old exporters) are skipped.
    """
    inits = {t.name for t in proto.graph.initializer}
    found: dict[str, list[tuple[str, int]]] = {}
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        for axis, d in enumerate(_dims(vi.type) or ()):
            if not isinstance(d, int):
                found.setdefault(d if isinstance(d, str) and d else f"{vi.name}[{axis}]", []).append((vi.name, axis))
    return found


def fill_symbolic(proto: ModelProto, values: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """``--shapes``-style overrides giving every input with a symbolic dim that dim's value from ``values``
    (keys as ``symbolic_dims`` names them); fixed dims stay."""
    inits = {t.name for t in proto.graph.initializer}
    out: dict[str, tuple[int, ...]] = {}
    for vi in proto.graph.input:
        dims = _dims(vi.type)
        if vi.name in inits or dims is None or all(isinstance(d, int) for d in dims):
            continue
        filled = []
        for axis, d in enumerate(dims):
            if isinstance(d, int):
                filled.append(d)
            else:
                name = d if isinstance(d, str) and d else f"{vi.name}[{axis}]"
                filled.append(values[name])
        out[vi.name] = tuple(filled)
    return out
