"""A pruning plan: which layers to prune for the largest estimated speed-up within an output-error budget.

``sensitivity`` scores each layer alone; this module turns the scores into a plan. A layer's gain is its timed
saving ``dense_ms − sparse_ms`` from a ``bench --json`` report (layers whose sparse GEMM is not faster, or gave
wrong results, gain nothing), or else its share of the weighted-layer FLOPs. Errors are assumed to add, so the
choice is a knapsack: layers are taken greedily by gain per unit of error, and the best single layer replaces
the greedy set when it alone gains more (the classic guard that keeps greedy within a factor 2 of the optimum).
The plan document is what ``--plan-out`` writes and ``prune{plan=PATH}`` reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxsparse.errors import OnnxSparseError

PLAN_VERSION = 1


@dataclass(frozen=True)
class Gains:
    """Each layer's estimated gain, and what the gains mean."""

    #: "bench": milliseconds saved per run (``dense_ms − sparse_ms``); "flops": share of the weighted FLOPs
    basis: str
    by_layer: dict[str, float]
    #: bench: the timed layers' total dense milliseconds (the speed-up's denominator)
    dense_ms: float | None = None
    notes: dict[str, str] = field(default_factory=dict)

    def speedup(self, layers: Sequence[str]) -> float | None:
        if self.basis != "bench" or not self.dense_ms:
            return None
        saved = sum(self.by_layer.get(n, 0.0) for n in layers)
        return self.dense_ms / (self.dense_ms - saved) if saved < self.dense_ms else None

    def share(self, layers: Sequence[str]) -> float:
        return sum(self.by_layer.get(n, 0.0) for n in layers)


def flop_gains(flops: Mapping[str, int], params: Mapping[str, int]) -> Gains:
    """FLOP share per layer (parameter share when any layer's GEMM shape, hence FLOPs, is unknown)."""
    if all(flops.values()):
        total = sum(flops.values())
        return Gains("flops", {n: f / total for n, f in flops.items()} if total else {})
    total = sum(params.values())
    return Gains("params", {n: p / total for n, p in params.items()} if total else {})


def bench_gains(path: str | os.PathLike[str], layers: Sequence[str]) -> Gains:
    """Per-layer savings from a ``bench --json`` report (``layers``: name, dense_ms, sparse_ms)."""
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        raise OnnxSparseError(f"--bench: cannot read {path}: {str(e).splitlines()[0][:160]}") from None
    rows = report.get("layers") if isinstance(report, dict) else None
    if not isinstance(rows, list):
        raise OnnxSparseError(f"--bench: {path} is not a `onnxsparse bench --json` report (no 'layers' list)")
    timed: dict[str, tuple[float, float]] = {}
    for row in rows:
        if isinstance(row, dict) and row.get("dense_ms") is not None and row.get("sparse_ms") is not None:
            timed[str(row.get("name"))] = (float(row["dense_ms"]), float(row["sparse_ms"]))
    if not timed:
        raise OnnxSparseError(f"--bench: {path} has no timed layer")
    wrong = {str(row.get("name")) for row in rows if isinstance(row, dict) and row.get("ok") is False}
    names = set(layers)
    if not names & set(timed):
        raise OnnxSparseError(f"--bench: none of the {len(timed)} layers timed in {path} is a layer of this model")
    gains: dict[str, float] = {}
    notes: dict[str, str] = {}
    for name in layers:
        if name not in timed:
            notes[name] = "not timed in --bench"
            continue
        dense, sparse = timed[name]
        gains[name] = max(dense - sparse, 0.0)
        if name in wrong:
            gains[name] = 0.0
            notes[name] = "wrong sparse result in --bench"
        elif sparse >= dense:
            notes[name] = "sparse not faster in --bench"
    return Gains("bench", gains, sum(d for d, _ in timed.values()), notes)


def choose_plan(scores: Mapping[str, float], gains: Mapping[str, float], budget: float) -> list[str]:
    """The layers to prune: greedy by gain per error within ``budget`` (errors add), or the best single layer.

    A layer without gain is never chosen (its error would buy nothing). Zero-error layers come first.
    """
    items = [(n, gains.get(n, 0.0), max(e, 0.0)) for n, e in scores.items() if gains.get(n, 0.0) > 0 and np.isfinite(e)]
    items.sort(key=lambda t: (-(t[1] / t[2]) if t[2] > 0 else -np.inf, -t[1], t[0]))
    chosen: list[str] = []
    spent = gain = 0.0
    for name, g, e in items:
        if spent + e <= budget:
            chosen.append(name)
            spent += e
            gain += g
    single = max((t for t in items if t[2] <= budget), key=lambda t: t[1], default=None)
    if single is not None and single[1] > gain:
        return [single[0]]
    return chosen


@dataclass
class PlanResult:
    """The chosen layers, the budget, the estimate and the measurement of the applied plan."""

    layers: list[str]
    budget: dict[str, Any]
    estimated: dict[str, Any]
    measured: dict[str, Any]
    dropped: list[str]
    measurements: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def plan_document(method: str, pattern: str, plan: PlanResult) -> dict[str, Any]:
    """What ``--plan-out`` writes and ``prune{plan=...}`` reads (``estimated`` also carries the measurement)."""
    return {
        "version": PLAN_VERSION,
        "method": method,
        "pattern": pattern,
        "layers": plan.layers,
        "estimated": {**plan.estimated, "measured": plan.measured, "budget": plan.budget},
    }


def error_of(result: Mapping[str, Any], use_cosine: bool) -> float:
    """The budgeted error of a score or measurement: rel L2, or 1 - cosine (inf where it is missing)."""
    if use_cosine:
        c = result.get("cosine")
        return float("inf") if c is None or not np.isfinite(c) else 1.0 - float(c)
    v = result.get("rel_l2")
    return float("inf") if v is None or not np.isfinite(v) else float(v)
