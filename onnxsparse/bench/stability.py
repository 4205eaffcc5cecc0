"""Timing stability without a GPU: wait for a steady measurement, and compare repeated bench runs.

Why: on the H100 the per-launch time of the same product moved by up to 8% between three ``bench`` runs of
one call (BERT-base FFN-up, dense and sparse alike, 38.6 µs in the first run against 35.2-35.5 µs in the
next two) while the speed-up agreed within 0.4%: a clock / power state, not the kernels. Clocks settle
under sustained load over seconds, so a fixed count of warm-up launches is not enough; ``settle`` keeps
measuring until two consecutive blocks agree. The logic is kept here, apart from torch, so that it is
tested on CPU with made-up measurements and a fake clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Settled:
    """How a warm-up ended: its duration, every block's measurement, and whether two blocks agreed."""

    seconds: float
    blocks: list[float] = field(default_factory=list)
    settled: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def agree(a: float, b: float, tol: float) -> bool:
    """True when ``a`` and ``b`` differ by at most ``tol`` relative to the larger (both positive)."""
    hi = max(abs(a), abs(b))
    return hi > 0 and abs(a - b) <= tol * hi


def settle(
    measure: Callable[[], float],
    min_s: float,
    max_s: float,
    tol: float = 0.01,
    clock: Callable[[], float] = time.perf_counter,
) -> Settled:
    """Call ``measure`` (one block of load, returning its time per unit) until at least ``min_s`` seconds
    have passed and the last two blocks agree within ``tol``, or until ``max_s`` seconds have passed.

    At least two blocks always run (one block cannot be compared with anything). ``max_s`` below ``min_s``
    is read as ``min_s``: the minimum is a promise of load, the maximum only a bound on waiting.
    """
    max_s = max(max_s, min_s)
    t0 = clock()
    blocks: list[float] = []
    while True:
        blocks.append(float(measure()))
        elapsed = clock() - t0
        steady = len(blocks) >= 2 and agree(blocks[-1], blocks[-2], tol)
        if len(blocks) >= 2 and ((elapsed >= min_s and steady) or elapsed >= max_s):
            return Settled(seconds=elapsed, blocks=blocks, settled=steady)


def max_deviation(values: Sequence[float]) -> float:
    """Largest relative distance of a value from the mean of ``values`` (0.05 = ±5%)."""
    if not values:
        raise ValueError("no values")
    mean = sum(values) / len(values)
    if mean == 0:
        return 0.0 if all(v == 0 for v in values) else float("inf")
    return max(abs(v - mean) for v in values) / abs(mean)


_METRICS = ("dense_ms", "sparse_ms", "speedup")


def compare_runs(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-layer spread of ``bench --json`` reports of the same model: for each timed layer and each of
    dense time, sparse time and speed-up, the values of every run and their largest deviation from the mean.

    Layers are matched by name; a layer timed in some runs only is an error (the runs did not bench the same
    thing). ``worst`` holds each metric's largest deviation over all layers and the layer it came from.
    """
    if len(reports) < 2:
        raise ValueError("need at least two reports to compare")
    per_run = []
    for report in reports:
        layers = {
            lg["name"]: lg
            for lg in report["layers"]
            if lg.get("dense_ms") is not None and lg.get("sparse_ms") is not None
        }
        per_run.append(layers)
    names = list(per_run[0])
    for i, layers in enumerate(per_run[1:], start=2):
        if set(layers) != set(names):
            diff = sorted(set(layers) ^ set(names))
            raise ValueError(f"run {i} timed other layers than run 1 (e.g. {diff[0]})")
    rows = []
    worst: dict[str, dict[str, Any]] = {m: {"deviation": 0.0, "layer": None} for m in _METRICS}
    for name in names:
        row: dict[str, Any] = {"name": name, "shape": [per_run[0][name][d] for d in ("m", "n", "k")]}
        for metric in _METRICS:
            values = [float(layers[name][metric]) for layers in per_run]
            dev = max_deviation(values)
            row[metric] = values
            row[metric + "_deviation"] = dev
            if dev > worst[metric]["deviation"]:
                worst[metric] = {"deviation": dev, "layer": name}
        rows.append(row)
    return {"runs": len(reports), "layers": rows, "worst": worst}
