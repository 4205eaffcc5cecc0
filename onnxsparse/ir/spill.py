"""A model's scratch storage for the new bytes of edited external tensors (``SpillStore``).

When a pass rewrites an external tensor of a large model, its new bytes are *spilled* to a private scratch
file and the tensor points there by absolute path (``tensors.spill_writer``), so editing every weight of a
10 GB model never holds more than one tensor in memory. Spilled tensors share one page-aligned "pack" file
(``_SpillPack``), which ``save_model`` can turn into the output data file without copying it again.

Why an object owned by the model, not module state: two models in one process (a teacher and a student, a
test and the next) then never share a pack — the pack link of one save cannot be spoilt by the other's
edits — and every function that resolves a scratch location is handed the store it may resolve against, so
a location read from a model file can only name a file of a store the caller holds (never an arbitrary
absolute path).

Lifetime. A ``Model`` owns its store (``Model.store``); the store object is cheap and its folder is made on
the first spill only. Files must outlive every proto that points at them, and a proto copied with
``CopyFrom`` (tests, ``run_ort`` helpers, a caller keeping the unpruned model, a pass's working copy) points
at the same files: so no tensor owns a file, models derived from one another *share* the store (whoever
builds a ``Model`` over a copied proto passes ``store=model.store``), and the folder goes when the store
does — ``SpillStore.close()`` (``Model.close()``, or leaving ``with model:``), or else a ``weakref.finalize``
on the store when the last model holding it is garbage collected (or at interpreter exit). Arrays already
read (memory maps) stay valid after that: the kernel keeps an unlinked file's pages while they are mapped.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto

from onnxsparse.errors import OnnxSparseError

#: (scratch file, offset, length) of a spilled tensor's bytes
Region = tuple[str, int, int]

_PAGE = 4096
#: Largest single write into a scratch file. Measured on the 2-core VM (kernel 6.18, ext4, 1 GiB of new file
#: data after 8 s idle): 2 MiB or larger pieces 0.45 GB/s, 64 KiB-1 MiB pieces 2.4-2.9 GB/s — a write covering
#: an aligned 2 MiB range gets a 2 MiB page-cache folio, and fresh 2 MiB blocks of guest memory are slow to
#: fault in here. Pruning the 2.4 GB bench model (weights into the pack + masks into their own files):
#: 1 MiB pieces 4.6-4.9 s, 256 KiB 3.5-3.9 s, 128 KiB 2.8-3.2 s, 64 KiB 3.3 s (noisy shared machine).
_WRITE_PIECE = 256 * 2**10


class _SpillPack:
    """One growing scratch file holding a store's spilled tensors, each at a page-aligned offset.

    Why one file: ``save_model`` can then hard-link it as the output data file (``SpillStore.link_pack``)
    instead of copying every edited weight a second time — on a large model, writing new file data is the
    dominant cost. Regions are reserved under a lock, written with positional writes (safe from several
    threads), and committed when the tensor points at them. A pack that has been linked into an output is
    sealed: it is never written again (later spills go to a new pack), so the output cannot change behind the
    user's back.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies: it may become an output
        self.end = 0
        self.regions: dict[int, int] = {}  # committed: offset -> length
        self.dead = 0  # bytes of abandoned regions that could not be given back
        self.sealed = False
        self.lock = threading.Lock()

    def reserve(self, length: int) -> int:
        with self.lock:
            if self.sealed:
                raise RuntimeError("spill pack is sealed")
            offset = -(-self.end // _PAGE) * _PAGE
            self.end = offset + length
            return offset

    def commit(self, offset: int, length: int) -> None:
        with self.lock:
            self.regions[offset] = length

    def release(self, offset: int, length: int) -> None:
        """Give an abandoned region back (truncating the file) when it is the last one; else count it dead."""
        with self.lock:
            if self.end == offset + length and not self.sealed:
                self.end = offset
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, offset)
            else:
                self.dead += length

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _remove(folders: list[Path], packs: list[_SpillPack]) -> None:
    """The store's finalizer: close the packs' descriptors and delete the scratch folders. It holds these
    lists, never the store itself (which would keep the store alive)."""
    for pack in packs:
        pack.close()
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


class SpillStore:
    """The scratch folder, pack, file counter and moved-pack map of one model (and the models derived from it).

    ``written`` holds the n:m checks ``stream.prune_tensor`` made of the bytes it wrote into this store's
    regions (``WrittenCheck``), so a validate right after it need not read them back: a fact about
    bytes in this store, so it lives and dies with it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._folder: Path | None = None
        self._folders: list[Path] = []  # every folder made (one that vanished is replaced); the finalizer's
        self._packs: list[_SpillPack] = []  # every pack opened; the finalizer closes them
        self._pack: _SpillPack | None = None
        #: packs that became output data files: scratch path -> (output path, (st_dev, st_ino) of that file)
        self._moved: dict[str, tuple[Path, tuple[int, int]]] = {}
        self._finalizer: weakref.finalize | None = None  # type: ignore[type-arg]
        self._closed = False
        self.written: dict[Region, WrittenCheck] = {}

    # ------------------------------------------------------------------------------------------ lifetime

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def folder(self) -> Path | None:
        """The current scratch folder, or None before the first spill."""
        return self._folder

    def close(self) -> None:
        """Delete the scratch files now. Tensors (of any model sharing this store) that still point at them
        can no longer be read: save or copy what is needed first. Idempotent."""
        with self._lock:
            self._closed = True
            self._pack = None
            self.written.clear()
            finalizer = self._finalizer
        if finalizer is not None:
            finalizer()

    def __deepcopy__(self, memo: dict[int, object]) -> SpillStore:
        """A deep-copied model's proto points at the same scratch files, so the copy shares the store."""
        return self

    def _folder_locked(self) -> Path:
        if self._closed:
            raise RuntimeError("the model's spill store is closed")
        if self._folder is None or not self._folder.is_dir():
            self._folder = Path(tempfile.mkdtemp(prefix="onnxsparse-spill-")).resolve()
            self._folders.append(self._folder)
            if self._finalizer is None:
                self._finalizer = weakref.finalize(self, _remove, self._folders, self._packs)
        return self._folder

    def new_file(self) -> Path:
        """A fresh file name in the scratch folder (made on first use)."""
        with self._lock:
            return self._folder_locked() / f"t{next(self._counter)}.bin"

    def pack(self) -> _SpillPack:
        """The pack new spills go to (a new one once the last was sealed, or its folder vanished)."""
        with self._lock:
            pack = self._pack
            if pack is None or pack.sealed or not pack.path.parent.is_dir():
                pack = _SpillPack(self._folder_locked() / f"pack{next(self._counter)}.bin")
                self._packs.append(pack)
                self._pack = pack
            return pack

    # ---------------------------------------------------------------------------------------- resolving

    def _ours(self, path: Path) -> bool:
        return path.parent in self._folders

    def resolve(self, location: str) -> Path | None:
        """The file an absolute ``location`` names when it is one of this store's scratch files — or a pack
        that became a saved model's data file (``settle_pack``) — else None.

        Only files inside this store's own folders are accepted, so a model file cannot use an absolute
        location to make us read an arbitrary path.
        """
        if not os.path.isabs(location):
            return None
        moved = self._moved.get(location)
        if moved is not None:
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
        if not self._ours(path):
            return None
        if self._closed:
            raise OnnxSparseError("the model holding this edited tensor was closed; its scratch data is gone")
        return path if path.is_file() else None

    def holds(self, location: str) -> bool:
        """True if ``location`` is a live scratch file of this store (not a pack that became a user's file)."""
        return location not in self._moved and not self._closed and self.resolve(location) is not None

    # ---------------------------------------------------------------------------------- pack into output

    def link_pack(self, tensors: list[TensorProto], dest: Path) -> tuple[set[int], int] | None:
        """Hard-link the current pack as ``dest`` when it holds exactly the spilled data of ``tensors``.

        ``tensors`` are the ones a saver is about to write to one external data file. When every committed
        region of the pack is referenced by one of them (no stale data from tensors edited again or dropped,
        nothing abandoned) and ``dest`` is on the pack's file system, the pack becomes ``dest`` without copying
        a byte and is sealed. Returns (ids of the tensors whose bytes are now in ``dest`` at their current
        offsets, the file's length), or None: then nothing happened and the caller copies as usual.
        """
        pack = self._pack
        if pack is None or pack.sealed or pack.dead or not pack.regions:
            return None
        location = str(pack.path)
        placed: set[int] = set()
        used: dict[int, int] = {}
        for t in tensors:
            if t.data_location != TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            if info.get("location") != location:
                continue
            offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
            if pack.regions.get(offset) != length:
                return None
            placed.add(id(t))
            used[offset] = length
        if used != pack.regions:
            return None
        with pack.lock:
            if pack.sealed:
                return None
            try:
                os.link(pack.path, dest)
            except OSError:  # another file system (EXDEV), or links not supported: copy instead
                return None
            pack.sealed = True
            return placed, pack.end

    def settle_pack(self, dest: Path) -> None:
        """After a save that linked the pack (``link_pack``) has put ``dest`` in place: drop the pack's own
        name, so the output data file has one link (onnx's checker refuses hard-linked data files), and
        resolve the pack's path to ``dest`` from now on — protos copied before the save still point at it.
        Should ``dest`` later be removed or replaced, such a tensor says so instead of reading another file's
        bytes. Checks recorded for the pack's regions are dropped: it is a user's file now."""
        pack = self._pack
        if pack is None or not pack.sealed or str(pack.path) in self._moved:
            return
        try:
            if not os.path.samefile(pack.path, dest):
                return
            st = dest.stat()
        except OSError:
            return
        location = str(pack.path)
        self._moved[location] = (dest.resolve(), (st.st_dev, st.st_ino))
        for region in [r for r in self.written if r[0] == location]:
            del self.written[region]
        with contextlib.suppress(OSError):
            os.unlink(pack.path)


class ScratchArray:
    """An array written chunk by chunk (C order) into a scratch file and read back as a read-only memory map.

    For results as large as a weight that are needed later but not now (pruning masks): they cost disk, not
    resident memory. ``write`` chunks, then ``finish()`` → ``np.memmap`` (or ``discard()``). With
    ``pack=True`` the array is a region of the store's spill pack (``_SpillPack``) rather than its own file.
    """

    def __init__(self, store: SpillStore, shape: tuple[int, ...], dtype: np.dtype, pack: bool = False) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.count = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        self.written = 0
        self._lock = threading.Lock()
        self._closed = False
        self._pack = store.pack() if pack else None
        if self._pack is not None:
            self.path = self._pack.path
            self.offset = self._pack.reserve(self.count * self.dtype.itemsize)
            self._fd = self._pack.fd
        else:
            self.path = store.new_file()
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
        """Mark a pack region as holding a tensor's data (``SpillStore.link_pack`` checks them)."""
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


@dataclass(frozen=True)
class CheckStats:
    """Non-zeros and groups with more than ``n`` non-zeros of one tensor (``check_tensor``)."""

    groups: int
    violations: int
    nonzero: int
    size: int


@dataclass(frozen=True)
class WrittenCheck:
    """The n:m check ``prune_tensor`` made of the bytes it wrote into one spill region, counted from the very
    buffer it wrote, so that a validate right after it need not read a large tensor back.

    Kept on the model's store (``SpillStore.written``, by region): it is a fact about bytes in that store.
    Sound because a committed spill region is never written again (``_SpillPack``; regions are only
    handed back when abandoned) and lives in the store's private folder; the store drops the checks of a pack
    that became a saved output (``SpillStore.settle_pack``), and a tensor that points anywhere else is read
    and checked as usual.
    """

    axis: int  # normalised (non-negative)
    n: int
    m: int
    stats: CheckStats
