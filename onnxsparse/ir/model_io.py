"""Loading and saving models: external data, atomic writes, provenance.

IO happens only here, at the edges of a pipeline. Loading never reads external weights (they are
memory-mapped on first use, see ``tensors``); saving streams tensors one by one into the data file, so a
model far over 2 GB is never held whole in memory. Writes go to temporary files in the destination folder
and are renamed into place only when everything succeeded: an error leaves no partial output.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from onnxsparse import __version__
from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir import paths, wire
from onnxsparse.ir.checker import check_proto
from onnxsparse.ir.graph import iter_graphs, use_counts
from onnxsparse.ir.index import LayerCache
from onnxsparse.ir.spill import SpillStore
from onnxsparse.ir.tensors import external_info, external_path, inline_origin, mark_inline_origin, nbytes, to_array

#: protobuf's hard limit is 2 GiB; stay clear of it since the graph itself takes some room too.
PROTO_LIMIT = 2**31 - 64 * 2**20
#: tensors smaller than this stay inline when saving with external data (as onnx's own saver does).
EXTERNAL_MIN_BYTES = 1024
MIN_OPSET = 7


@dataclass
class Model:
    """An ONNX model in memory plus the folder its external data (if any) is read from, and the spill store
    its edited external tensors are written to (``onnxsparse.ir.spill``).

    ``store``: a model made over a copy of another's proto (``CopyFrom``: its edited tensors point at the same
    scratch files) passes ``store=other.store``, so the files live as long as either model. The store object
    is cheap; its folder is made on the first spill. ``close()`` (or ``with model:``) deletes the scratch files
    now — for every model sharing the store — instead of when the store is garbage collected.
    """

    proto: onnx.ModelProto
    base_dir: Path | None = None
    source: Path | None = None
    store: SpillStore = field(default_factory=SpillStore, repr=False, compare=False)
    #: the weighted-layer index of the current proto (``onnxsparse.ir.index``); never copied to a new Model
    layer_cache: LayerCache = field(default_factory=LayerCache, init=False, repr=False, compare=False)

    def close(self) -> None:
        """Delete the scratch files of edited tensors (shared with derived models); save first to keep them."""
        self.store.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def opset(self) -> int:
        """The default-domain opset version."""
        return default_opset(self.proto)

    def has_external_data(self) -> bool:
        """True if a tensor's data is in a separate file (weights external only in memory do not count)."""
        return any(
            external_info(t) is not None and not inline_origin(t)
            for g in iter_graphs(self.proto.graph)
            for t in g.initializer
        )


def default_opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise OnnxSparseError("model has no default-domain opset import")


def load_model(path: str | os.PathLike[str], check: bool = True, lazy: bool = False) -> Model:
    """Load a model without its external weights, verifying that it is ONNX and its data files are there.

    ``lazy``: inline weights stay in the file too (``wire.read_model``): the proto costs kilobytes and a weight
    is read (memory-mapped) only where a pass reads it. The commands load this way. ``Model.proto`` then points
    at the model file for those tensors, so it is not a self-contained protobuf: use ``ort_session`` /
    ``save_model`` (or ``materialize``) rather than ``proto.SerializeToString()``. The default keeps the proto
    self-contained for Python callers.
    """
    p = Path(path)
    if not p.exists():
        raise OnnxSparseError(f"no such file: {p}")
    if not p.is_file():
        raise OnnxSparseError(f"not a file: {p}")
    try:
        proto, cut = wire.read_model(p, min_bytes=EXTERNAL_MIN_BYTES if lazy else 2**63)
    except (DecodeError, RuntimeError, ValueError) as e:
        detail = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise OnnxSparseError(f"{p} is not an ONNX model (protobuf parse failed: {detail})") from e
    if not proto.opset_import or (len(proto.graph.node) == 0 and len(proto.graph.output) == 0):
        raise OnnxSparseError(f"{p} is not an ONNX model (no graph or no opset import)")
    model = Model(proto=proto, base_dir=p.resolve().parent, source=p.resolve())
    opset = model.opset
    max_opset = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET or opset > max_opset:
        raise OnnxSparseError(f"unsupported opset {opset}: onnxsparse handles opsets {MIN_OPSET} to {max_opset}")
    for graph in iter_graphs(proto.graph):
        for tensor in graph.initializer:
            info = external_info(tensor)
            if info is None:
                continue
            data = external_path(tensor, model)
            need = int(info.get("offset", 0)) + nbytes(tensor)
            if data.stat().st_size < need:
                raise OnnxSparseError(
                    f"external data file '{data.name}' is truncated: tensor '{tensor.name}' needs {need} bytes"
                )
    for t in cut:
        tensor = next(x for x in proto.graph.initializer if x.name == t.name)
        if t.length != nbytes(tensor):
            need = nbytes(tensor)
            raise OnnxSparseError(f"{p}: tensor '{t.name}' holds {t.length} bytes of data, its dims need {need}")
    if check:
        try:
            check_proto(proto, model, full_check=False)
        except onnx.checker.ValidationError as e:
            raise OnnxSparseError(f"{p} fails the ONNX checker: {_first_line(e)}") from e
    return model


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


def model_nbytes(model: Model) -> int:
    """Bytes of all initializers (inline and external)."""
    return sum(nbytes(t) for g in iter_graphs(model.proto.graph) for t in g.initializer)


def input_files(model: Model) -> list[Path]:
    """The model's own file and every data file its external tensors are read from (as loaded or edited)."""
    files = [model.source] if model.source is not None else []
    seen: set[Path] = set()
    for graph in iter_graphs(model.proto.graph):
        for t in graph.initializer:
            if external_info(t) is not None and model.base_dir is not None:
                data = external_path(t, model)
                if data not in seen:
                    seen.add(data)
                    files.append(data)
    return files


def check_output_path(model: Model, out: Path, flag: str = "output") -> None:
    """Refuse to write ``out`` over the model's own files or into a missing / read-only folder.

    Commands check every output against every input up front with ``paths.check_outputs``; this is the
    library's last line (``save_model`` calls it) for the one output it knows.
    """
    paths.check_outputs(input_files(model), [(flag, out)], output_model=out)


def save_model(model: Model, path: str | os.PathLike[str], external_data: bool | None = None) -> Path:
    """Write ``model`` atomically; returns the path written.

    ``external_data``: True forces a ``<name>.data`` file beside the model, False forces one protobuf (error
    if it cannot fit 2 GB), None decides: external when the input used external data or the weights would
    not fit in one protobuf. After an external save, ``model`` refers to the new data file.
    """
    out = Path(path)
    check_output_path(model, out)
    inline_bytes = model_nbytes(model)
    if external_data is None:
        external_data = model.has_external_data() or inline_bytes + 64 * 2**20 > PROTO_LIMIT
    if not external_data and inline_bytes + 64 * 2**20 > PROTO_LIMIT:
        raise OnnxSparseError("model weights exceed protobuf's 2 GB limit; save with external data")
    offsets: dict[str, int] = {}
    with _atomic_dir_writes(out) as tmp:
        if external_data:
            data_name = paths.data_file(out).name
            _write_external(model, tmp / data_name, data_name)
            with open(tmp / out.name, "wb") as f:
                f.write(model.proto.SerializeToString())
        else:
            _inline_subgraph_external(model)
            with open(tmp / out.name, "wb") as f:
                offsets = wire.write_model(model.proto, f, lambda t: _payload(model, t))
    if external_data:
        model.store.settle_pack(paths.data_file(out))
    model.base_dir = out.resolve().parent
    model.source = out.resolve()
    # The streamed weights are in the new file now: read them from there, as a fresh load would.
    for t in model.proto.graph.initializer:
        if t.name in offsets:
            _point_external(t, out.name, offsets[t.name], nbytes(t))
            mark_inline_origin(t)
    return out


def _payload(model: Model, t: TensorProto) -> wire.Payload | None:
    """A main-graph tensor's bytes for an inline save, streamed from its file (None: it is inline already)."""
    info = external_info(t)
    if info is None:
        return None
    length = nbytes(t)
    return length, wire.file_pieces(external_path(t, model), int(info.get("offset", 0)), length)


@contextlib.contextmanager
def _atomic_dir_writes(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success move its files into ``out.parent``."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:  # e.g. a read-only file system, or root in /proc: os.access cannot tell beforehand
        raise OnnxSparseError(f"cannot write to output folder {out.parent}: {e.strerror or e}") from e
    try:
        yield tmp
        names = sorted(os.listdir(tmp), key=lambda n: n == out.name)  # the model file last
        for name in names:
            os.replace(tmp / name, out.parent / name)
    except OSError as e:
        if e.filename is not None and not str(e.filename).startswith(str(tmp)):
            raise  # about another file (an input's data): its own message says which
        # a full disk, a quota: name the user's path, not the temporary folder
        raise OnnxSparseError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        for name in os.listdir(tmp) if tmp.exists() else []:
            with contextlib.suppress(OSError):
                os.unlink(tmp / name)
        with contextlib.suppress(OSError):
            tmp.rmdir()


_CHUNK = 64 * 2**20


def _write_external(model: Model, data_path: Path, location: str) -> None:
    """Stream every large initializer into one data file and point the proto at it.

    When the edited tensors' spill pack holds exactly the edited data of this model (``SpillStore.link_pack``: the
    usual load → prune → save), the pack is hard-linked as the data file — those tensors keep their offsets
    and are not copied again — and the remaining tensors are appended after it. Otherwise every tensor is
    copied, in initializer order.
    """
    chosen = [
        t
        for graph in iter_graphs(model.proto.graph)
        for t in graph.initializer
        if not (nbytes(t) < EXTERNAL_MIN_BYTES and external_info(t) is None)
    ]
    linked = model.store.link_pack(chosen, data_path)
    placed, offset = linked if linked is not None else (set(), 0)
    with open(data_path, "r+b" if linked is not None else "wb") as f:
        f.seek(offset)
        for t in chosen:
            if id(t) in placed:
                info = external_info(t)
                assert info is not None
                _point_external(t, location, int(info.get("offset", 0)), int(info.get("length", 0)))
                continue
            pad = (-offset) % 4096  # page-align so readers can memory-map each tensor
            f.write(b"\0" * pad)
            offset += pad
            if external_info(t) is not None:
                length = _copy_external(t, model, f)
            else:
                raw = (
                    t.raw_data
                    if t.HasField("raw_data")
                    else onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t)).raw_data
                )
                f.write(raw)
                length = len(raw)
            _point_external(t, location, offset, length)
            offset += length


def _copy_external(t: TensorProto, model: Model, f: BinaryIO) -> int:
    """Append an external tensor's bytes to ``f`` file-to-file; returns the bytes copied.

    ``os.copy_file_range`` copies inside the kernel (no pages mapped into this process, so a 10 GB model
    adds nothing to its resident memory); where it is unavailable, a reused buffer is read and written.
    """
    info = external_info(t)
    assert info is not None
    src = external_path(t, model)
    start = int(info.get("offset", 0))
    length = nbytes(t)
    if src.stat().st_size < start + length:
        raise OnnxSparseError(f"external data for tensor '{t.name}' is truncated in '{src.name}'")
    f.flush()
    dst = f.fileno()
    pos = os.lseek(dst, 0, os.SEEK_CUR)
    done = 0
    with open(src, "rb") as s:
        if hasattr(os, "copy_file_range"):
            with contextlib.suppress(OSError):
                while done < length:
                    n = os.copy_file_range(s.fileno(), dst, length - done, start + done, pos + done)
                    if n <= 0:
                        break
                    done += n
        buf = bytearray(min(_CHUNK, max(length - done, 1)))
        view = memoryview(buf)
        while done < length:
            n = os.preadv(s.fileno(), [view[: min(len(buf), length - done)]], start + done)
            if n <= 0:
                raise OnnxSparseError(f"external data for tensor '{t.name}' ended early in '{src.name}'")
            os.pwrite(dst, view[:n], pos + done)
            done += n
    f.seek(pos + length)
    return length


def _point_external(t: TensorProto, location: str, offset: int, length: int) -> None:
    for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(name)  # type: ignore[arg-type]
    t.ClearField("raw_data")
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key = key
        entry.value = value


def _inline_subgraph_external(model: Model) -> None:
    """Bring subgraphs' external tensors inline (rare and small; the main graph's are streamed by the saver)."""
    for graph in list(iter_graphs(model.proto.graph))[1:]:
        for t in graph.initializer:
            if external_info(t) is not None:
                arr = np.array(to_array(t, model))
                name = t.name
                t.CopyFrom(onnx.numpy_helper.from_array(arr, name))


def ort_session(model: Model, options: Any = None, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    """An onnxruntime ``InferenceSession`` for the in-memory model, external data included, writing no file.

    ORT resolves external data relative to a model *path*, and refuses absolute locations (the scratch files
    of edited tensors, ``tensors.spill_writer``). So every external main-graph initializer is handed to ORT as
    an OrtValue over its memory map (no copy; ORT uses the buffer in place) and the proto is passed as bytes;
    external initializers of subgraphs (rare and small) are inlined into those bytes only. The model is left
    as it was. ORT's own errors propagate: callers word them for their context.
    """
    import onnxruntime as ort

    opts = options if options is not None else ort.SessionOptions()
    names: list[str] = []
    values: list[Any] = []
    restore: list[tuple[TensorProto, TensorProto]] = []
    used = use_counts(model.proto.graph)  # ORT drops unread initializers and then refuses to replace them
    try:
        for depth, graph in enumerate(iter_graphs(model.proto.graph)):
            for t in graph.initializer:
                if external_info(t) is None or not used.get(t.name):
                    continue
                arr = to_array(t, model)
                if depth == 0 and arr.dtype in _ORT_DTYPES:
                    names.append(t.name)
                    values.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr)))
                else:
                    saved = TensorProto()
                    saved.CopyFrom(t)
                    restore.append((t, saved))
                    t.CopyFrom(onnx.numpy_helper.from_array(np.array(arr), t.name))
        if names:
            opts.add_external_initializers(names, values)
        data = model.proto.SerializeToString()
    finally:
        for t, saved in restore:
            t.CopyFrom(saved)
    session = ort.InferenceSession(data, opts, providers=list(providers))
    session._onnxsparse_buffers = values  # the OrtValues (and their memory maps) must outlive the session
    return session


_ORT_DTYPES = frozenset(
    np.dtype(d)
    for d in (np.float32, np.float16, np.float64, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.int64, np.bool_)
)


def record_provenance(model: Model, pipeline_text: str) -> None:
    """Stamp the tool version and the pipeline that made the model into ``metadata_props``."""
    props = {p.key: p for p in model.proto.metadata_props}
    for key, value in (("onnxsparse.version", __version__), ("onnxsparse.pipeline", pipeline_text)):
        if key in props:
            props[key].value = value
        else:
            entry = model.proto.metadata_props.add()
            entry.key = key
            entry.value = value
