"""From per-layer GEMM timings to an end-to-end estimate, with its assumptions (CPU only).

The GEMM-time estimate of ``report`` covers the weighted GEMMs only. A model also spends time in attention
products between activations, normalisation, softmax, copies, and layers that stay dense; 2:4 sparsity
leaves all of that unchanged. So the end-to-end gain follows Amdahl's law over a measured dense total T:

    T_sparse = T − G_dense + G_sparse,   gain = T / T_sparse,

with G the model's weighted-GEMM time (each layer once per occurrence, dense with its fused epilogue vs the
faster of sparse and dense). T comes from the user's engine: ``--total-ms`` (the dense model's measured
latency), or a TensorRT per-layer profile (``trtexec --exportProfile``), whose layer times replace our dense
figures where a TensorRT layer can be matched to ours by name. Without either, the gain is printed for a
range of GEMM shares of the total instead of one number.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxsparse.errors import OnnxSparseError

#: GEMM shares of the dense total for which the gain is printed when no total is known
SHARES = (0.5, 0.7, 0.9)


@dataclass(frozen=True)
class LayerTime:
    """One timed layer as the estimate sees it: its names (ONNX node + fused epilogue nodes), dense and chosen
    ms (the faster of sparse and dense, per the bench's choice)."""

    name: str
    names: tuple[str, ...]
    dense_ms: float
    best_ms: float


def amdahl(total_ms: float, dense_gemm_ms: float, best_gemm_ms: float) -> dict[str, Any]:
    """The end-to-end figures for a dense total ``total_ms`` of which ``dense_gemm_ms`` is weighted GEMMs."""
    if total_ms <= 0:
        raise OnnxSparseError(f"the dense total must be positive (got {total_ms} ms)")
    if dense_gemm_ms > total_ms:
        raise OnnxSparseError(
            f"the weighted GEMMs alone take {dense_gemm_ms:.3f} ms, more than the dense total {total_ms:.3f} ms: "
            "the total must be measured at the same shapes and precision as the bench"
        )
    sparse_total = total_ms - dense_gemm_ms + best_gemm_ms
    return {
        "total_dense_ms": total_ms,
        "gemm_share": dense_gemm_ms / total_ms,
        "total_sparse_ms": sparse_total,
        "speedup": total_ms / sparse_total,
    }


def by_share(gemm_speedup: float, shares: Sequence[float] = SHARES) -> list[dict[str, float]]:
    """The end-to-end gain if the weighted GEMMs were ``share`` of the dense total: 1 / ((1 − p) + p / s)."""
    return [{"gemm_share": p, "speedup": 1.0 / ((1.0 - p) + p / gemm_speedup)} for p in shares]


@dataclass(frozen=True)
class ProfileEntry:
    name: str
    average_ms: float
    time_ms: float
    median_ms: float | None
    percentage: float | None


@dataclass
class TrtProfile:
    """A ``trtexec --exportProfile`` file: the iteration count and one entry per TensorRT layer."""

    count: int
    entries: list[ProfileEntry] = field(default_factory=list)

    @property
    def total_ms(self) -> float:
        """Per-inference total: the sum of the layers' average times (profiling adds a little per layer)."""
        return sum(e.average_ms for e in self.entries)


def parse_trt_profile(path: str | Path) -> TrtProfile:
    """Read the JSON trtexec writes with ``--exportProfile``: a list whose first element is ``{"count": N}``
    (timed iterations), then one ``{"name", "timeMs", "averageMs", "medianMs", "percentage"}`` per layer
    (``timeMs`` summed over the iterations; ``medianMs`` only in newer TensorRT, hence optional), as written
    by ``Profiler::exportJSONProfile`` in TensorRT's samples/common/sampleReporting.cpp."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise OnnxSparseError(f"--trt-profile: no such file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OnnxSparseError(f"--trt-profile {path}: not a JSON file ({e})") from None
    if not isinstance(data, list) or not data or not isinstance(data[0], dict) or "count" not in data[0]:
        raise OnnxSparseError(
            f"--trt-profile {path}: not a trtexec profile (expected a list starting with "
            '{"count": N}, as `trtexec --exportProfile` writes)'
        )
    entries = []
    for i, row in enumerate(data[1:], start=1):
        if not isinstance(row, dict) or "name" not in row or ("averageMs" not in row and "timeMs" not in row):
            raise OnnxSparseError(f"--trt-profile {path}: entry {i} has no name/averageMs")
        try:
            count = max(int(data[0]["count"]), 1)
            time_ms = float(row.get("timeMs", 0.0))
            avg = float(row["averageMs"]) if "averageMs" in row else time_ms / count
            median = float(row["medianMs"]) if "medianMs" in row else None
            pct = float(row["percentage"]) if "percentage" in row else None
        except (TypeError, ValueError) as e:
            raise OnnxSparseError(f"--trt-profile {path}: entry {i} ({row.get('name')!r}): {e}") from None
        entries.append(ProfileEntry(str(row["name"]), avg, time_ms, median, pct))
    if not entries:
        raise OnnxSparseError(f"--trt-profile {path}: the profile lists no layers")
    return TrtProfile(count=int(data[0]["count"]), entries=entries)


_WRAPPER = re.compile(r"^(?:PWN|PointWise|Fused|ForeignNode)?[\(\[\{]+|[\)\]\}]+$")


def _tokens(trt_name: str) -> set[str]:
    """The ONNX node names a TensorRT layer name is made of: fused layers are joined with " + ", pointwise
    fusions are wrapped as PWN(a, b). A Myelin "{ForeignNode[first...last]}" names only its ends."""
    out: set[str] = set()
    for part in re.split(r" \+ |, |\.\.\.", trt_name):
        part = part.strip()
        prev = None
        while prev != part:
            prev, part = part, _WRAPPER.sub("", part).strip()
        if part:
            out.add(part)
    return out


def profile_estimate(profile: TrtProfile, layers: Sequence[LayerTime]) -> dict[str, Any]:
    """Amdahl over a TensorRT profile: a layer matched by name takes TensorRT's time, scaled by our speed-up
    (dense/best); an entry that holds several of our layers is shared in proportion to our dense times.
    Layers TensorRT hides (e.g. inside a Myelin ForeignNode) keep our dense and best times, assumed to be
    part of the profile's total."""
    by_token: dict[str, list[int]] = {}
    for i, entry in enumerate(profile.entries):
        if entry.name.startswith("Reformatting CopyNode"):  # a layout copy named after its consumer
            continue
        for t in _tokens(entry.name):
            by_token.setdefault(t, []).append(i)
    owners: dict[int, list[LayerTime]] = {}
    unmatched: list[LayerTime] = []
    for lt in layers:
        # the GEMM node's own name first; the epilogue's nodes only where TensorRT named the layer after them
        hits = sorted(set(by_token.get(lt.name, []))) or sorted({i for n in lt.names for i in by_token.get(n, [])})
        if len(hits) == 1:
            owners.setdefault(hits[0], []).append(lt)
        else:  # not found, or spread over several entries: keep our own times
            unmatched.append(lt)
    total = profile.total_ms
    dense_gemm = best_gemm = 0.0
    matched: list[dict[str, Any]] = []
    for i, group in owners.items():
        entry = profile.entries[i]
        ours = sum(g.dense_ms for g in group) or 1.0
        for g in group:
            trt_ms = entry.average_ms * (g.dense_ms / ours)
            best = trt_ms * (g.best_ms / g.dense_ms) if g.dense_ms > 0 else trt_ms
            dense_gemm += trt_ms
            best_gemm += best
            matched.append({"layer": g.name, "trt_layer": entry.name, "trt_ms": trt_ms, "estimate_ms": best})
    for g in unmatched:
        dense_gemm += g.dense_ms
        best_gemm += g.best_ms
    result = amdahl(total, dense_gemm, best_gemm)
    result.update(
        source="trt-profile",
        profile_count=profile.count,
        profile_layers=len(profile.entries),
        matched_layers=len(matched),
        unmatched_layers=[g.name for g in unmatched],
        matched=matched,
    )
    return result


def estimate(
    layers: Sequence[LayerTime],
    total_ms: float | None = None,
    profile: TrtProfile | None = None,
    shares: Sequence[float] = SHARES,
) -> dict[str, Any]:
    """The end-to-end section of the report: Amdahl from a total or a profile, else the gain by GEMM share."""
    dense = sum(lt.dense_ms for lt in layers)
    best = sum(lt.best_ms for lt in layers)
    gemm_speedup = dense / best if best > 0 else None
    out: dict[str, Any] = {
        "gemm_dense_ms": dense,
        "gemm_best_ms": best,
        "gemm_speedup": gemm_speedup,
        "assumptions": assumptions(total_ms is not None, profile is not None),
    }
    if profile is not None:
        out["e2e"] = profile_estimate(profile, layers)
    elif total_ms is not None:
        out["e2e"] = dict(amdahl(total_ms, dense, best), source="total-ms")
    if gemm_speedup is not None:
        out["by_share"] = by_share(gemm_speedup, shares)
    return out


def assumptions(total: bool, profile: bool) -> list[str]:
    lines = [
        "'weighted GEMMs only': the GEMM-time figure covers the timed weighted layers, each with the epilogue "
        "the graph applies (bias, Relu/Gelu) fused on both sides; attention products, normalisation, softmax, "
        "copies and untimed layers are not in it",
        "end to end = Amdahl: sparse total = dense total - dense GEMM time + sparse GEMM time; everything else "
        "is assumed unchanged, and the GEMMs to run in the engine as fast as cuBLASLt / cuSPARSELt do here "
        "(same GPU, same shapes, one tuned plan per shape)",
    ]
    if profile:
        lines.append(
            "TensorRT profile: the total is the sum of the layers' average times (per-layer profiling "
            "adds a little to each); layers matched by name take TensorRT's time scaled by our speed-up, "
            "the others keep our times and are assumed to be inside the total"
        )
    elif total:
        lines.append("--total-ms is the dense model's latency measured at the same shapes and precision")
    else:
        lines.append(
            "no measured total (--total-ms or --trt-profile): the gain is shown for a GEMM share of "
            f"{', '.join(f'{p:.0%}' for p in SHARES)} of the dense total"
        )
    return lines


def summary_lines(section: dict[str, Any]) -> list[str]:
    """Text for the end of the bench report."""
    lines = []
    if section.get("gemm_speedup") is not None:
        lines.append(
            f"weighted GEMMs only: dense {section['gemm_dense_ms']:.3f} ms -> "
            f"{section['gemm_best_ms']:.3f} ms = {section['gemm_speedup']:.2f}x (not the model's gain)"
        )
    e2e = section.get("e2e")
    if e2e:
        src = "TensorRT profile" if e2e["source"] == "trt-profile" else "--total-ms"
        lines.append(
            f"end to end ({src}): dense {e2e['total_dense_ms']:.3f} ms, GEMM share "
            f"{e2e['gemm_share']:.0%} -> sparse {e2e['total_sparse_ms']:.3f} ms = {e2e['speedup']:.2f}x"
        )
        if e2e["source"] == "trt-profile":
            lines.append(
                f"  {e2e['matched_layers']} layers matched to TensorRT layers by name, "
                f"{len(e2e['unmatched_layers'])} kept our times"
            )
    elif section.get("by_share"):
        lines.append(
            "end to end, by the weighted GEMMs' share of the dense total: "
            + ", ".join(f"{s['gemm_share']:.0%} -> {s['speedup']:.2f}x" for s in section["by_share"])
        )
    lines.extend(f"assumption: {a}" for a in section.get("assumptions", []))
    return lines
