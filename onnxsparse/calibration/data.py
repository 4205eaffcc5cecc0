"""Calibration data: every accepted form normalised into validated batches for ONNX Runtime.

Calibration data comes from a ``.npz`` file (keys = input names, first axis = samples), a directory of
``.npy``/``.npz`` files, an iterable of ``{input name: array}`` dicts, or an ORT ``CalibrationDataReader``;
``open_calibration`` normalises all of them into validated batches. The checks (``check_batch``) name the input,
the batch and what was expected, so a wrong file fails with one line before any model runs, rather than with
ONNX Runtime's own message from inside the first ``run``.

Separate from ``onnxsparse.calibration.histogram`` (the streaming histogram and the collection loop) because the readers
and checks are shared by every command that feeds data to a model: ``calibrate``/``qdq``, the pruning statistics,
``compare``, ``sensitivity`` and the fine-tune data.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.model_io import Model

log = logging.getLogger("onnxsparse.calibration.histogram")

#: a single .npz holding all samples is cut into batches of this many samples unless told otherwise
DEFAULT_NPZ_BATCH = 32

Dim = int | str | None


# ---------------------------------------------------------------------------------------------- model inputs


@dataclass(frozen=True)
class InputSpec:
    """A model input as calibration data must match it."""

    name: str
    dtype: np.dtype[Any] | None
    shape: tuple[Dim, ...] | None
    optional: bool = False  # backed by an initializer: data may override it but need not

    def describe(self) -> str:
        dims = "?" if self.shape is None else "x".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype if self.dtype is not None else '?'}[{dims}]"


def value_dtype(vi: onnx.ValueInfoProto) -> np.dtype[Any] | None:
    """The numpy dtype of a tensor value, or None where it is not a tensor or has no (known) element type."""
    tt = vi.type.tensor_type
    if not (vi.type.HasField("tensor_type") and tt.elem_type):
        return None
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    except (KeyError, TypeError, ValueError):
        return None


def input_specs(proto: onnx.ModelProto) -> dict[str, InputSpec]:
    """The main graph's inputs (those with an initializer of the same name are optional)."""
    inits = {t.name for t in proto.graph.initializer}
    specs: dict[str, InputSpec] = {}
    for vi in proto.graph.input:
        tt = vi.type.tensor_type
        dtype = value_dtype(vi)
        shape: tuple[Dim, ...] | None = None
        if tt.HasField("shape"):
            shape = tuple(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs[vi.name] = InputSpec(vi.name, dtype, shape, optional=vi.name in inits)
    return specs


def batch_layout(specs: Mapping[str, InputSpec]) -> tuple[frozenset[str], int | None]:
    """(inputs that carry samples on their first axis, the model's fixed batch size or None).

    Inputs whose first axis is symbolic carry samples; an input with a fixed first dim next to them (an
    auxiliary table) is fed whole with every batch. When every first dim is fixed and they agree, that is the
    model's fixed batch size and every input carries samples.
    """
    required = [s for s in specs.values() if not s.optional and s.shape]
    dynamic = frozenset(s.name for s in required if s.shape is not None and not isinstance(s.shape[0], int))
    if dynamic:
        return dynamic, None
    firsts = {s.shape[0] for s in required if s.shape is not None}
    if len(firsts) == 1:
        return frozenset(s.name for s in required), int(firsts.pop())  # type: ignore[arg-type]
    return frozenset(), None


def check_batch(
    batch: Any, specs: Mapping[str, InputSpec], where: str, regrouped: Collection[str] = ()
) -> dict[str, np.ndarray]:
    """One batch as the model takes it, or OnnxSparseError naming what does not fit and where.

    ``regrouped``: inputs whose sample axis is left unchecked (chunks that are regrouped into batches later).
    """
    if not isinstance(batch, Mapping):
        raise OnnxSparseError(
            f"calibration {where} is a {type(batch).__name__}, expected a dict of input name -> array"
        )
    known = ", ".join(s.describe() for s in specs.values() if not s.optional) or "none"
    for name in batch:
        if name not in specs:
            raise OnnxSparseError(f"calibration {where} has '{name}', which is not a model input (inputs: {known})")
    out: dict[str, np.ndarray] = {}
    for spec in specs.values():
        if spec.name not in batch:
            if spec.optional:
                continue
            raise OnnxSparseError(f"calibration {where} lacks model input '{spec.name}' (inputs: {known})")
        value = batch[spec.name]
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        if spec.dtype is not None and arr.dtype != spec.dtype:
            raise OnnxSparseError(
                f"calibration {where}: input '{spec.name}' is {arr.dtype}, the model takes {spec.dtype} "
                f"(convert with .astype(np.{spec.dtype.name}))"
            )
        if spec.shape is not None:
            if arr.ndim != len(spec.shape):
                raise OnnxSparseError(
                    f"calibration {where}: input '{spec.name}' has shape {list(arr.shape)} (rank {arr.ndim}), "
                    f"the model takes rank {len(spec.shape)} ({spec.describe()}); the first axis holds samples"
                )
            for i, (got, want) in enumerate(zip(arr.shape, spec.shape, strict=True)):
                if isinstance(want, int) and got != want and (i or spec.name not in regrouped):
                    raise OnnxSparseError(
                        f"calibration {where}: input '{spec.name}' has shape {list(arr.shape)}, "
                        f"dim {i} must be {want} ({spec.describe()})"
                    )
        out[spec.name] = arr
    if not out:
        raise OnnxSparseError(f"calibration {where} is empty")
    return out


# ---------------------------------------------------------------------------------------------- readers


Chunk = dict[str, np.ndarray]


def _rows(chunk: Mapping[str, np.ndarray], batched: frozenset[str], where: str) -> int:
    counts = {name: (a.shape[0] if a.ndim else None) for name, a in chunk.items() if name in batched}
    values = set(counts.values())
    if not counts:
        raise OnnxSparseError(f"calibration {where}: no model input has a sample axis to batch along")
    if None in values:
        raise OnnxSparseError(f"calibration {where}: a scalar input has no sample axis to batch along")
    if len(values) != 1:
        raise OnnxSparseError(
            f"calibration {where}: inputs disagree on the number of samples (first axis): "
            + ", ".join(f"{n}={c}" for n, c in counts.items())
        )
    return int(values.pop())  # type: ignore[arg-type]


def _slice(chunk: Chunk, batched: frozenset[str], sl: slice) -> Chunk:
    return {k: (v[sl] if k in batched else v) for k, v in chunk.items()}


def _limit(
    chunks: Iterable[tuple[str, Chunk]], samples: int | None, batched: frozenset[str]
) -> Iterator[tuple[str, Chunk]]:
    """Stop after ``samples`` samples (cutting the last chunk)."""
    if samples is None:
        yield from chunks
        return
    left = samples
    for where, chunk in chunks:
        if left <= 0:
            return
        n = _rows(chunk, batched, where)
        if n > left:
            chunk = _slice(chunk, batched, slice(0, left))
            n = left
        left -= n
        yield where, chunk


def _rebatch(
    chunks: Iterable[tuple[str, Chunk]], size: int, exact: bool, batched: frozenset[str]
) -> Iterator[tuple[str, Chunk]]:
    """Regroup samples into batches of ``size`` (views where a chunk already holds whole batches).

    ``exact``: the model's batch axis is fixed, so a short last batch is dropped (and logged) instead of fed.
    Inputs without a sample axis are taken from the newest chunk.
    """
    pending: list[Chunk] = []
    rows = 0
    index = 0
    for where, chunk in chunks:
        n = _rows(chunk, batched, where)
        if n == 0:
            continue
        pending.append(chunk)
        rows += n
        while rows >= size:
            parts: list[Chunk] = []
            need = size
            while need:
                head = pending[0]
                hn = _rows(head, batched, where)
                if hn <= need:
                    parts.append(pending.pop(0))
                    need -= hn
                else:
                    parts.append(_slice(head, batched, slice(0, need)))
                    pending[0] = _slice(head, batched, slice(need, None))
                    need = 0
            rows -= size
            index += 1
            yield f"batch {index} (from {where})", _concat(parts, batched)
    if rows:
        if exact:
            log.warning("dropping the last %d calibration samples: the model's batch size is fixed to %d", rows, size)
        else:
            index += 1
            yield f"batch {index} (last)", _concat(pending, batched)


def _concat(parts: list[Chunk], batched: frozenset[str]) -> Chunk:
    if len(parts) == 1:
        return parts[0]
    return {k: (np.concatenate([p[k] for p in parts], axis=0) if k in batched else parts[-1][k]) for k in parts[0]}


def _npz_items(path: Path) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise OnnxSparseError(f"cannot read calibration file {path}: {str(e).splitlines()[0][:160]}") from e
    yield path.name, data


def _npy_item(path: Path, specs: Mapping[str, InputSpec]) -> tuple[str, dict[str, np.ndarray]]:
    required = [s.name for s in specs.values() if not s.optional]
    if len(required) != 1:
        raise OnnxSparseError(
            f"calibration file {path.name} is .npy but the model has {len(required)} inputs "
            f"({', '.join(required)}): use .npz files keyed by input name"
        )
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise OnnxSparseError(f"cannot read calibration file {path}: {str(e).splitlines()[0][:160]}") from e
    return path.name, {required[0]: arr}


def _dir_items(path: Path, specs: Mapping[str, InputSpec]) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz") and p.is_file())
    if not files:
        raise OnnxSparseError(f"calibration folder {path} holds no .npy or .npz files")
    for p in files:
        if p.suffix == ".npz":
            yield from _npz_items(p)
        else:
            yield _npy_item(p, specs)


def _reader_items(reader: Any) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    i = 0
    while True:
        item = reader.get_next()
        if not item:
            return
        i += 1
        yield f"item {i}", item


def _iter_items(items: Iterable[Any]) -> Iterator[tuple[str, Any]]:
    for i, item in enumerate(items, 1):
        yield f"item {i}", item


@dataclass
class CalibrationData:
    """Validated calibration batches, read lazily and once.

    ``batches_hint`` is the number of batches when it is known up front (for the progress bar).
    """

    items: Iterable[tuple[str, Any]]
    specs: dict[str, InputSpec]
    samples: int | None
    batch_size: int | None
    description: str
    batches_hint: int | None = None
    fixed_batch: int | None = None
    batched: frozenset[str] = frozenset()
    #: samples yielded so far
    seen: int = 0
    _used: bool = field(default=False, repr=False)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self._used:
            raise OnnxSparseError("calibration data can be read only once; open it again")
        self._used = True
        regroup = self.batch_size is not None
        loose = self.batched if regroup else frozenset()
        checked = ((where, check_batch(item, self.specs, where, loose)) for where, item in self.items)
        stream: Iterable[tuple[str, Chunk]] = _limit(checked, self.samples, self.batched)
        if self.batch_size is not None:
            stream = _rebatch(stream, self.batch_size, self.fixed_batch is not None, self.batched)
        count = 0
        for where, batch in stream:
            if self.fixed_batch is not None:
                check_batch(batch, self.specs, where)  # the fixed batch axis, after regrouping
            count += 1
            self.seen += _rows(batch, self.batched, where) if self.batched else 1
            yield batch
        if count == 0:
            raise OnnxSparseError(f"calibration data {self.description} yielded no samples")


def open_calibration(
    obj: Any, model: Model | onnx.ModelProto, samples: int | None = None, batch_size: int | None = None
) -> CalibrationData:
    """Normalise every accepted form of calibration data into one validated stream of batches.

    ``obj``: a path (``.npz`` file or a folder of ``.npy``/``.npz`` files), an ORT ``CalibrationDataReader``
    (anything with ``get_next()``), a dict of arrays (like an ``.npz``'s contents), an iterable of
    ``{input name: array}`` dicts, or an already opened ``CalibrationData``. ``samples`` caps the number of
    samples (first-axis rows) used; ``batch_size`` regroups them (default: the model's fixed batch size if it
    has one, else items as given, except that one ``.npz`` holding every sample is cut into batches of 32).
    """
    if isinstance(obj, CalibrationData):
        return obj
    proto = model.proto if isinstance(model, Model) else model
    specs = input_specs(proto)
    if samples is not None and samples <= 0:
        raise OnnxSparseError(f"--calib-samples must be positive, got {samples}")
    if batch_size is not None and batch_size <= 0:
        raise OnnxSparseError(f"--batch-size must be positive, got {batch_size}")
    batched, fixed = batch_layout(specs)
    if not batched and (batch_size is not None or samples is not None):
        raise OnnxSparseError(
            "the model's inputs have no common sample axis: --batch-size and --calib-samples "
            "cannot be used; give the batches as they are fed"
        )
    if fixed is not None and batch_size is not None and batch_size != fixed:
        raise OnnxSparseError(f"--batch-size {batch_size} conflicts with the model's fixed batch size {fixed}")
    size = batch_size if batch_size is not None else fixed
    items: Iterable[tuple[str, Any]]
    hint: int | None = None
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        if not path.exists():
            raise OnnxSparseError(f"calibration data {path} does not exist")
        if path.is_dir():
            items = _dir_items(path, specs)
            description = f"folder {path}"
        elif path.suffix == ".npz":
            items = _npz_items(path)
            description = str(path)
            if size is None:
                size = DEFAULT_NPZ_BATCH
        elif path.suffix == ".npy":
            items = [_npy_item(path, specs)]
            description = str(path)
            if size is None:
                size = DEFAULT_NPZ_BATCH
        else:
            raise OnnxSparseError(f"calibration data {path} is not a .npz file or a folder of .npy/.npz files")
    elif hasattr(obj, "get_next"):
        items = _reader_items(obj)
        description = f"reader {type(obj).__name__}"
        if hasattr(obj, "__len__") and size is None:
            try:
                hint = len(obj)
            except (TypeError, NotImplementedError):
                hint = None
    elif isinstance(obj, Mapping):
        items = [("arrays", obj)]
        description = "dict of arrays"
        if size is None:
            size = DEFAULT_NPZ_BATCH
    elif isinstance(obj, Iterable) and not isinstance(obj, (bytes, np.ndarray)):
        items = _iter_items(obj)
        description = f"iterable {type(obj).__name__}"
        if isinstance(obj, Sequence) and size is None:
            hint = len(obj)
    else:
        raise OnnxSparseError(
            f"unsupported calibration data {type(obj).__name__}: give a .npz, a folder of .npy/.npz, "
            "an iterable of {input: array} dicts or a CalibrationDataReader"
        )
    if hint is not None and samples is not None:
        hint = None
    if not batched:
        size = None
    if hint is None and isinstance(obj, (str, os.PathLike)):
        hint = _file_batches(Path(obj), specs, batched, size, samples, exact=fixed is not None)
    return CalibrationData(items, specs, samples, size, description, hint, fixed, batched)


def _file_batches(
    path: Path,
    specs: Mapping[str, InputSpec],
    batched: frozenset[str],
    size: int | None,
    samples: int | None,
    exact: bool,
) -> int | None:
    """How many batches a calibration file or folder will give, from the arrays' headers (no data is read).

    For the progress line's total and ETA. None where it cannot be known cheaply (no common sample axis, an
    unreadable header): the count is only a hint, the data's own checks come later.
    """
    files = (
        sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz") and p.is_file()) if path.is_dir() else [path]
    )
    if size is None:  # items as stored: one batch per file, unless --calib-samples cuts them
        return len(files) if samples is None else None
    if not batched:
        return None
    required = [s.name for s in specs.values() if not s.optional]
    total = 0
    for f in files:
        rows = _header_rows(f, batched, required[0] if len(required) == 1 else None)
        if rows is None:
            return None
        total += rows
    if samples is not None:
        total = min(total, samples)
    return total // size if exact else -(-total // size)


def _header_rows(path: Path, batched: frozenset[str], npy_input: str | None) -> int | None:
    """First-axis length of a batched input's array in a .npy/.npz, read from the .npy header only."""
    import zipfile

    def rows_of(f: Any) -> int | None:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape = read(f)[0]
        return int(shape[0]) if shape else None

    try:
        if path.suffix == ".npy":
            if npy_input is None or npy_input not in batched:
                return None
            with open(path, "rb") as fh:
                return rows_of(fh)
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith(".npy") and name[:-4] in batched:
                    with z.open(name) as member:
                        return rows_of(member)
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    return None
