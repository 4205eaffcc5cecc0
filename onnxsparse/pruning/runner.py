"""Staged calibrated pruning: which layers share one ORT pass, and the loop that prunes stage by stage.

Sequential mode (SparseGPT's default) gives each layer statistics from the model with every *upstream* pruned
layer already pruned, so later layers compensate for earlier errors. Layers whose inputs do not depend on each
other's weights — q/k/v reading one LayerNorm output — form one stage and share one pass over the data: a
layer's stage is the number of pruned layers on its longest path from the inputs. One-pass mode
(``sequential=false``) takes every statistic from the dense model in a single pass.

Calibration data is read once per stage. A path, a dict of arrays or a list of batches is simply opened again;
a one-shot source (a generator or an ORT ``CalibrationDataReader``) is read once and its validated batches are
kept (model inputs only, never activations).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxsparse.calibration.data import open_calibration
from onnxsparse.calibration.gram import GramStats
from onnxsparse.ir.graph import node_reads
from onnxsparse.ir.layers import Layer
from onnxsparse.ir.model_io import Model
from onnxsparse.ir.tensors import to_array
from onnxsparse.pruning.apply import LayerOutcome, prune_layer
from onnxsparse.pruning.collect import collect, replayable
from onnxsparse.pruning.layout import stats_shape

log = logging.getLogger("onnxsparse.pruning")


@dataclass
class Item:
    """One layer to prune: its solver method and the stored-shape mask it may keep (progressive)."""

    layer: Layer
    method: str
    prefer: np.ndarray | None = None
    note: str | None = None  # why the method differs from the one asked for


@dataclass
class RunReport:
    """What the staged run did and cost."""

    outcomes: list[LayerOutcome] = field(default_factory=list)
    stages: int = 0
    ort_passes: int = 0
    batches: int = 0
    rows: int = 0  # statistic rows per pass (tokens, pixels), after masking
    stats_seconds: float = 0.0
    solve_seconds: float = 0.0
    stats_bytes_max: int = 0
    unmasked: dict[str, str] = field(default_factory=dict)
    dense_target: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": self.stages,
            "ort_passes": self.ort_passes,
            "batches_per_pass": self.batches,
            "rows": self.rows,
            "stats_seconds": round(self.stats_seconds, 3),
            "solve_seconds": round(self.solve_seconds, 3),
            "stats_bytes_max": self.stats_bytes_max,
            "mask_not_applied": self.unmasked,
            "dense_target": self.dense_target,
        }


def release_freed_memory() -> None:
    """Hand memory freed by the process back to the system (glibc's ``malloc_trim``; a no-op elsewhere).

    Why: glibc raises its mmap threshold after a large array is freed, so later arrays of up to 32 MB come
    from the heap and stay resident after they are freed. Between stages that retained memory (ORT's session
    and the batch's activations) sat under the next solve's K×K arrays: 60 MB of MiniLM-L3's peak.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return
    trim(0)


def stages(model: Model, layers: Iterable[Layer]) -> list[list[Layer]]:
    """Layers grouped into topological stages (main-graph layers; see the module docstring)."""
    wanted = {layer.key: layer for layer in layers}
    level: dict[str, int] = {}
    stage_of: dict[str, int] = {}
    for node in model.proto.graph.node:  # ONNX requires topological order
        lvl = max((level.get(name, 0) for name in node_reads(node)), default=0)
        layer = wanted.get(node.output[0]) if node.output else None
        if layer is not None:
            stage_of[layer.key] = lvl
            lvl += 1
        for out in node.output:
            if out:
                level[out] = lvl
    grouped: dict[int, list[Layer]] = {}
    for key, layer in wanted.items():
        grouped.setdefault(stage_of[key], []).append(layer)
    return [grouped[s] for s in sorted(grouped)]


def data_source(calibration: Any, model: Model, samples: int | None, batch_size: int | None) -> Callable[[], Any]:
    """A function returning freshly opened calibration data for each pass (see the module docstring)."""
    if replayable(calibration):
        return lambda: open_calibration(calibration, model, samples, batch_size)
    batches = list(open_calibration(calibration, model, samples, batch_size))
    return lambda: open_calibration(batches, model)


def prune_calibrated(
    model: Model,
    items: list[Item],
    data: Callable[[], Any],
    n: int,
    m: int,
    *,
    sequential: bool,
    mask_input: str | None = None,
    max_k: int = 8192,
    block_size: int = 128,
    damp: float = 0.01,
    target_damp: float = 0.1,
    bias_correction: bool = False,
    refit_iters: int = 0,
    dense_target: bool = False,
    progress: bool = False,
) -> RunReport:
    """Prune ``items`` stage by stage (or in one pass); each layer's weight is written as soon as it is solved.

    ``dense_target`` (sequential only): every stage also runs the dense model on the same batches and each
    layer is fitted to the dense model's output (``solvers.dense_target``), one more ORT run per batch.
    """
    report = RunReport()
    by_node = {item.layer.key: item for item in items}
    groups = stages(model, [i.layer for i in items]) if sequential else [[i.layer for i in items]]
    thin = []
    for it in items:
        k, g = stats_shape(it.layer)
        if it.method == "sparsegpt" and k > max_k:
            it.note = (
                f"K={k} > max-k {max_k}: wanda instead of sparsegpt (H would take "
                f"{GramStats.planned_bytes(k, g) / 2**20:.0f} MiB)"
            )
        if it.method == "wanda" or k > max_k:
            thin.append(it.layer.name)
    report.stages = len(groups)
    # The dense reference is the model with the originals of every tensor changed so far put back: external
    # originals are memory maps of the input's data file, inline ones the weights (and biases) pruned so far.
    reference: dict[str, np.ndarray] | None = {} if dense_target and len(groups) > 1 else None
    report.dense_target = reference is not None
    for index, stage in enumerate(groups):
        start = time.perf_counter()
        ref = reference if index > 0 else None  # the first stage's inputs are the dense ones anyway
        got = collect(
            model,
            stage,
            data(),
            mask_input=mask_input,
            diag_only=thin,
            progress=progress,
            reference=ref,
            desc=f"statistics, stage {index + 1}/{len(groups)}",
        )
        report.stats_seconds += time.perf_counter() - start
        release_freed_memory()  # the stage's sessions and activations are gone; the solve needs K²-sized arrays
        report.ort_passes += 1 if ref is None else 2
        report.batches, report.rows = got.batches, got.rows
        report.stats_bytes_max = max(report.stats_bytes_max, got.nbytes)
        report.unmasked.update(got.unmasked)
        start = time.perf_counter()
        for layer in stage:
            item = by_node[layer.key]
            st: GramStats = got.stats.pop(layer.name)
            outcome = prune_layer(
                model,
                layer,
                st,
                item.method,
                n,
                m,
                block_size=block_size,
                damp=damp,
                target_damp=target_damp,
                prefer=item.prefer,
                bias_correction=bias_correction,
                refit_iters=refit_iters,
            )
            if item.note:
                outcome.notes.insert(0, item.note)
            report.outcomes.append(outcome)
            if reference is not None:
                for original in outcome.originals():
                    reference.setdefault(original.name, to_array(original, model))
            log.info("%s: %s, relative output error %.4g", layer.name, outcome.method, outcome.error)
            del st
        report.solve_seconds += time.perf_counter() - start
    return report
