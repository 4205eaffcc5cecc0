"""Reading and writing initializer data without loading a whole model's weights.

Models are loaded with ``load_external_data=False`` so that a 10 GB model's graph costs kilobytes. A tensor
stored outside the protobuf is read on demand through ``numpy.memmap``. A tensor a pass rewrites is stored
inline again (``raw_data``) when it was inline before; when it was external (a large model), its new bytes
are *spilled* to a scratch file of the model's ``SpillStore`` (``onnxsparse.ir.spill``: one private folder
per model, shared by the models derived from it) and the tensor points there, so editing every weight of a
10 GB model never holds more than one tensor in memory. Every pass reads weights through ``to_array`` and
writes them through ``set_array`` (or ``spill_writer`` for chunked writes) so this policy lives in one place.

Each of them is handed the model (any ``TensorHome``: the folder relative locations are read from, and the
store absolute scratch locations are resolved against) rather than finding a store in module state: so a
location read from a model file can only name the model's folder or a scratch file of the caller's own
store, never an arbitrary absolute path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.spill import ScratchArray, SpillStore

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


class TensorHome(Protocol):
    """Where a model's external tensor bytes are found: the folder relative locations are read from, and the
    spill store absolute (scratch) locations must belong to. ``model_io.Model`` is one."""

    @property
    def base_dir(self) -> Path | None: ...

    @property
    def store(self) -> SpillStore: ...


def external_info(tensor: TensorProto) -> dict[str, str] | None:
    """The ``external_data`` key/values of a tensor, or None where its data is inline."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


#: an ``external_data`` key of ours: the tensor is inline in the model file it came from, and external only in
#: memory (left in the file by ``wire.read_model``, or spilled after an edit), so a save keeps it inline
INLINE_KEY = "onnxsparse.inline"


def inline_origin(tensor: TensorProto) -> bool:
    """True if the tensor is external only in memory (``INLINE_KEY``)."""
    return tensor.data_location == TensorProto.EXTERNAL and any(e.key == INLINE_KEY for e in tensor.external_data)


def mark_inline_origin(tensor: TensorProto) -> None:
    entry = tensor.external_data.add()
    entry.key, entry.value = INLINE_KEY, "1"


def external_path(tensor: TensorProto, home: TensorHome | None) -> Path:
    """Where an external tensor's bytes live: a file in ``home.base_dir`` (never one that escapes it) or a
    scratch file of ``home.store``; anything else is refused."""
    info = external_info(tensor)
    assert info is not None
    location = info.get("location", "")
    if os.path.isabs(location):
        spilled = home.store.resolve(location) if home is not None else None
        if spilled is None:
            raise OnnxSparseError(f"tensor '{tensor.name}': external data '{location}' is outside the model folder")
        return spilled
    base_dir = home.base_dir if home is not None else None
    if base_dir is None:
        raise OnnxSparseError(f"tensor '{tensor.name}' uses external data but the model has no directory")
    path = (base_dir / location).resolve()
    if ".." in Path(location).parts:
        raise OnnxSparseError(f"tensor '{tensor.name}': external data '{location}' is outside the model folder")
    if not path.is_file():
        raise OnnxSparseError(f"missing external data file '{location}' for tensor '{tensor.name}' (in {base_dir})")
    return path


def to_array(tensor: TensorProto, home: TensorHome | None = None) -> np.ndarray:
    """The tensor's values; external data (found through ``home``, the model) is memory-mapped read-only,
    not copied."""
    info = external_info(tensor)
    if info is None:
        return numpy_helper.to_array(tensor)
    path = external_path(tensor, home)
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


def set_array(tensor: TensorProto, array: np.ndarray, home: TensorHome | None, spill: bool | None = None) -> None:
    """Replace a tensor's values in place (name kept); ``home`` is the model the tensor belongs to.

    ``spill``: None (default) keeps the tensor where it was — inline stays inline (the saver moves large
    tensors out again), external goes to a scratch file of ``home.store`` (``spill_writer``) so that a large
    model never gathers its edited weights in memory; True/False force either. An edited tensor never points
    at a file that still holds its old bytes. ``home`` may be None only for a tensor that is not spilled.
    """
    array = np.asarray(array)
    if spill is None:
        spill = external_info(tensor) is not None and array.nbytes >= SPILL_MIN_BYTES
    dtype = array.dtype
    if spill and dtype in _TYPE_OF and tensor.data_type != TensorProto.BFLOAT16:
        if home is None:
            raise ValueError(f"set_array: spilling tensor '{tensor.name}' needs its model (the spill store)")
        with spill_writer(tensor, home.store, array.shape, dtype) as write:
            write(array)
        return
    new = numpy_helper.from_array(np.ascontiguousarray(array), tensor.name)
    if new.data_type != tensor.data_type and tensor.data_type in (TensorProto.BFLOAT16,):
        raise OnnxSparseError(f"cannot store {array.dtype} into bfloat16 tensor '{tensor.name}'")
    doc = tensor.doc_string
    tensor.CopyFrom(new)
    tensor.doc_string = doc


# ------------------------------------------------------------------------------------------------ spilling

#: a rewritten external tensor at least this large goes to a scratch file (smaller ones are stored inline)
SPILL_MIN_BYTES = 1024
_TYPE_OF: dict[np.dtype, int] = {v: k for k, v in _MEMMAP_DTYPES.items()}


def is_spilled(tensor: TensorProto, home: TensorHome | None) -> bool:
    """True if the tensor's bytes live in a scratch file of ``home``'s store (edited and not yet saved)."""
    info = external_info(tensor)
    return info is not None and home is not None and home.store.resolve(info.get("location", "")) is not None


@contextlib.contextmanager
def spill_writer(
    tensor: TensorProto,
    store: SpillStore,
    shape: tuple[int, ...],
    dtype: np.dtype,
    commit: Callable[[], bool] | None = None,
) -> Iterator[Callable[..., None]]:
    """Stream a tensor's new values into the pack of ``store`` (its model's), chunk by chunk, in C order.

    ``with spill_writer(t, model.store, shape, dtype) as write: write(chunk); ...``: each chunk continues where the last
    ended (or goes to element offset ``at``: ``write(chunk, at=n)``, safe from several threads); the total
    must be exactly ``prod(shape)`` elements. On success the tensor (name and doc kept)
    points at the file; on error — or when ``commit()`` answers False at the end (e.g. nothing changed after
    all) — it is left as it was. The data is written with plain file writes, so it never counts towards the
    process's resident memory.
    """
    dtype = np.dtype(dtype)
    data_type = _TYPE_OF.get(dtype)
    if data_type is None:
        raise OnnxSparseError(f"cannot spill tensor '{tensor.name}' of dtype {dtype}")
    scratch = ScratchArray(store, shape, dtype, pack=True)
    try:
        yield scratch.write
        scratch.close()
    except BaseException:
        scratch.discard()
        raise
    if commit is not None and not commit():
        scratch.discard()
        return
    scratch.commit()
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)  # type: ignore[arg-type]
    tensor.ClearField("raw_data")
    del tensor.dims[:]
    tensor.dims.extend(scratch.shape)
    tensor.data_type = data_type
    inline = inline_origin(tensor)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    length = scratch.count * dtype.itemsize
    for key, value in (("location", str(scratch.path)), ("offset", str(scratch.offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key = key
        entry.value = value
    if inline:
        mark_inline_origin(tensor)


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
