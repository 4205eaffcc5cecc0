"""Reading and writing initializer data without loading a whole model's weights.

Models are loaded with ``load_external_data=False`` so that a 10 GB model's graph costs kilobytes. A tensor
stored outside the protobuf is read on demand through ``numpy.memmap``. A tensor a pass rewrites is stored
inline again (``raw_data``) when it was inline before; when it was external (a large model), its new bytes
are *spilled* to a private scratch file and the tensor points there, so editing every weight of a 10 GB
model never holds more than one tensor in memory. Spilled tensors share one page-aligned "pack" file; when
a save's tensors are exactly what the pack holds (load → prune → save), the saver turns the pack into the
output data file (hard link, then the pack's name is dropped) instead of copying every edited byte again;
otherwise it streams spilled tensors into the output data file like any other external tensor. Every pass
reads weights through ``to_array`` and writes them through ``set_array`` (or ``spill_writer`` for chunked
writes) so this policy lives in one place.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
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


#: an ``external_data`` key of ours: the tensor is inline in the model file it came from, and external only in
#: memory (left in the file by ``wire.read_model``, or spilled after an edit), so a save keeps it inline
INLINE_KEY = "onnxsparse.inline"


def inline_origin(tensor: TensorProto) -> bool:
    """True if the tensor is external only in memory (``INLINE_KEY``)."""
    return tensor.data_location == TensorProto.EXTERNAL and any(e.key == INLINE_KEY for e in tensor.external_data)


def mark_inline_origin(tensor: TensorProto) -> None:
    entry = tensor.external_data.add()
    entry.key, entry.value = INLINE_KEY, "1"


def external_path(tensor: TensorProto, base_dir: Path | None) -> Path:
    """Where an external tensor's bytes live; refuses paths that escape ``base_dir``."""
    info = external_info(tensor)
    assert info is not None
    location = info.get("location", "")
    spilled = spill_path(location)
    if spilled is not None:
        return spilled
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


def set_array(tensor: TensorProto, array: np.ndarray, spill: bool | None = None) -> None:
    """Replace a tensor's values in place (name kept).

    ``spill``: None (default) keeps the tensor where it was — inline stays inline (the saver moves large
    tensors out again), external goes to a scratch file (``spill_writer``) so that a large model never
    gathers its edited weights in memory; True/False force either. An edited tensor never points at a file
    that still holds its old bytes.
    """
    array = np.asarray(array)
    if spill is None:
        spill = external_info(tensor) is not None and array.nbytes >= SPILL_MIN_BYTES
    dtype = array.dtype
    if spill and dtype in _TYPE_OF and tensor.data_type != TensorProto.BFLOAT16:
        with spill_writer(tensor, array.shape, dtype) as write:
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
_SPILL_DIR: Path | None = None
_SPILL_COUNTER = itertools.count()


def _spill_dir() -> Path:
    """The process's scratch folder (created on first use, removed at exit).

    Scratch files are never deleted earlier: a proto copied with ``CopyFrom`` (tests, ``run_ort`` helpers,
    a caller keeping the unpruned model) points at the same files, so no single tensor owns one.
    """
    global _SPILL_DIR
    if _SPILL_DIR is None or not _SPILL_DIR.is_dir():
        _SPILL_DIR = Path(tempfile.mkdtemp(prefix="onnxsparse-spill-")).resolve()
        atexit.register(shutil.rmtree, _SPILL_DIR, True)
    return _SPILL_DIR


def spill_path(location: str) -> Path | None:
    """The scratch file ``location`` names, if it is one of this process's spill files (else None).

    Only files inside our own scratch folder are accepted, so a model file cannot use an absolute location
    to make us read an arbitrary path.
    """
    if _SPILL_DIR is None or not os.path.isabs(location):
        return None
    moved = _MOVED.get(location)
    if moved is not None:  # a pack that became a saved model's data file (``settle_spill_pack``)
        dest, ident = moved
        try:
            st = dest.stat()
        except OSError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != ident:
            raise OnnxSparseError(
                f"edited tensor data was saved into {dest}, which has since been removed or "
                "replaced; reload the model from a saved file"
            )
        return dest
    path = Path(location)
    if path.parent != _SPILL_DIR or not path.is_file():
        return None
    return path


def is_spilled(tensor: TensorProto) -> bool:
    """True if the tensor's bytes live in a scratch file (it was edited and not yet saved)."""
    info = external_info(tensor)
    return info is not None and spill_path(info.get("location", "")) is not None


_PAGE = 4096
#: Largest single write into a scratch file. Measured on the 2-core VM (kernel 6.18, ext4, 1 GiB of new file
#: data after 8 s idle): 2 MiB or larger pieces 0.45 GB/s, 64 KiB-1 MiB pieces 2.4-2.9 GB/s — a write covering
#: an aligned 2 MiB range gets a 2 MiB page-cache folio, and fresh 2 MiB blocks of guest memory are slow to
#: fault in here. Pruning the 2.4 GB bench model (weights into the pack + masks into their own files):
#: 1 MiB pieces 4.6-4.9 s, 256 KiB 3.5-3.9 s, 128 KiB 2.8-3.2 s, 64 KiB 3.3 s (noisy shared machine).
_WRITE_PIECE = 256 * 2**10


class _SpillPack:
    """One growing scratch file holding the process's spilled tensors, each at a page-aligned offset.

    Why one file: ``save_model`` can then hard-link it as the output data file (``link_spill_pack``) instead
    of copying every edited weight a second time — on a large model, writing new file data is the dominant
    cost. Regions are reserved under a lock, written with positional writes (safe from several threads), and
    committed when the tensor points at them. A pack that has been linked into an output is sealed: it is
    never written again (later spills go to a new pack), so the output cannot change behind the user's back.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies: it may become an output
        atexit.register(self.close)
        self.end = 0
        self.regions: dict[int, int] = {}  # committed: offset -> length
        self.dead = 0  # bytes of abandoned regions that could not be given back
        self.sealed = False
        self._lock = threading.Lock()

    def reserve(self, length: int) -> int:
        with self._lock:
            if self.sealed:
                raise RuntimeError("spill pack is sealed")
            offset = -(-self.end // _PAGE) * _PAGE
            self.end = offset + length
            return offset

    def commit(self, offset: int, length: int) -> None:
        with self._lock:
            self.regions[offset] = length

    def release(self, offset: int, length: int) -> None:
        """Give an abandoned region back (truncating the file) when it is the last one; else count it dead."""
        with self._lock:
            if self.end == offset + length and not self.sealed:
                self.end = offset
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, offset)
            else:
                self.dead += length

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


_PACK: _SpillPack | None = None
_PACK_LOCK = threading.Lock()


def _spill_pack() -> _SpillPack:
    """The pack new spills go to (a new one once the last was sealed, or its folder vanished)."""
    global _PACK
    with _PACK_LOCK:
        if _PACK is None or _PACK.sealed or not _PACK.path.parent.is_dir():
            _PACK = _SpillPack(_spill_dir() / f"pack{next(_SPILL_COUNTER)}.bin")
        return _PACK


#: packs that became output data files: scratch path -> (output path, (st_dev, st_ino) of that file)
_MOVED: dict[str, tuple[Path, tuple[int, int]]] = {}


def link_spill_pack(tensors: list[TensorProto], dest: Path) -> tuple[set[int], int] | None:
    """Hard-link the current spill pack as ``dest`` when it holds exactly the spilled data of ``tensors``.

    ``tensors`` are the ones a saver is about to write to one external data file. When every committed region
    of the pack is referenced by one of them (no stale data from tensors edited again or dropped, nothing
    abandoned) and ``dest`` is on the pack's file system, the pack becomes ``dest`` without copying a byte and
    is sealed. Returns (ids of the tensors whose bytes are now in ``dest`` at their current offsets, the
    file's length), or None: then nothing happened and the caller copies as usual.
    """
    pack = _PACK
    if pack is None or pack.sealed or pack.dead or not pack.regions:
        return None
    location = str(pack.path)
    placed: set[int] = set()
    used: dict[int, int] = {}
    for t in tensors:
        info = external_info(t)
        if info is None or info.get("location") != location:
            continue
        offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        if pack.regions.get(offset) != length:
            return None
        placed.add(id(t))
        used[offset] = length
    if used != pack.regions:
        return None
    with pack._lock:
        if pack.sealed:
            return None
        try:
            os.link(pack.path, dest)
        except OSError:  # another file system (EXDEV), or links not supported: copy instead
            return None
        pack.sealed = True
        return placed, pack.end


def settle_spill_pack(dest: Path) -> None:
    """After a save that linked the pack (``link_spill_pack``) has put ``dest`` in place: drop the pack's own
    name, so the output data file has one link (onnx's checker refuses hard-linked data files), and resolve
    the pack's path to ``dest`` from now on — protos copied before the save still point at it. Should
    ``dest`` later be removed or replaced, such a tensor says so instead of reading another file's bytes."""
    pack = _PACK
    if pack is None or not pack.sealed or str(pack.path) in _MOVED:
        return
    try:
        if not os.path.samefile(pack.path, dest):
            return
        st = dest.stat()
    except OSError:
        return
    _MOVED[str(pack.path)] = (dest.resolve(), (st.st_dev, st.st_ino))
    with contextlib.suppress(OSError):
        os.unlink(pack.path)


class ScratchArray:
    """An array written chunk by chunk (C order) into a scratch file and read back as a read-only memory map.

    For results as large as a weight that are needed later but not now (pruning masks): they cost disk, not
    resident memory. ``write`` chunks, then ``finish()`` → ``np.memmap`` (or ``discard()``). With
    ``pack=True`` the array is a region of the shared spill pack (``_SpillPack``) rather than its own file.
    """

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, pack: bool = False) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.count = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        self.written = 0
        self._lock = threading.Lock()
        self._closed = False
        self._pack = _spill_pack() if pack else None
        if self._pack is not None:
            self.path = self._pack.path
            self.offset = self._pack.reserve(self.count * self.dtype.itemsize)
            self._fd = self._pack.fd
        else:
            self.path = _spill_dir() / f"t{next(_SPILL_COUNTER)}.bin"
            self.offset = 0
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def write(self, chunk: np.ndarray, at: int | None = None) -> None:
        """Append ``chunk`` — or, with ``at`` (an element offset), write it there: positional writes are
        thread-safe, so workers can store their slabs in any order."""
        flat = np.ascontiguousarray(chunk, dtype=self.dtype).reshape(-1)
        with self._lock:
            if self.written + flat.size > self.count or (at is not None and at + flat.size > self.count):
                raise ValueError(f"more than {self.count} elements written to a scratch array")
            if at is None:
                at = self.written
            self.written += flat.size
        data = flat.view(np.uint8).data
        done, pos = 0, self.offset + at * self.dtype.itemsize
        while done < len(data):
            done += os.pwrite(self._fd, data[done : done + _WRITE_PIECE], pos + done)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._pack is None:
                os.close(self._fd)
        if self.written != self.count:
            raise ValueError(f"{self.written} of {self.count} elements written")

    def commit(self) -> None:
        """Mark a pack region as holding a tensor's data (``link_spill_pack`` checks them)."""
        if self._pack is not None:
            self._pack.commit(self.offset, self.count * self.dtype.itemsize)

    def finish(self) -> np.ndarray:
        self.close()
        if self.count == 0:
            return np.zeros(self.shape, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=self.shape, offset=self.offset)

    def discard(self) -> None:
        if not self._closed:
            self._closed = True
            if self._pack is None:
                os.close(self._fd)
        if self._pack is not None:
            self._pack.release(self.offset, self.count * self.dtype.itemsize)
        else:
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def spill_writer(
    tensor: TensorProto, shape: tuple[int, ...], dtype: np.dtype, commit: Callable[[], bool] | None = None
) -> Iterator[Callable[..., None]]:
    """Stream a tensor's new values into a scratch file, chunk by chunk, in C order.

    ``with spill_writer(t, shape, dtype) as write: write(chunk); ...``: each chunk continues where the last
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
    scratch = ScratchArray(shape, dtype, pack=True)
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
