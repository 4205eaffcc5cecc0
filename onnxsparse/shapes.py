"""Shape inference through onnx's own inference, with trtexec-style overrides for symbolic input dims.

Reports (FLOPs, GEMM extraction) need concrete shapes; a model with ``batch``/``seq`` dims gets them from
``--shapes input:1x3x640x640``. Values are collected from every (sub)graph into one name → shape map.
"""

from __future__ import annotations

import re

import onnx
from onnx import ModelProto, TypeProto

from onnxsparse.errors import OnnxSparseError
from onnxsparse.graph import iter_graphs

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


def with_input_shapes(proto: ModelProto, shapes: dict[str, tuple[int, ...]]) -> ModelProto:
    """A copy of ``proto`` (graph only; weights shared by reference is impossible in protobuf, so
    initializers are dropped from the copy) whose inputs carry the given concrete shapes."""
    copy = ModelProto()
    copy.CopyFrom(proto)
    inputs = {i.name: i for i in copy.graph.input}
    for name, dims in shapes.items():
        if name not in inputs:
            known = ", ".join(i.name for i in copy.graph.input) or "none"
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
    return copy


def infer_shapes(proto: ModelProto, overrides: dict[str, tuple[int, ...]] | None = None) -> dict[str, Shape]:
    """Name → shape for every value onnx can infer (graph inputs, initializers, intermediates, subgraphs)."""
    model = with_input_shapes(proto, overrides or {})
    # Strip weight bytes so inference of a huge model stays small; dims stay on the TensorProtos. Small
    # (shape-like) tensors keep their data: Reshape targets need it for inference.
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            if t.data_type == onnx.TensorProto.INT64 and len(t.dims) <= 1 and (not t.dims or t.dims[0] <= 16):
                continue
            t.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data"):
                t.ClearField(field)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:  # onnx raises several unrelated types here
        raise OnnxSparseError(f"shape inference failed: {str(e).splitlines()[0][:200]}") from e
    shapes: dict[str, Shape] = {}
    for g in iter_graphs(inferred.graph):
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


def concrete(shape: Shape | None) -> tuple[int, ...] | None:
    """The shape if every dim is a known integer, else None."""
    if shape is None or any(not isinstance(d, int) for d in shape):
        return None
    return tuple(int(d) for d in shape)  # type: ignore[arg-type]
