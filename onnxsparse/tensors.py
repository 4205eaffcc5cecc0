"""Reading and writing initializer data without loading a whole model's weights.

Models are loaded with ``load_external_data=False`` so that a 10 GB model's graph costs kilobytes. A tensor
stored outside the protobuf is read on demand through ``numpy.memmap``; a tensor a pass rewrites is stored
inline again (``raw_data``) and written back out at save time. Every pass reads weights through ``to_array``
and writes them through ``set_array`` so this policy lives in one place.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxsparse.errors import OnnxSparseError

# bfloat16 and the float8 types have no numpy dtype; numpy_helper maps them for us, memmap does not.
_MEMMAP_DTYPES: dict[int, np.dtype] = {
    TensorProto.FLOAT: np.dtype(np.float32),
    TensorProto.FLOAT16: np.dtype(np.float16),
    TensorProto.DOUBLE: np.dtype(np.float64),
    TensorProto.INT8: np.dtype(np.int8),
    TensorProto.UINT8: np.dtype(np.uint8),
    TensorProto.INT16: np.dtype(np.int16),
    TensorProto.UINT16: np.dtype(np.uint16),
    TensorProto.INT32: np.dtype(np.int32),
    TensorProto.INT64: np.dtype(np.int64),
    TensorProto.BOOL: np.dtype(np.bool_),
}


def external_info(tensor: TensorProto) -> dict[str, str] | None:
    """The ``external_data`` key/values of a tensor, or None where its data is inline."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def external_path(tensor: TensorProto, base_dir: Path | None) -> Path:
    """Where an external tensor's bytes live; refuses paths that escape ``base_dir``."""
    info = external_info(tensor)
    assert info is not None
    location = info.get("location", "")
    if base_dir is None:
        raise OnnxSparseError(f"tensor '{tensor.name}' uses external data but the model has no directory")
    path = (base_dir / location).resolve()
    if os.path.isabs(location) or ".." in Path(location).parts:
        raise OnnxSparseError(f"tensor '{tensor.name}': external data '{location}' is outside the model folder")
    if not path.is_file():
        raise OnnxSparseError(f"missing external data file '{location}' for tensor '{tensor.name}' (in {base_dir})")
    return path


def to_array(tensor: TensorProto, base_dir: Path | None = None) -> np.ndarray:
    """The tensor's values; external data is memory-mapped read-only, not copied."""
    info = external_info(tensor)
    if info is None:
        return numpy_helper.to_array(tensor)
    path = external_path(tensor, base_dir)
    offset = int(info.get("offset", 0))
    shape = tuple(int(d) for d in tensor.dims)
    dtype = _MEMMAP_DTYPES.get(tensor.data_type)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if dtype is None:
        # Rare types (bf16, float8, int4): read the bytes and let onnx decode them.
        length = int(info.get("length", 0)) or None
        with open(path, "rb") as f:
            f.seek(offset)
            raw = f.read() if length is None else f.read(length)
        copy = TensorProto()
        copy.CopyFrom(tensor)
        del copy.external_data[:]
        copy.data_location = TensorProto.DEFAULT
        copy.raw_data = raw
        return numpy_helper.to_array(copy)
    size = path.stat().st_size
    if offset + count * dtype.itemsize > size:
        raise OnnxSparseError(
            f"external data for tensor '{tensor.name}' is truncated: needs {offset + count * dtype.itemsize} bytes, "
            f"'{path.name}' has {size}"
        )
    if count == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def set_array(tensor: TensorProto, array: np.ndarray) -> None:
    """Replace a tensor's values in place (name kept), storing them inline.

    The saver moves large tensors out again; keeping them inline here means an edited tensor never points
    at a file that still holds the old bytes.
    """
    new = numpy_helper.from_array(np.ascontiguousarray(array), tensor.name)
    if new.data_type != tensor.data_type and tensor.data_type in (TensorProto.BFLOAT16,):
        raise OnnxSparseError(f"cannot store {array.dtype} into bfloat16 tensor '{tensor.name}'")
    doc = tensor.doc_string
    tensor.CopyFrom(new)
    tensor.doc_string = doc


def constant_value(node: onnx.NodeProto) -> TensorProto | None:
    """The tensor a ``Constant`` node produces, when it holds a dense ``value`` (else None)."""
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return attr.t
    return None


def nbytes(tensor: TensorProto) -> int:
    """Bytes of a tensor's data, without reading external data."""
    info = external_info(tensor)
    if info is not None and "length" in info:
        return int(info["length"])
    count = int(np.prod(tuple(tensor.dims), dtype=np.int64)) if tensor.dims else 1
    dtype = _MEMMAP_DTYPES.get(tensor.data_type)
    if dtype is not None:
        return count * dtype.itemsize
    return len(tensor.raw_data) or count * 2
