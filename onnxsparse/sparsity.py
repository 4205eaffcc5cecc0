"""n:m structured sparsity on numpy arrays: masks, checks, and the stored-weight view both passes share.

Groups run along one axis of a tensor (the layer's reduction axis mapped onto the stored tensor, see
``onnxsparse.ir.layers``): element ``i`` of a group of ``m`` is ``i`` steps along that axis. Everything here is
vectorised over groups; the only Python loops run over the ``m`` positions of a group (≤ m iterations), so a
100 M-parameter weight costs a few array passes.

``prune`` and ``validate`` agree on what "zero" and "magnitude" mean through ``StoredWeight``: for a plain
weight, zero is ``w == 0`` and magnitude ``|w|``; for a weight stored as integers behind a DequantizeLinear,
zero is ``q == zero_point`` (the dequantized value is exactly 0) and magnitude ``|(q - zp) * scale|`` with the
DQ's per-tensor, per-axis or blocked scale broadcast onto the stored tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.layers import Layer, attr
from onnxsparse.ir.reasons import render
from onnxsparse.ir.tensors import to_array

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")

#: Stored types a weight may be pruned in (integers only make sense behind a DequantizeLinear).
SUPPORTED_TYPES: dict[int, str] = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
    TensorProto.DOUBLE: "float64",
    TensorProto.INT8: "int8",
    TensorProto.UINT8: "uint8",
    TensorProto.INT16: "int16",
    TensorProto.UINT16: "uint16",
    TensorProto.INT32: "int32",
}


def parse_pattern(text: str) -> tuple[int, int]:
    """``"2:4"`` → ``(2, 4)``: keep at most n non-zeros in every group of m (1 ≤ n < m)."""
    match = _PATTERN.match(str(text))
    if not match:
        raise OnnxSparseError(f"bad sparsity pattern '{text}': expected n:m, e.g. 2:4")
    n, m = int(match[1]), int(match[2])
    if not 1 <= n < m:
        raise OnnxSparseError(f"bad sparsity pattern '{text}': need 1 <= n < m")
    return n, m


#: Below this many elements after the reduction axis, groups are copied into an [m, ...] layout first:
#: numpy's inner loops are slow when the innermost run is only a few elements long.
_SHORT_RUN = 64


def _group_view(a: np.ndarray, axis: int, m: int) -> np.ndarray:
    """``a`` as [pre, K/m, m, post] (a free view): position-in-group is axis 2."""
    axis = axis % a.ndim
    size = a.shape[axis]
    if size % m:
        raise ValueError(f"axis {axis} of shape {a.shape} is not divisible by {m}")
    pre = int(np.prod(a.shape[:axis], dtype=np.int64))
    post = int(np.prod(a.shape[axis + 1 :], dtype=np.int64))
    return a.reshape(pre, size // m, m, post)


def nm_keep(magnitude: np.ndarray, axis: int, n: int, m: int, prefer: np.ndarray | None = None) -> np.ndarray:
    """The keep-set of n:m magnitude pruning: a bool array shaped like ``magnitude``, exactly n True per group.

    In each group of ``m`` along ``axis`` the ``n`` entries of largest magnitude are kept; ties go to the lower
    index (deterministic: the order a stable sort gives). Entries where ``prefer`` is False rank below every
    preferred entry whatever their magnitude — that is how progressive pruning keeps earlier zeros: the 2:4
    keep-set is chosen among the survivors of 3:4 first.
    """
    magnitude = np.asarray(magnitude)
    key = magnitude.astype(np.float64 if magnitude.dtype == np.float64 else np.float32)  # a copy we may edit
    nan = np.isnan(key)
    if nan.any():
        key[nan] = np.inf  # a NaN weight is kept (pruning it would hide the problem)
    if prefer is not None:
        key[~np.broadcast_to(np.asarray(prefer, dtype=bool), key.shape)] = -1.0  # magnitudes are >= 0
    v = _group_view(key, axis, m)
    short = v.shape[3] < _SHORT_RUN
    if short:  # short runs after the axis: copy into an [m, ...] layout first
        g = np.ascontiguousarray(np.moveaxis(v, 2, 0))
        slices, out = list(g), np.empty(g.shape, dtype=bool)
        targets = list(out)
    else:  # long runs: strided views of the position-in-group axis are fast as they are
        slices, out = [v[:, :, j, :] for j in range(m)], np.empty(v.shape, dtype=bool)
        targets = [out[:, :, j, :] for j in range(m)]
    # rank[j] = #{i: key[i] > key[j]} + #{i < j: key[i] == key[j]}: 0 for the winner, m-1 for the loser.
    # The loops run over positions within a group (m*(m-1) steps), each step vectorised over all groups.
    rank_type = np.int8 if m < 128 else np.int32
    for j in range(m):
        rank = np.zeros(slices[j].shape, dtype=rank_type)
        for i in range(m):
            if i != j:
                rank += (slices[i] >= slices[j]) if i < j else (slices[i] > slices[j])
        np.less(rank, n, out=targets[j])
    keep = np.moveaxis(out, 0, 2) if short else out
    return np.ascontiguousarray(keep).reshape(magnitude.shape)


def group_nonzeros(nonzero: np.ndarray, axis: int, m: int) -> np.ndarray:
    """Number of non-zeros in each group of ``m`` along ``axis`` (flat, one entry per group)."""
    v = _group_view(np.asarray(nonzero, dtype=bool), axis, m)
    counts = v[:, :, 0, :].astype(np.int32)
    for j in range(1, m):  # m strided adds beat a reduction over a short middle axis
        counts += v[:, :, j, :]
    return counts.reshape(-1)


def count_violations(nonzero: np.ndarray, axis: int, n: int, m: int) -> tuple[int, int]:
    """(groups with more than ``n`` non-zeros, total groups) — every group is checked."""
    counts = group_nonzeros(nonzero, axis, m)
    return int(np.count_nonzero(counts > n)), int(counts.size)


def is_nm(values: np.ndarray, axis: int, n: int = 2, m: int = 4) -> bool:
    """True if ``values`` has at most ``n`` non-zeros in every group of ``m`` along ``axis``."""
    return count_violations(np.asarray(values) != 0, axis, n, m)[0] == 0


# ---------------------------------------------------------------------------------------------- stored weights


def constants_by_name(model: onnx.ModelProto) -> dict[str, TensorProto]:
    """Every initializer and Constant-node tensor of the model (all graphs), by name."""
    from onnxsparse.ir.graph import iter_graphs
    from onnxsparse.ir.tensors import constant_value

    out: dict[str, TensorProto] = {}
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            out.setdefault(t.name, t)
        for node in g.node:
            if node.op_type == "Constant":
                value = constant_value(node)
                if value is not None:
                    out.setdefault(node.output[0], value)
    return out


@dataclass
class StoredWeight:
    """A layer's stored tensor with what "zero" and "magnitude" mean for it.

    ``fill`` is what a pruned entry is set to (0, or the zero point behind a DequantizeLinear), broadcastable
    to ``values``. ``axis`` is the reduction axis in ``values``.
    """

    name: str
    tensor: TensorProto
    values: np.ndarray
    axis: int
    zp: np.ndarray | None = None  # broadcastable zero point (DQ weights)
    scale: np.ndarray | None = None  # broadcastable scale (DQ weights)

    @property
    def dtype_name(self) -> str:
        return SUPPORTED_TYPES.get(self.tensor.data_type, str(self.tensor.data_type))

    def nonzero(self) -> np.ndarray:
        if self.zp is not None:
            return self.values != self.zp
        return self.values != 0

    def magnitude(self) -> np.ndarray:
        if self.scale is not None:
            centred = self.values.astype(np.float32)
            if self.zp is not None:
                centred = centred - self.zp.astype(np.float32)
            return np.abs(centred * self.scale.astype(np.float32))
        v = self.values
        if v.dtype.kind not in "fc":  # integers and bfloat16 (numpy kind 'V')
            v = v.astype(np.float32)
        return np.abs(v)

    def pruned(self, keep: np.ndarray) -> np.ndarray:
        """The stored values with every entry outside ``keep`` set to zero (or the zero point); dtype kept."""
        v = self.values
        if self.zp is not None:
            return np.where(keep, v, self.zp).astype(v.dtype, copy=False)
        if v.dtype.kind in "iu":
            return v * keep
        # Multiplying is ~15x faster than np.where; "+ 0" turns the -0.0 of a dropped negative weight into +0.0
        # so pruned entries are all-zero bits. A dropped Inf would become NaN, but check_finite refuses those.
        out = np.multiply(v, keep, dtype=v.dtype)
        out += 0
        return out


def check_finite(sw: StoredWeight) -> None:
    """Refuse a weight holding NaN or Inf: ranking by magnitude is meaningless there, and a user should
    hear which tensor is broken rather than get a silently odd mask."""
    v = sw.values
    if v.dtype.kind == "f" and v.size and not np.isfinite(v).all():
        bad = int(np.count_nonzero(~np.isfinite(v)))
        raise OnnxSparseError(f"weight '{sw.name}' has {bad} NaN/Inf value(s); fix the model first")


def stored_weight(layer: Layer, consts: dict[str, TensorProto], base_dir: object = None) -> StoredWeight | str:
    """The layer's ``StoredWeight``, or why it cannot be read as one (a reason string)."""
    src = layer.source
    if src is None or layer.source_reduction_axis is None:
        return render(layer.reason, "no constant weight")
    if src.tensor.data_type not in SUPPORTED_TYPES:
        type_name = TensorProto.DataType.Name(src.tensor.data_type)
        return f"weight '{src.name}' has unsupported type {type_name}"
    values = to_array(src.tensor, base_dir)  # type: ignore[arg-type]
    sw = StoredWeight(name=src.name, tensor=src.tensor, values=values, axis=layer.source_reduction_axis)
    dqs = [i for i, n in enumerate(layer.chain) if n.op_type == "DequantizeLinear"]
    if not dqs:
        if values.dtype.kind in "iu":
            return f"integer weight '{src.name}' does not reach the layer through a DequantizeLinear"
        return sw
    # The DQ nearest to the stored tensor is the one that gives the integers meaning.
    idx = dqs[-1]
    dq = layer.chain[idx]
    between = layer.chain[idx + 1 :]  # nodes between the stored tensor and the DQ (source side last)
    scale_t = consts.get(dq.input[1]) if len(dq.input) > 1 else None
    if scale_t is None:
        return f"DequantizeLinear '{dq.name or dq.output[0]}' has a non-constant scale"
    scale = np.asarray(to_array(scale_t, base_dir)).astype(np.float32)  # type: ignore[arg-type]  # may be external
    zp_arr = None
    if len(dq.input) > 2 and dq.input[2]:
        zp_t = consts.get(dq.input[2])
        if zp_t is None:
            return f"DequantizeLinear '{dq.name or dq.output[0]}' has a non-constant zero point"
        zp_arr = np.asarray(to_array(zp_t, base_dir))  # type: ignore[arg-type]
    if zp_arr is not None and not zp_arr.any():
        zp_arr = None  # a zero zero-point means plain zeros: no need to broadcast it
    per_tensor = scale.size == 1 and (zp_arr is None or zp_arr.size == 1)
    if not per_tensor and any(n.op_type != "Identity" for n in between):
        # The DQ's axis is an axis of the transposed/reshaped tensor; mapping a per-axis scale back is not
        # worth the risk for a layout no exporter produces.
        return "a per-axis DequantizeLinear follows a Transpose/Reshape of the stored weight"
    if per_tensor:
        sw.scale = scale.reshape(())
        sw.zp = None if zp_arr is None else zp_arr.reshape(()).astype(values.dtype)
        return sw
    rank = values.ndim
    axis = int(attr(dq, "axis", 1)) % max(rank, 1)  # type: ignore[call-overload]
    block = int(attr(dq, "block_size", 0) or 0)  # type: ignore[call-overload]
    try:
        sw.scale = _broadcast_q(scale, values.shape, axis, block)
        if zp_arr is not None:
            sw.zp = _broadcast_q(zp_arr, values.shape, axis, block).astype(values.dtype)
    except ValueError as e:
        return f"DequantizeLinear '{dq.name or dq.output[0]}': {e}"
    return sw


def _broadcast_q(p: np.ndarray, shape: tuple[int, ...], axis: int, block: int) -> np.ndarray:
    """A DQ scale/zero point (per-axis 1-D or blocked same-rank) broadcast onto the stored tensor's shape."""
    if p.ndim == 1 and p.size == shape[axis] and not block:
        view = [1] * len(shape)
        view[axis] = p.size
        return np.broadcast_to(p.reshape(view), shape)
    if p.ndim == len(shape) and block:
        return np.broadcast_to(np.repeat(p, block, axis=axis)[tuple(slice(0, d) for d in shape)], shape)
    raise ValueError(f"scale/zero point of shape {p.shape} does not fit weight {shape} on axis {axis}")
