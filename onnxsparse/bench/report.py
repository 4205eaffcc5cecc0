"""Turn per-shape timings into the per-layer bench report: speed-ups, which layers stay dense, a model estimate.

Kept apart from the GPU code so that the arithmetic (and its JSON) is tested on CPU with hand-made timings.
The model estimate covers the timed GEMMs only: attention products between activations, grouped convs and
other non-weight work are not in it, so it is an upper bound of the end-to-end gain, and says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from onnxsparse.bench.gemms import LayerGemm


class Timing(Protocol):
    """What the report needs of a measurement (``gpu.GemmTiming`` has it; tests build their own)."""

    dense_ms: float
    sparse_ms: float
    ok: bool

    def to_dict(self) -> dict[str, Any]: ...


@dataclass
class LayerResult:
    layer: LayerGemm
    dense_ms: float | None = None
    sparse_ms: float | None = None
    ok: bool = True
    #: "sparse" (faster sparse), "dense" (sparse not faster: keep dense), "skip" (not timed: see reason)
    choice: str = "skip"

    @property
    def speedup(self) -> float | None:
        if self.dense_ms is None or not self.sparse_ms:
            return None
        return self.dense_ms / self.sparse_ms

    def to_dict(self) -> dict[str, Any]:
        d = self.layer.to_dict()
        d.update(dense_ms=self.dense_ms, sparse_ms=self.sparse_ms, speedup=self.speedup, ok=self.ok,
                 choice=self.choice)
        return d


@dataclass
class BenchReport:
    dtype: str
    layers: list[LayerResult]
    shapes: list[dict[str, Any]] = field(default_factory=list)
    device: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    min_speedup: float = 1.0

    @property
    def timed(self) -> list[LayerResult]:
        return [r for r in self.layers if r.dense_ms is not None and r.sparse_ms is not None]

    def summary(self) -> dict[str, Any]:
        """Totals over the timed layers (each layer counted once per occurrence in the model)."""
        timed = self.timed
        dense = sum(r.dense_ms for r in timed if r.dense_ms is not None)
        sparse_all = sum(r.sparse_ms for r in timed if r.sparse_ms is not None)
        best = sum(r.sparse_ms if r.choice == "sparse" else r.dense_ms for r in timed)  # type: ignore[misc]
        flops_timed = sum(r.layer.flops for r in timed)
        flops_all = sum(r.layer.flops for r in self.layers)
        weighted = (sum(r.layer.flops * (r.speedup or 0.0) for r in timed) / flops_timed) if flops_timed else None
        return {
            "layers": len(self.layers),
            "timed_layers": len(timed),
            "sparse_layers": sum(r.choice == "sparse" for r in timed),
            "keep_dense": [r.layer.name for r in timed if r.choice == "dense"],
            "wrong_results": [r.layer.name for r in timed if not r.ok],
            "dense_ms": dense,
            "sparse_all_ms": sparse_all,
            "best_ms": best,
            #: time-based estimate over the timed GEMMs, each layer sparse only where that is faster
            "speedup_estimate": dense / best if best else None,
            #: mean of per-layer speed-ups weighted by each layer's FLOPs (sparse everywhere)
            "flop_weighted_speedup": weighted,
            "timed_flops_fraction": flops_timed / flops_all if flops_all else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "device": self.device, "settings": self.settings,
                "min_speedup": self.min_speedup, "summary": self.summary(), "shapes": self.shapes,
                "layers": [r.to_dict() for r in self.layers]}


def build_report(layers: Sequence[LayerGemm], timings: Mapping[tuple[int, int, int], Timing], dtype: str,
                 min_speedup: float = 1.0, device: dict[str, Any] | None = None,
                 settings: dict[str, Any] | None = None) -> BenchReport:
    """Attach each layer's shape timing; a layer whose sparse speed-up is below ``min_speedup`` stays dense."""
    results: list[LayerResult] = []
    for layer in layers:
        key = layer.key
        t = timings.get(key) if key is not None else None
        if t is None:
            results.append(LayerResult(layer))
            continue
        res = LayerResult(layer, dense_ms=t.dense_ms, sparse_ms=t.sparse_ms, ok=t.ok)
        fast = res.speedup is not None and res.speedup >= min_speedup
        res.choice = "sparse" if (fast and t.ok) else "dense"
        results.append(res)
    shapes = []
    for key, t in timings.items():
        d = t.to_dict()
        d["count"] = sum(1 for layer in layers if layer.key == key)
        shapes.append(d)
    return BenchReport(dtype=dtype, layers=results, shapes=shapes, device=device or {}, settings=settings or {},
                       min_speedup=min_speedup)


def _fmt_ms(v: float | None) -> str:
    return "" if v is None else f"{v * 1000:.1f}"


def layer_rows(report: BenchReport) -> list[list[Any]]:
    """Rows for ``render.table`` (times in µs per launch)."""
    rows = []
    for r in report.layers:
        lg = r.layer
        shape = "" if lg.m is None else f"{lg.m}x{lg.n}x{lg.k}"
        if r.choice == "skip":
            note = lg.reason or ("not timed" if lg.key is None else "no timing")
        elif not r.ok:
            note = "WRONG sparse result: keep dense"
        elif r.choice == "dense":
            note = "sparse slower: keep dense"
        else:
            note = ""
        speed = "" if r.speedup is None else f"{r.speedup:.2f}x"
        rows.append([lg.name, lg.op_type, shape, _fmt_ms(r.dense_ms), _fmt_ms(r.sparse_ms), speed, r.choice, note])
    return rows


LAYER_HEADERS = ("layer", "op", "MxNxK", "dense µs", "2:4 µs", "speed-up", "use", "note")


def shape_rows(report: BenchReport) -> list[list[Any]]:
    rows = []
    for s in report.shapes:
        rows.append([f"{s['m']}x{s['n']}x{s['k']}", s["count"], _fmt_ms(s["dense_ms"]), _fmt_ms(s["sparse_ms"]),
                     f"{s['speedup']:.2f}x", f"{s.get('dense_tflops') or 0:.0f}", f"{s.get('sparse_tflops') or 0:.0f}",
                     f"{s.get('error', 0):.1e}", "LAUNCH-BOUND (try --mode graph)" if s.get("launch_bound") else ""])
    return rows


SHAPE_HEADERS = ("MxNxK (padded M)", "layers", "dense µs", "2:4 µs", "speed-up", "dense TFLOP/s", "2:4 TFLOP/s",
                 "error", "note")


def summary_lines(report: BenchReport) -> list[str]:
    s = report.summary()
    lines = [f"{s['timed_layers']} of {s['layers']} weighted layers timed ({report.dtype}); "
             f"{s['sparse_layers']} faster sparse, {len(s['keep_dense'])} should stay dense"]
    if s["speedup_estimate"] is not None:
        lines.append(f"GEMM time: dense {s['dense_ms']:.3f} ms, all 2:4 {s['sparse_all_ms']:.3f} ms, "
                     f"best mix {s['best_ms']:.3f} ms → estimate {s['speedup_estimate']:.2f}x "
                     f"(FLOP-weighted mean {s['flop_weighted_speedup']:.2f}x) over "
                     f"{100 * (s['timed_flops_fraction'] or 0):.0f}% of the weighted layers' FLOPs")
    if s["wrong_results"]:
        lines.append(f"WRONG sparse results (kept dense): {', '.join(s['wrong_results'])}")
    return lines
