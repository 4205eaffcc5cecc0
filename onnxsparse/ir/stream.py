"""Chunked n:m pruning and checking of large external weights: memory follows a chunk, not the tensor.

``prune`` and ``validate`` hold a whole weight and several same-sized temporaries (magnitudes, ranks, masks)
at once — fine for most layers, but a 512 MB weight would cost gigabytes. For a plain float weight stored as
external data and at least ``STREAM_MIN_BYTES`` large, they call this module instead: the tensor is read in
slabs of whole groups straight from its data file (``os.preadv`` into a reused buffer — no memory map, so
pages already processed do not stay resident), each slab is ranked and pruned, and the result is streamed
into a scratch file of the model's spill store (``tensors.spill_writer``). Two worker threads process slabs
(numpy releases the GIL in its loops), each with its own buffers allocated once per tensor (``_Workspace``),
and store them with positional writes; results are gathered in order, with at most a few slabs in flight.
While writing, prune also counts the non-zeros and violating groups of the bytes it writes and records them
on the model's store (``WrittenCheck`` in ``SpillStore.written``), so that a validate right after it answers
from that instead of reading the tensor back.

Measured on the 2-core bench VM (``tools/bench_scale.py``, 2.4 GB model, half the weights grouped along a
long axis, half along the contiguous one): reading + pruning without writing went from 9.1 s to 2.0-2.3 s
with reused buffers (fresh multi-MB temporaries per slab page-faulted on every slab) and the contiguous
per-position magnitudes (the old reduction over a short middle axis was the slow part for post = 1).

The keep-set is identical to ``sparsity.nm_keep``: in each group of ``m`` along the reduction axis the ``n``
largest magnitudes stay, ties go to the lower index, entries outside ``prefer`` rank below every preferred
one. Ranks come from the m·(m-1)/2 pairwise comparisons of a group, a third of the work of ranking every
position against every other.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto

from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.spill import CheckStats, Region, ScratchArray, SpillStore, WrittenCheck
from onnxsparse.ir.tensors import TensorHome, external_info, external_path, spill_writer

#: external float weights at least this large are pruned / checked in slabs
STREAM_MIN_BYTES = 32 * 2**20
#: bytes of weight per slab (the working set is a small multiple of this per thread)
CHUNK_BYTES = 4 * 2**20
WORKERS = 2

_FLOAT_TYPES: dict[int, np.dtype] = {
    TensorProto.FLOAT: np.dtype(np.float32),
    TensorProto.FLOAT16: np.dtype(np.float16),
    TensorProto.DOUBLE: np.dtype(np.float64),
}


def streamable(tensor: TensorProto, values: np.ndarray, scale: object = None, zp: object = None) -> bool:
    """True for a plain (not DequantizeLinear-scaled) float weight in external data of at least
    ``STREAM_MIN_BYTES``."""
    return (
        scale is None
        and zp is None
        and tensor.data_type in _FLOAT_TYPES
        and external_info(tensor) is not None
        and values.nbytes >= STREAM_MIN_BYTES
    )


@dataclass
class _Source:
    """Where a tensor's bytes are and how its groups lie: rows of ``m * post`` elements, one group-row each."""

    path: Path
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]
    rows: int  # pre * K / m
    m: int
    post: int

    @property
    def row_elems(self) -> int:
        return self.m * self.post


def _source(tensor: TensorProto, home: TensorHome, axis: int, m: int) -> _Source:
    info = external_info(tensor)
    assert info is not None
    shape = tuple(int(d) for d in tensor.dims)
    axis %= len(shape)
    if shape[axis] % m:
        raise ValueError(f"axis {axis} of shape {shape} is not divisible by {m}")
    pre = int(np.prod(shape[:axis], dtype=np.int64))
    post = int(np.prod(shape[axis + 1 :], dtype=np.int64))
    return _Source(
        path=external_path(tensor, home),
        offset=int(info.get("offset", 0)),
        dtype=_FLOAT_TYPES[tensor.data_type],
        shape=shape,
        rows=pre * (shape[axis] // m),
        m=m,
        post=post,
    )


def _slab_rows(src: _Source) -> int:
    """Rows per slab: ``CHUNK_BYTES`` of weight, at least one row."""
    return max(1, CHUNK_BYTES // max(src.row_elems * src.dtype.itemsize, 1))


def _slabs(src: _Source) -> list[tuple[int, int]]:
    step = _slab_rows(src)
    return [(r, min(r + step, src.rows)) for r in range(0, src.rows, step)]


def _read(fd: int, src: _Source, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows [start, stop) as a [rows, m, post] array, read with one positional read (thread-safe); into ``out``
    (a flat buffer of at least that many elements) when given, so a worker reuses one buffer for every slab."""
    count = (stop - start) * src.row_elems
    buf = np.empty(count, dtype=src.dtype) if out is None else out[:count]
    want = buf.nbytes
    view = buf.view(np.uint8).data
    got = 0
    pos = src.offset + start * src.row_elems * src.dtype.itemsize
    while got < want:
        n = os.preadv(fd, [view[got:]], pos + got)
        if n <= 0:
            raise OnnxSparseError(f"external data file '{src.path.name}' ended early")
        got += n
    return buf.reshape(stop - start, src.m, src.post)


def _check_finite(values: np.ndarray, name: str) -> None:
    """Refuse NaN/Inf (as ``sparsity.check_finite``): the max and min of the values show both (NaN
    propagates; +Inf is the max, -Inf the min) without a temporary array."""
    if values.size and not (np.isfinite(values.max()) and np.isfinite(values.min())):
        raise OnnxSparseError(f"weight '{name}' has NaN/Inf value(s); fix the model first")


class _Workspace:
    """One worker thread's buffers for slabs of at most ``rows`` rows, allocated once and reused.

    Why: a fresh multi-MB numpy temporary per slab costs a page fault per 4 KiB page every time (the
    allocator hands large blocks back to the kernel), which on this kind of VM cost more than the arithmetic.
    Slabs shorter than ``rows`` (the last one) use leading views of the same buffers.
    """

    def __init__(self, rows: int, m: int, post: int, dtype: np.dtype) -> None:
        shape = (rows, m, post)
        self.x = np.empty(rows * m * post, dtype=dtype)  # flat: ``_read`` fills a prefix
        self.nonzero = np.empty(shape, dtype=bool)
        self.mask = np.empty(shape, dtype=bool)
        self.count_type = np.int8 if m < 128 else np.int32
        self.counts = np.empty((rows, post), dtype=self.count_type)
        self.shape = shape
        self._ranking: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def ranking(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(magnitude [m, rows, post], rank [m, rows, post], scratch [rows, post]) — only pruning needs them."""
        if self._ranking is None:
            rows, m, post = self.shape
            self._ranking = (
                np.empty((m, rows, post), dtype=self.x.dtype),
                np.empty((m, rows, post), dtype=self.count_type),
                np.empty((rows, post), dtype=bool),
            )
        return self._ranking


def _group_counts(nonzero: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Non-zeros per group of a [rows, m, post] bool slab into ``out`` [rows, post]: m - 1 strided adds of the
    bytes (a reduction over a short middle axis is many times slower, see ``sparsity.group_nonzeros``)."""
    m = nonzero.shape[1]
    as_int = nonzero.view(np.int8)
    np.copyto(out, as_int[:, 0])
    for j in range(1, m):
        np.add(out, as_int[:, j], out=out)
    return out


def _rank_keep(
    x: np.ndarray,
    n: int,
    keep: np.ndarray,
    mag: np.ndarray,
    rank: np.ndarray,
    tmp: np.ndarray,
    prefer: np.ndarray | None = None,
    nonzero: np.ndarray | None = None,
) -> np.ndarray:
    """The n:m keep-set of a [rows, m, post] slab ``x`` (values, not magnitudes) into ``keep`` (same layout).

    The magnitudes of each group position are first gathered into one contiguous block (``mag[j] = |x[:, j]|``,
    which also makes short runs — post = 1, groups along the last axis — as fast as long ones). Ranks come from
    the m·(m-1)/2 pairwise comparisons of a group: for j < k, ``j beats k`` iff |x_j| >= |x_k| (ties: the lower
    index wins); rank[j] starts at m-1-j (the positions after it) and each comparison moves one count between
    the pair, so rank[j] = number of positions that beat j. Entries where ``prefer & nonzero`` is False rank
    below every other (magnitude -1), as in ``sparsity.nm_keep``.
    """
    m = x.shape[1]
    rows = x.shape[0]
    mag, rank, tmp = mag[:, :rows], rank[:, :rows], tmp[:rows]
    for j in range(m):
        np.abs(x[:, j], out=mag[j])
        if prefer is not None:
            assert nonzero is not None
            np.logical_and(prefer[:, j], nonzero[:, j], out=tmp)
            np.logical_not(tmp, out=tmp)
            np.copyto(mag[j], -1, where=tmp)
        rank[j].fill(m - 1 - j)
    beats = tmp.view(np.int8)
    for j in range(m):
        for k in range(j + 1, m):
            np.greater_equal(mag[j], mag[k], out=tmp)
            np.add(rank[k], beats, out=rank[k])
            np.subtract(rank[j], beats, out=rank[j])
    for j in range(m):
        np.less(rank[j], n, out=keep[:, j])
    return keep


def keep_pairwise(key: np.ndarray, n: int) -> np.ndarray:
    """Keep-set of n:m along axis 1 of a [rows, m, post] magnitude array (same result as ``nm_keep``),
    returned C-contiguous in the same layout."""
    rows, m, post = key.shape
    keep = np.empty(key.shape, dtype=bool)
    rank_type = np.int8 if m < 128 else np.int32
    return _rank_keep(
        key,
        n,
        keep,
        np.empty((m, rows, post), dtype=key.dtype),
        np.empty((m, rows, post), dtype=rank_type),
        np.empty((rows, post), dtype=bool),
    )


@dataclass
class PruneStats:
    """What pruning one tensor did (the same numbers the in-memory path reports)."""

    groups: int
    violations: int  # groups with more than n non-zeros before pruning
    nonzero_before: int
    nonzero_after: int
    mask: np.ndarray | None  # True = may be non-zero; a read-only memory map of a scratch file


def prune_tensor(
    tensor: TensorProto,
    home: TensorHome,
    axis: int,
    n: int,
    m: int,
    prefer: np.ndarray | None = None,
    want_mask: bool = True,
) -> PruneStats:
    """n:m-prune a large external tensor of the model ``home`` in slabs; the tensor ends up spilled into the
    model's store (unless it already was n:m, in which case it is left untouched and ``violations`` is 0)."""
    src = _source(tensor, home, axis, m)
    store = home.store
    prefer3 = None
    if prefer is not None:
        prefer3 = np.asarray(prefer, dtype=bool).reshape(src.rows, m, src.post)

    stats = PruneStats(groups=src.rows * src.post, violations=0, nonzero_before=0, nonzero_after=0, mask=None)
    mask_out = ScratchArray(store, src.shape, np.dtype(bool)) if want_mask else None
    local = threading.local()
    step = _slab_rows(src)
    violations_after = 0
    committed = False
    try:
        with spill_writer(tensor, store, src.shape, src.dtype, commit=lambda: stats.violations > 0) as write:

            def work(fd: int, start: int, stop: int) -> tuple[int, int, int, int]:
                ws = getattr(local, "ws", None)
                if ws is None:
                    ws = local.ws = _Workspace(step, m, src.post, src.dtype)
                rows = stop - start
                x = _read(fd, src, start, stop, out=ws.x)
                _check_finite(x, tensor.name)
                nonzero = np.not_equal(x, 0, out=ws.nonzero[:rows])
                mask = ws.mask[:rows]
                mag, rank, tmp = ws.ranking()
                pre = prefer3[start:stop] if prefer3 is not None else None
                keep = _rank_keep(x, n, mask, mag, rank, tmp, prefer=pre, nonzero=nonzero)
                counts = _group_counts(nonzero, ws.counts[:rows])
                bad = int(np.count_nonzero(counts > n))
                mask = np.logical_and(keep, nonzero, out=mask)
                # Multiplying by the mask instead of the keep-set gives the same bytes: a kept zero is 0 either
                # way, and "+ 0" turns every -0.0 into +0.0 (as the in-memory path's multiply-then-add).
                np.multiply(x, mask, out=x)  # finite values: exact; 4x faster than np.where here
                np.add(x, 0, out=x)
                at = start * src.row_elems
                write(x, at=at)  # positional writes from the worker: the kernel copies run in parallel
                if mask_out is not None:
                    mask_out.write(mask, at=at)
                nz_before = int(np.count_nonzero(nonzero))
                # Check the bytes just written, as ``check_tensor`` would (``WrittenCheck``): re-using the
                # nonzero buffer, the pruned values' non-zeros and group counts cost two passes over a slab
                # in cache, instead of validate reading the whole tensor back from the file.
                written_nz = np.not_equal(x, 0, out=nonzero)
                after = int(np.count_nonzero(written_nz))
                bad_after = int(np.count_nonzero(_group_counts(written_nz, counts) > n))
                return bad, nz_before, after, bad_after

            # closing(): should this loop fail, the generator shuts its pool down (waiting for running
            # workers) before the scratch files are discarded, so no worker writes to a closed descriptor.
            with contextlib.closing(_run(src, work)) as results:
                for bad, nz_before, nz_after, bad_after in results:
                    stats.violations += bad
                    stats.nonzero_before += nz_before
                    stats.nonzero_after += nz_after
                    violations_after += bad_after
        committed = True
        region = _region(tensor, store) if stats.violations else None
        if region is not None:  # the tensor now points at a committed (hence never rewritten) spill region
            store.written[region] = WrittenCheck(
                axis=axis % len(src.shape),
                n=n,
                m=m,
                stats=CheckStats(
                    groups=stats.groups,
                    violations=violations_after,
                    nonzero=stats.nonzero_after,
                    size=int(np.prod(src.shape, dtype=np.int64)),
                ),
            )
    finally:
        if mask_out is not None and not committed:
            mask_out.discard()
    if mask_out is not None:
        stats.mask = mask_out.finish()
    return stats


def check_tensor(tensor: TensorProto, home: TensorHome, axis: int, n: int, m: int) -> CheckStats:
    """Non-zeros and groups with more than ``n`` non-zeros (``m`` = 0: non-zeros only), read in slabs — or
    answered from the ``WrittenCheck`` that pruning recorded for these very bytes."""
    src = _source(tensor, home, axis, m or 1)
    region = _region(tensor, home.store)
    known = home.store.written.get(region) if region is not None else None
    if known is not None and (known.axis, known.n, known.m) == (axis % len(src.shape), n, m) and src.path.is_file():
        return known.stats
    local = threading.local()
    step = _slab_rows(src)

    def work(fd: int, start: int, stop: int) -> tuple[int, int]:
        ws = getattr(local, "ws", None)
        if ws is None:
            ws = local.ws = _Workspace(step, src.m, src.post, src.dtype)
        rows = stop - start
        x = _read(fd, src, start, stop, out=ws.x)
        _check_finite(x, tensor.name)
        nonzero = np.not_equal(x, 0, out=ws.nonzero[:rows])
        bad = 0
        if m:
            counts = _group_counts(nonzero, ws.counts[:rows])
            bad = int(np.count_nonzero(counts > n))
        return bad, int(np.count_nonzero(nonzero))

    bad = nz = 0
    for b, z in _run(src, work):
        bad += b
        nz += z
    size = int(np.prod(src.shape, dtype=np.int64))
    return CheckStats(groups=src.rows * src.post if m else 0, violations=bad, nonzero=nz, size=size)


def _region(tensor: TensorProto, store: SpillStore) -> Region | None:
    """(scratch file, offset, length) of a tensor spilled into ``store`` (and still there), or None."""
    info = external_info(tensor)
    if info is None or not store.holds(info.get("location", "")):  # a moved pack is a user's file now
        return None
    return info.get("location", ""), int(info.get("offset", 0)), int(info.get("length", 0))


def _run(src: _Source, work: Callable[..., tuple]) -> Generator[tuple, None, None]:  # type: ignore[type-arg]
    """``work(fd, start, stop)`` over every slab on ``WORKERS`` threads; results in slab order."""
    slabs = _slabs(src)
    fd = os.open(src.path, os.O_RDONLY)
    try:
        if WORKERS <= 1 or len(slabs) < 2:
            for start, stop in slabs:
                yield work(fd, start, stop)
            return
        with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="onnxsparse-stream") as pool:
            pending: deque[Future[tuple]] = deque()  # type: ignore[type-arg]
            it = iter(slabs)
            try:
                for start, stop in it:
                    pending.append(pool.submit(work, fd, start, stop))
                    if len(pending) > WORKERS:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()
    finally:
        os.close(fd)
