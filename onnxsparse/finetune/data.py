"""What a fine-tune reads, checked before any training starts: masks, training/eval data, the teacher, the mask input.

Every mismatch is one ``OnnxSparseError`` line naming the file, the input or output and what differs, in the
words ``calibrate`` uses (``onnxsparse.calibration.data.check_batch``): without these checks ONNX Runtime's own
message surfaced from deep in the worker (``InvalidArgument: ... Invalid rank for input: x Got: 4 Expected:
2``) after the artefacts were built. Data files are checked from their ``.npy`` headers, so a large ``.npz`` is
not read for it; only the mask input's array is read (its values must be 0/1).
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxsparse.calibration.data import InputSpec, input_specs
from onnxsparse.errors import OnnxSparseError

log = logging.getLogger("onnxsparse.finetune.run")

Header = tuple[tuple[int, ...], np.dtype[Any]]


def npz_shapes(path: str | os.PathLike[str]) -> dict[str, Header]:
    """Key → (shape, dtype) of an ``.npz`` without loading the arrays (reads the .npy headers only)."""
    p = Path(path)
    if not p.is_file():
        raise OnnxSparseError(f"no such data file: {p}")
    out: dict[str, Header] = {}
    try:
        with zipfile.ZipFile(p) as z:
            for name in z.namelist():
                if not name.endswith(".npy"):
                    continue
                with z.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    reader = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = reader(f)
                out[name[:-4]] = (tuple(shape), dtype)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise OnnxSparseError(f"{p} is not an .npz data file ({e})") from e
    return out


def sample_specs(proto: onnx.ModelProto) -> dict[str, InputSpec]:
    """The inputs a fine-tune feeds from data (initializer-backed inputs are constants, not data)."""
    return {k: s for k, s in input_specs(proto).items() if not s.optional}


def check_data(
    path: str | os.PathLike[str], specs: Mapping[str, InputSpec], what: str = "data", labels: str | None = None
) -> dict[str, Header]:
    """The ``.npz`` headers, or a one-line error: a missing input, a dtype, rank or fixed dim that differs,
    inputs that disagree on the number of samples. ``what`` names the flag (``data``, ``eval data``)."""
    headers = npz_shapes(path)
    where = f"{what} {path}"
    known = ", ".join(s.describe() for s in specs.values())
    for spec in specs.values():
        if spec.name not in headers:
            raise OnnxSparseError(
                f"{where} has no array for model input '{spec.name}' "
                f"(has: {', '.join(headers) or 'nothing'}; the model takes {known})"
            )
        shape, dtype = headers[spec.name]
        if spec.dtype is not None and dtype != spec.dtype:
            raise OnnxSparseError(
                f"{where}: input '{spec.name}' is {dtype}, the model takes {spec.dtype} "
                f"(convert with .astype(np.{spec.dtype.name}))"
            )
        if spec.shape is not None:
            if len(shape) != len(spec.shape):
                raise OnnxSparseError(
                    f"{where}: input '{spec.name}' has shape {list(shape)} (rank {len(shape)}), the model takes "
                    f"rank {len(spec.shape)} ({spec.describe()}); the first axis holds samples"
                )
            for i, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
                if i and isinstance(want, int) and got != want:
                    raise OnnxSparseError(
                        f"{where}: input '{spec.name}' has shape {list(shape)}, dim {i} must be "
                        f"{want} ({spec.describe()})"
                    )
    if labels is not None and labels not in headers:
        raise OnnxSparseError(f"{where} has no labels array '{labels}' (has: {', '.join(headers)})")
    keys = [*specs, *([labels] if labels else [])]
    counts = {k: headers[k][0][0] if headers[k][0] else None for k in keys}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise OnnxSparseError(f"{where}: arrays disagree on the number of samples (first axis): {listed}")
    if next(iter(counts.values()), 1) == 0:
        raise OnnxSparseError(f"{where} holds no samples")
    return headers


def _dims(vi: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)


def _describe(name: str, elem: int, dims: Sequence[int | str | None] | None) -> str:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem) if elem else "?"
    shown = "?" if dims is None else "x".join("?" if d is None else str(d) for d in dims)
    return f"{name}: {dtype}[{shown}]"


def check_teacher(
    teacher: onnx.ModelProto,
    student: onnx.ModelProto,
    headers: Mapping[str, Header],
    outputs: Sequence[str],
    where: str,
) -> None:
    """The teacher must take what the data holds and give the student's loss outputs in the same dtype, rank
    and fixed dims; otherwise one line naming the teacher's input or output."""
    for spec in sample_specs(teacher).values():
        if spec.name not in headers:
            raise OnnxSparseError(
                f"teacher {where} needs input '{spec.name}', which the data lacks (the data has: {', '.join(headers)})"
            )
        shape, dtype = headers[spec.name]
        if spec.dtype is not None and dtype != spec.dtype:
            raise OnnxSparseError(f"teacher {where}: input '{spec.name}' is {spec.dtype}, the data holds {dtype}")
        if spec.shape is not None:
            fixed = [(i, w) for i, w in enumerate(spec.shape) if i and isinstance(w, int)]
            if len(shape) != len(spec.shape) or any(shape[i] != w for i, w in fixed):
                raise OnnxSparseError(
                    f"teacher {where}: input '{spec.name}' takes {spec.describe()}, the data's "
                    f"samples are {list(shape)} (first axis = samples)"
                )
    t_out = {o.name: o for o in teacher.graph.output}
    s_out = {o.name: o for o in student.graph.output}
    for name in outputs:
        if name not in t_out:
            raise OnnxSparseError(
                f"teacher {where} has no output '{name}' (it must give the student's outputs; "
                f"it has: {', '.join(t_out)})"
            )
        t, s = t_out[name], s_out[name]
        te, se = t.type.tensor_type.elem_type, s.type.tensor_type.elem_type
        td, sd = _dims(t), _dims(s)
        bad = (te and se and te != se) or (
            td is not None
            and sd is not None
            and (
                len(td) != len(sd)
                or any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(td, sd, strict=True))
            )
        )
        if bad:
            raise OnnxSparseError(
                f"teacher {where}: output {_describe(name, te, td)} does not match the "
                f"student's {_describe(name, se, sd)}"
            )


# ---------------------------------------------------------------------------------------------- mask input


@dataclass(frozen=True)
class MaskLayout:
    """How ``mask_input`` marks real positions, and which inputs can be trimmed along with it.

    ``seq_axis`` is the mask's last axis (the sequence). ``trim`` maps each input sharing that axis (the same
    symbolic dim, e.g. input_ids / attention_mask / token_type_ids all ``[batch, seq]``) to its axis index;
    empty when the model's sequence dim is fixed (then ``static_reason`` says so). ``masked_outputs`` maps
    each loss output whose leading dims are the mask's dims to the mask's rank; other loss outputs (a pooled
    ``[batch, hidden]``) get the plain MSE, listed in ``unmasked_outputs``.
    """

    name: str
    rank: int
    seq_axis: int
    trim: dict[str, int] = field(default_factory=dict)
    static_reason: str | None = None
    masked_outputs: list[str] = field(default_factory=list)
    unmasked_outputs: list[str] = field(default_factory=list)


def mask_layout(
    proto: onnx.ModelProto,
    name: str,
    outputs: Sequence[str],
    headers: Mapping[str, Header],
    data_path: str | os.PathLike[str],
) -> MaskLayout:
    """Check ``name`` as the mask input (a model input of integers or bools, values 0/1 in the data) and
    work out what is trimmed and which outputs are masked; one-line errors otherwise."""
    specs = sample_specs(proto)
    if name not in specs:
        raise OnnxSparseError(f"mask input '{name}' is not a model input (inputs: {', '.join(specs) or 'none'})")
    spec = specs[name]
    if spec.dtype is None or not (np.issubdtype(spec.dtype, np.integer) or spec.dtype == np.bool_):
        raise OnnxSparseError(f"mask input '{name}' is {spec.dtype}: it must hold 0/1 integers (an attention mask)")
    check_mask_values(data_path, name)
    if spec.shape is None or len(spec.shape) < 2:
        raise OnnxSparseError(f"mask input '{name}' ({spec.describe()}) needs a sample axis and a sequence axis")
    seq_axis = len(spec.shape) - 1
    seq = spec.shape[seq_axis]
    trim: dict[str, int] = {}
    static_reason = None
    if isinstance(seq, int):
        static_reason = (
            f"the model's sequence dim is fixed ({spec.describe()}): batches stay padded to {seq}; "
            "export the model with a dynamic sequence axis to train on trimmed batches"
        )
    else:
        length = headers[name][0][seq_axis]
        for other in specs.values():
            if other.shape is None:
                continue
            for axis, d in enumerate(other.shape):
                if (
                    axis
                    and not isinstance(d, int)
                    and (d == seq if seq else True)
                    and headers[other.name][0][axis] == length
                ):
                    trim[other.name] = axis
                    break
    masked, unmasked = [], []
    out_dims = {o.name: _dims(o) for o in proto.graph.output}
    for out in outputs:
        dims = out_dims.get(out)
        if dims is None or len(dims) < len(spec.shape):
            unmasked.append(out)
            continue
        for i, (m, o) in enumerate(zip(spec.shape, dims, strict=False)):
            if isinstance(m, int) and isinstance(o, int) and m != o and m != 1:
                raise OnnxSparseError(
                    f"mask input {spec.describe()} does not line up with output '{out}' "
                    f"[{'x'.join('?' if d is None else str(d) for d in dims)}] at dim {i}: the mask's dims must "
                    "be the output's leading dims"
                )
        masked.append(out)
    if not masked:
        raise OnnxSparseError(f"mask input '{name}' lines up with no loss output (outputs: {', '.join(outputs)})")
    return MaskLayout(name, len(spec.shape), seq_axis, trim, static_reason, masked, unmasked)


def check_mask_values(path: str | os.PathLike[str], name: str) -> None:
    """The mask array in the data must hold only 0 and 1 (one line naming the first other value)."""
    with np.load(path, allow_pickle=False) as z:
        arr = np.asarray(z[name])
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise OnnxSparseError(f"mask input '{name}' in {path} is {arr.dtype}: it must hold 0/1 integers")
    bad = arr[(arr != 0) & (arr != 1)]
    if bad.size:
        raise OnnxSparseError(f"mask input '{name}' in {path} holds {bad.flat[0]}: it must hold only 0 and 1")
