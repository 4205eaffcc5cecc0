"""The stage runner: one ONNX Runtime pass over the calibration data folds every given layer's input into its
``GramStats``, batch by batch; activations are dropped as soon as they are folded in.

The layers' input values are exposed as extra graph outputs (``calibration._session``, the session helper qdq
uses: external weights go to ORT as memory maps). A layer input that is a model input is taken from the feed.
Statistics cost K²·8 bytes per layer (``GramStats.planned_bytes``), never the data's size.

``mask-input``: rows whose attention mask is 0 (padding) are left out. The mask (``[B, S]``, or ``[B, 1, 1, S]``
squeezed to ``[B, S]``) applies to a MatMul/Gemm input whose flattened leading dims have B·S rows; a 0/1 mask
marks valid tokens by 1, an additive mask (0 and large negatives) by 0.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxsparse.calibration.data import CalibrationData, open_calibration
from onnxsparse.calibration.gram import GramStats
from onnxsparse.calibration.histogram import _first_line
from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.graph import GraphIndex, node_reads
from onnxsparse.ir.layers import Layer
from onnxsparse.ir.model_io import Model
from onnxsparse.ir.tensors import to_array
from onnxsparse.progress import progress as show_progress
from onnxsparse.pruning.layout import activation_rows, stats_shape

if TYPE_CHECKING:
    from onnx import NodeProto

log = logging.getLogger("onnxsparse.pruning")


@dataclass
class Collection:
    """Statistics of one ORT pass and what it cost."""

    stats: dict[str, GramStats]
    batches: int = 0
    rows: int = 0
    seconds: float = 0.0
    #: layers the attention mask could not be applied to (their rows all count), with why
    unmasked: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.stats.values())


def row_weights(value: np.ndarray, name: str) -> np.ndarray:
    """A [B, S] (or [B, 1, 1, S]) attention mask as one weight per token: 1 = real token, 0 = padding."""
    v = np.asarray(value)
    if v.ndim > 2:
        lead = v.shape[0]
        v = v.reshape(lead, -1) if all(d == 1 for d in v.shape[1:-1]) else v
    if v.ndim > 2:
        raise OnnxSparseError(f"mask-input '{name}' has shape {list(value.shape)}; expected [B, S] or [B, 1, 1, S]")
    f = v.astype(np.float64)
    if np.isin(f, (0.0, 1.0)).all():
        return (f != 0).astype(np.float64)
    if (f <= 0).all():  # additive mask: 0 where attended, a large negative where padded
        return (f == 0).astype(np.float64)
    raise OnnxSparseError(f"mask-input '{name}' holds values other than 0/1 and is not an additive (<= 0) mask")


def stage_session(
    model: Model,
    fetch: list[str],
    overrides: Mapping[str, np.ndarray] | None = None,
    cache: dict[str, np.ndarray] | None = None,
) -> StageSession:
    """An ORT session computing just ``fetch`` (as outputs) from the model's inputs.

    Only the nodes the fetched tensors depend on are kept, so an early stage of a sequential run does not pay
    for the rest of the network (stage k of a 12-stage encoder runs about k/12 of it). The model is unchanged:
    the reduced graph is a new proto holding the kept nodes and the initializers they read.

    ``overrides``: initializer values to use instead of the model's (the dense originals of the tensors pruned so
    far: the dense reference session). ``cache``: weight arrays shared between sessions built from one model
    (the stage's own and its reference), so the weights both read are in memory once.
    """
    import onnx
    import onnxruntime as ort

    graph = model.proto.graph
    index = GraphIndex(graph)
    keep: set[str] = set()  # the kept nodes, by their first written value (each value has one producer)
    todo = list(fetch)
    while todo:
        node = index.producer(todo.pop())
        if node is not None and (key := _written(node)) not in keep:
            keep.add(key)
            todo.extend(node_reads(node))
    nodes = [node for node in graph.node if _written(node) in keep]  # graph order
    reads = {name for node in nodes for name in node_reads(node)}
    sub = onnx.ModelProto()
    sub.ir_version = model.proto.ir_version
    sub.opset_import.extend(model.proto.opset_import)
    sub.functions.extend(model.proto.functions)
    sub.graph.name = graph.name
    sub.graph.input.extend(graph.input)
    sub.graph.sparse_initializer.extend(t for t in graph.sparse_initializer if t.values.name in reads)
    sub.graph.node.extend(nodes)
    for name in fetch:
        sub.graph.output.add().name = name
    names, values = _hand_over(graph, reads, sub.graph, model, overrides or {}, {} if cache is None else cache)
    model_inputs = {i.name for i in graph.input}
    sub.graph.input.sort(key=lambda v: v.name not in model_inputs)  # the model's inputs first
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # Pre-packing would keep a second, re-laid-out copy of every MatMul/Gemm weight for a few batches' runs.
    opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.enable_cpu_mem_arena = False  # an arena keeps its peak (every intermediate of a batch) for the session
    # ORT's threads spin after each run while numpy's BLAS threads fold the batch into H (and the other way
    # round): on a machine with few cores the two pools fight for them. Idle ORT threads sleep instead.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(sub.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise OnnxSparseError(f"onnxruntime cannot load the model for pruning statistics: {_first_line(e)}") from e
    return StageSession(session, dict(zip(names, values, strict=True)))


def _written(node: NodeProto) -> str:
    """A node's first non-empty output name: which node it is, by a name no other node writes."""
    return next((o for o in node.output if o), "")


@dataclass
class StageSession:
    """A stage's ORT session and the weights it takes as feeds (``_hand_over``), added to every run's."""

    session: Any
    weights: dict[str, np.ndarray]

    def run(self, fetch: list[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.session.run(fetch, {**feeds, **self.weights}))


#: initializers at least this large are handed to ORT as buffers (the weights); smaller ones stay inline
_HANDOFF_MIN_BYTES = 4096
#: dtypes ORT takes as OrtValues over numpy buffers
_HANDOFF_DTYPES = frozenset(
    np.dtype(d)
    for d in (np.float32, np.float16, np.float64, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.int64, np.bool_)
)


def _hand_over(
    graph: Any,
    reads: set[str],
    sub: Any,
    base_dir: Any,
    overrides: Mapping[str, np.ndarray],
    cache: dict[str, np.ndarray],
) -> tuple[list[str], list[Any]]:
    """Put the small initializers ``reads`` needs into ``sub``; return the large ones, which become graph inputs
    of ``sub`` fed with every run.

    Why inputs: ORT copies every initializer into its session state, even one handed over as an OrtValue
    (``add_external_initializers``): on MiniLM-L3 the first stage's session took +119 MB for a 47 MB embedding
    table (the memory map's pages and ORT's copy). A feed is used in place, and only the pages a run reads are
    touched (a Gather reads 64 of 30522 rows). Serialising the weights into the session's bytes would cost
    two copies more.
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    declared = {i.name for i in sub.input}

    names: list[str] = []
    values: list[Any] = []
    for t in graph.initializer:
        if t.name not in reads:
            continue
        if t.name in overrides:
            arr = np.require(overrides[t.name], requirements="C")
        else:
            if t.name not in cache:
                cache[t.name] = np.require(to_array(t, base_dir), requirements="C")
            arr = cache[t.name]
        # Small tensors (shapes, scales, axes) stay inline: ORT's shape inference reads their values.
        if arr.dtype not in _HANDOFF_DTYPES or arr.nbytes < _HANDOFF_MIN_BYTES or arr.dtype.kind not in "fiu":
            if t.data_location == TensorProto.EXTERNAL or t.name in overrides:  # external: ORT would look for
                sub.initializer.append(numpy_helper.from_array(np.array(arr), t.name))  # (or refuse) its file
            else:
                sub.initializer.append(t)
            continue
        if t.name not in declared:  # an old-IR model may list its initializers as inputs already
            sub.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        names.append(t.name)
        values.append(arr)
    return names, values


def collect(
    model: Model,
    layers: Iterable[Layer],
    data: Any,
    mask_input: str | None = None,
    diag_only: Iterable[str] = (),
    progress: bool = False,
    reference: Mapping[str, np.ndarray] | None = None,
    desc: str = "statistics",
) -> Collection:
    """Run ``model`` once over ``data`` (anything ``open_calibration`` accepts) and fold each layer's input into
    its statistics (keyed by layer name). ``diag_only``: layer names that need only Σx² (Wanda).

    ``reference``: the dense values of the initializers changed so far; the model with them put back (the dense
    model) runs on the same batches and the statistics are paired (``GramStats.cross``) for every layer not in
    ``diag_only``."""
    layers = list(layers)
    thin = set(diag_only)
    cal = data if isinstance(data, CalibrationData) else open_calibration(data, model)
    if mask_input is not None and mask_input not in cal.specs:
        raise OnnxSparseError(f"mask-input '{mask_input}' is not a model input (inputs: {', '.join(cal.specs)})")
    stats: dict[str, GramStats] = {}
    for layer in layers:
        k, g = stats_shape(layer)
        thin_layer = layer.name in thin
        stats[layer.name] = GramStats(k, g, diag_only=thin_layer, paired=reference is not None and not thin_layer)
    acts = list(dict.fromkeys(layer.node.input[0] for layer in layers))
    fetch = [a for a in acts if a not in cal.specs]
    start = time.perf_counter()
    cache: dict[str, np.ndarray] = {}
    session = stage_session(model, fetch, cache=cache) if fetch else None
    ref_session = stage_session(model, fetch, reference, cache) if reference is not None and fetch else None
    del cache  # the sessions keep what they use
    out = Collection(stats)
    batches = show_progress(cal, total=cal.batches_hint, desc=desc, unit="batch", enabled=progress)
    for batch in batches:
        values: dict[str, np.ndarray] = {a: batch[a] for a in acts if a in cal.specs}
        if session is not None:
            try:
                got = session.run(fetch, batch)
            except Exception as e:  # ORT's own exception types
                raise OnnxSparseError(
                    f"onnxruntime failed on calibration batch {out.batches + 1}: {_first_line(e)}"
                ) from e
            values.update(zip(fetch, got, strict=True))
        ref: dict[str, np.ndarray] = {}
        if ref_session is not None:
            try:
                ref = dict(zip(fetch, ref_session.run(fetch, batch), strict=True))
            except Exception as e:  # ORT's own exception types
                raise OnnxSparseError(
                    f"onnxruntime failed on calibration batch {out.batches + 1} (dense reference): {_first_line(e)}"
                ) from e
        weights = row_weights(batch[mask_input], mask_input) if mask_input is not None else None
        for name, value in values.items():
            if value.dtype.kind != "f":
                raise OnnxSparseError(f"layer input '{name}' is {value.dtype}, not floating point")
            if not np.isfinite(value).all():
                raise OnnxSparseError(
                    f"layer input '{name}' has NaN/Inf values on calibration batch "
                    f"{out.batches + 1}; check the model and the data"
                )
        for layer in layers:
            name = layer.node.input[0]
            _fold(layer, values[name], stats[layer.name], weights, out, ref.get(name, values[name]))
        del values, ref
        out.batches += 1
    out.rows = int(next(iter(stats.values())).samples) if stats else 0
    out.seconds = time.perf_counter() - start
    return out


def _fold(
    layer: Layer, value: np.ndarray, st: GramStats, weights: np.ndarray | None, out: Collection, ref_value: np.ndarray
) -> None:
    ref_rows = activation_rows(layer, ref_value) if st.paired else None
    for group, rows, where in activation_rows(layer, value):
        wt = None
        if weights is not None:
            if where is not None and rows.shape[0] == weights.size:
                wt = weights.reshape(-1)
            elif layer.name not in out.unmasked:
                why = (
                    "convolution patches"
                    if where is None
                    else f"{rows.shape[0]} rows, the mask has {weights.size} tokens"
                )
                out.unmasked[layer.name] = why
        st.update(rows, group, wt)
        if ref_rows is not None:
            st.update_reference(next(ref_rows)[1], rows, group, wt)


def collect_stats(
    model: Model, layers: Iterable[Layer], data: Any, mask_input: str | None = None, progress: bool = False
) -> dict[str, GramStats]:
    """Public API: one ORT pass over ``data`` for all ``layers`` (the model as it is now), stats by layer name."""
    return collect(model, layers, data, mask_input=mask_input, progress=progress).stats


def replayable(obj: Any) -> bool:
    """Whether ``open_calibration(obj)`` can be called again for another pass (paths, dicts, sequences)."""
    import os

    return isinstance(obj, (str, os.PathLike, Mapping, list, tuple))
