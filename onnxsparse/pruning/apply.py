"""``prune_layer``: run a solver on one layer's stored weight with its input statistics and write the result.

The stored tensor is read through ``sparsity.stored_weight`` (an int8 weight behind a DequantizeLinear is
dequantized with its scale and zero point), cut into the solver problems of ``layout.problems``, solved, and
written back with ``tensors.set_array`` (a large external weight is spilled, as magnitude pruning does). An
int8 weight is re-quantized with the same scale, q = round(w/scale) + zp clipped to the type's range, pruned
entries exactly the zero point. With ``bias_correction`` the layer's constant bias (Gemm C, Conv B, or the
constant operand of the Add right after a MatMul) absorbs (W_old − W_new)·E[x], so the mean output is kept.
Paired statistics (``GramStats.paired``, the dense-target correction) make SparseGPT and the re-fit aim at
``solvers.dense_target`` and the bias at the dense model's mean output.

The returned ``LayerOutcome`` keeps copies of the tensor protos it replaced; ``undo()`` puts them back (for
sensitivity scans that prune one layer at a time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import TensorProto

from onnxsparse.calibration.gram import GramStats
from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.graph import consumers, use_counts
from onnxsparse.ir.layers import Layer, attr
from onnxsparse.ir.model_io import Model
from onnxsparse.ir.tensors import set_array, to_array
from onnxsparse.pruning import solvers
from onnxsparse.pruning.layout import problems
from onnxsparse.sparsity import StoredWeight, constants_by_name, stored_weight

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass
class LayerOutcome:
    """What ``prune_layer`` changed in one layer."""

    layer: str
    weight: str
    method: str
    #: relative output error on the calibration inputs, ‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² (from H)
    error: float
    #: non-zeros of the stored tensor before and after
    nonzero_before: int
    nonzero_after: int
    #: True = may be non-zero, shaped like the stored tensor
    mask: np.ndarray
    bias: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    _saved: list[tuple[TensorProto, TensorProto]] = field(default_factory=list, repr=False)

    def originals(self) -> list[TensorProto]:
        """Copies of the tensor protos as they were before ``prune_layer`` (weight first, then bias)."""
        return [saved for _, saved in self._saved]

    def undo(self) -> None:
        """Put back the weight (and bias) protos exactly as they were before ``prune_layer``."""
        for tensor, saved in reversed(self._saved):
            tensor.CopyFrom(saved)
        self._saved.clear()

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "weight": self.weight,
            "method": self.method,
            "error": round(self.error, 6),
            "bias_corrected": self.bias,
            "seconds": round(self.seconds, 3),
            "notes": self.notes,
        }


def _dequantized(sw: StoredWeight) -> np.ndarray:
    v = np.asarray(sw.values)
    if sw.scale is None:
        return v.astype(np.float64)
    c = v.astype(np.float64)
    if sw.zp is not None:
        c = c - sw.zp.astype(np.float64)
    return c * sw.scale.astype(np.float64)


def _stored(sw: StoredWeight, w: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Solver values back in the stored type: re-quantized behind a DQ, exact zeros (zero points) outside keep."""
    dtype = np.asarray(sw.values).dtype
    if sw.scale is None:
        out = (w * keep).astype(dtype)
        out += 0  # -0.0 → +0.0: pruned entries are all-zero bits
        return out
    scale = sw.scale.astype(np.float64)
    zp = np.zeros(()) if sw.zp is None else sw.zp.astype(np.float64)
    q = np.rint(np.divide(w, scale, out=np.zeros_like(w), where=scale != 0)) + zp
    info = np.iinfo(dtype)
    q = np.clip(q, info.min, info.max)
    q = np.where(keep, q, zp)
    return q.astype(dtype)


def _save(outcome: LayerOutcome, tensor: TensorProto) -> None:
    saved = TensorProto()
    saved.CopyFrom(tensor)
    outcome._saved.append((tensor, saved))


def prune_layer(
    model: Model,
    layer: Layer,
    stats: GramStats | None,
    method: str,
    n: int,
    m: int,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    target_damp: float = 0.1,
    prefer: np.ndarray | None = None,
    bias_correction: bool = False,
    refit_iters: int = 0,
) -> LayerOutcome:
    """Prune one layer's stored weight in place with ``method`` and return what changed (see module doc).

    ``stats``: the layer's input statistics (``collect_stats``); not needed for magnitude. A diagonal-only
    ``stats`` (K above max-k) turns sparsegpt into wanda. ``prefer``: stored-shape bool mask of entries that may
    stay non-zero (progressive pruning); the weight's current zeros are always kept zero.
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise OnnxSparseError(f"unknown pruning method '{method}' (choose {', '.join(METHODS)})")
    sw = stored_weight(layer, constants_by_name(model.proto), model)
    if isinstance(sw, str):
        raise OnnxSparseError(f"layer '{layer.name}': {sw}")
    probs = problems(layer)
    if isinstance(probs, str):
        raise OnnxSparseError(f"layer '{layer.name}': {probs}")
    if method != "magnitude" and stats is None:
        raise OnnxSparseError(f"layer '{layer.name}': {method} needs input statistics")
    work = _dequantized(sw)  # a fresh float64 array: it is overwritten with the result below
    if not np.isfinite(work).all():
        raise OnnxSparseError(f"weight '{sw.name}' has NaN/Inf value(s); fix the model first")
    nonzero = sw.nonzero()
    allowed = nonzero if prefer is None else nonzero & np.asarray(prefer, dtype=bool)
    keep_all = np.zeros(work.shape, dtype=bool)
    used = method
    notes: list[str] = []
    err = ref = 0.0
    shift = np.zeros(_out_channels(layer))
    # ``work`` becomes the new values problem by problem: each problem reads its own (disjoint) entries first
    # as a gathered copy, so no second full-size float64 array is needed.
    flat, flat_keep, flat_pref = work.reshape(-1), keep_all.reshape(-1), allowed.reshape(-1)
    for p in probs:
        w = flat[p.index]
        target = w
        pref = flat_pref[p.index]
        if method == "magnitude":
            w_new, keep = solvers.magnitude(w, n, m, pref)
        elif method == "wanda" or (stats is not None and stats.diag_only):
            assert stats is not None
            if method == "sparsegpt":
                used = "wanda"
            w_new, keep = solvers.wanda(w, stats.sq_norms(p.group), n, m, pref)
        else:
            assert stats is not None
            h = stats.gram(p.group)
            if stats.paired:  # fit the dense model's output, not this layer's output on its perturbed input
                assert stats.cross is not None
                target = solvers.dense_target(w, h, stats.cross[p.group], target_damp)
                if stats.groups == 1 and p is probs[-1]:  # the cross term is used up: free K²·8 before the solve
                    stats.cross = None
            w_new, keep, _info = solvers.sparsegpt(target, h, n, m, block_size=block_size, damp=damp, prefer=pref)
            if refit_iters:
                w_new = solvers.refit(target, h, keep, w_new, damp=damp, iters=refit_iters)
        if stats is not None:
            e, r = solvers.output_error(target, w_new, stats.gram(p.group))  # against what was fitted
            err, ref = err + e, ref + r
            if bias_correction and p.channels is not None:
                if stats.paired:  # E[dense output] − E[new output on the perturbed input]
                    shift[p.channels] += w @ stats.ref_mean(p.group) - w_new @ stats.mean(p.group)
                else:
                    shift[p.channels] += solvers.bias_delta(w, w_new, stats.mean(p.group))
        flat[p.index] = w_new
        flat_keep[p.index] = keep
    outcome = LayerOutcome(
        layer=layer.name,
        weight=sw.name,
        method=used,
        error=err / ref if ref > 0 else 0.0,
        nonzero_before=int(np.count_nonzero(nonzero)),
        nonzero_after=0,
        mask=keep_all,
        notes=notes,
    )
    stored = _stored(sw, work, keep_all)
    _save(outcome, sw.tensor)
    set_array(sw.tensor, stored, model)
    outcome.nonzero_after = int(np.count_nonzero(stored != (0 if sw.zp is None else sw.zp)))
    if bias_correction and method != "magnitude":
        if layer.op_type == "ConvTranspose":
            notes.append("no bias correction for ConvTranspose (its outputs mix kernel positions)")
        else:
            why = _correct_bias(model, layer, shift, outcome)
            if why:
                notes.append(f"no bias correction: {why}")
    outcome.seconds = time.perf_counter() - start
    return outcome


def _out_channels(layer: Layer) -> int:
    w = layer.weight_shape
    assert w is not None
    if layer.op_type == "ConvTranspose":
        return w[1] * layer.group
    assert layer.channel_axis is not None
    return w[layer.channel_axis]


def _correct_bias(model: Model, layer: Layer, shift: np.ndarray, outcome: LayerOutcome) -> str | None:
    """Add ``shift`` (in the layer's output units) to its constant bias; why not, where it cannot."""
    node = layer.node
    scale = 1.0
    if node.op_type == "Gemm":
        name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        beta = float(attr(node, "beta", 1.0))
        if beta == 0:
            return "Gemm beta is 0"
        scale = float(attr(node, "alpha", 1.0)) / beta
    elif node.op_type == "Conv":
        name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    else:  # MatMul: the constant operand of the Add that is its only reader
        readers = consumers(layer.graph).get(node.output[0], [])
        name = None
        if len(readers) == 1 and readers[0].op_type == "Add":
            other = [i for i in readers[0].input if i != node.output[0]]
            name = other[0] if len(other) == 1 else None
    if name is None:
        return "the layer has no bias"
    src = layer.constant(name)
    if src is None:
        return f"bias '{name}' is not a constant"
    if use_counts(model.proto.graph).get(name, 0) > 1:
        return f"bias '{name}' is read by several nodes"
    bias = np.asarray(to_array(src.tensor, model))
    if bias.dtype.kind != "f" or bias.size != shift.size or max(bias.shape, default=1) != shift.size:
        return f"bias '{name}' of shape {list(bias.shape)} is not one value per output channel"
    _save(outcome, src.tensor)
    set_array(src.tensor, (bias.astype(np.float64) + scale * shift.reshape(bias.shape)).astype(bias.dtype), model)
    outcome.bias = name
    return None
