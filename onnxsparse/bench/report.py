"""Turn per-shape timings into the per-layer bench report: speed-ups, which layers stay dense, a model estimate.

Kept apart from the GPU code so that the arithmetic (and its JSON) is tested on CPU with hand-made timings.
The model estimate covers the timed GEMMs only ("weighted GEMMs only"): attention products between
activations, grouped convs and other non-weight work are not in it, so it is an upper bound of the
end-to-end gain; ``e2e`` turns it into an end-to-end figure from a measured total.

With epilogue timing, a layer's dense and sparse figures both include the fused bias/activation, and the
keep-dense choice is made on those fused figures; the unfused sparse time is reported beside them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from onnxsparse.bench.e2e import LayerTime
from onnxsparse.bench.gemms import GemmKey, LayerGemm


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
    #: sparse GEMM followed by separate bias/activation kernels (epilogue timing only)
    unfused_ms: float | None = None
    #: False where the sparse figure runs the activation as its own kernel (cuSPARSELt rejected fusing it)
    activation_fused: bool = True
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
        d.update(
            dense_ms=self.dense_ms,
            sparse_ms=self.sparse_ms,
            speedup=self.speedup,
            ok=self.ok,
            choice=self.choice,
            sparse_unfused_ms=self.unfused_ms,
            activation_fused=self.activation_fused,
            unfused_speedup=(self.dense_ms / self.unfused_ms) if self.dense_ms and self.unfused_ms else None,
        )
        return d

    @property
    def best_ms(self) -> float | None:
        """The layer's time as the report advises it: sparse where that was chosen, else dense."""
        return self.sparse_ms if self.choice == "sparse" else self.dense_ms


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
            #: every timed layer sparse with its epilogue as separate kernels (None without epilogue timing)
            "sparse_unfused_ms": (
                sum(r.unfused_ms for r in timed if r.unfused_ms is not None)
                if timed and all(r.unfused_ms is not None for r in timed)
                else None
            ),
        }

    def layer_times(self) -> list[LayerTime]:
        """The timed layers for the end-to-end estimate (``e2e.estimate``)."""
        return [
            LayerTime(r.layer.name, (r.layer.name, *r.layer.epilogue_nodes), r.dense_ms or 0.0, r.best_ms or 0.0)
            for r in self.timed
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "device": self.device,
            "settings": self.settings,
            "min_speedup": self.min_speedup,
            "summary": self.summary(),
            "shapes": self.shapes,
            "layers": [r.to_dict() for r in self.layers],
        }


def build_report(
    layers: Sequence[LayerGemm],
    timings: Mapping[GemmKey, Timing],
    dtype: str,
    min_speedup: float = 1.0,
    device: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
) -> BenchReport:
    """Attach each layer's shape timing; a layer whose sparse speed-up is below ``min_speedup`` stays dense."""
    results: list[LayerResult] = []
    for layer in layers:
        key = layer.key
        t = timings.get(key) if key is not None else None
        if t is None:
            results.append(LayerResult(layer))
            continue
        res = LayerResult(
            layer,
            dense_ms=t.dense_ms,
            sparse_ms=t.sparse_ms,
            ok=t.ok,
            unfused_ms=getattr(t, "sparse_unfused_ms", None),
            activation_fused=bool(getattr(t, "activation_fused", True)),
        )
        fast = res.speedup is not None and res.speedup >= min_speedup
        res.choice = "sparse" if (fast and t.ok) else "dense"
        results.append(res)
    shapes = []
    for key, t in timings.items():
        d = t.to_dict()
        d["count"] = sum(1 for layer in layers if layer.key == key)
        shapes.append(d)
    return BenchReport(
        dtype=dtype,
        layers=results,
        shapes=shapes,
        device=device or {},
        settings=settings or {},
        min_speedup=min_speedup,
    )


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
        if r.choice != "skip" and not r.activation_fused:
            note = "; ".join(p for p in (note, "2:4 activation as its own kernel (cuSPARSELt rejected fusing it)") if p)
        speed = "" if r.speedup is None else f"{r.speedup:.2f}x"
        unfused = "" if r.unfused_ms is None or not r.dense_ms else f"{r.dense_ms / r.unfused_ms:.2f}x"
        rows.append(
            [
                lg.name,
                lg.op_type,
                shape,
                lg.epilogue or "-",
                _fmt_ms(r.dense_ms),
                _fmt_ms(r.sparse_ms),
                speed,
                unfused,
                r.choice,
                note,
            ]
        )
    return rows


LAYER_HEADERS = ("layer", "op", "MxNxK", "epilogue", "dense µs", "2:4 µs", "speed-up", "unfused", "use", "note")


def shape_rows(report: BenchReport) -> list[list[Any]]:
    rows = []
    for s in report.shapes:
        unfused = s.get("sparse_unfused_ms")
        rows.append(
            [
                f"{s['m']}x{s['n']}x{s['k']}",
                s.get("epilogue") or "-",
                s["count"],
                _fmt_ms(s["dense_ms"]),
                _fmt_ms(s["sparse_ms"]),
                f"{s['speedup']:.2f}x",
                _fmt_ms(unfused),
                f"{s.get('dense_tflops') or 0:.0f}",
                f"{s.get('sparse_tflops') or 0:.0f}",
                f"{s.get('error', 0):.1e}",
                "LAUNCH-BOUND (try --mode graph)" if s.get("launch_bound") else "",
            ]
        )
    return rows


SHAPE_HEADERS = (
    "MxNxK (plan M)",
    "epilogue",
    "layers",
    "dense µs",
    "2:4 µs",
    "speed-up",
    "2:4 unfused µs",
    "dense TFLOP/s",
    "2:4 TFLOP/s",
    "error",
    "note",
)


def summary_lines(report: BenchReport) -> list[str]:
    s = report.summary()
    lines = [
        f"{s['timed_layers']} of {s['layers']} weighted layers timed ({report.dtype}); "
        f"{s['sparse_layers']} faster sparse, {len(s['keep_dense'])} should stay dense"
    ]
    if s["speedup_estimate"] is not None:
        lines.append(
            f"GEMM time (weighted GEMMs only): dense {s['dense_ms']:.3f} ms, "
            f"all 2:4 {s['sparse_all_ms']:.3f} ms, "
            f"best mix {s['best_ms']:.3f} ms → estimate {s['speedup_estimate']:.2f}x "
            f"(FLOP-weighted mean {s['flop_weighted_speedup']:.2f}x) over "
            f"{100 * (s['timed_flops_fraction'] or 0):.0f}% of the weighted layers' FLOPs"
        )
    if s["sparse_unfused_ms"] is not None and s["sparse_unfused_ms"] > 0:
        lines.append(
            f"without sparse epilogue fusion (bias/activation as separate kernels): all 2:4 "
            f"{s['sparse_unfused_ms']:.3f} ms = {s['dense_ms'] / s['sparse_unfused_ms']:.2f}x"
        )
    if s["wrong_results"]:
        lines.append(f"WRONG sparse results (kept dense): {', '.join(s['wrong_results'])}")
    return lines
