"""ONNX files read and written at the protobuf wire level, so that inline weights are never parsed into memory.

Why: ``onnx.load`` parses every inline weight into the ``ModelProto`` (the file's bytes and the parsed copy are
both alive while it parses), and ``onnx.checker.check_model`` / ``SerializeToString`` make one or two more
transient copies. On the trained MiniLM-L3 (68 MB, all weights inline) that was most of a prune's peak memory:
243 MB after loading and checking, 343 MB after the final check (``tools/bench_calibrated.py``'s RSS target is
weights + 2·K²·8 + 200 MB). No library does this: onnx's loader has no "skip raw_data" option and onnx-ir's
``load`` parses the protobuf the same way (it memory-maps external data only).

``read_model``: the main graph's inline tensors of at least ``min_bytes`` are cut out of the bytes handed to the
protobuf parser and the parsed tensors point at their own bytes in the file instead (``data_location =
EXTERNAL``, ``location`` = the model file's name, ``offset``/``length`` of the ``raw_data`` field's payload).
``tensors.to_array`` memory-maps them like any external tensor, so a weight is read only where a pass reads it.
The file is walked field by field (a few thousand fields for a large graph: every node is skipped as one block),
and only the pages holding field headers are touched.

``write_model``: the reverse for an inline save: the ``ModelProto`` is written with every tensor whose data
lives in a file (``lazy``) streamed from its source in pieces, so the serialised model never exists in memory
as one ``bytes``. The result is byte-for-byte a protobuf that ``onnx.load`` reads back as the same model.

Protobuf's wire format (https://protobuf.dev/programming-guides/encoding/): a message is a sequence of fields,
each a varint key ``(field_number << 3) | wire_type`` and a payload; wire type 2 (LEN) is a varint length and
that many bytes. ModelProto.graph is field 7, GraphProto.initializer field 5, TensorProto.raw_data field 9.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from onnx import ModelProto, TensorProto

from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.graph import copy_fields
from onnxsparse.ir.tensors import mark_inline_origin

_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_LEN = 2
#: copy pieces when streaming a weight into an output file
_PIECE = 8 * 2**20


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message (the caller words it for the user)."""


def _varint(buf: mmap.mmap | bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, payload start, field end) of each field in ``buf[start:end]``."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos, end)
        number, wtype = key >> 3, key & 7
        if wtype == 0:
            _, pos2 = _varint(buf, pos, end)
            payload = pos
        elif wtype == 1:
            payload, pos2 = pos, pos + 8
        elif wtype == _LEN:
            length, payload = _varint(buf, pos, end)
            pos2 = payload + length
        elif wtype == 5:
            payload, pos2 = pos, pos + 4
        else:  # groups (3, 4) are not used by onnx.proto
            raise WireError(f"unsupported wire type {wtype}")
        if pos2 > end or number == 0:
            raise WireError("field runs past the end of its message")
        yield number, wtype, first, payload, pos2
        pos = pos2


@dataclass(frozen=True)
class LazyTensor:
    """A main-graph initializer whose ``raw_data`` payload was left in the file: where it is."""

    name: str
    offset: int
    length: int


def read_model(path: Path, min_bytes: int = 1024) -> tuple[ModelProto, list[LazyTensor]]:
    """Parse ``path`` with the payloads of inline main-graph weights of ``min_bytes`` or more left in the file.

    The returned tensors are already external (pointing at ``path.name`` in ``path``'s folder). Raises
    ``WireError`` on malformed bytes and the protobuf's own ``DecodeError`` if the reduced bytes do not parse.
    """
    size = path.stat().st_size
    if size == 0:
        raise WireError("empty file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        lazy: list[LazyTensor] = []
        pieces: list[bytes] = []
        for number, wtype, first, payload, end in _fields(buf, 0, size):
            if number == _MODEL_GRAPH and wtype == _LEN:
                graph = _graph_without_weights(buf, payload, end, min_bytes, lazy)
                pieces.append(buf[first : payload - len(encode_varint(end - payload))])
                pieces.append(encode_varint(len(graph)))
                pieces.append(graph)
            else:
                pieces.append(buf[first:end])
    proto = ModelProto()
    proto.ParseFromString(b"".join(pieces))
    if lazy:
        _point_at_file(proto, lazy, path.name)
    return proto, lazy


def _graph_without_weights(buf: mmap.mmap, start: int, end: int, min_bytes: int, lazy: list[LazyTensor]) -> bytes:
    out: list[bytes] = []
    for number, wtype, first, payload, stop in _fields(buf, start, end):
        if number == _GRAPH_INITIALIZER and wtype == _LEN:
            tensor, cut = _tensor_without_data(buf, payload, stop, min_bytes)
            if cut is not None:
                out.append(buf[first : first + 1])  # the key of field 5 (LEN) is one byte
                out.append(encode_varint(len(tensor)))
                out.append(tensor)
                name = _tensor_name(tensor)
                lazy.append(LazyTensor(name, cut[0], cut[1]))
                continue
        out.append(buf[first:stop])
    return b"".join(out)


def _tensor_without_data(buf: mmap.mmap, start: int, end: int, min_bytes: int) -> tuple[bytes, tuple[int, int] | None]:
    raw: tuple[int, int] | None = None
    kept: list[tuple[int, int]] = []
    for number, wtype, first, payload, stop in _fields(buf, start, end):
        if number == _TENSOR_RAW_DATA and wtype == _LEN:
            raw = (payload, stop - payload)  # the last raw_data wins, as in protobuf's own parser
        else:
            kept.append((first, stop))
    if raw is None or raw[1] < min_bytes:
        return b"", None
    return b"".join(buf[a:b] for a, b in kept), raw


def _tensor_name(data: bytes) -> str:
    t = TensorProto()
    t.ParseFromString(data)
    return t.name


def _point_at_file(proto: ModelProto, lazy: list[LazyTensor], location: str) -> None:
    where = {t.name: t for t in lazy}
    for t in proto.graph.initializer:
        spot = where.get(t.name)
        if spot is None or t.data_location == TensorProto.EXTERNAL:
            continue
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(spot.offset)), ("length", str(spot.length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        mark_inline_origin(t)


# ------------------------------------------------------------------------------------------------ writing

#: a tensor's data: its length and a function yielding it in pieces
Payload = tuple[int, Callable[[], Iterator[bytes | memoryview]]]


def write_model(proto: ModelProto, f: BinaryIO, payload_of: Callable[[TensorProto], Payload | None]) -> dict[str, int]:
    """Write ``proto`` to ``f``; main-graph tensors for which ``payload_of`` gives a payload are streamed inline.

    Those tensors are written as inline tensors (``raw_data``, no external fields), the others as they are, one
    tensor serialised at a time. Returns each streamed tensor's payload offset in the file, so the caller can
    point the in-memory tensor at the bytes just written (as ``read_model`` would have).
    """
    init_key = bytes([(_GRAPH_INITIALIZER << 3) | _LEN])
    entries: list[tuple[str, bytes, Payload | None]] = []
    for t in proto.graph.initializer:
        got = payload_of(t)
        if got is None:
            entries.append((t.name, t.SerializeToString(), None))
            continue
        head = TensorProto()
        copy_fields(head, t, skip=("raw_data", "data_location", "external_data"))
        raw_key = bytes([(_TENSOR_RAW_DATA << 3) | _LEN]) + encode_varint(got[0])
        entries.append((t.name, head.SerializeToString() + raw_key, got))
    graph_shell = proto.graph.__class__()
    copy_fields(graph_shell, proto.graph, skip=("initializer",))
    graph_bytes = graph_shell.SerializeToString()
    model_shell = ModelProto()
    copy_fields(model_shell, proto, skip=("graph",))
    sizes = [len(head) + (got[0] if got else 0) for _, head, got in entries]
    graph_len = len(graph_bytes) + sum(1 + len(encode_varint(s)) + s for s in sizes)
    offsets: dict[str, int] = {}
    pos = 0

    def put(data: bytes | memoryview) -> None:
        nonlocal pos
        f.write(data)
        pos += len(data)

    put(model_shell.SerializeToString())
    put(bytes([(_MODEL_GRAPH << 3) | _LEN]) + encode_varint(graph_len))
    put(graph_bytes)
    for (name, header, got), size in zip(entries, sizes, strict=True):
        put(init_key + encode_varint(size))
        put(header)
        if got is None:
            continue
        offsets[name] = pos
        written = 0
        for piece in got[1]():
            put(piece)
            written += len(piece)
        if written != got[0]:
            raise OnnxSparseError(f"tensor '{name}': {written} bytes of data where {got[0]} were expected")
    return offsets


def file_pieces(path: Path, offset: int, length: int) -> Callable[[], Iterator[bytes]]:
    """A payload reader for ``length`` bytes at ``offset`` of ``path``, in pieces of at most 8 MiB."""

    def pieces() -> Iterator[bytes]:
        with open(path, "rb") as src:
            src.seek(offset)
            left = length
            while left:
                chunk = src.read(min(_PIECE, left))
                if not chunk:
                    raise OnnxSparseError(f"{path} ended {left} bytes early")
                left -= len(chunk)
                yield chunk

    return pieces
